"""HostOnlyExperts: every expert computed on the host CPU, attention on the device (llama.cpp's
``--cpu-moe`` layout). No expert ever crosses the link; only each layer's activations do.

The bench's ``host-experts`` row, and a CPU run with a host budget (``--host-memory`` with every expert
"resident"): there the experts come from the host tier (``offload.experts.host_tier``) instead of a store
holding all of them, llama.cpp's memory-mapped case done deliberately. All of a layer's experts are fetched,
then submitted, before the first is yielded, so the disk reads them in one queue while the host computes the
ones already read, and the caller places each output. With ``gates`` and ``prefetch``, the next layer's likely
experts are read from disk while this layer computes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from offload.experts.cache import Materialize
from offload.experts.host import HostJob, HostRun, ThreadHost
from offload.experts.host_tier import HostTier
from offload.experts.offloaded import computed
from offload.experts.source import Expert, ExpertMemory, Inputs
from offload.experts.stats import CacheStats
from offload.experts.store import HostStore


class InlineHost(ThreadHost):
    """A host that runs each expert at once, in the caller's thread: on a CPU device the host *is* the device,
    so a worker thread would add only a hand-off per expert (the disk's worker still overlaps the reads)."""

    def __init__(self) -> None:
        pass  # no worker, no queue

    def describe(self) -> str:
        return "CPU"

    def submit(self, run: HostRun, x: Tensor) -> HostJob:
        job = HostJob(x.shape[0])
        job.output = run(x)
        job.finished.set()
        return job

    def close(self) -> None:
        pass


class HostOnlyExperts:
    """Serves every expert of ``store`` by computing it with ``materialize[layer]`` on ``host``."""

    def __init__(
        self,
        store: HostStore | HostTier,
        host: ThreadHost,
        materialize: Sequence[Materialize],
        gates: Sequence[nn.Module] = (),
        prefetch: int = 0,
    ) -> None:
        self.store = store
        self.host = host
        self.materialize = list(materialize)
        self.gates = list(gates)
        self.prefetch = prefetch if self.gates else 0
        self.stats = CacheStats(store.num_layers)  # every access computed on the host

    @property
    def host_tier(self) -> HostTier | None:
        """The host tier the experts are read through (None when the host store holds every expert)."""
        return self.store if isinstance(self.store, HostTier) else None

    def speculate(self, layer: int, hidden: Tensor) -> Tensor | None:
        """The next layer's likeliest experts, worth reading from disk early; None without a tier to read into."""
        if self.prefetch == 0 or layer + 1 >= len(self.gates):
            return None
        logits = self.gates[layer + 1](hidden)
        probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)  # (T, E)
        return torch.topk(probs.sum(dim=0), min(self.prefetch, probs.shape[-1])).indices

    def experts_for(
        self, layer: int, needed: list[int], guesses: list[int], inputs: Inputs | None = None
    ) -> Iterator[tuple[int, Expert]]:
        if inputs is None:
            raise ValueError("HostOnlyExperts computes on the host and needs the caller's inputs")
        stats = self.stats.layers[layer]
        store = self.store
        materialize = self.materialize[layer]
        unique = list(dict.fromkeys(needed))
        if layer == 0:  # a new forward pass: drop reservations left behind by one that was interrupted
            store.release()
        for expert in sorted(unique, key=lambda e: not store.is_ready(layer, e)):  # held ones reserved first,
            store.fetch(layer, expert)  # so no read of this step evicts another expert the step needs
        for expert in dict.fromkeys(guesses):
            if not store.prefetch(layer + 1, expert):
                break
        jobs = {}
        for expert in unique:
            built = store.expert(layer, expert) if isinstance(store, HostTier) and store.builds else None
            if built is not None:
                run = built.__call__  # built in its tier slot as it was read: only the matmuls are left
            else:
                tensors = store.tensors(layer, expert)
                run = lambda x, t=tensors: materialize(t)(x)  # noqa: E731
            job = jobs[expert] = self.host.submit(run, inputs(expert))
            store.hold(layer, expert, job.finished.is_set, job.finished.wait)
            stats.accesses += 1  # not a miss: there is no device cache to miss (no hit rate)
            stats.host_computes += 1
        store.note_step(layer, unique)
        for expert, job in jobs.items():
            started = time.perf_counter()
            output = self.host.wait(job)
            stats.host_wait_seconds += time.perf_counter() - started
            yield expert, computed(output)

    def reset_stats(self) -> None:
        self.stats.reset()
        self.store.reset_stats()

    def flush(self) -> None:
        pass  # the device holds no expert

    def memory(self) -> ExpertMemory:
        return ExpertMemory(device_bytes=0, host_bytes=self.store.nbytes)

    def expert_bytes(self) -> tuple[int, ...] | None:
        return None  # no expert is ever loaded

    def describe(self) -> str:
        where = "" if isinstance(self.store, HostStore) else f" from a {self.store.describe()}"
        return f"every expert computed on the {self.host.describe()}{where}"
