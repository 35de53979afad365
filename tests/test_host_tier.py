"""The host tier on its own: budget, eviction policy, holds, counters and damaged reads, over a raw file of
hand-made experts (``offload.experts.host_tier``, ``offload.experts.disk``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offload.errors import CacheError, CheckpointError
from offload.experts.disk import EmulatedDisk, FileDisk, TensorRead, parse_disk
from offload.experts.host_tier import HostTier
from offload.experts.packing import ExpertLayout

LAYOUT = ExpertLayout.of({"a": torch.empty(4, dtype=torch.float32), "b": torch.empty(10, dtype=torch.uint8)})
STORED = 4 * 4 + 10  # one expert's stored bytes, without the layout's padding


def expert_tensors(layer: int, expert: int) -> dict[str, torch.Tensor]:
    return {
        "a": torch.full((4,), float(10 * layer + expert)),
        "b": torch.arange(10, dtype=torch.uint8) + 16 * layer + expert,
    }


def write_experts(path: Path, layers: int, experts: int) -> list[list[list[TensorRead]]]:
    """A file holding every expert's tensors back to back, and where each lies."""
    payload = bytearray(b"header..")
    reads = []
    for layer in range(layers):
        reads.append([])
        for expert in range(experts):
            pieces = []
            for name, tensor in expert_tensors(layer, expert).items():
                data = tensor.numpy().tobytes()
                pieces.append(
                    TensorRead(path, len(payload), len(data), f"l{layer}.e{expert}.{name}", tensor.dtype)
                )
                payload += data
            reads[layer].append(pieces)
    path.write_bytes(bytes(payload))
    return reads


def make_tier(
    tmp_path: Path, slots: int, *, layers: int = 2, experts: int = 4, policy: str = "lru", **options
) -> HostTier:
    reads = write_experts(tmp_path / "experts.bin", layers, experts)
    disk = options.pop("disk", None) or FileDisk()
    return HostTier([LAYOUT] * layers, reads, slots * LAYOUT.nbytes + 7, disk, policy=policy, **options)


def use(tier: HostTier, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One demand as the engine makes it: fetch, read, step."""
    tier.fetch(layer, expert)
    tensors = tier.tensors(layer, expert)
    tier.note_step(layer, [expert])
    return tensors


def test_the_budget_bounds_the_bytes_held_and_every_read_is_exact(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=3)
    assert tier.slots == 3 and tier.nbytes == 3 * LAYOUT.nbytes <= tier.budget_bytes
    for layer in range(2):
        for expert in range(4):
            tensors = use(tier, layer, expert)
            for name, want in expert_tensors(layer, expert).items():
                assert torch.equal(tensors[name], want), (layer, expert, name)
            assert len(tier.resident()) <= 3
    assert tier.nbytes == 3 * LAYOUT.nbytes


def test_a_budget_larger_than_every_expert_holds_them_all_and_no_more(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=100)
    assert tier.slots == 8 and tier.nbytes == tier.total_bytes


def test_a_budget_below_one_layers_step_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(
        CacheError, match=r"--host-memory .* holds 1 experts .* needs 2 \(give at least"
    ) as error:
        make_tier(tmp_path, slots=1, min_slots=2)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("policy", "evicted"), [("lru", 0), ("lrfu", 1)])
def test_the_policy_picks_the_victim(tmp_path: Path, policy: str, evicted: int) -> None:
    tier = make_tier(tmp_path, slots=3, policy=policy)
    for _ in range(5):  # expert 0: used often, long ago
        use(tier, 0, 0)
    use(tier, 0, 1)  # expert 1: once, then expert 2: once, most recently
    use(tier, 0, 2)
    use(tier, 0, 3)  # full: LRU drops the least recent (0), LRFU the least used (1)
    assert sorted(e for _, e in tier.resident()) == sorted({0, 1, 2, 3} - {evicted})


def test_held_and_reserved_experts_are_never_evicted(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=2)
    copied = {"done": False}
    use(tier, 0, 0)
    tier.hold(0, 0, lambda: copied["done"], lambda: copied.update(done=True))  # a copy still reads it
    tier.fetch(0, 1)  # reserved for this layer, not yet handed over
    assert not tier.prefetch(1, 0)  # no room without waiting: a guess gives up
    # A demand waits for the copy, then takes its slot; the reserved expert stays.
    use(tier, 1, 1)
    assert copied["done"] and set(tier.resident()) == {(0, 1), (1, 1)}


def test_a_demand_with_every_slot_reserved_is_one_line(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=2)
    tier.fetch(0, 0)
    tier.fetch(0, 1)
    with pytest.raises(
        CacheError, match=r"all needed by the current layer at once; raise the budget \(--host-memory "
    ):
        tier.buffer(0, 2)


def test_counters_on_a_hand_trace(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=3)  # a slot left free for the guess (a full LRU tier takes none)
    for expert in (0, 1, 0, 1):  # miss, miss, hit, hit
        use(tier, 0, expert)
    assert tier.prefetch(1, 3) and tier.prefetch(1, 3)  # one read: the second finds it arriving
    use(tier, 1, 3)  # a hit on the prefetched expert
    layer0, layer1 = (stats for stats in tier.stats.layers)
    assert (layer0.accesses, layer0.hits, layer0.misses, layer0.reads) == (4, 2, 2, 2)
    assert layer0.disk_bytes_read == 2 * STORED and layer0.prefetch_reads == 0
    assert (layer1.accesses, layer1.hits, layer1.misses) == (1, 1, 0)
    assert (layer1.reads, layer1.prefetch_reads) == (1, 1)
    total = tier.stats.as_dict()
    assert total["disk_bytes_read"] == 3 * STORED and total["hit_rate"] == pytest.approx(3 / 5)
    assert total["disk_wait_seconds"] >= 0
    tier.reset_stats()
    assert tier.stats.as_dict()["accesses"] == 0


def test_the_emulated_disk_reads_the_same_bytes(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=2, disk=EmulatedDisk(50.0))
    tensors = use(tier, 1, 2)
    assert torch.equal(tensors["b"], expert_tensors(1, 2)["b"])
    assert "emulated disk, 50 GB/s" in tier.describe()


def test_a_short_read_is_one_line(tmp_path: Path) -> None:
    """A file shorter than its tensors from the start (never a checkpoint the loader accepted: its header is
    checked against its size) reads short."""
    path = tmp_path / "experts.bin"
    reads = write_experts(path, 2, 4)
    path.write_bytes(path.read_bytes()[:40])
    tier = HostTier([LAYOUT] * 2, reads, 2 * LAYOUT.nbytes, FileDisk())
    with pytest.raises(
        CheckpointError, match=r"experts.bin: tensor l0.e1.a is cut short \(the file is truncated\)"
    ):
        use(tier, 0, 1)
    # The failed read left nothing behind: a later demand tries again.
    assert (0, 1) not in tier.resident()


def test_a_file_that_changes_size_after_load_is_one_line(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=2)
    use(tier, 0, 0)  # opens the file
    path = tmp_path / "experts.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(
        CheckpointError, match=r"experts.bin: tensor l1.e0.a: the file changed size since it was"
    ):
        use(tier, 1, 0)


def test_nan_in_a_stored_float_is_one_line(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=2)
    path = tmp_path / "experts.bin"
    data = bytearray(path.read_bytes())
    offset = 8 + STORED  # layer 0, expert 1, tensor a (after the file's 8-byte head and expert 0)
    data[offset : offset + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor l0.e1.a holds NaN or inf values"):
        use(tier, 0, 1)


@pytest.mark.parametrize("spec", ["disk", "emulated", "emulated:0", "emulated:x", "emulated:nan", "file:2"])
def test_a_bad_disk_spec_is_one_line(spec: str) -> None:
    with pytest.raises(CacheError, match=r"--disk .*: expected 'file' or 'emulated:GBPS'"):
        parse_disk(spec)


def test_good_disk_specs() -> None:
    with parse_disk("file") as disk:
        assert isinstance(disk, FileDisk)
    with parse_disk("emulated:2.5") as disk:
        assert isinstance(disk, EmulatedDisk) and disk.gbps == 2.5


def test_a_new_pass_ends_the_reservations_an_interrupted_one_left(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=2)
    tier.fetch(0, 0)
    tier.fetch(0, 1)  # then the pass stopped before using them
    tier.release()
    assert torch.equal(use(tier, 1, 2)["a"], expert_tensors(1, 2)["a"])


def test_finished_holds_are_forgotten_even_when_nothing_is_evicted(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=100)  # every expert fits: the tier never looks for a victim
    use(tier, 0, 0)
    for _ in range(1000):
        tier.hold(0, 0, lambda: True, lambda: None)  # a copy that has already read the slot
    assert tier.holds(0, 0) == 1
