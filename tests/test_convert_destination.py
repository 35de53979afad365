"""`offload convert` never removes what it did not write, fails in one line, and shows progress in a log."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from offload.checkpoint.convert import convert_checkpoint
from offload.checkpoint.convert_output import INSIDE, PARTIAL, is_convert_name
from offload.checkpoint.shard_file import ShardFile
from offload.errors import CheckpointError
from offload.loading import load_model
from offload.quant.scheme import QuantScheme
from tests.test_cli_generate import offload_here
from tests.test_convert import LAYERS, source  # noqa: F401  (source is a fixture)

ARGS = ["--experts", "bnb:nf4"]


def entries(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def test_force_into_the_current_directory_keeps_other_files(
    source: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    here = tmp_path / "work"
    (here / "notes").mkdir(parents=True)
    (here / "keep.txt").write_text("mine")
    (here / "notes" / "a.txt").write_text("also mine")
    monkeypatch.chdir(here)
    for _ in range(2):  # the second run replaces the first one's output
        code, _, err = offload_here(monkeypatch, capfd, "convert", str(source), ".", *ARGS, "--force")
        assert code == 0, err
        assert (here / "keep.txt").read_text() == "mine"
        assert (here / "notes" / "a.txt").read_text() == "also mine"
        assert [name for name in entries(here) if not is_convert_name(name)] == ["keep.txt", "notes"]
        assert (
            load_model(here).quant_scheme.experts[0]
            == QuantScheme.build(LAYERS, experts="bnb:nf4").experts[0]
        )
    assert entries(tmp_path) == ["work"]  # no partial directory beside it


def test_an_empty_directory_needs_no_force(source: Path, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "out").mkdir()
    convert_checkpoint(source, tmp_path / "out", QuantScheme.build(LAYERS, experts="bnb:nf4"))
    load_model(tmp_path / "out")


def test_force_never_replaces_what_convert_did_not_write(
    source: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    float_copy = tmp_path / "float-copy"
    shutil.copytree(
        source, float_copy
    )  # a checkpoint, but not a convert output: its config.json is the user's
    before = {name: (float_copy / name).read_bytes() for name in entries(float_copy)}
    code, _, err = offload_here(monkeypatch, capfd, "convert", str(source), str(float_copy), *ARGS, "--force")
    assert code == 2 and "which convert did not write" in err and len(err.strip().splitlines()) == 1
    assert {name: (float_copy / name).read_bytes() for name in entries(float_copy)} == before

    regular = tmp_path / "file.bin"
    regular.write_text("mine")
    code, _, err = offload_here(monkeypatch, capfd, "convert", str(source), str(regular), *ARGS, "--force")
    assert code == 2 and "is not a directory" in err
    assert regular.read_text() == "mine"


def test_a_failed_replacement_puts_the_old_output_back(
    source: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    old_scheme = QuantScheme.build(LAYERS, experts="bnb:int8")
    convert_checkpoint(source, out, old_scheme)
    (out / "keep.txt").write_text("mine")
    before = {name: (out / name).read_bytes() for name in entries(out)}
    rename = Path.rename

    def fail_on_the_new_config(self: Path, target: Path) -> Path:
        if self.name == "config.json" and self.parent.name.startswith(INSIDE):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", fail_on_the_new_config)
    with pytest.raises(CheckpointError, match="Input/output error"):
        convert_checkpoint(source, out, QuantScheme.build(LAYERS, experts="bnb:nf4"), force=True)
    assert {name: (out / name).read_bytes() for name in entries(out)} == before
    assert load_model(out).quant_scheme == old_scheme


def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second shard fills the disk: some bytes reach the file, then ENOSPC."""
    close, calls = ShardFile.close, []

    def closing(shard: ShardFile) -> None:
        calls.append(shard.path)
        if len(calls) == 2:
            shard.path.write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        close(shard)

    monkeypatch.setattr(ShardFile, "close", closing)


def test_a_full_disk_is_one_line_and_leaves_no_partial_output(
    source: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    full_disk(monkeypatch)
    out = tmp_path / "out"
    code, _, err = offload_here(monkeypatch, capfd, "convert", str(source), str(out), *ARGS)
    assert code == 2, err
    assert (
        err.strip().splitlines()[-1]
        == f"error: {out}: cannot write the converted checkpoint (No space left on device)"
    )
    assert "Traceback" not in err
    assert entries(tmp_path) == []

    convert_checkpoint(source, out, QuantScheme.build(LAYERS))  # an earlier output, to be replaced
    before = {name: (out / name).read_bytes() for name in entries(out)}
    full_disk(monkeypatch)
    code, _, err = offload_here(monkeypatch, capfd, "convert", str(source), str(out), *ARGS, "--force")
    assert code == 2 and "No space left on device" in err
    assert {name: (out / name).read_bytes() for name in entries(out)} == before
    assert entries(tmp_path) == ["out"]


def test_unwritable_destinations_are_one_line(
    source: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    regular = tmp_path / "file.bin"
    regular.write_text("mine")
    code, _, err = offload_here(monkeypatch, capfd, "convert", str(source), str(regular / "out"), *ARGS)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot write the converted checkpoint (Not a directory)" in err

    # Tests may run as root, which writes anywhere; a read-only place is imitated instead.
    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = offload_here(
        monkeypatch, capfd, "convert", str(source), str(tmp_path / "ro" / "out"), *ARGS
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot write the converted checkpoint (Read-only file system)" in err
    assert not list(tmp_path.glob(f"*{PARTIAL}*"))


def test_progress_outside_a_terminal_is_one_line_per_shard(
    source: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    code, _, err = offload_here(monkeypatch, capfd, "convert", str(source), str(tmp_path / "out"), *ARGS)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("convert: shard")]
    assert len(lines) == 1 + LAYERS
    assert lines[0].startswith(f"convert: shard 1/{1 + LAYERS} written (embedding, norm and lm_head)")
    assert lines[-1].startswith(f"convert: shard {1 + LAYERS}/{1 + LAYERS} written (layer {LAYERS - 1})")
