"""Hybrid's time per layer in our engine's terms, and the sums ``offload.settings.plan_speed`` shows.

Hybrid (``--host-compute auto`` beside a GPU) places each miss where ``offload.experts.cost_model`` finds it
cheaper at one token on an idle host and link: on the host when host_e + crossing < copy_e + device_e, else
copied to the device. Both places are timed in our engine's terms (``plan_speed``: ours_l, device_e, host_e),
per layer, with hits_l and misses_l expected counts:
    host side:   ours_l + balanced(hits_l, misses_l, device_e, host_e)       misses on the host, beside the
                 device's hits; a hit moves to the host too where one would end there before the device's hits
                 (``CostModel._balance``), as many as make both sides end together (``moved``)
    device side: ours_l + misses_l · (copy_e + device_e) - prefetched_l + balanced(hits_l, 0, device_e, host_e)
                 prefetched_l = min(recall · misses_l · copy_e, (ours_l + top_k · device_e) / 2), as copy-only
                 counts it; the idle host may still take some hits (the cost model's balance)
    hybrid:      the device side where the cost model sends a miss to the device; else the host side, or the
                 device side where prefetched copies make that less (the engine waits for a prefetched copy,
                 ``WAIT``, rather than recompute it on the host)
So hybrid is never slower than host-only (top_k · host_e per layer) nor than copying every miss in the same
terms; the copy-only figure, the paper's engine with its constants, may differ either way.
    always:      ``--host-compute always``: every miss on the host, no balance:
                 ours_l + max(hits_l · device_e, misses_l · host_e); on a CPU device, where host and device
                 share the cores, ours_l + hits_l · device_e + misses_l · host_e
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from offload.config import ModelConfig


@dataclass(frozen=True)
class LayerTimes:
    """One layer's experts (ours_l not included), in seconds, for hits and misses expected a token."""

    hits: float
    misses: float
    device_e: float
    host_e: float  # one expert on the host; a host job adds ``crossing``, its activations there and back
    copy_e: float
    crossing: float
    prefetched: float  # link time prefetch hides on the device side
    host: float  # misses on the host (``balanced``)
    device: float  # misses copied to the device
    always: float  # every miss on the host, no balance
    miss_on_host: bool  # the cost model's choice for one miss

    @property
    def hybrid(self) -> float:
        return min(self.host, self.device) if self.miss_on_host else self.device

    @property
    def hybrid_side(self) -> str:
        """Where hybrid's misses are computed: "host" or "device"."""
        return "host" if self.miss_on_host and self.host <= self.device else "device"


def layer_times(
    hits: float,
    misses: float,
    device_e: float,
    host_e: float,
    copy_e: float,
    *,
    crossing: float,
    dense: float,
    recall: float,
    miss_on_host: bool,
    on_cpu: bool,
) -> LayerTimes:
    """``LayerTimes`` for one layer of ``hits`` and ``misses`` (module docstring); ``dense`` is ours_l."""
    link, job = misses * copy_e, host_e + crossing
    prefetched = min(recall * link, (dense + (hits + misses) * device_e) / 2)
    copied = misses * (copy_e + device_e) - prefetched
    if on_cpu:  # the host is the device: nothing to balance, and its jobs share the cores
        device, always = copied + hits * device_e, hits * device_e + misses * job
    else:
        device = copied + balanced(hits, 0.0, device_e, job)
        always = max(hits * device_e, misses * job)
    return LayerTimes(
        hits=hits,
        misses=misses,
        device_e=device_e,
        host_e=host_e,
        copy_e=copy_e,
        crossing=crossing,
        prefetched=prefetched,
        host=balanced(hits, misses, device_e, job),
        device=device,
        always=always,
        miss_on_host=miss_on_host and not on_cpu,
    )


def moved(hits: float, misses: float, device_e: float, host_e: float) -> float:
    """The hits the cost model's balance moves to the host while the device is behind (``balanced``).

    The balance moves a hit only where the host, after its misses, would finish it before the device finishes
    its hits: none where one more hit (or the fraction of one expected) on the host would end later. Past that,
    the share that makes both sides end together.
    """
    device, host = hits * device_e, misses * host_e
    if host + min(1.0, hits) * host_e >= device:
        return 0.0
    return min(hits, (device - host) / (device_e + host_e))


def balanced(hits: float, misses: float, device_e: float, host_e: float) -> float:
    """The experts' time in one layer when the host takes the misses and, while the device is behind,
    some hits (``CostModel._balance``, in expected counts)."""
    x = moved(hits, misses, device_e, host_e)
    return max(hits * device_e - x * device_e, misses * host_e + x * host_e)


def speed_sums(
    config: ModelConfig,
    ks: Sequence[int],
    expert_bytes: Sequence[int],
    layer: LayerTimes,
    dense: float,
    attention_s: float,
    whys: tuple[str, str, str],
    totals: dict[str, float],
    head: float,
    on_cpu: bool,
) -> list[str]:
    """The sums behind each prediction, for layer 0 (the per-layer figures are summed over every layer).

    ``layer``: layer 0's times; ``dense``: ours_l; ``whys``: how device_e, host_e and the lm_head were timed.
    """
    ms, top_k, layers = 1e3, config.num_experts_per_tok, config.num_hidden_layers
    device_why, host_why, head_why = whys
    tok_s = {policy: 1 / seconds for policy, seconds in totals.items()}
    device_e, host_e, copy_s, hits, misses = (
        layer.device_e,
        layer.host_e,
        layer.copy_e,
        layer.hits,
        layer.misses,
    )
    # On a CPU device the host is the device: every expert already runs there, and misses stay there.
    host_only_e = device_e if on_cpu else host_e
    # With one K (and one expert size) the layers are alike; else the sum runs over layers like layer 0's.
    times = (
        f"{layers} ×" if len(set(ks)) == 1 and len(set(expert_bytes)) == 1 else f"Σ of {layers} layers like"
    )
    where = (
        f"host ({host_e * ms:.2f} < {copy_s * ms:.2f} + {device_e * ms:.2f} ms)"
        if layer.miss_on_host
        else "device (the host is the device)"
        if on_cpu
        else f"device ({copy_s * ms:.2f} + {device_e * ms:.2f} <= {host_e * ms:.2f} ms)"
    )
    copy_terms = (
        "our engine's terms: no paper figure on a CPU" if on_cpu else "the paper's engine and constants"
    )
    result = f" + {head * ms:.2f} = {totals['hybrid'] * ms:.1f} ms -> {tok_s['hybrid']:.2f} tok/s"
    if on_cpu:
        hybrid = f"as copy-only, {tok_s['hybrid']:.2f} tok/s"
    elif layer.hybrid_side == "host":
        x = moved(hits, misses, device_e, host_e + layer.crossing)
        hybrid = (
            f"{times} ({dense * ms:.2f} + max({hits - x:.2f} × {device_e * ms:.2f}, {misses + x:.2f} × "
            f"{host_e * ms:.2f})){result}"
            + (f" ({x:.2f} hits a layer moved to the idle host)" if x > 0 else "")
        )
    else:
        x = moved(hits, 0.0, device_e, host_e + layer.crossing)
        on_device = (
            f"max({hits - x:.2f} × {device_e * ms:.2f}, {x:.2f} × {host_e * ms:.2f})"
            if x > 0
            else f"{hits:.2f} × {device_e * ms:.2f}"
        )
        prefetched = f" - {layer.prefetched * ms:.2f} prefetched" if layer.prefetched > 0 else ""
        why = "" if not layer.miss_on_host else ", which prefetched copies make less than the host's sum"
        hybrid = (
            f"misses copied, in our engine's terms{why}: {times} ({dense * ms:.2f} + {misses:.2f} × "
            f"({copy_s * ms:.2f} + {device_e * ms:.2f}){prefetched} + {on_device}){result}"
        )
    return [
        f"one expert: device {device_e * ms:.2f} ms ({device_why}); host {host_e * ms:.2f} ms ({host_why}); "
        f"copy {copy_s * ms:.2f} ms ({expert_bytes[0] / 1e6:.1f} MB over the link)",
        f"layer 0: K = {ks[0]} of {config.num_local_experts}, device cache hit rate {hits / top_k:.1%}: {hits:.2f} "
        f"hits and {misses:.2f} misses a token; our engine's dense part {dense * ms:.2f} ms "
        f"({(dense - attention_s) * ms:.1f} ms overhead + {attention_s * ms:.2f} ms attention); lm_head "
        f"{head * ms:.2f} ms a token ({head_why})",
        f"copy-only ({copy_terms}): {layers} layers, {totals['copy-only'] * ms:.1f} ms a token "
        f"-> {tok_s['copy-only']:.2f} tok/s",
        f"host-only: {layers} × ({dense * ms:.2f} + {top_k} × {host_only_e * ms:.2f}) + {head * ms:.2f} = "
        f"{totals['host-only'] * ms:.1f} ms -> {tok_s['host-only']:.2f} tok/s",
        f"hybrid: a miss is cheaper on the {where}; {hybrid}",
    ]
