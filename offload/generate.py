"""Prefill, single-token decode on the KV cache, sampling, stop rules and streaming.

``stream_generate`` yields one ``Response`` per generated token (text piece included), then stops;
the last response carries ``finish_reason`` and the timings.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from offload.errors import ContextError, OffloadError
from offload.kv_cache import KVCache
from offload.model import MixtralModel
from offload.settings.limits import (
    MAX_LOGIT_BIAS,
    MAX_OPENAI_PENALTY,
    MAX_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    MIN_PENALTY,
    MIN_TEMPERATURE,
)

NON_FINITE_LOGITS = (
    "the model produced NaN or inf logits (weights overflow in this dtype, or a damaged checkpoint); "
    "try --dtype float32"
)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The steps run in transformers' order: repetition penalty (then
    OpenAI's logit bias and penalties), temperature, top-k, top-p, min-p; greedy (temperature 0) takes the
    best token after the penalties.
    """

    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    seed: int | None = None  # fixes the random stream
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest one; 0 keeps all
    # Every id already in the prompt or the reply has its logit divided by this when positive and
    # multiplied by it when negative (transformers' and llama.cpp's rule); 1 is off, > 1 discourages repeats.
    repetition_penalty: float = 1.0
    # OpenAI's rules, over the reply's own tokens (as vLLM counts them): each id's logit loses
    # presence_penalty once it has appeared and frequency_penalty times its count; 0 is off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit before sampling)

    def __post_init__(self) -> None:
        # NaN passes every comparison below, and a temperature too small or too large turns the logits
        # into inf or NaN, which would then read as a damaged checkpoint: refuse them as settings.
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise OffloadError(
                f"temperature must be 0 (greedy) or {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}, got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise OffloadError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OffloadError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise OffloadError(f"seed must be from 0 to {MAX_SEED} (64 bits), got {self.seed}")
        if not 0 <= self.min_p <= 1:  # written so that NaN fails too
            raise OffloadError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY:  # NaN fails too
            raise OffloadError(
                f"repetition_penalty must be {MIN_PENALTY:g} to {MAX_PENALTY:g} (1 = off), "
                f"got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_OPENAI_PENALTY <= getattr(self, name) <= MAX_OPENAI_PENALTY:
                raise OffloadError(
                    f"{name} must be {-MAX_OPENAI_PENALTY:g} to {MAX_OPENAI_PENALTY:g} (0 = off), "
                    f"got {getattr(self, name)}"
                )
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise OffloadError(
                    f"logit_bias needs token ids >= 0 and biases from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}, "
                    f"got {token_id}: {bias}"
                )


class Sampler:
    """Picks the next token from (V,) logits; built once per generation, it remembers the ids seen."""

    def __init__(self, params: SamplingParams, device: torch.device, seen: Iterable[int] = ()) -> None:
        self.params = params
        self.device = device
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self._seen: set[int] = set()
        self._seen_ids: Tensor | None = None  # the seen ids on the device, rebuilt when one is added
        # The reply's ids and how often each came (the OpenAI penalties).
        self._reply_counts: dict[int, int] = {}
        self._adjustment: Tensor | None = None  # (V,) the OpenAI penalties and logit_bias, built at first use
        self._remember(seen)

    def observe(self, ids: Iterable[int]) -> None:
        """Note ids the reply has just added to the text (the penalties' memory)."""
        ids = [int(i) for i in ids]
        self._remember(ids)
        params = self.params
        if not (params.presence_penalty or params.frequency_penalty):
            return
        for token_id in ids:
            count = self._reply_counts.get(token_id, 0)
            self._reply_counts[token_id] = count + 1
            if self._adjustment is not None:  # kept up to date in place: no rebuild of V logits per token
                self._adjustment[token_id] -= params.frequency_penalty + (
                    params.presence_penalty if count == 0 else 0
                )

    def _remember(self, ids: Iterable[int]) -> None:
        if self.params.repetition_penalty == 1:
            return
        before = len(self._seen)
        self._seen.update(int(i) for i in ids)
        if len(self._seen) != before:
            self._seen_ids = None

    def __call__(self, logits: Tensor) -> Tensor:
        """A 0-d tensor holding the chosen id (on the logits' device, so nothing syncs here)."""
        if self.params.temperature == 0:
            logits = self._penalized(logits)
            best = logits.argmax()
            # argmax picks a NaN or +inf when there is one, so checking the chosen logit (one value,
            # not the row) catches what the sampling path catches, at no cost to the decode step.
            if not torch.isfinite(logits[best]):
                raise OffloadError(NON_FINITE_LOGITS)
            return best
        return torch.multinomial(self.weights(logits), 1, generator=self.generator)[0]

    def weights(self, logits: Tensor) -> Tensor:
        """(V,) weights proportional to the probability of drawing each id (not normalised: the draw
        does not need it). Raises OffloadError on NaN or inf logits. Not for temperature 0.
        """
        params = self.params
        logits = self._penalized(logits).float() / params.temperature
        if params.top_k and params.top_k < logits.shape[-1]:
            kth_best = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if not torch.isfinite(probs).all():
            raise OffloadError(NON_FINITE_LOGITS)
        if params.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        if params.min_p > 0:
            # Relative to the likeliest token, which always stays (min_p <= 1).
            probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        return probs

    def _penalized(self, logits: Tensor) -> Tensor:
        params = self.params
        if params.repetition_penalty != 1 and self._seen:
            logits = logits.float()
            if self._seen_ids is None:
                self._seen_ids = torch.tensor(sorted(self._seen), device=self.device)
            ids = self._seen_ids
            scores = logits.gather(0, ids)
            penalty = params.repetition_penalty
            logits = logits.scatter(0, ids, torch.where(scores > 0, scores / penalty, scores * penalty))
        if params.logit_bias or self._reply_counts:
            if self._adjustment is None:
                self._adjustment = self._openai_adjustment(logits.shape[-1])
            logits = logits.float() + self._adjustment
        return logits

    def _openai_adjustment(self, vocab_size: int) -> Tensor:
        """(V,) what OpenAI's rules add to the logits now: the bias, less the reply's penalties."""
        adjustment = torch.zeros(vocab_size)
        for token_id, bias in self.params.logit_bias:
            if token_id >= vocab_size:
                raise OffloadError(
                    f"logit_bias token id {token_id} is out of range: the vocabulary has {vocab_size} tokens"
                )
            adjustment[token_id] += bias
        for token_id, count in self._reply_counts.items():
            adjustment[token_id] -= self.params.presence_penalty + self.params.frequency_penalty * count
        return adjustment.to(self.device)


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0  # prompt in, first token out: the TTFT
    decode_seconds: float = 0.0  # every later token

    @property
    def ttft_seconds(self) -> float:
        return self.prefill_seconds

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        decoded = self.generated_tokens - 1  # the first token comes out of the prefill
        return decoded / self.decode_seconds if decoded > 0 and self.decode_seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "ttft_seconds": self.ttft_seconds,
            "prefill_tokens_per_second": self.prefill_tokens_per_second,
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "decode_seconds": self.decode_seconds,
        }


@dataclass
class Response:
    token: int | None  # the id generated at this step (None on a closing response with no token)
    text: str  # the new text this step adds (may be empty mid-character or near a stop string)
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or None while going on
    timings: Timings = field(default_factory=Timings)
    stop: str | None = None  # the stop string that ended the reply (its text is not in any response)


# Text longer than this many UTF-8 bytes per context token cannot fit (a token rarely spans more
# than a dozen bytes). Tokenizing costs about 200 times the text's size in memory, so text past
# the cap is refused before it is tokenized.
MAX_BYTES_PER_TOKEN = 16


def text_byte_limit(context_tokens: int) -> int:
    """The most UTF-8 bytes of text a context of ``context_tokens`` tokens is worth tokenizing."""
    return MAX_BYTES_PER_TOKEN * context_tokens


def oversized_text(text: str, context_tokens: int) -> int | None:
    """``text``'s size in UTF-8 bytes when it is over ``text_byte_limit``, else None (nothing tokenized)."""
    limit = text_byte_limit(context_tokens)
    # Every character is at least one byte: only text near the limit needs its bytes counted.
    if len(text) <= limit and len(text.encode("utf-8", "surrogatepass")) <= limit:
        return None
    return len(text.encode("utf-8", "surrogatepass"))


def check_text_fits(text: str, context_tokens: int, what: str = "the prompt") -> None:
    """Raise ContextError, before any tokenizing, when ``text`` is too long to fit the context."""
    size = oversized_text(text, context_tokens)
    if size is not None:
        raise ContextError(
            f"{what} is {size:,} bytes, more than the {text_byte_limit(context_tokens):,} bytes "
            f"({MAX_BYTES_PER_TOKEN} per token) that the model's context of {context_tokens:,} tokens can hold; "
            "shorten it"
        )


def check_context(model: MixtralModel, used: int, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise ContextError when the sequence would run past the context window."""
    window = model.config.max_position_embeddings
    if used + prompt_tokens + max_new_tokens > window:
        raise ContextError(
            f"prompt of {prompt_tokens} tokens (+{used} already in context) plus max_new_tokens "
            f"{max_new_tokens} exceeds the model's context of {window} tokens; shorten the prompt or lower "
            "--max-new-tokens"
        )


def stream_generate(
    model: MixtralModel,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop_ids: Iterable[int] | None = None,
    stop_strings: Iterable[str] = (),
    tokenizer: Any = None,
    cache: KVCache | None = None,
    continues_text: bool = False,
) -> Iterator[Response]:
    """Generate after ``prompt_ids``, which continue ``cache`` when one is given (a chat's next turn).

    With ``continues_text`` (a raw completion) the reply's text continues the prompt's, so its first word keeps
    the space before it; a chat reply's does not (it starts a new turn).

    Stops at any of ``stop_ids`` (default: the model's EOS), at a stop string (needs ``tokenizer``),
    or after ``max_new_tokens``. The stopping EOS is not fed to the model; the caller keeps it.
    """
    if max_new_tokens < 0:
        raise OffloadError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompt_ids:
        raise OffloadError("the prompt is empty: give at least one token")
    sampling = sampling or SamplingParams()
    stops = set(stop_ids) if stop_ids is not None else {model.config.eos_token_id} - {None}
    stop_strings = [s for s in stop_strings if s]
    if stop_strings and tokenizer is None:
        raise OffloadError("stop strings need a tokenizer")
    used = 0 if cache is None else cache.length
    check_context(model, used, len(prompt_ids), max_new_tokens)
    timings = Timings(prompt_tokens=len(prompt_ids))
    if max_new_tokens == 0:
        yield Response(token=None, text="", finish_reason="length", timings=timings)
        return
    if cache is None:
        cache = KVCache(
            model.config, len(prompt_ids) + max_new_tokens, dtype=model.dtype, device=model.device
        )
    sampler = Sampler(sampling, model.device, seen=prompt_ids)
    context = prompt_ids if continues_text else ()
    decoder = tokenizer.stream_decoder(context) if tokenizer is not None else None
    held = ""  # text withheld because it may be the start of a stop string
    start = time.perf_counter()
    with torch.inference_mode():
        inputs = torch.tensor([prompt_ids], device=model.device)
        for step in range(max_new_tokens):
            logits = model(inputs, cache, last_only=True)[0, -1]
            token = int(sampler(logits))  # one host sync per token, to stream and to test the stop rules
            now = time.perf_counter()
            if step == 0:
                timings.prefill_seconds = now - start
            else:
                timings.decode_seconds = now - start - timings.prefill_seconds
            timings.generated_tokens += 1
            sampler.observe((token,))
            if token in stops:
                yield Response(token, held + (decoder.flush() if decoder else ""), "stop", timings)
                return
            held += decoder.push(token) if decoder else ""
            last = step == max_new_tokens - 1
            if last and decoder:
                held += decoder.flush()  # an unfinished character, which may still end a stop string
            emit, held, stop = _split_at_stop(held, stop_strings)
            if stop is not None:
                yield Response(token, emit, "stop", timings, stop=stop)
                return
            if last:
                yield Response(token, emit + held, "length", timings)
                return
            yield Response(token, emit, None, timings)
            inputs = torch.tensor([[token]], device=model.device)


def _split_at_stop(text: str, stop_strings: list[str]) -> tuple[str, str, str | None]:
    """(text safe to emit, text to hold back, the stop string reached or None).

    The earliest stop string in ``text`` wins; the text before it is emitted and the rest dropped.
    """
    found = [(at, stop) for stop in stop_strings if (at := text.find(stop)) >= 0]
    if found:
        at, stop = min(found)
        return text[:at], "", stop
    # Hold back the longest tail that could still grow into a stop string.
    keep = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                keep = max(keep, size)
                break
    return text[: len(text) - keep], text[len(text) - keep :], None


def generate_ids(
    model: MixtralModel,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_ids: Iterable[int] | None = None,
) -> list[int]:
    """The generated ids (a stopping EOS included), without streaming."""
    return [
        r.token
        for r in stream_generate(
            model, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids
        )
        if r.token is not None
    ]
