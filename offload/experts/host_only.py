"""HostOnlyExperts: every expert computed on the host CPU, attention on the device (llama.cpp's
``--cpu-moe`` layout). No expert ever crosses the link; only each layer's activations do.

The bench's ``host-experts`` row. All of a layer's experts are submitted before the first is yielded, so
the host works through them in one queue while the caller places each output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from torch import Tensor

from offload.experts.offloaded import HostPath, computed
from offload.experts.source import Expert, ExpertMemory, Inputs
from offload.experts.stats import CacheStats
from offload.experts.store import HostStore


class HostOnlyExperts:
    """Serves every expert from ``store`` by computing it on ``path``'s host."""

    def __init__(self, store: HostStore, path: HostPath) -> None:
        self.store = store
        self.path = path
        self.stats = CacheStats(store.num_layers)  # every access a miss computed on the host

    def speculate(self, layer: int, hidden: Tensor) -> Tensor | None:
        return None  # nothing moves, so nothing is worth guessing

    def experts_for(
        self, layer: int, needed: list[int], guesses: list[int], inputs: Inputs | None = None
    ) -> Iterator[tuple[int, Expert]]:
        if inputs is None:
            raise ValueError("HostOnlyExperts computes on the host and needs the caller's inputs")
        stats = self.stats.layers[layer]
        materialize = self.path.materialize[layer]
        jobs = {}
        for expert in dict.fromkeys(needed):
            tensors = self.store.tensors(layer, expert)
            jobs[expert] = self.path.host.submit(lambda x, t=tensors: materialize(t)(x), inputs(expert))
            stats.accesses += 1
            stats.misses += 1
            stats.host_computes += 1
        for expert, job in jobs.items():
            started = time.perf_counter()
            output = self.path.host.wait(job)
            stats.host_wait_seconds += time.perf_counter() - started
            yield expert, computed(output)

    def reset_stats(self) -> None:
        self.stats.reset()

    def flush(self) -> None:
        pass  # the device holds no expert

    def memory(self) -> ExpertMemory:
        return ExpertMemory(device_bytes=0, host_bytes=self.store.nbytes)

    def expert_bytes(self) -> tuple[int, ...] | None:
        return None  # no expert is ever loaded

    def describe(self) -> str:
        return f"every expert computed on the {self.path.host.describe()}"
