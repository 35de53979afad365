"""Which policy a run with the plan's settings uses, its predicted speed, and when another would be faster.

A run places its cache misses by ``--host-compute`` (else the profile's ``[host] compute``, "auto" by default;
``offload.hybrid.uses_host``):
    never                 copy every miss to the device: the plan's copy-only figure
    auto, beside a GPU    hybrid: each miss where the cost model finds it cheaper (the plan's hybrid figure)
    auto, on a CPU device the host is the device, misses stay there: copy-only (which hybrid equals there)
    always                every miss on the host: ``SpeedPlan.always_tok_s`` (``plan_hybrid``)
Host-only (llama.cpp's --cpu-moe) is no --host-compute mode of an offloaded run; the plan shows it for comparison.

With a host tier the figures count its disk reads, and the builds of the reads where the run's tier converts
them for the host's int4 kernel: the tier of a run that may compute on the host (auto or always beside a GPU
whose int4 kernel runs, or a hybrid run whose misses go to the host) converts every read, those it copies to
the device too (``offload.loading.load_offloaded_experts``); a copy-only run's does not. The cost model,
measured at load, sees neither, so the plan says when another mode is predicted faster.
"""

from __future__ import annotations

from offload.errors import CacheError
from offload.settings.plan_speed import SpeedPlan
from offload.settings.plan_tiers import HostTier, with_tiers
from offload.settings.profile_toml import HOST_COMPUTE_MODES

POLICY_OF_MODE = {"never": "copy-only", "auto": "hybrid", "always": "always"}
WHAT = {
    "copy-only": "copying every miss",
    "hybrid": "hybrid: each miss where the cost model finds it cheaper",
    "always": "every miss on the host",
}


def check_host_compute(mode: str) -> str:
    """``mode`` if it is a --host-compute mode, else the error generate gives (``offload.hybrid.uses_host``)."""
    if mode not in HOST_COMPUTE_MODES:
        raise CacheError(f"--host-compute {mode!r} is not one of {', '.join(HOST_COMPUTE_MODES)}")
    return mode


def run_policy(mode: str, device_kind: str) -> str:
    """The policy a run with ``--host-compute mode`` uses on a ``device_kind`` device (module docstring)."""
    if mode == "auto" and device_kind == "cpu":
        return "copy-only"
    return POLICY_OF_MODE[mode]


def hybrid_builds(speeds: SpeedPlan) -> bool:
    """Whether a hybrid run's tier builds its reads for the host's int4 kernel (module docstring)."""
    return speeds.miss_on_host or speeds.int4_gpu_kernel


def mode_figures(
    speeds: SpeedPlan, tiers: dict[bool, HostTier] | None, from_tier: bool, device_kind: str
) -> dict[str, float]:
    """Each --host-compute mode's predicted tok/s, with the tier's reads (and builds) where there is a tier."""
    figures = {**speeds.tok_s, "always": speeds.always_tok_s}
    if tiers is not None:
        figures = with_tiers(tiers, figures, from_tier, hybrid_builds(speeds))
    return {mode: figures[run_policy(mode, device_kind)] for mode in HOST_COMPUTE_MODES}


def faster_mode_note(
    mode: str, by_mode: dict[str, float], device_kind: str, where: str, builds_ms: float
) -> str | None:
    """What the plan says when another --host-compute mode than the run's is predicted faster (at the shown
    precision); ``where`` names the run's mode's source, ``builds_ms`` the builds a token the run's tier adds."""
    best = max(by_mode, key=lambda other: (round(by_mode[other], 2), other == mode))
    if best == mode or round(by_mode[best], 2) <= round(by_mode[mode], 2):
        return None
    ours, theirs = run_policy(mode, device_kind), run_policy(best, device_kind)
    why = (
        f": this run's host tier converts each read for the host's int4 kernel, +{builds_ms:.1f} ms a token, which "
        "a copy-only run's does not, and the cost model, measured at load, counts neither the reads nor the builds"
        if theirs == "copy-only" and builds_ms > 0 and device_kind != "cpu"
        else ""
    )
    return (
        f"--host-compute {best} is predicted faster here: {theirs} {by_mode[best]:.2f} against {ours} "
        f"{by_mode[mode]:.2f} tok/s ({where}){why}; give --host-compute {best} to the run"
    )
