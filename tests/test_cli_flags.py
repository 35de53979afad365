"""The load flags and every numeric flag, through the real entry point: declared once, resolved once,
checked before any weight is read, and bounded."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click
import pytest
import typer

from offload.settings.flags import FIELDS
from tests.baby import BabySpec, write_baby
from tests.test_cli_generate import offload_here

LOADING_COMMANDS = {
    ("generate",): set(FIELDS),
    ("chat",): set(FIELDS),
    ("bench",): set(FIELDS),
    ("trace", "record"): set(FIELDS)
    - {"cache_policy", "link", "host_compute", "host_ratio"},  # routing: none
}


def sentencepiece_v1() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A baby with Mixtral's real tokenizer (8 experts per layer, a context of 512)."""
    directory = tmp_path_factory.mktemp("flags-baby")
    write_baby(BabySpec("flags-baby", hidden_size=48, intermediate_size=64, vocab_size=32000), directory)
    shutil.copy(sentencepiece_v1(), directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def garbage(baby: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The baby's config.json and tokenizer, with weights that are not safetensors at all.

    Any command that reads a weight fails here with a checkpoint error, so a flag error seen instead
    proves the flag was checked first.
    """
    directory = tmp_path_factory.mktemp("garbage")
    shutil.copy(baby / "config.json", directory / "config.json")
    shutil.copy(baby / "tokenizer.model", directory / "tokenizer.model")
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    return directory


def command_args(command: tuple[str, ...], model: Path, tmp_path: Path) -> list[str]:
    """The smallest run of ``command`` on ``model``."""
    if command == ("generate",):
        return ["generate", "--model", str(model), "--max-new-tokens", "2", "--json", "Hi"]
    if command == ("chat",):
        return ["chat", "--model", str(model), "--max-new-tokens", "2"]
    if command == ("bench",):
        return [
            "bench",
            "--model",
            str(model),
            "--prompt-tokens",
            "3",
            "--new-tokens",
            "2",
            "--runs",
            "1",
            "--json",
            "-",
        ]
    return ["trace", "record", str(tmp_path / "t.trace"), "--model", str(model), "--max-new-tokens", "2"]


def click_command(path: tuple[str, ...]) -> click.Command:
    from cli.main import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


@pytest.mark.parametrize("command", list(LOADING_COMMANDS), ids=" ".join)
def test_every_loading_command_declares_the_load_flags(command: tuple[str, ...]) -> None:
    options = {param.name for param in click_command(command).params}
    assert LOADING_COMMANDS[command] <= options


@pytest.mark.parametrize("command", list(LOADING_COMMANDS), ids=" ".join)
def test_one_loader_one_config_read_and_the_flags_reach_it(
    command: tuple[str, ...],
    baby: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    """generate, chat, bench and trace record all load through Engine.load, parsing config.json once."""
    from offload.config import ModelConfig
    from offload.engine import Engine

    loads: list[object] = []
    configs: list[Path] = []
    real_load, real_from_file = Engine.load.__func__, ModelConfig.from_file.__func__  # type: ignore[attr-defined]

    def spy_load(cls: type, *args: object, **kwargs: object) -> Engine:
        engine = real_load(cls, *args, **kwargs)
        loads.append(engine)
        return engine

    def spy_from_file(cls: type, path: Path) -> ModelConfig:
        configs.append(Path(path))
        return real_from_file(cls, path)

    monkeypatch.setattr(Engine, "load", classmethod(spy_load))
    monkeypatch.setattr(ModelConfig, "from_file", classmethod(spy_from_file))
    flags = ["--dtype", "float32", "--threads", "1", "-k", "3", "--prefetch", "1"]
    if command != ("trace", "record"):
        flags += ["--host-compute", "always", "--host-ratio", "7"]
    code, out, err = offload_here(monkeypatch, capfd, *command_args(command, baby, tmp_path), *flags)
    assert code == 0, err
    assert len(loads) == 1, "one Engine.load per command"
    assert configs == [baby / "config.json"], "config.json is parsed once"
    settings = loads[0].settings
    assert settings.threads == 1
    if command == ("bench",):  # bench's loader holds one slot; its rows make their own caches of K
        report = json.loads(out)
        assert report["experts_per_layer"] == 3 and report["prefetch"] == 1
    else:
        assert settings.offload.experts_per_layer == 3 and settings.offload.prefetch == 1
    if command == ("bench",):  # the loader copies every miss; the measured row uses the flags
        report = json.loads(out)
        assert (report["host"]["host_compute"], report["host"]["host_ratio"]) == ("always", 7.0)
        # Which decode misses a prefetch covers in time depends on timing; prefill and decode together
        # always miss on a cold cache of 3 slots of 8.
        row = report["rows"][0]
        assert row["prefill"]["host_computes"] + row["decode"]["host_computes"] > 0
    elif command != ("trace", "record"):
        assert (settings.offload.host_compute, settings.offload.host_ratio) == ("always", 7.0)


ALL = tuple(LOADING_COMMANDS)
SAMPLING = (("generate",), ("chat",))
BAD_FLAGS = [
    # (flag and value, the commands that have it, what the one-line error must say)
    (["-k", "99"], ALL, "from 1 to 8"),  # against config.json's num_local_experts
    (["--experts-per-layer", "1,2,3"], ALL, "lists 3 values but the model has 2 layers"),
    (["--prefetch", "-1"], ALL, "--prefetch -1 is out of range: 0 (off) to 8"),
    (["--prefetch", "99"], ALL, "--prefetch 99 is out of range: 0 (off) to 8"),
    (["--link", "emulated:fast"], ALL[:3], "emulated:fast"),
    (["--cache-policy", "fifo"], ALL[:3], "--cache-policy 'fifo'"),
    (
        ["--host-compute", "sometimes"],
        ALL[:3],
        "--host-compute 'sometimes' is not one of auto, never, always",
    ),
    (["--host-ratio", "0"], ALL[:3], "--host-ratio 0.0 is out of range: above 0 to"),
    (["--host-ratio", "nan"], ALL[:3], "--host-ratio nan is out of range"),
    (["--dtype", "float64"], ALL, "--dtype 'float64'"),
    (["--device", "tpu"], ALL, "--device 'tpu'"),
    (["--quant", "q4"], ALL, "--quant 'q4'"),
    (["--profile", "no-such-profile"], ALL, "no-such-profile"),
    (["--threads", "0"], ALL, "--threads 0 is out of range: 1 to"),
    (["--threads", "100000"], ALL, "--threads 100000 is out of range: 1 to"),  # segfaulted (exit 139)
    (["--seed", "99999999999999999999999"], (*SAMPLING, ALL[3]), "--seed 99999999999999999999999 is out of"),
    (["--seed", "-1"], (*SAMPLING, ALL[3]), "--seed -1 is out of range"),
    (["--temperature", "nan"], (*SAMPLING, ALL[3]), "--temperature nan is out of range"),
    (["--temperature", "inf"], (*SAMPLING, ALL[3]), "--temperature inf is out of range"),
    (["--temperature", "-1"], (*SAMPLING, ALL[3]), "--temperature -1.0 is out of range"),
    (["--temperature", "1e-300"], (*SAMPLING, ALL[3]), "--temperature 1e-300 is out of range"),
    (["--top-p", "nan"], SAMPLING, "--top-p nan is out of range"),
    (["--top-p", "0"], SAMPLING, "--top-p 0.0 is out of range: above 0 to 1"),
    (["--top-p", "1.5"], SAMPLING, "--top-p 1.5 is out of range"),
    (["--top-k", "-1"], SAMPLING, "--top-k -1 is out of range"),
    (["--max-new-tokens", "-1"], (*SAMPLING, ALL[3]), "--max-new-tokens -1 is out of range"),
    (["--max-new-tokens", "512"], (*SAMPLING, ALL[3]), "does not fit the model's context of 512"),
    (["--max-new-tokens", str(1 << 40)], (*SAMPLING, ALL[3]), "is out of range"),
    (["--runs", "0"], (("bench",),), "--runs 0 is out of range"),
    (["--runs", "100000000"], (("bench",),), "--runs 100000000 is out of range"),
    (["--new-tokens", "1"], (("bench",),), "--new-tokens 1 is out of range: 2 to"),
    (["--prompt-tokens", "0"], (("bench",),), "--prompt-tokens 0 is out of range"),
    (["--prompt-tokens", "600"], (("bench",),), "context of 512"),
    (["--copy-ratio", "nan"], (("bench",),), "--copy-ratio nan is out of range"),
    (["--copy-ratio", "0"], (("bench",),), "--copy-ratio 0.0 is out of range"),
]
CASES = [
    pytest.param(command, flag, message, id=f"{' '.join(command)} {' '.join(flag)}")
    for flag, commands, message in BAD_FLAGS
    for command in commands
]


@pytest.mark.parametrize(("command", "flag", "message"), CASES)
def test_bad_flags_are_one_line_before_any_weight_is_read(
    command: tuple[str, ...],
    flag: list[str],
    message: str,
    garbage: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    """On a checkpoint whose weights are garbage: the flag's error, never the checkpoint's."""
    import offload.loading

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before its flags were checked")

    monkeypatch.setattr(offload.loading, "load_model", no_loading)
    args = [*command_args(command, garbage, tmp_path), *flag]
    code, out, err = offload_here(monkeypatch, capfd, *args, stdin=b"Hello\n")
    err = err.strip()
    assert code == 2, err
    assert message in err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Type a message" not in out  # chat refuses before its first prompt


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": 1e-300},
        {"seed": 1 << 64},
    ],
)
def test_sampling_params_refuse_what_the_flags_refuse(changes: dict) -> None:
    """Callers of the engine (chat's /set, a server) get the same limits as the flags and the profiles."""
    import offload.generate
    import offload.settings.limits
    from offload.errors import OffloadError
    from offload.generate import SamplingParams

    with pytest.raises(OffloadError, match=next(iter(changes))):
        SamplingParams(**changes)
    for name in ("MIN_TEMPERATURE", "MAX_TEMPERATURE", "MAX_SEED", "MIN_PENALTY", "MAX_PENALTY"):
        assert getattr(offload.settings.limits, name) == getattr(offload.generate, name)


@pytest.mark.parametrize("value", ["0", str(1 << 41)])
def test_replay_expert_bytes_is_bounded(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    code, _, err = offload_here(
        monkeypatch, capfd, "trace", "replay", str(tmp_path / "none.trace"), "--expert-bytes", value
    )
    assert code == 2 and err.strip() == f"error: --expert-bytes {value} is out of range: 1 to 1099511627776"


@pytest.mark.parametrize(
    ("load", "expected"),
    [(0.0, 4), (0.9, 3), (1.9, 2), (3.5, 1), (12.0, 1)],  # 4 physical cores, busy ones left out
)
def test_default_threads_leave_out_the_cores_the_load_takes(
    load: float, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.settings import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    assert threads.default_threads() == expected


def test_default_threads_follow_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from offload.settings import threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # never more than the CPUs there are
    assert threads.default_threads() == 8


def test_generate_json_and_chat_stats_say_how_many_threads_ran(
    baby: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import types

    import torch
    from rich.console import Console

    from cli.stats_view import stats_table
    from offload.settings.threads import available_cpus

    before, wanted = torch.get_num_threads(), min(2, available_cpus())
    try:
        args = ["generate", "--model", str(baby), "--max-new-tokens", "2", "--json", "-t", str(wanted), "Hi"]
        code, out, err = offload_here(monkeypatch, capfd, *args)
        assert code == 0, err
        assert json.loads(out)["threads"] == wanted == torch.get_num_threads()
        console = Console(record=True, width=120)
        console.print(
            stats_table(
                types.SimpleNamespace(
                    engine=types.SimpleNamespace(cache_stats=lambda: None), last_timings=None
                )
            )
        )
        assert f"{wanted} CPU threads" in console.export_text()
    finally:
        torch.set_num_threads(before)


HELP_COMMANDS = [
    ["generate"], ["chat"], ["bench"], ["convert"], ["plan"], ["profiles", "list"], ["profiles", "show"],
    ["trace", "record"], ["trace", "replay"], [],
]  # fmt: skip


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "offload")
def test_help_shows_arguments_in_capitals_and_flags_without_a_type(command: list[str]) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    shown = CliRunner().invoke(app, [*command, "--help"], prog_name="offload", env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "<bool>" not in shown.output  # --json, --help and the like take no value
    assert "{" not in shown.output.splitlines()[1]  # the usage line: PROMPT, not {prompt}
    if command == ["generate"]:
        assert "Usage: offload generate [OPTIONS] [PROMPT]" in shown.output  # or --prompt-file
        assert "DIR|REPO" in shown.output  # --model says what it takes


def test_a_missing_argument_is_named_as_in_the_usage_line(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    code, _, err = offload_here(monkeypatch, capfd, "generate")
    assert code == 2 and "give PROMPT" in err and "--prompt-file" in err


def test_shell_completion_is_on() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    assert "--install-completion" in runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output

    def complete(words: str) -> str:
        env = {
            "_OFFLOAD_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        return runner.invoke(app, [], prog_name="offload", env=env).output

    assert complete("offload gen").split() == ["generate"]
    assert "--threads" in complete("offload bench --thr").split()


def test_bitsandbytes_kernels_warning_is_not_printed() -> None:
    """Only that warning: another one from the same bitsandbytes logger still shows."""
    import subprocess

    script = (
        "import logging, torch\n"
        "from offload.quant.spec import QuantSpec\n"
        "from offload.quant import bnb_backend\n"
        "bnb_backend.quantize(torch.randn(64, 64), QuantSpec.parse('bnb:nf4'), 'w')\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. pip install kernels', 'x')\n"
        "log.warning('another warning')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert "kernels" not in done.stderr
    assert "another warning" in done.stderr
