"""The engine as the CLI sees it: a loaded model with its tokenizer and the options it was loaded with."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload.checkpoint.hub import model_dir
from offload.config import ModelConfig
from offload.errors import OffloadError
from offload.generate import Response, SamplingParams, check_text_fits, stream_generate
from offload.kv_cache import KVCache
from offload.model import MixtralModel
from offload.settings.flags import LoadFlags
from offload.settings.resolve import RunSettings


@dataclass(frozen=True)
class ResolvedModel:
    """A model found and its settings resolved: everything checked that can be without reading a weight.

    ``offload.engine.resolve_model`` makes one; ``Engine.load`` loads it. Resolving once and passing the
    result along is what keeps the directory found once, config.json parsed once, and the profile and
    flags merged once.
    """

    directory: Path
    config: ModelConfig
    settings: RunSettings
    flags: LoadFlags

    def with_offload(self, **changes: Any) -> ResolvedModel:
        """A copy whose offload options have ``changes`` (bench and trace record derive theirs this way)."""
        return dataclasses.replace(self, settings=self.settings.with_offload(**changes))


def resolve_model(model: str | Path | None = None, flags: LoadFlags | None = None) -> ResolvedModel:
    """Find ``model`` (default: the demo model), read its config.json and resolve ``flags`` against it.

    A bad flag, a bad config or a missing directory fails here, before any weight is read.
    """
    from offload.settings.resolve import resolve_settings

    flags = flags or LoadFlags()
    directory = model_dir(model)
    config = ModelConfig.from_file(directory / "config.json")  # a bad config is reported first
    return ResolvedModel(directory, config, resolve_settings(config, flags), flags)


@dataclass
class Engine:
    model: MixtralModel
    tokenizer: Any  # offload.tokenizer.Tokenizer; None when loaded with tokenizer=False
    directory: Path

    settings: Any = None  # offload.settings.resolve.RunSettings
    end_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id ids: a reply stops at any of them

    @classmethod
    def load(
        cls,
        model: str | Path | ResolvedModel | None = None,
        flags: LoadFlags | None = None,
        *,
        progress: Any = None,
        tokenizer: bool = True,
    ) -> Engine:
        """Load ``model`` (default: the demo model) and its tokenizer: the one loader every command uses.

        ``model`` is a directory or repo id, resolved here with ``flags`` (unset ones come from the
        profile), or a ``ResolvedModel`` already resolved. torch's CPU threads are set to the settings'
        before anything heavy runs.
        """
        import torch

        from offload.checkpoint.generation_config import end_ids
        from offload.checkpoint.reader import Checkpoint
        from offload.loading import load_model
        from offload.settings.flags import check_offload_flags
        from offload.tokenizer import Tokenizer

        if isinstance(model, ResolvedModel):
            if flags is not None:
                raise TypeError("give flags to resolve_model, not with a ResolvedModel")
            resolved = model
        else:
            resolved = resolve_model(model, flags)
        settings = resolved.settings
        flags = resolved.flags  # the user's: a flag that would do nothing is refused before anything loads
        check_offload_flags(
            flags,
            offloaded=settings.offload.experts_per_layer is not None,
            host_tier=settings.offload.host_memory_gib is not None,
            profile=settings.profile_name,
        )
        torch.set_num_threads(settings.threads)
        loaded_tokenizer = Tokenizer.from_dir(resolved.directory) if tokenizer else None
        if loaded_tokenizer is not None:
            loaded_tokenizer.check_fits(resolved.config.vocab_size, resolved.directory / "config.json")
        mixtral = load_model(
            Checkpoint(resolved.directory, resolved.config),
            device=settings.device,
            dtype=settings.dtype,
            quant=settings.quant,
            offload=settings.offload,
            progress=progress,
        )
        ends = end_ids(resolved.directory, resolved.config.vocab_size)
        return cls(mixtral, loaded_tokenizer, resolved.directory, settings, ends)

    def sampling(
        self,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        *,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: tuple[tuple[int, float], ...] = (),
    ) -> SamplingParams:
        """Sampling from the flags, falling back to the profile's generation defaults (min-p, the repetition
        penalty and OpenAI's penalties and logit bias, which profiles do not set, default to off).
        """
        defaults = self.settings.generation
        return SamplingParams(
            temperature=defaults.temperature if temperature is None else temperature,
            top_p=defaults.top_p if top_p is None else top_p,
            top_k=defaults.top_k if top_k is None else top_k,
            seed=seed,
            min_p=0.0 if min_p is None else min_p,
            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
        )

    def max_new_tokens(self, requested: int | None, prompt_tokens: int = 0) -> int:
        """The flag as given; else the profile's default, capped by the context left after the prompt."""
        if requested is not None:
            return requested
        room = self.model.config.max_position_embeddings - prompt_tokens
        return max(0, min(self.settings.generation.max_new_tokens, room))

    def prompt_ids(self, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """The prompt as ids: a one-turn Mixtral-Instruct chat, or raw text after BOS.

        Text that cannot fit the context is refused before it is tokenized (ContextError); a system prompt
        without the chat template, which is what places it, is refused too.
        """
        if system is not None and not chat:
            raise OffloadError(
                "a system prompt needs the chat template, and this prompt is raw text (no chat)"
            )
        context = self.model.config.max_position_embeddings
        check_text_fits(prompt, context)
        if system:
            check_text_fits(system, context, "the system prompt")
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
        continues_text: bool = False,
    ) -> Iterator[Response]:
        """Stream the reply to ``prompt_ids`` (see ``stream_generate``); ``continues_text`` for a raw completion."""
        stop_ids = {self.tokenizer.eos_id, self.model.config.eos_token_id, *self.end_ids} - {None}
        return stream_generate(
            self.model,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_ids=stop_ids,
            stop_strings=stop_strings,
            tokenizer=self.tokenizer,
            cache=cache,
            continues_text=continues_text,
        )

    def summary(self) -> str:
        """One line: where the weights went."""
        model = self.model
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
        dense = sum(t.numel() * t.element_size() for t in tensors)
        experts = model.expert_source.describe()
        dtype = str(model.dtype).removeprefix("torch.")
        return f"{self.directory.name}: dense weights {dense / 2**20:.1f} MiB on {model.device} ({dtype}); {experts}"

    def host_tier_stats(self) -> dict[str, Any] | None:
        """The host tier's budget, bytes held and counters, when experts are read from disk (--host-memory)."""
        tier = getattr(self.model.expert_source, "host_tier", None)
        return None if tier is None else tier.summary()

    def cache_stats(self) -> dict[str, Any] | None:
        """The expert cache's counters, when the experts are offloaded."""
        stats = self.model.expert_source.stats
        return stats.as_dict() if stats is not None else None
