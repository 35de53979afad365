"""Routing traces: which experts every layer used at every step, and what the prefetcher guessed.

A trace is one safetensors file (no pickle) with a JSON header and five tensors.
Shapes: S steps (forward calls), N tokens over all steps, L layers, k experts per token, G guesses.

| tensor | shape | dtype | contents |
|---|---|---|---|
| ``step_tokens`` | (S,) | int32 | tokens in each forward call: the prompt at prefill, then 1 per decode step |
| ``ids`` | (N, L, k) | int32 | the routed expert ids of every token at every layer |
| ``weights`` | (N, L, k) | float32 | their router weights (softmax, top-k, renormalised) |
| ``guess_counts`` | (S, L) | int32 | how many experts were guessed for each layer at each step (layer 0: none) |
| ``guesses`` | (G,) | int32 | the guesses, step by step, layer by layer, in the order they were made |

``offload.trace.recorder.TraceRecorder`` records a loaded model without changing what it computes; ``offload.trace.replay``
replays a trace against cache policies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from offload.atomic import write_bytes_atomically
from offload.config import MAX_EXPERTS, MAX_LAYERS
from offload.errors import TraceError, first_line

FORMAT = "offload-routing-trace"
VERSION = 1
METADATA_KEY = "offload_trace"  # the safetensors metadata entry holding the JSON header
MAX_TRACE_CELLS = 2**32  # steps x layers x experts: 4 GiB of booleans in ``Trace.used``
TENSORS = {
    "step_tokens": np.int32,
    "ids": np.int32,
    "weights": np.float32,
    "guess_counts": np.int32,
    "guesses": np.int32,
}
STORED_DTYPES = {np.int32: "I32", np.float32: "F32"}  # safetensors' names for the tensors' types
# Other types' names in errors, as numpy spells them (bfloat16 has no numpy type: a shard, not a trace).
TYPE_NAMES = {
    "I32": "int32",
    "F32": "float32",
    "I64": "int64",
    "F64": "float64",
    "F16": "float16",
    "BF16": "bfloat16",
}


@dataclass(frozen=True, eq=False)
class Trace:
    """A model's routing over a run: see the module docstring for the arrays' shapes."""

    model: str  # the model's name, for people reading the trace
    num_layers: int
    num_experts: int
    top_k: int
    step_tokens: np.ndarray  # (S,)
    ids: np.ndarray  # (N, L, k)
    weights: np.ndarray  # (N, L, k)
    guess_counts: np.ndarray  # (S, L)
    guesses: np.ndarray  # (G,)
    expert_bytes: tuple[int, ...] | None = None  # one expert's size per layer, when the recorder knew it

    @property
    def steps(self) -> int:
        return len(self.step_tokens)

    @property
    def tokens(self) -> int:
        return int(self.step_tokens.sum())

    @property
    def has_guesses(self) -> bool:
        return len(self.guesses) > 0

    @cached_property
    def used(self) -> np.ndarray:
        """(S, L, E) booleans: whether a step's tokens used an expert at a layer."""
        used = np.zeros((self.steps, self.num_layers, self.num_experts), dtype=bool)
        step_of_token = np.repeat(np.arange(self.steps), self.step_tokens)  # (N,)
        layers = np.arange(self.num_layers)
        used[step_of_token[:, None, None], layers[None, :, None], self.ids] = True
        return used

    @cached_property
    def needed_by_layer(self) -> list[list[list[int]]]:
        """[layer][step]: the distinct experts used, ascending (what the MoE block asks for)."""
        experts = range(self.num_experts)
        return [
            [[e for e in experts if row[e]] for row in self.used[:, layer].tolist()]
            for layer in range(self.num_layers)
        ]

    @cached_property
    def guesses_by_layer(self) -> list[list[list[int]]]:
        """[layer][step]: the experts guessed for the layer (by the layer before, before it routed)."""
        by_layer: list[list[list[int]]] = [[] for _ in range(self.num_layers)]
        flat, start = self.guesses.tolist(), 0
        for counts in self.guess_counts.tolist():
            for layer, count in enumerate(counts):
                by_layer[layer].append(flat[start : start + count])
                start += count
        return by_layer

    def needed(self, step: int, layer: int) -> list[int]:
        """The distinct experts ``layer`` used at ``step``, ascending."""
        return self.needed_by_layer[layer][step]

    def guesses_for(self, step: int, layer: int) -> list[int]:
        """The experts guessed for ``layer`` at ``step``, in the order the prefetcher ranked them."""
        return self.guesses_by_layer[layer][step]

    def header(self) -> dict[str, Any]:
        """The JSON header stored with the tensors."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "expert_bytes": None if self.expert_bytes is None else list(self.expert_bytes),
        }

    def check(self, where: str) -> None:
        """Raise TraceError, naming ``where``, unless every array agrees with the header and each other."""
        _check_tensors(self, where)


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    trace.check(str(path))
    tensors = {
        name: np.ascontiguousarray(getattr(trace, name), dtype=dtype) for name, dtype in TENSORS.items()
    }
    data = save(tensors, metadata={METADATA_KEY: json.dumps(trace.header())})
    try:
        write_bytes_atomically(path, data)
    except OSError as err:
        raise TraceError(f"{path}: cannot write the trace ({err.strerror or err})") from None


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace written by ``save_trace``; any problem is a one-line TraceError."""
    path = Path(path)
    if path.is_dir():
        raise TraceError(f"{path}: a directory, not a trace file")
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    try:
        with safe_open(str(path), framework="numpy") as file:
            # The header and the tensors' names and types first: a checkpoint shard given by mistake is refused
            # before gigabytes of it are read.
            header = _parse_header(file.metadata() or {}, str(path))
            names = set(file.keys())
            _check_names(names, str(path))
            for name, dtype in TENSORS.items():
                stored = file.get_slice(name).get_dtype()
                if stored != STORED_DTYPES[dtype]:
                    raise TraceError(
                        f"{path}: tensor {name!r} is {TYPE_NAMES.get(stored, stored)}, expected {np.dtype(dtype)}"
                    )
            tensors = {name: file.get_tensor(name) for name in TENSORS}
    except TraceError:
        raise
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise TraceError(
            f"{path}: not an offload routing trace (not a safetensors file: {first_line(err)})"
        ) from None
    trace = Trace(**header, **tensors)
    trace.check(str(path))
    return trace


def _check_names(names: set[str], where: str) -> None:
    missing = sorted(set(TENSORS) - names)
    extra = sorted(names - set(TENSORS))
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        raise TraceError(f"{where}: {what}; expected exactly {', '.join(TENSORS)}")


def _parse_header(metadata: dict[str, str], where: str) -> dict[str, Any]:
    if METADATA_KEY not in metadata:
        raise TraceError(f"{where}: not an offload routing trace (no {METADATA_KEY!r} metadata)")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError):  # also a number of thousands of digits, or deep nesting
        raise TraceError(f"{where}: the trace header is not valid JSON") from None
    if not isinstance(header, dict):
        raise TraceError(f"{where}: the trace header is not a JSON object")
    if header.get("format") != FORMAT:
        raise TraceError(f"{where}: format {header.get('format')!r} is not {FORMAT!r}")
    if header.get("version") != VERSION:
        raise TraceError(
            f"{where}: trace version {header.get('version')!r} is not supported (this offload reads {VERSION})"
        )
    for key, limit in (("num_layers", MAX_LAYERS), ("num_experts", MAX_EXPERTS), ("top_k", MAX_EXPERTS)):
        value = header.get(key)
        # The same limits as config.json: a header claiming a billion layers would make a replay loop forever.
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise TraceError(f"{where}: header {key} must be a whole number from 1 to {limit}, got {value!r}")
    if not isinstance(header.get("model"), str):
        raise TraceError(f"{where}: header model must be a string, got {header.get('model')!r}")
    expert_bytes = header.get("expert_bytes")
    if expert_bytes is not None:
        if not isinstance(expert_bytes, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in expert_bytes
        ):
            raise TraceError(f"{where}: header expert_bytes must be null or whole numbers > 0")
        expert_bytes = tuple(expert_bytes)
    fields = ("model", "num_layers", "num_experts", "top_k")
    return {**{key: header[key] for key in fields}, "expert_bytes": expert_bytes}


def _check_tensors(trace: Trace, where: str) -> None:
    """Shapes, id ranges and lengths; the header's fields are already known to be sane."""
    layers, experts, top_k = trace.num_layers, trace.num_experts, trace.top_k

    def fail(what: str) -> None:
        raise TraceError(f"{where}: {what}")

    if top_k > experts:
        fail(f"top_k {top_k} is more than num_experts {experts}")
    if trace.expert_bytes is not None and len(trace.expert_bytes) != layers:
        fail(f"expert_bytes has {len(trace.expert_bytes)} values for {layers} layers")
    step_tokens, ids, weights = trace.step_tokens, trace.ids, trace.weights
    guess_counts, guesses = trace.guess_counts, trace.guesses
    if step_tokens.ndim != 1:
        fail(f"step_tokens has shape {list(step_tokens.shape)}, expected one dimension")
    if len(step_tokens) * layers * experts > MAX_TRACE_CELLS:
        # ``Trace.used`` holds one boolean per (step, layer, expert): refuse before it is allocated.
        fail(f"{len(step_tokens)} steps x {layers} layers x {experts} experts is too large to replay")
    if (step_tokens < 1).any():
        fail("a step has no tokens (step_tokens must all be >= 1)")
    expected = [int(step_tokens.sum()), layers, top_k]
    for name, array in (("ids", ids), ("weights", weights)):
        if list(array.shape) != expected:
            fail(f"{name} has shape {list(array.shape)}, expected {expected} (tokens, layers, top_k)")
    if list(guess_counts.shape) != [len(step_tokens), layers]:
        fail(f"guess_counts has shape {list(guess_counts.shape)}, expected {[len(step_tokens), layers]}")
    if ((guess_counts < 0) | (guess_counts > experts)).any():
        fail(f"a guess count is out of range (allowed 0..{experts})")
    if guesses.ndim != 1 or len(guesses) != int(guess_counts.sum()):
        fail(f"guesses has shape {list(guesses.shape)}, but guess_counts add up to {int(guess_counts.sum())}")
    if ids.size and (ids.min() < 0 or ids.max() >= experts):
        fail(f"an expert id is out of range: ids span {ids.min()}..{ids.max()}, allowed 0..{experts - 1}")
    if guesses.size and (guesses.min() < 0 or guesses.max() >= experts):
        fail(f"a guessed expert id is out of range (allowed 0..{experts - 1})")
    if layers and guess_counts[:, 0].any():
        fail("layer 0 has guesses, but guesses come from the layer before")
    if top_k > 1 and ids.size and (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
        fail("a token was routed to the same expert twice")
    if not np.isfinite(weights).all() or (weights < 0).any():
        fail("a router weight is negative or not finite")
