"""The flags that act only on offloaded experts: --host-compute and --host-ratio place cache misses,
--cache-policy evicts from the cache, --link copies into it and --prefetch N guesses what to copy. With every
expert resident (the cpu profile, the default without CUDA) there is none of that, so a flag the user gives is
refused in one line rather than ignored; the same keys in a profile are defaults, and stay accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli_flags import baby, command_args, garbage  # noqa: F401  (fixtures)
from tests.test_cli_generate import offload_here

COMMANDS = [("generate",), ("chat",), ("bench",), ("serve",)]


def args_for(command: tuple[str, ...], model: Path, tmp_path: Path) -> list[str]:
    if command == ("serve",):
        return ["serve", "--model", str(model), "--port", "0"]
    return command_args(command, model, tmp_path)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize(
    ("flags", "named", "missing"),
    [
        (["--host-ratio", "10"], "--host-ratio 10", "no cache miss to place on the host"),
        (["--host-compute", "always"], "--host-compute always", "no cache miss to place on the host"),
        (["--host-compute", "never"], "--host-compute never", "no cache miss to place on the host"),
        (
            ["--host-compute", "auto", "--host-ratio", "2.5"],
            "--host-ratio 2.5 and --host-compute auto",
            "no cache miss to place on the host;",
        ),
        (["--cache-policy", "lru"], "--cache-policy lru", "no expert cache to evict from"),
        (["--cache-policy", "lrfu"], "--cache-policy lrfu", "no expert cache to evict from"),
        (["--prefetch", "2"], "--prefetch 2", "no expert to prefetch"),
        (["--link", "emulated:12"], "--link emulated:12", "no expert to copy over a link"),
        (["--link", "local"], "--link local", "no expert to copy over a link"),
        (
            ["--cache-policy", "lru", "--link", "local", "--prefetch", "1"],
            "--cache-policy lru, --prefetch 1 and --link local",
            "no expert cache to evict from, no expert to prefetch and no expert to copy over a link",
        ),
    ],
)
def test_offload_flags_with_every_expert_resident_are_one_line_before_any_weight(
    command: tuple[str, ...],
    flags: list[str],
    named: str,
    missing: str,
    garbage: Path,  # noqa: F811  (a fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    args = [*args_for(command, garbage, tmp_path), "--profile", "cpu", "--threads", "1", *flags]
    code, out, err = offload_here(monkeypatch, capfd, *args)
    assert code == 2 and err.count("\n") == 1, err  # the flag's error, not the unreadable weights'
    assert err.startswith(f"error: {named}: every expert is resident (profile cpu), so there is {missing}")
    assert "offloaded experts: add -k K (e.g. -k 4)" in err
    assert "serving" not in out


@pytest.mark.parametrize("flags", [["--prefetch", "2"], ["-k", "all", "--prefetch", "0"]])
def test_trace_record_refuses_prefetch_only_where_nothing_is_guessed(
    flags: list[str],
    garbage: Path,  # noqa: F811  (a fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    """trace record serves resident experts through a cache of every expert so that its guesses are recorded;
    with -k all given it keeps them resident, and no guess is made."""
    base = [*args_for(("trace", "record"), garbage, tmp_path), "--profile", "cpu", "--threads", "1"]
    code, _, err = offload_here(monkeypatch, capfd, *base, "-k", "all", "--prefetch", "2")
    assert code == 2 and err.startswith("error: --prefetch 2: every expert is resident (profile cpu)"), err
    code, _, err = offload_here(monkeypatch, capfd, *base, *flags)  # past the flags: the garbage weights
    assert code == 2 and "every expert is resident" not in err, err


def test_offloaded_runs_and_profiles_setting_the_same_keys_are_accepted(
    baby: Path,  # noqa: F811  (a fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    base = [*command_args(("generate",), baby, tmp_path), "--threads", "1"]
    offloaded = ["-k", "3", "--host-ratio", "10", "--host-compute", "never", "--cache-policy", "lru"]
    code, _, err = offload_here(monkeypatch, capfd, *base, "--profile", "cpu", *offloaded, "--link", "local")
    assert code == 0, err
    # --prefetch 0 asks for what happens anyway with every expert resident
    code, _, err = offload_here(monkeypatch, capfd, *base, "--profile", "cpu", "--prefetch", "0")
    assert code == 0, err
    profile = tmp_path / "resident.toml"
    profile.write_text(
        '[device]\nkind = "cpu"\n[cache]\nexperts_per_layer = "all"\npolicy = "lru"\n'
        '[prefetch]\nexperts = 3\n[quant]\nattention = "none"\nexperts = "none"\n[host]\ncompute = "never"\n',
        encoding="utf-8",
    )
    code, out, err = offload_here(monkeypatch, capfd, *base, "--profile", str(profile))
    assert code == 0, err
    assert json.loads(out)["cache"] is None  # every expert resident: the profile's keys had nothing to do


def test_a_host_tier_takes_prefetch_guesses_with_every_expert_resident(
    baby: Path,  # noqa: F811  (a fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    """With --host-memory and every expert resident, the experts run on the host from the tier, and --prefetch
    reads the next layer's guesses ahead; the cache's flags still have nothing to act on."""
    base = [*command_args(("generate",), baby, tmp_path), "--profile", "cpu", "--threads", "1"]
    tier = ["--host-memory", "0.01", "--dtype", "float32"]
    code, out, err = offload_here(monkeypatch, capfd, *base, *tier, "--prefetch", "2")
    assert code == 0, err
    assert json.loads(out)["host_tier"] is not None
    code, _, err = offload_here(monkeypatch, capfd, *base, *tier, "--cache-policy", "lru")
    assert code == 2 and err.startswith(
        "error: --cache-policy lru: every expert runs on the host from the host tier (profile cpu)"
    ), err


def test_bench_ablate_sets_its_own_k_and_takes_the_offload_flags(
    baby: Path,  # noqa: F811  (a fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    args = [*command_args(("bench",), baby, tmp_path), "--profile", "cpu", "--threads", "1", "--ablate"]
    flags = ["--cache-policy", "lru", "--prefetch", "1", "--link", "local", "--host-compute", "never"]
    code, out, err = offload_here(monkeypatch, capfd, *args, *flags)
    assert code == 0, err
    report = json.loads(out)
    assert (report["experts_per_layer"], report["cache_policy"], report["prefetch"]) == (4, "lru", 1)
