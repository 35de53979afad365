"""`bench --json FILE`: a place that cannot be written fails before the run; a late failure still shows the results."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.test_bench import bench_baby  # noqa: F401  (a fixture)
from tests.test_cli_generate import offload_here


def never_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the benchmark ran although --json could not be written")


@pytest.mark.parametrize("case", ["a directory", "under a regular file", "read-only"])
def test_an_unwritable_json_fails_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, case: str
) -> None:
    regular = tmp_path / "regular.txt"
    regular.write_text("mine")
    target = {
        "a directory": tmp_path,
        "under a regular file": regular / "b.json",
        "read-only": tmp_path / "b.json",
    }
    if case == "read-only":  # tests may run as root, which writes anywhere: imitate the refusal

        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr("tempfile.mkstemp", refuse)
    monkeypatch.setattr("offload.bench.run.run_bench", never_run)
    code, _, err = offload_here(monkeypatch, capfd, "bench", "--json", str(target[case]))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --json {target[case]}: ")


def test_a_write_that_fails_at_the_end_still_prints_the_results(
    bench_baby: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    def full_disk(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("offload.atomic.write_text_atomically", full_disk)
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "b.json"
    args = [
        "bench",
        "--model",
        str(bench_baby),
        "--dtype",
        "float32",
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "2",
    ]
    code, stdout, err = offload_here(monkeypatch, capfd, *args, "--runs", "1", "--json", str(out))
    assert code == 2
    assert "decode tok/s" in stdout  # the table
    assert f"--json {out}: cannot write the report (No space left on device); the results are above" in err
