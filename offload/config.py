"""ModelConfig: the Mixtral architecture read from a checkpoint's config.json.

Two dialects are accepted: the hub's Mixtral (top-level ``rope_theta``, ``torch_dtype``) and
transformers 5 ``save_pretrained`` (``rope_parameters.rope_theta``, ``dtype``, ``head_dim: null``).
Unknown keys are ignored, as mlx-lm does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload.errors import ConfigError, OffloadError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Far above any released MoE (DeepSeek-V3: 61 layers x 256 experts), yet small enough that a config.json
# claiming billions of layers or experts fails here instead of in a loop or a huge allocation later.
MAX_LAYERS = 4096
MAX_EXPERTS = 4096
MAX_TOTAL_EXPERTS = 2**16  # layers x experts per layer
MAX_WIDTH = 2**20  # hidden_size, intermediate_size, head_dim, heads
MAX_VOCAB = 2**24
MAX_CONTEXT = 2**27
MAX_JSON_BYTES = 64 * 2**20  # config.json, the shard index, a chat save: all far smaller in practice


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # rows of the embedding and of lm_head
    hidden_size: int  # D: the residual stream width
    intermediate_size: int  # F: each expert's SwiGLU width
    num_hidden_layers: int  # L: decoder blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA: divides num_attention_heads)
    num_local_experts: int  # E: experts per MoE block
    num_experts_per_tok: int  # k: experts each token is routed to
    head_dim: int  # width of one attention head
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    rope_theta: float = 1e6  # RoPE base
    max_position_embeddings: int = 32768  # the context window
    sliding_window: int | None = None  # attend to at most this many past positions, if set
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    bos_token_id: int | None = 1  # begin-of-sequence id
    eos_token_id: int | None = 2  # end-of-sequence id
    torch_dtype: str = "bfloat16"  # the dtype the checkpoint was saved in
    quantization: dict[str, Any] | None = field(default=None, compare=False)  # written by convert

    @property
    def kv_groups(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Validate a parsed config.json; errors name ``source`` and the key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ConfigError(f"{source}: model_type is {_short(model_type)}; only 'mixtral' is supported")

        def need(key: str, kind: type = int) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: missing key {key!r}")
            return _typed(raw[key], key, kind, source)

        def opt(key: str, default: Any, kind: type) -> Any:
            value = raw.get(key)
            return default if value is None else _typed(value, key, kind, source)

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = opt("num_key_value_heads", heads, int)
        rope_parameters = raw.get("rope_parameters")
        if isinstance(rope_parameters, dict) and rope_parameters.get("rope_theta") is not None:
            rope_theta = _typed(rope_parameters["rope_theta"], "rope_parameters.rope_theta", float, source)
        else:
            rope_theta = opt("rope_theta", 1e6, float)
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        if dtype not in DTYPE_NAMES:
            raise ConfigError(f"{source}: torch_dtype {_short(dtype)} is not one of {', '.join(DTYPE_NAMES)}")
        sliding_window = raw.get("sliding_window")
        config = cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            num_local_experts=need("num_local_experts"),
            num_experts_per_tok=need("num_experts_per_tok"),
            head_dim=opt("head_dim", hidden // heads if heads > 0 else 0, int),
            rms_norm_eps=opt("rms_norm_eps", 1e-5, float),
            rope_theta=rope_theta,
            max_position_embeddings=opt("max_position_embeddings", 32768, int),
            sliding_window=None
            if sliding_window is None
            else _typed(sliding_window, "sliding_window", int, source),
            tie_word_embeddings=opt("tie_word_embeddings", False, bool),
            bos_token_id=opt("bos_token_id", None, int),
            eos_token_id=_eos(raw.get("eos_token_id"), source),
            torch_dtype=dtype,
            quantization=raw.get("quantization"),
        )
        config._check(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read and validate ``path`` (a config.json)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a model directory needs a config.json)")
        return cls.from_dict(read_json(path, ConfigError), source=str(path))

    def _check(self, source: str) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "num_local_experts",
            "num_experts_per_tok",
            "head_dim",
            "max_position_embeddings",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(
                    f"{source}: {key} must be a positive integer, got {_short(getattr(self, key))}"
                )
        limits = {
            "num_hidden_layers": MAX_LAYERS,
            "num_local_experts": MAX_EXPERTS,
            "vocab_size": MAX_VOCAB,
            "max_position_embeddings": MAX_CONTEXT,
            **dict.fromkeys(
                ("hidden_size", "intermediate_size", "head_dim", "num_attention_heads"), MAX_WIDTH
            ),
        }
        for key, limit in limits.items():
            if getattr(self, key) > limit:
                raise ConfigError(
                    f"{source}: {key} {_short(getattr(self, key))} is beyond what offload supports ({limit})"
                )
        if self.num_hidden_layers * self.num_local_experts > MAX_TOTAL_EXPERTS:
            raise ConfigError(
                f"{source}: {self.num_hidden_layers} layers x {self.num_local_experts} experts is beyond what "
                f"offload supports ({MAX_TOTAL_EXPERTS} experts in all)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{source}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"{source}: num_experts_per_tok {self.num_experts_per_tok} is more than "
                f"num_local_experts {self.num_local_experts}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim {self.head_dim} must be even for RoPE")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(f"{source}: rms_norm_eps and rope_theta must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"{source}: sliding_window must be a positive integer or null")


def read_json(path: Path, error: type[OffloadError]) -> Any:
    """Parse the JSON file ``path``; any damage (too big, not UTF-8, not JSON, NaN) raises ``error``."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size} bytes is too large for this JSON file (at most {MAX_JSON_BYTES})")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read it ({_reason(err)})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, NaN or Infinity, or an integer of thousands of digits
        raise error(f"{path}: not valid JSON ({_reason(err)})") from None


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON and are never a valid size or weight.
    raise ValueError(f"{name} is not a JSON number")


def _reason(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _typed(value: Any, key: str, kind: type, source: str) -> Any:
    # bool is an int in Python; a config that says `"hidden_size": true` is still wrong.
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: {key} must be an integer, got {_short(value)}")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {_short(value)}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {_short(value)}")
        # A huge integer overflows float(); inf and NaN pass every "> 0" check but poison the model.
        number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {key} must be a finite number, got {_short(value)}")
        return number
    return value


def _short(value: Any) -> str:
    """``value`` for an error message: at most 60 characters."""
    if isinstance(value, int) and abs(value) > 2**64:
        return f"an integer of {value.bit_length()} bits"  # repr of a 4,300-digit int raises
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _eos(value: Any, source: str) -> int | None:
    # Some configs list several EOS ids; the first is the one the chat template writes.
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else _typed(value, "eos_token_id", int, source)
