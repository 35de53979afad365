"""--host-compute and --host-ratio place cache misses; with every expert resident there is none, so they are
refused in one line rather than ignored (the cpu profile, the default without CUDA, keeps every expert resident)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli_flags import baby, command_args, garbage  # noqa: F401  (fixtures)
from tests.test_cli_generate import offload_here

COMMANDS = [("generate",), ("chat",), ("bench",)]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--host-ratio", "10"], "--host-ratio 10"),
        (["--host-compute", "always"], "--host-compute always"),
        (["--host-compute", "auto", "--host-ratio", "2.5"], "--host-ratio 2.5 and --host-compute auto"),
    ],
)
def test_host_flags_with_every_expert_resident_are_one_line_before_any_weight(
    command: tuple[str, ...],
    flags: list[str],
    named: str,
    garbage: Path,  # noqa: F811  (a fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    args = [*command_args(command, garbage, tmp_path), "--profile", "cpu", "--threads", "1", *flags]
    code, _, err = offload_here(monkeypatch, capfd, *args)
    assert code == 2 and err.count("\n") == 1, err  # the flag's error, not the unreadable weights'
    assert err.startswith(f"error: {named}: every expert is resident (profile cpu)") and "-k K" in err


def test_never_and_offloaded_runs_are_accepted(
    baby: Path,  # noqa: F811  (a fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    base = [*command_args(("generate",), baby, tmp_path), "--profile", "cpu", "--threads", "1"]
    code, _, err = offload_here(monkeypatch, capfd, *base, "--host-compute", "never")  # what happens anyway
    assert code == 0, err
    code, _, err = offload_here(monkeypatch, capfd, *base, "-k", "3", "--host-ratio", "10")
    assert code == 0, err
