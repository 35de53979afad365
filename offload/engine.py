"""The engine as the CLI sees it: a loaded model with its tokenizer and the options it was loaded with."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload.checkpoint import resolve_model_dir
from offload.errors import OffloadError
from offload.generate import Response, SamplingParams, stream_generate
from offload.kv_cache import KVCache
from offload.model import MixtralModel

DEMO_MODEL = Path(__file__).resolve().parent / "demo"


def default_model() -> Path:
    """The bundled demo model, used when no --model is given."""
    if not (DEMO_MODEL / "config.json").is_file():
        raise OffloadError(f"the bundled demo model is missing from {DEMO_MODEL}; pass --model DIR")
    return DEMO_MODEL


@dataclass
class Engine:
    model: MixtralModel
    tokenizer: Any  # offload.tokenizer.Tokenizer
    directory: Path

    @classmethod
    def load(cls, model: str | Path | None = None, **load_options: Any) -> Engine:
        """Load ``model`` (default: the demo model) and its tokenizer. Options go to ``load_model``."""
        from offload.config import ModelConfig
        from offload.loading import load_model
        from offload.tokenizer import Tokenizer

        directory = resolve_model_dir(model) if model is not None else default_model()
        ModelConfig.from_file(directory / "config.json")  # a bad config is reported before anything else
        tokenizer = Tokenizer.from_dir(directory)
        return cls(load_model(directory, **load_options), tokenizer, directory)

    def prompt_ids(self, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """The prompt as ids: a one-turn Mixtral-Instruct chat, or raw text after BOS."""
        if not chat:
            return self.tokenizer.encode(prompt, add_bos=True)
        messages = [{"role": "system", "content": system}] if system else []
        return self.tokenizer.encode_chat([*messages, {"role": "user", "content": prompt}])

    def stream(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingParams,
        stop_strings: tuple[str, ...] = (),
        cache: KVCache | None = None,
    ) -> Iterator[Response]:
        """Stream the reply to ``prompt_ids`` (see ``stream_generate``)."""
        stop_ids = {self.tokenizer.eos_id, self.model.config.eos_token_id} - {None}
        return stream_generate(
            self.model,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_ids=stop_ids,
            stop_strings=stop_strings,
            tokenizer=self.tokenizer,
            cache=cache,
        )

    def summary(self) -> str:
        """One line: where the weights went."""
        model = self.model
        dense = sum(p.numel() * p.element_size() for p in model.parameters())
        describe = getattr(model.expert_source, "describe", None)
        experts = describe() if describe is not None else "every expert resident on the device"
        return (
            f"{self.directory.name}: dense weights {dense / 2**20:.1f} MiB on {model.device} ({model.dtype}); "
            f"{experts}"
        )

    def cache_stats(self) -> dict[str, Any] | None:
        """The expert cache's counters, when the experts are offloaded."""
        stats = getattr(self.model.expert_source, "stats", None)
        return stats.as_dict() if stats is not None else None
