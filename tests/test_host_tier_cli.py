"""`--host-memory` and `--disk` on the command line: the same tokens as without them, the host tier's figures
in `generate --json`, and every bad value or damaged file as one line."""

from __future__ import annotations

import io
import json
import shutil
import types
from pathlib import Path

import pytest
from rich.console import Console

from cli.bench_view import bench_view
from offload.checkpoint.reader import Checkpoint
from tests.baby import BabySpec, write_baby
from tests.test_cli_generate import offload_here, sentencepiece_v1
from tests.test_host_tier_model import convert

GENERATE = (
    "generate",
    "--no-chat",
    "--temperature",
    "0",
    "--max-new-tokens",
    "12",
    "--threads",
    "1",
    "--json",
)
BUDGET = "0.00015"  # GiB: about half of the baby's 24 hqq:4:64 experts (13 KiB each)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A baby with a real tokenizer, converted by `offload convert` to hqq:4:64 experts."""
    root = tmp_path_factory.mktemp("tier-cli")
    source = root / "float"
    write_baby(
        BabySpec("tier-cli", hidden_size=64, intermediate_size=128, num_hidden_layers=3, vocab_size=32000),
        source,
    )
    shutil.copy(sentencepiece_v1(), source / "tokenizer.model")
    return convert(source, root / "hqq4", "--experts", "hqq:4:64")


def generate(monkeypatch, capfd, model: Path, *flags: str) -> dict:
    code, out, err = offload_here(monkeypatch, capfd, *GENERATE, "-m", str(model), *flags, "The cat")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize(
    "flags",
    [("-k", "2"), ("-k", "2", "--disk", "emulated:5", "--link", "emulated:5"), ()],
    ids=["offloaded", "emulated", "host-only"],
)
def test_generate_reports_the_tier_and_gives_the_same_tokens(
    converted: Path, monkeypatch, capfd, flags: tuple[str, ...]
) -> None:
    want = generate(monkeypatch, capfd, converted, *flags[:2])
    assert want["host_tier"] is None
    got = generate(monkeypatch, capfd, converted, *flags, "--host-memory", BUDGET)
    assert got["token_ids"] == want["token_ids"] and got["dtype"] == want["dtype"]
    tier = got["host_tier"]
    assert tier["budget_bytes"] == int(float(BUDGET) * 2**30) >= tier["bytes_held"] > 0
    assert tier["slots"] < tier["experts"] == 24
    assert tier["disk"] == ("emulated:5" if "--disk" in flags else "file")
    assert tier["misses"] > 0 and tier["disk_bytes_read"] > 0 and tier["disk_wait_seconds"] >= 0
    assert tier["hit_rate"] == tier["hits"] / tier["accesses"]
    assert len(tier["layers"]) == 3
    # The device cache's hit rate: none where the host computes every expert from the tier (not 0%).
    cache = got["cache"]
    if flags:
        assert cache["hit_rate"] == cache["hits"] / cache["accesses"]
    else:
        assert cache["hit_rate"] is None and cache["host_computes"] == cache["accesses"] > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--host-memory", "0"), "error: --host-memory 0.0 is out of range: above 0 to 1048576"),
        (("--host-memory", "-2"), "error: --host-memory -2.0 is out of range"),
        (("--host-memory", "nan"), "error: --host-memory nan is out of range"),
        (("--host-memory", "1", "--disk", "ssd"), "error: --disk 'ssd': expected 'file' or 'emulated:GBPS'"),
        (("--host-memory", "1", "--disk", "emulated:0"), "error: --disk 'emulated:0': expected"),
        (
            ("--disk", "emulated:2"),
            "error: --disk emulated:2 sets how the host tier reads experts, and there is",
        ),
        (("--host-memory", "0.00001"), "error: --host-memory 1e-05 GiB holds 0 experts of"),
    ],
)
def test_bad_tier_flags_are_one_line(converted: Path, monkeypatch, capfd, flags, message: str) -> None:
    code, out, err = offload_here(monkeypatch, capfd, *GENERATE, "-m", str(converted), *flags, "The cat")
    assert code in (1, 2) and err.startswith(message) and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""


def test_a_float_checkpoint_at_another_dtype_says_what_to_do(converted: Path, monkeypatch, capfd) -> None:
    source = converted.parent / "float"
    code, _, err = offload_here(
        monkeypatch,
        capfd,
        *GENERATE,
        "-m",
        str(source),
        "--host-memory",
        "1",
        "--dtype",
        "bfloat16",
        "The cat",
    )
    assert code in (1, 2) and err.count("\n") == 1
    assert "stores model.layers.0.block_sparse_moe.experts.0.w1.weight as float32" in err
    assert "give --dtype float32, or convert it (offload convert" in err


def test_a_damaged_expert_read_from_disk_is_one_line(
    tmp_path: Path, converted: Path, monkeypatch, capfd
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(converted, damaged)
    checkpoint = Checkpoint(damaged)
    prefix = "model.layers.2.block_sparse_moe.experts."
    names = sorted(n for n in checkpoint.names() if n.startswith(prefix))
    # Every expert's float tensors (its scales) get NaN: whichever the run reads, the read is refused.
    for name in names:
        path, offset, nbytes, dtype, _ = checkpoint.locate(name)
        if dtype.is_floating_point:
            with path.open("r+b") as file:
                file.seek(offset)
                file.write(b"\xff" * nbytes)  # NaN in every float format
    code, _, err = offload_here(
        monkeypatch, capfd, *GENERATE, "-m", str(damaged), "-k", "2", "--host-memory", BUDGET, "The cat"
    )
    assert code in (1, 2), err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "(the file is damaged)" in err and f"tensor {prefix}" in err and "holds NaN or inf values" in err


def test_the_profile_budget_is_the_default_and_the_flag_wins(
    tmp_path: Path, converted: Path, monkeypatch, capfd
) -> None:
    cpu = (Path(__file__).resolve().parent.parent / "profiles" / "cpu.toml").read_text()
    profile = tmp_path / "tier.toml"
    profile.write_text(cpu.replace('name = "cpu"', 'name = "tier"') + f"memory_gib = {BUDGET}\n")
    from_profile = generate(monkeypatch, capfd, converted, "-p", str(profile))["host_tier"]
    assert from_profile["budget_bytes"] == int(float(BUDGET) * 2**30)
    flag = generate(monkeypatch, capfd, converted, "-p", str(profile), "--host-memory", "0.0001")["host_tier"]
    assert flag["budget_bytes"] == int(0.0001 * 2**30)


def test_serve_reports_the_tier_per_answer_and_in_health(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'offload[serve]')")
    httpx = pytest.importorskip("httpx")
    from tests.serve_helpers import LiveServer

    # The demo model is bfloat16 float: the tier reads it as stored (the run's dtype follows).
    live = LiveServer(tmp_path, "-k", "4", "--host-memory", "0.003", "--disk", "emulated:5")
    try:
        body = {"model": "demo", "prompt": "The cat", "max_tokens": 8, "temperature": 0}
        answer = httpx.post(live.url + "/v1/completions", json=body, timeout=120).json()
        tier = answer["offload"]["host_tier"]
        assert tier["misses"] > 0 and tier["disk_bytes_read"] > 0
        assert tier["hit_rate"] == tier["hits"] / (tier["hits"] + tier["misses"])
        health = live.health()["host_tier"]
        assert health["budget_bytes"] == int(0.003 * 2**30) >= health["bytes_held"]
        assert health["disk"] == "emulated:5" and health["misses"] >= tier["misses"]
    finally:
        live.stop()


@pytest.mark.parametrize(("flags", "row"), [(("-k", "2"), "offloaded"), ((), "host-tier")])
def test_bench_reports_the_tier(tmp_path: Path, converted: Path, monkeypatch, capfd, flags, row: str) -> None:
    def bench(*extra: str) -> dict:
        path = tmp_path / "bench.json"
        command = ("bench", "-m", str(converted), "--runs", "1", "--new-tokens", "4", "--threads", "1")
        code, _, err = offload_here(monkeypatch, capfd, *command, *flags, *extra, "--json", str(path))
        assert code == 0, err
        return json.loads(path.read_text())

    plain = bench()
    report = bench("--host-memory", BUDGET, "--disk", "emulated:5")
    assert report["format"] == "offload-bench" and plain["host_tier"] is None
    assert report["rows"][0]["tokens"] == plain["rows"][0]["tokens"]
    assert report["host_tier"]["budget_bytes"] == int(float(BUDGET) * 2**30)
    assert report["host_tier"]["disk"] == "emulated:5" and report["host_tier"]["policy"] == "adaptive"
    measured = report["rows"][0]
    assert measured["name"] == row
    assert measured["memory"]["host"]["store_bytes"] == report["host_tier"]["bytes_held"]
    decode = measured["host_tier"]["decode"]
    assert decode["tokens"] == 3 and decode["accesses"] == decode["hits"] + decode["misses"] > 0
    assert decode["disk_bytes_read_per_token"] == decode["disk_bytes_read"] / 3
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(bench_view(report))
    table = console.export_text()
    assert "host tier (decode steps)" in table and "disk emulated:5" in table and "MB read/tok" in table


def test_chat_stats_show_the_tier_per_layer(converted: Path) -> None:
    from cli.stats_view import stats_table
    from offload.engine import Engine
    from offload.settings.flags import LoadFlags

    engine = Engine.load(converted, LoadFlags(experts_per_layer="2", host_memory=float(BUDGET), threads=1))
    ids = engine.prompt_ids("The cat", chat=False)
    *_, last = engine.stream(ids, max_new_tokens=4, sampling=engine.sampling(temperature=0))
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(stats_table(types.SimpleNamespace(engine=engine, last_timings=last.timings)))
    text = console.export_text()
    assert "host-tier hit" in text and "disk reads" in text and "MB read from disk" in text
    tier = engine.host_tier_stats()
    totals = next(line for line in text.splitlines() if line.strip().startswith("all")).split()
    # The disk reads column counts every read (demand misses and the next layer's guesses), and its MB match.
    assert str(tier["reads"]) in totals and f"{tier['disk_bytes_read'] / 1e6:.1f}" in totals
    assert "last reply:" in text and "tok/s decode" in text
    assert f"of {engine.host_tier_stats()['experts']} experts" in text and "waited on disk" in text
