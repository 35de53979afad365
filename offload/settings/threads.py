"""How many CPU threads torch runs: the ``--threads`` flag, or a default chosen from the free cores.

On a busy machine an OpenMP barrier waits whenever another process holds one of its cores, so torch
with every core can decode 10-70x slower than with one (FACTS.md, "Threads"). The default therefore
counts the physical cores this process may run on and leaves out those the load average says are taken.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from offload.errors import FlagError

# A load average this far above a whole number still counts as that number of busy cores: background
# noise (a shell, a cron job) should not cost an idle machine a thread.
LOAD_NOISE = 0.2


def available_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on; the logical count where Linux's topology is absent."""
    if not hasattr(os, "sched_getaffinity"):
        return available_cpus()
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return available_cpus()
        cores.add((package, core))
    return max(1, len(cores))


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set; else the physical cores left free by the current load, at least 1."""
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) >= 1:
        return min(int(from_env), available_cpus())
    cores = physical_cores()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        return cores
    free = (os.cpu_count() or cores) - busy + LOAD_NOISE
    return max(1, min(cores, math.floor(free)))


def check_threads(threads: int) -> int:
    """``threads`` when it is a whole number from 1 to the CPUs available; else a FlagError."""
    limit = available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= limit:
        raise FlagError(
            f"--threads {threads!r} is out of range: 1 to {limit} (the CPUs this process may use)"
        )
    return threads
