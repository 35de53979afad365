"""Whether building a 4-bit expert for the CPU int4 kernel spreads over torch's threads.

Builds one random ``hqq:4:64`` expert of Mixtral's shapes in its slot (``build_in_place``, as the host tier does
after a read) on a worker thread, at ``torch.set_num_threads`` 1, 2, 1, 2, and prints the medians of the wall
and CPU time of ``--runs`` builds each. A build that used more than one thread would take more CPU than wall
time. ``offload.settings.plan_speed.HOST_INT4_BUILD_WEIGHTS_PER_S`` assumes one thread from this.

    OMP_NUM_THREADS=1 python benchmarks/int4_build_threads.py --runs 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import int4_repack  # noqa: E402

from offload.experts.in_place import build_in_place  # noqa: E402
from offload.experts.packing import ExpertLayout, pack_expert  # noqa: E402
from offload.memory_release import release_freed_memory  # noqa: E402
from offload.quant.codec import codec_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    expert = int4_repack.random_expert(generator)
    layout = ExpertLayout.of(expert)
    stored = pack_expert(expert, layout)
    codec = codec_for(int4_repack.SPEC)
    slot = stored.clone()

    def once() -> tuple[float, float]:
        slot.copy_(stored)  # the read's bytes, which the last build overwrote
        release_freed_memory()
        wall, cpu = time.perf_counter(), time.process_time()
        build_in_place(slot, layout, lambda tensors: codec.materialize(tensors, torch.float32, "cpu"))
        return time.perf_counter() - wall, time.process_time() - cpu

    for threads in (1, 2, 1, 2):
        times: list[tuple[float, float]] = []

        def worker(threads: int = threads, times: list[tuple[float, float]] = times) -> None:
            torch.set_num_threads(threads)  # a new thread starts with torch's default, as the tier's reader
            times.extend(once() for _ in range(args.runs))

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        wall = statistics.median(w for w, _ in times) * 1e3
        cpu = statistics.median(c for _, c in times) * 1e3
        load = Path("/proc/loadavg").read_text().split()[:3]
        print(f"threads {threads}: wall {wall:.1f} ms, CPU {cpu:.1f} ms (load average {' '.join(load)})")


if __name__ == "__main__":
    main()
