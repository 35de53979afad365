"""Repacking a 4-bit expert for the CPU int4 kernel: the old way (unpack every code, then pack) against the new
(``hqq_backend.host_linear`` packing straight from hqq's packed bytes), at Mixtral-8x7B's width.

The inputs are random ``hqq:4:64`` tensors of the real shapes (codes random bytes, scales positive, zeros
integers in 0..15; ``benchmarks/write_mixtral_shaped.py`` draws them the same way). Rows:

- ``w1 14336x4096`` and ``w2 4096x14336``: one matrix through ``host_linear``;
- ``expert in place``: what a host-tier miss of a CPU run pays after its read (``build_in_place``): the three
  matrices built, copied over the stored bytes in the slot, and the freed temporaries handed back to the OS;
- ``expert moved``: the same, both ways with the new repacking: "old" builds into fresh tensors and moves them
  over the stored bytes (the codec handed a plain dict), "new" builds each matrix straight over its stored bytes
  (what ``build_in_place`` does now).

Each row runs the old and the new build in turn, ``--runs`` rounds; figures are medians of the process's CPU
time (one thread, so the CPU clock is the wall clock without other processes' share). glibc's freed pages are
handed back before every build (``malloc_trim``, as ``build_in_place`` does after each), so each build pays its
own page faults, as it does in a run. Both builds' outputs are checked byte for byte.

    OMP_NUM_THREADS=1 python benchmarks/int4_repack.py --threads 1 --runs 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload.experts.in_place import build_in_place  # noqa: E402
from offload.experts.packing import ExpertLayout, pack_expert, unpack_expert  # noqa: E402
from offload.memory_release import release_freed_memory  # noqa: E402
from offload.quant import hqq_backend  # noqa: E402
from offload.quant.codec import codec_for  # noqa: E402
from offload.quant.host_kernels import Int4Linear  # noqa: E402
from offload.quant.spec import QuantSpec  # noqa: E402

HIDDEN, FFN, GROUP = 4096, 14336, 64
SPEC = QuantSpec.parse(f"hqq:4:{GROUP}")


def random_expert(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One Mixtral-sized expert's hqq:4:64 tensors (w1, w3: FFN x HIDDEN; w2: HIDDEN x FFN), named as the codec's."""
    shapes = (("w1", (FFN, HIDDEN)), ("w2", (HIDDEN, FFN)), ("w3", (FFN, HIDDEN)))
    return {
        f"{name}.{key}": tensor
        for name, shape in shapes
        for key, tensor in random_matrix(shape, generator).items()
    }


def random_matrix(shape: tuple[int, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """hqq:4:64 tensors of an (out, in) matrix, as ``hqq_backend.quantize`` lays them out."""
    out_features, in_features = shape
    groups = (out_features, in_features // GROUP)
    return {
        "W_q": torch.randint(
            0, 256, (out_features * in_features // GROUP // 2, GROUP), generator=generator
        ).to(torch.uint8),
        "scale": (torch.rand(groups, generator=generator) * 0.5 + 0.75).div_(64 * 4.6).half(),
        "zero": torch.randint(0, 16, groups, generator=generator).half(),
    }


def old_host_linear(
    tensors: dict[str, torch.Tensor], spec: QuantSpec, *, overwrite: bool = False
) -> torch.nn.Module | None:
    """``hqq_backend.host_linear`` before this change: (N, K) codes unpacked with torch.cat, then packed (into
    fresh tensors, whatever ``overwrite`` says)."""
    scale = tensors["scale"]
    out_features, groups_per_row = scale.shape
    packed = tensors["W_q"]
    codes = torch.cat([packed >> 4, packed & 0xF]).reshape(out_features, groups_per_row * spec.group_size)
    offset = (8 - tensors["zero"].float()) * scale.float()
    return Int4Linear.from_affine(codes, scale, offset, spec.group_size)


def cpu_seconds(prepare: Callable[[], Callable[[], object]]) -> tuple[float, object]:
    """``prepare()`` untimed, then the CPU time of the build it returns, after glibc's freed pages are returned."""
    build = prepare()
    release_freed_memory()
    start = time.process_time()
    result = build()
    return time.process_time() - start, result


def same_linear(a: Int4Linear, b: Int4Linear) -> bool:
    return torch.equal(a.packed, b.packed) and torch.equal(
        a.scales_and_offsets.view(torch.int16), b.scales_and_offsets.view(torch.int16)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    matrices = {
        "w1 14336x4096": random_matrix((FFN, HIDDEN), generator),
        "w2 4096x14336": random_matrix((HIDDEN, FFN), generator),
    }
    expert = random_expert(generator)
    layout = ExpertLayout.of(expert)
    stored = pack_expert(expert, layout)
    codec = codec_for(SPEC)

    slot = stored.clone()

    def in_place() -> object:
        slot.copy_(
            stored
        )  # the read's bytes (the build overwrote them): untimed, in ``cpu_seconds``'s prepare
        return lambda: build_in_place(
            slot, layout, lambda tensors: codec.materialize(tensors, torch.float32, "cpu")
        )

    def moved() -> object:
        slot.copy_(stored)
        return lambda: build_in_place(
            slot, layout, lambda tensors: codec.materialize(dict(tensors), torch.float32, "cpu")
        )

    new_linear = hqq_backend.host_linear
    builds: dict[str, dict[str, Callable[[], Callable[[], object]]]] = {
        name: {
            "old": lambda t=tensors: lambda: old_host_linear(t, SPEC),
            "new": lambda t=tensors: lambda: new_linear(t, SPEC),
        }
        for name, tensors in matrices.items()
    }
    builds["expert in place"] = {"old": in_place, "new": in_place}
    builds["expert moved"] = {"old": moved, "new": in_place}
    times: dict[str, dict[str, list[float]]] = {name: {"old": [], "new": []} for name in builds}
    for _ in range(args.runs):
        for name, ways in builds.items():
            results = {}
            for way, build in ways.items():
                # The in-place row swaps the backend's function: the codec reaches it through the module.
                old_way = way == "old" and name != "expert moved"
                hqq_backend.host_linear = old_host_linear if old_way else new_linear
                seconds, results[way] = cpu_seconds(build)
                times[name][way].append(seconds)
            hqq_backend.host_linear = new_linear
            if name.startswith("expert"):
                # Both experts are views of the one slot, so compare the new one with a fresh old build.
                hqq_backend.host_linear = old_host_linear
                old = codec.materialize(unpack_expert(stored, layout), torch.float32, "cpu")
                hqq_backend.host_linear = new_linear
                pairs = [(getattr(old, m), getattr(results["new"], m)) for m in ("w1", "w2", "w3")]
            else:
                pairs = [(results["old"], results["new"])]
            if not all(same_linear(a, b) for a, b in pairs):
                raise SystemExit(f"{name}: the new build's bytes differ from the old one's")
    summary = {
        "threads": args.threads,
        "runs": args.runs,
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
        "rows": {
            name: {
                "old_ms": round(1000 * statistics.median(ways["old"]), 1),
                "new_ms": round(1000 * statistics.median(ways["new"]), 1),
                "old_over_new": round(
                    statistics.median(o / n for o, n in zip(ways["old"], ways["new"], strict=True)), 2
                ),
            }
            for name, ways in times.items()
        },
    }
    print(f"{'':18} {'old ms':>8} {'new ms':>8} {'old/new':>8}")
    for name, row in summary["rows"].items():
        print(f"{name:18} {row['old_ms']:8.1f} {row['new_ms']:8.1f} {row['old_over_new']:8.2f}")
    print(f"load average {' '.join(summary['load_average'])}, {args.threads} thread(s), {args.runs} runs")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
