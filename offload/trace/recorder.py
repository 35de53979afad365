"""Recording a routing trace from a loaded model (the format is ``offload.trace.format``'s)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from offload.experts.source import route
from offload.trace.format import Trace

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from torch import Tensor

    from offload.experts.source import ExpertMemory, ExpertSource, Inputs
    from offload.experts.stats import CacheStats
    from offload.model import MixtralModel


class TraceRecorder:
    """Records a loaded MixtralModel's routing, one step per forward call, without changing its outputs.

    It wraps each MoE block's ExpertSource in a pass-through that notes the experts asked for and
    the prefetch guesses, and hooks each router gate to keep the token-level ids and weights::

        with TraceRecorder(model, model_name="demo") as recorder:
            generate_ids(model, prompt_ids, max_new_tokens=32)
        save_trace(recorder.trace(), "demo.trace")

    Guesses are recorded only when the source makes them (``OffloadedExperts`` with prefetch on).
    """

    def __init__(self, model: MixtralModel, *, model_name: str = "") -> None:
        self.model = model
        self.model_name = model_name
        config = model.config
        self.num_layers, self.num_experts = config.num_hidden_layers, config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self._blocks = [layer.block_sparse_moe for layer in model.model.layers]
        self._sources = [block.source for block in self._blocks]
        self.expert_bytes = self._sources[0].expert_bytes()
        self._steps: list[_Step] = []
        self._pending: _Step | None = None
        wrappers: dict[int, _RecordingSource] = {}  # one wrapper per distinct real source
        for block, source in zip(self._blocks, self._sources, strict=True):
            block.source = wrappers.setdefault(id(source), _RecordingSource(source, self._on_experts))
        self._wrappers = list(wrappers.values())
        self._hooks = [
            model.register_forward_pre_hook(self._begin_step),
            model.register_forward_hook(self._end_step),
        ]
        for layer, block in enumerate(self._blocks):
            self._hooks.append(block.gate.register_forward_hook(partial(self._on_gate, layer)))

    def detach(self) -> None:
        """Remove every hook and give each MoE block its own source back; the recorded steps stay."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for block, source in zip(self._blocks, self._sources, strict=True):
            block.source = source
        self._pending = None

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    @property
    def steps(self) -> int:
        """Forward calls recorded so far (an interrupted call is not one)."""
        return len(self._steps)

    def trace(self) -> Trace:
        """Everything recorded so far, as a Trace."""
        steps = self._steps
        ids = [torch.stack(step.ids, dim=1) for step in steps]  # (T, L, k) per step
        weights = [torch.stack(step.weights, dim=1) for step in steps]
        shape = (0, self.num_layers, self.top_k)
        trace = Trace(
            model=self.model_name,
            num_layers=self.num_layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            step_tokens=np.array([len(step_ids) for step_ids in ids], dtype=np.int32),
            ids=torch.cat(ids).cpu().numpy().astype(np.int32) if ids else np.zeros(shape, np.int32),
            weights=torch.cat(weights).float().cpu().numpy() if ids else np.zeros(shape, np.float32),
            guess_counts=np.array([[len(g) for g in step.guesses] for step in steps], dtype=np.int32).reshape(
                len(steps), self.num_layers
            ),
            guesses=np.array([e for step in steps for g in step.guesses for e in g], dtype=np.int32),
            expert_bytes=self.expert_bytes,
        )
        for index, step in enumerate(steps):
            for layer in range(self.num_layers):
                # The block asks for exactly the experts its router chose: a check on the recorder itself.
                assert trace.needed(index, layer) == step.needed[layer], "recorded routing disagrees"
        return trace

    def _begin_step(self, module: object, args: object) -> None:
        self._pending = _Step(self.num_layers)  # drops a step left unfinished by an interrupted call

    def _end_step(self, module: object, args: object, output: object) -> None:
        step, self._pending = self._pending, None
        if step is not None:
            assert step.complete(), "a forward call skipped a layer's router or experts"
            self._steps.append(step)

    def _on_gate(self, layer: int, module: object, args: object, logits: Tensor) -> None:
        if self._pending is None or any(wrapper.speculating for wrapper in self._wrappers):
            return  # the prefetcher running the next layer's gate is not routing
        weights, ids = route(logits.reshape(-1, logits.shape[-1]), self.top_k)  # (T, k) each, on the device
        self._pending.ids[layer], self._pending.weights[layer] = ids, weights

    def _on_experts(self, layer: int, needed: list[int], guesses: list[int]) -> None:
        if self._pending is None:
            return
        self._pending.needed[layer] = sorted(set(needed))
        if layer + 1 < self.num_layers:  # guesses made at layer l are for layer l+1
            self._pending.guesses[layer + 1] = list(guesses)


class _Step:
    """One forward call's routing while it is being recorded."""

    def __init__(self, num_layers: int) -> None:
        self.ids: list[Any] = [None] * num_layers  # (T, k) tensors
        self.weights: list[Any] = [None] * num_layers
        self.needed: list[Any] = [None] * num_layers
        self.guesses: list[list[int]] = [[] for _ in range(num_layers)]

    def complete(self) -> bool:
        return all(x is not None for x in (*self.ids, *self.needed))


class _RecordingSource:
    """An ExpertSource that tells the recorder what the block asks for and forwards everything."""

    def __init__(self, inner: ExpertSource, on_experts: Callable[[int, list[int], list[int]], None]) -> None:
        self.inner = inner
        self.on_experts = on_experts  # told (layer, needed, guesses) before each experts_for
        self.speculating = False  # True while the inner source runs a gate to guess, which is not routing

    def speculate(self, layer: int, hidden: Tensor) -> Tensor | None:
        self.speculating = True
        try:
            return self.inner.speculate(layer, hidden)
        finally:
            self.speculating = False

    def experts_for(
        self, layer: int, needed: list[int], guesses: list[int], inputs: Inputs | None = None
    ) -> Iterator[tuple[int, Any]]:
        self.on_experts(layer, needed, guesses)
        return self.inner.experts_for(layer, needed, guesses, inputs)

    @property
    def stats(self) -> CacheStats | None:
        return self.inner.stats

    def reset_stats(self) -> None:
        self.inner.reset_stats()

    def flush(self) -> None:
        self.inner.flush()

    def memory(self) -> ExpertMemory:
        return self.inner.memory()

    def expert_bytes(self) -> tuple[int, ...] | None:
        return self.inner.expert_bytes()

    def describe(self) -> str:
        return self.inner.describe()
