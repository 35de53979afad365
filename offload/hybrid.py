"""Hybrid execution's setup: the host that computes misses, and the cost model's inputs measured at load.

``host_materializer`` is the one place that says how an expert of the host store runs on the host;
``build_host_path`` probes the link, the device and the host (``offload.experts.probe``) and gives the
``HostPath`` that ``OffloadedExperts`` chooses with. The loader and the bench both build theirs here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from offload.errors import CacheError
from offload.experts.cache import Materialize
from offload.experts.cost_model import HOST_COMPUTE_MODES, CostInputs, CostModel
from offload.experts.host import EmulatedHost, ThreadHost
from offload.experts.link import Link
from offload.experts.offloaded import HostPath
from offload.experts.probe import probe_link, time_expert
from offload.experts.store import HostStore
from offload.quant.codec import ExpertCodec

HOST = torch.device("cpu")


@dataclass(frozen=True)
class CostOverrides:
    """Cost-model inputs given by a profile's [host] table instead of measured (None: measure)."""

    link_gbps: float | None = None
    host_expert_ms: float | None = None  # the host's time for one expert at one token
    device_expert_ms: float | None = None  # the device's time for one expert at one token


def host_materializer(codec: ExpertCodec, dtype: torch.dtype) -> Materialize:
    """How an expert in the host store runs on the host: the codec's own expert, built on the CPU.

    With a codec whose CPU expert computes from the packed codes, this is its kernel; otherwise the
    codec dequantizes on each call (the host keeps one copy of each expert, never a dense one).
    """
    return lambda tensors: codec.materialize(tensors, dtype, HOST)


def uses_host(mode: str, device: torch.device, host_ratio: float | None) -> bool:
    """Whether misses may go to the host: ``never`` says no; ``auto`` on a CPU device says no unless the
    host is emulated (there the host *is* the device, so it has nothing to add); ``always`` says yes.
    """
    if mode not in HOST_COMPUTE_MODES:
        raise CacheError(f"--host-compute {mode!r} is not one of {', '.join(HOST_COMPUTE_MODES)}")
    if mode == "never":
        return False
    return mode == "always" or device.type != "cpu" or host_ratio is not None


def build_host_path(
    store: HostStore,
    codecs: Sequence[ExpertCodec],
    link: Link,
    *,
    dtype: torch.dtype,
    device: torch.device,
    hidden_size: int,
    mode: str = "auto",
    host_ratio: float | None = None,
    overrides: CostOverrides | None = None,
) -> HostPath | None:
    """The host path of an offloaded model, or None when misses stay on the device (``uses_host``).

    Probes: the link moving one packed expert; one expert on the device and, unless ``host_ratio``
    emulates the host as that many times the device's time, on the host; each for 1 to 256 tokens.
    """
    if host_ratio is not None and not host_ratio > 0:
        raise CacheError(f"--host-ratio must be > 0, got {host_ratio}")
    if not uses_host(mode, device, host_ratio):
        return None
    overrides = overrides or CostOverrides()
    host_run = [host_materializer(codec, dtype) for codec in codecs]
    tensors = store.tensors(0, 0)
    on_device = codecs[0].materialize({n: t.to(device) for n, t in tensors.items()}, dtype, device)
    device_curve = time_expert(on_device, hidden_size, dtype, device)
    if overrides.device_expert_ms is not None:
        device_curve = device_curve.scaled(overrides.device_expert_ms * 1e-3 / max(device_curve.at(1), 1e-12))
    if host_ratio is not None:
        host: ThreadHost = EmulatedHost(host_ratio, device_curve.at)
        host_curve = device_curve.scaled(host_ratio)
    else:
        host = ThreadHost()
        host_curve = time_expert(lambda x: host_run[0](tensors)(x), hidden_size, dtype, HOST)
        if overrides.host_expert_ms is not None:
            host_curve = host_curve.scaled(overrides.host_expert_ms * 1e-3 / max(host_curve.at(1), 1e-12))
    gbps, latency_us = probe_link(link, store.buffer(0, 0), device)
    if overrides.link_gbps is not None:
        gbps, latency_us = overrides.link_gbps, 0.0
    inputs = CostInputs(
        link_gbps=gbps,
        link_latency_us=latency_us,
        expert_bytes=tuple(store.layout(layer).nbytes for layer in range(store.num_layers)),
        activation_bytes=hidden_size * torch.finfo(dtype).bits // 8,
        host=host_curve,
        device=device_curve,
    )
    return HostPath(host, CostModel(inputs, mode), host_run)
