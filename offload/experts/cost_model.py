"""Where a cache miss is computed: the per-miss choice of the hybrid engine, from measured inputs.

A miss has three ways to its output:
- ``wait``: its copy is already on the link (a prefetch); wait for it, then compute on the device;
- ``copy``: copy it now, behind whatever the link is moving, then compute on the device;
- ``host``: compute it on the host CPU, behind the host's queued jobs; only the (T, D) activations
  cross the link, both ways.
A hit may go to the host too, when the host would finish it before the device finishes its other hits
(a device kernel slower per expert than the host's, or a prefill with many experts ready on the device).

Each option's finish time is estimated from the inputs (link bandwidth and latency, one expert's bytes,
the host's and the device's seconds for one expert as a function of the token count, all measured at
load by ``offload.experts.probe`` or given by a profile) and the busy-until times of the link and the
host; the cheapest wins, ties going to the device (a copy also leaves the expert in the cache). A
layer's misses are placed one after the other, each one's choice delaying the link or the host for the
next. Host time grows with the tokens while a copy costs the same for any batch, so a long prefill goes
to the device; ``prefill_threshold`` says from how many tokens on.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from offload.errors import CacheError

HOST_COMPUTE_MODES = ("auto", "never", "always")
WAIT, COPY, HOST = "wait", "copy", "host"
MAX_TOKENS_SEARCHED = 1 << 16


@dataclass(frozen=True)
class TokenCurve:
    """Seconds for one expert as a function of the token count, from measured points.

    Between points: linear interpolation; below the first: the first; past the last: the last point's
    seconds per token times the tokens (compute-bound, so at least linear).
    """

    points: tuple[tuple[int, float], ...]  # (tokens, seconds), tokens increasing

    def __post_init__(self) -> None:
        tokens = [t for t, _ in self.points]
        if not self.points or tokens != sorted(set(tokens)) or tokens[0] < 1:
            raise CacheError(f"a token curve needs increasing token counts >= 1, got {tokens}")
        if any(not seconds >= 0 for _, seconds in self.points):
            raise CacheError(f"a token curve needs seconds >= 0, got {[s for _, s in self.points]}")

    @classmethod
    def flat(cls, seconds: float) -> TokenCurve:
        """The same time for any token count up to one, then linear (a memory-bound expert at batch 1)."""
        return cls(((1, seconds),))

    def at(self, tokens: int) -> float:
        points = self.points
        first_tokens, first_seconds = points[0]
        if tokens <= first_tokens:
            return first_seconds
        last_tokens, last_seconds = points[-1]
        if tokens >= last_tokens:
            return last_seconds * tokens / last_tokens
        i = bisect.bisect_left([t for t, _ in points], tokens)
        (t0, s0), (t1, s1) = points[i - 1], points[i]
        return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)

    def scaled(self, factor: float) -> TokenCurve:
        return TokenCurve(tuple((t, s * factor) for t, s in self.points))


@dataclass(frozen=True)
class CostInputs:
    """What the choice is computed from; every figure is measured at load or given by a profile."""

    link_gbps: float  # host -> device bandwidth, 1e9 bytes/s
    link_latency_us: float  # per copy
    expert_bytes: tuple[int, ...]  # one expert's packed bytes, per layer: what a copy moves
    activation_bytes: int  # one token's hidden state, in the compute dtype: what crosses for a host expert
    host: TokenCurve  # the host's seconds for one expert
    device: TokenCurve  # the device's seconds for one expert

    def describe(self) -> str:
        return (
            f"link {self.link_gbps:.3g} GB/s, copy {self.copy_seconds(0) * 1e3:.3g} ms, expert at 1 token: "
            f"host {self.host.at(1) * 1e3:.3g} ms, device {self.device.at(1) * 1e3:.3g} ms"
        )

    def copy_seconds(self, layer: int) -> float:
        """One expert of ``layer`` over the link."""
        return self.link_latency_us * 1e-6 + self.expert_bytes[layer] / (self.link_gbps * 1e9)

    def host_seconds(self, tokens: int) -> float:
        """One expert on the host for ``tokens`` tokens, with its activations there and back."""
        crossing = 2 * tokens * self.activation_bytes / (self.link_gbps * 1e9)
        return self.host.at(tokens) + crossing


def guess_pays(precision: float | None, copy_seconds: float, layer_seconds: float | None) -> bool:
    """Whether a prefetch guess is worth a copy: while its measured ``precision`` (that of its layer's guesses at
    its rank: a second guess is often much less precise than the first) exceeds r / (1 + r), with
    r = one copy / one layer's time. A right guess saves at most a layer of waiting (r layers of copy time
    less the layer it overlaps), a wrong one costs a whole copy on the link. Unmeasured: yes, so that the
    precision gets measured.
    """
    if precision is None or layer_seconds is None or layer_seconds <= 0:
        return True
    ratio = copy_seconds / layer_seconds
    return precision > ratio / (1 + ratio)


@dataclass(frozen=True)
class Miss:
    """One expert a layer needs and the device does not hold ready."""

    expert: int
    tokens: int  # rows of the layer's input routed to it
    arriving_at: float | None = None  # when its copy, already on the link, lands (None: not in flight)


class CostModel:
    """Chooses wait / copy / host for each miss (module docstring); ``mode`` never or always forces it."""

    def __init__(self, inputs: CostInputs, mode: str = "auto") -> None:
        if mode not in HOST_COMPUTE_MODES:
            raise CacheError(f"--host-compute {mode!r} is not one of {', '.join(HOST_COMPUTE_MODES)}")
        self.inputs = inputs
        self.mode = mode

    def choose(
        self,
        layer: int,
        misses: Sequence[Miss],
        now: float,
        link_free_at: float,
        host_free_at: float,
        hits: Sequence[Miss] = (),
    ) -> dict[int, str]:
        """expert -> WAIT, COPY or HOST for each of ``misses``, placed in the given order; then, in auto mode,
        HOST for each of the ready ``hits`` that the host, after its misses, would finish before the device
        finishes its queue of hits (the device being slower per expert than the host, or far behind).
        """
        inputs = self.inputs
        choices: dict[int, str] = {}
        for miss in misses:
            if self.mode == "always":
                choices[miss.expert] = HOST
                continue
            if miss.arriving_at is not None:
                device_choice, landed = WAIT, max(now, miss.arriving_at)
            else:
                device_choice, landed = COPY, max(now, link_free_at) + inputs.copy_seconds(layer)
            if self.mode == "never":
                choices[miss.expert] = device_choice
                continue
            device_done = landed + inputs.device.at(miss.tokens)
            host_done = max(now, host_free_at) + inputs.host_seconds(miss.tokens)
            if host_done < device_done:
                choices[miss.expert] = HOST
                host_free_at = host_done
            else:
                choices[miss.expert] = device_choice
                if device_choice == COPY:
                    link_free_at = landed
        if self.mode == "auto" and hits:
            self._balance(hits, now, host_free_at, choices)
        return choices

    def _balance(
        self, hits: Sequence[Miss], now: float, host_free_at: float, choices: dict[int, str]
    ) -> None:
        """Move the device's last hits to the host while that ends the layer sooner (the device computes its
        hits in order, so its last ones are the ones the host could take off it)."""
        device_done = now + sum(self.inputs.device.at(hit.tokens) for hit in hits)
        for hit in reversed(hits):
            host_done = max(now, host_free_at) + self.inputs.host_seconds(hit.tokens)
            if host_done >= device_done:
                return
            choices[hit.expert] = HOST
            host_free_at = host_done
            device_done -= self.inputs.device.at(hit.tokens)

    def prefill_threshold(self, layer: int = 0) -> int | None:
        """The fewest tokens for which one miss, on an idle link and host, is cheaper on the device.

        None when the host is cheaper for any batch up to 65536 tokens (or the mode forces a side).
        """
        if self.mode != "auto":
            return None
        copy = self.inputs.copy_seconds(layer)

        def device_wins(tokens: int) -> bool:
            return copy + self.inputs.device.at(tokens) <= self.inputs.host_seconds(tokens)

        if not device_wins(MAX_TOKENS_SEARCHED):
            return None
        low, high = 1, MAX_TOKENS_SEARCHED  # host cost minus device cost grows with the tokens
        while low < high:
            middle = (low + high) // 2
            if device_wins(middle):
                high = middle
            else:
                low = middle + 1
        return low
