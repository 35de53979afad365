"""What one hybrid host job costs for a Mixtral-sized 4-bit expert: built from hqq's stored layout at every call
(before the host form) against computed on the host form's views (``offload.quant.host_form``).

Packs one random ``hqq:4:64`` expert of Mixtral's shapes (hidden 4096, FFN 14336) into a host store twice: as
stored, and in the host form. Then times, interleaved round by round on one thread, what a host job runs
(``OffloadedExperts._start_on_host``: materialize on the store's views, then the expert on one token), and prints
the medians, their ratio and what the conversion costs per expert at load. Then, as the host tier does after a
read, the conversion of one slot to the host form (``tier_form``) against the in-slot build (``in_place``), also
interleaved. Random codes and scales: the kernels' speed does not depend on the values.

    OMP_NUM_THREADS=1 python benchmarks/host_job_cost.py --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import int4_repack  # noqa: E402

from offload.experts.in_place import build_in_place  # noqa: E402
from offload.experts.packing import ExpertLayout, pack_expert  # noqa: E402
from offload.experts.store import HostStore  # noqa: E402
from offload.experts.tier_form import TierForm  # noqa: E402
from offload.quant.codec import codec_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    expert = int4_repack.random_expert(generator)
    codec = codec_for(int4_repack.SPEC)
    stored = HostStore(1, 1)
    stored.put(0, 0, expert)
    converted = HostStore(1, 2, host_forms=[codec.host_form])
    converted.put(0, 0, expert)  # the first put lays the layer out
    started = time.perf_counter()
    converted.put(0, 1, expert)  # a later one is written straight into the buffer: the load's cost per expert
    convert_ms = (time.perf_counter() - started) * 1e3
    x = torch.randn(args.tokens, 4096, generator=generator)

    def host_job(store: HostStore) -> float:
        started = time.perf_counter()
        codec.materialize(store.tensors(0, 0), torch.float32, "cpu")(x)
        return time.perf_counter() - started

    host_job(stored), host_job(converted)  # warm
    times: dict[str, list[float]] = {"stored": [], "host form": []}
    for _ in range(args.rounds):
        times["stored"].append(host_job(stored))
        times["host form"].append(host_job(converted))
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    for name, median in medians.items():
        print(f"host job, {name}: {median:.2f} ms (median of {args.rounds}, {args.tokens} token(s))")
    print(f"stored / host form: {medians['stored'] / medians['host form']:.1f}x")
    print(f"conversion at load: {convert_ms:.1f} ms per expert; load average {load}")

    layout = ExpertLayout.of(expert)
    stored_bytes = pack_expert(expert, layout)
    form = TierForm.of(layout, codec.host_form)
    assert form is not None
    slot = stored_bytes.clone()
    steps = {
        "tier conversion to the host form": lambda: form.convert(slot),
        "in-slot build": lambda: build_in_place(
            slot, layout, lambda tensors: codec.materialize(tensors, torch.float32, "cpu")
        ),
    }
    slot_times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            slot.copy_(stored_bytes)  # the read's bytes, which the last step overwrote
            started = time.perf_counter()
            step()
            slot_times[name].append(time.perf_counter() - started)
    for name, values in slot_times.items():
        print(f"{name}: {statistics.median(values) * 1e3:.1f} ms per read (median of {args.rounds})")


if __name__ == "__main__":
    main()
