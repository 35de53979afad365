"""Reading a checkpoint leaves nothing of its files in the process: tensors own their memory and no
mapping of a weight file outlives the load (a kept mapping shows in RSS as a second copy of the model).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offload.checkpoint.reader import Checkpoint
from offload.loading import OffloadOptions, load_model

MAPS = Path("/proc/self/maps")


def mapped_weight_files(directory: Path) -> list[str]:
    return [line for line in MAPS.read_text().splitlines() if str(directory.resolve()) in line]


def test_a_tensor_read_equals_the_file_and_owns_its_memory(baby_dir: Path) -> None:
    checkpoint = Checkpoint(baby_dir)
    stored = load_file(str(baby_dir / "model.safetensors"))
    for name in sorted(checkpoint.names())[:12]:
        tensor = checkpoint.get(name)
        assert tensor.dtype == stored[name].dtype and torch.equal(tensor, stored[name]), name
        tensor.zero_()  # writable, and no other reader sees the change
        assert torch.equal(checkpoint.get(name), stored[name]), name


def private_copy(source: Path, directory: Path) -> Path:
    """A copy of the checkpoint that no other test has open."""
    directory.mkdir()
    for path in source.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    return directory


@pytest.mark.skipif(not MAPS.is_file(), reason="needs /proc/self/maps (Linux)")
@pytest.mark.parametrize(
    "offload", [None, OffloadOptions(experts_per_layer=1, prefetch=1)], ids=["resident", "K1"]
)
def test_no_weight_file_stays_mapped_after_loading(
    tmp_path: Path, baby_dir: Path, offload: OffloadOptions | None
) -> None:
    directory = private_copy(baby_dir, tmp_path / "copy")
    model = load_model(directory, dtype="float32", offload=offload)
    assert mapped_weight_files(directory) == []
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 7]]))).all()


def test_a_file_cut_short_after_opening_is_one_clear_line(tmp_path: Path, baby_dir: Path) -> None:
    from offload.errors import CheckpointError

    directory = private_copy(baby_dir, tmp_path / "cut")
    checkpoint = Checkpoint(directory)
    weights = directory / "model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size - 64)
    last = max(checkpoint.names(), key=lambda name: checkpoint._offsets[name][1])
    with pytest.raises(CheckpointError, match="cut short") as raised:
        checkpoint.get(last)
    assert "\n" not in str(raised.value)
