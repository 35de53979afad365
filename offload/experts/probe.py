"""Measuring the cost model's inputs at load: the link's bandwidth, and one expert's time on the device
and on the host for a range of token counts, each with the kernel that will really run it.

Each figure is the median of a few repeats after a warm-up, as the bench's ``--copy-ratio`` calibration takes
the median of its runs: the fastest would make an emulated host (``--host-ratio``) look faster than the
device runs the same expert while the machine is busy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from offload.experts.cost_model import TokenCurve
from offload.experts.link import EmulatedLink, Link

PROBE_TOKENS = (1, 4, 16, 64, 256)
REPEATS = 5
BUDGET_S = (
    0.25  # per token count: a real expert on a CPU can take a second at 256 tokens; stop repeating then
)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_expert(
    run: Callable[[Tensor], Tensor],
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
    tokens: tuple[int, ...] = PROBE_TOKENS,
) -> TokenCurve:
    """Seconds of ``run`` on (T, hidden_size) random inputs in ``dtype`` on ``device``, for each T."""
    points = []
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for count in tokens:
            x = torch.randn(count, hidden_size, generator=generator).to(device=device, dtype=dtype)
            run(x)  # warm-up: first-call allocations and kernel selection
            seconds: list[float] = []
            while len(seconds) < REPEATS and sum(seconds) < BUDGET_S:
                _synchronize(device)
                started = time.perf_counter()
                run(x)
                _synchronize(device)
                seconds.append(time.perf_counter() - started)
            points.append((count, statistics.median(seconds)))
            if seconds[-1] > 4 * BUDGET_S:  # larger batches only extrapolate: linear past the last point
                break
    return TokenCurve(tuple(points))


def probe_link(link: Link, source: Tensor, device: torch.device) -> tuple[float, float]:
    """(GB/s, latency in µs) of ``link`` moving ``source`` (one packed expert) to ``device``.

    An emulated link says its own figures; any other is timed copying ``source`` into a scratch buffer.
    """
    if isinstance(link, EmulatedLink):
        return link.gbps, link.latency_us
    scratch = torch.empty_like(source, device=device)
    seconds = []
    for _ in range(REPEATS + 1):  # the first is a warm-up
        _synchronize(device)
        started = time.perf_counter()
        link.wait(link.submit(source, scratch))
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    nbytes = source.numel() * source.element_size()
    return nbytes / max(statistics.median(seconds[1:]), 1e-9) / 1e9, 0.0
