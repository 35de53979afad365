"""The main flow: `convert` once, then `plan` and a load with the `auto` profile read what convert wrote.

Every checkpoint here is real `offload convert` output, never a hand-written quantization block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from offload.config import ModelConfig
from offload.generate import SamplingParams, generate_ids
from offload.loading import load_model
from offload.settings.flags import LoadFlags
from offload.settings.plan import GIB, default_context, plan_memory
from offload.settings.profile import CacheSettings, load_profile
from offload.settings.resolve import resolve_settings
from tests.baby import BabySpec, write_baby
from tests.test_profile import run_offload

ROOT = Path(__file__).resolve().parent.parent
MIXTRAL = ROOT / "tests" / "fixtures" / "mixtral-8x7b-instruct-v0.1"
PROMPT = [1, 17, 42, 5, 99, 3, 64, 8]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(float source, its conversion by `offload convert SRC DST --profile laptop-8gb`)."""
    root = tmp_path_factory.mktemp("plan-converted")
    source, converted = root / "src", root / "baby-q"
    write_baby(BabySpec("plan-src", hidden_size=64, intermediate_size=128, num_hidden_layers=3), source)
    command = [
        sys.executable,
        "-c",
        "from cli.main import run; run()",
        "convert",
        str(source),
        str(converted),
    ]
    env = {**os.environ, "OFFLOAD_HOME": str(root / "home")}
    done = subprocess.run([*command, "--profile", "laptop-8gb"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return source, converted


def _plan_json(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> dict:
    code, out, err = run_offload(monkeypatch, capsys, "plan", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_plan_reads_convert_output(checkpoints: tuple[Path, Path], monkeypatch, capsys) -> None:
    source, converted = checkpoints
    block = json.loads((converted / "config.json").read_text())["quantization"]
    plan = _plan_json(monkeypatch, capsys, "--model", str(converted), "--profile", "laptop-8gb")
    assert plan["expert_specs"] == block["experts"] == ["hqq:4:64"] * 3
    # The converted checkpoint holds exactly what the profile would quantize to at load time.
    planned_from_float = _plan_json(monkeypatch, capsys, "--model", str(source), "--profile", "laptop-8gb")
    for key in ("dense", "expert_bytes", "device_bytes", "host_bytes", "experts_per_layer"):
        assert plan[key] == planned_from_float[key], key


def test_the_converted_block_wins_over_the_profile(
    checkpoints: tuple[Path, Path], monkeypatch, capsys
) -> None:
    source, converted = checkpoints
    as_stored = _plan_json(monkeypatch, capsys, "-m", str(converted), "-p", "cpu")
    float_plan = _plan_json(monkeypatch, capsys, "-m", str(source), "-p", "cpu")
    assert as_stored["expert_specs"] == ["hqq:4:64"] * 3 and float_plan["expert_specs"] == ["none"] * 3
    assert as_stored["dense"]["attention"] < float_plan["dense"]["attention"]  # 4-bit as stored, not float


def test_auto_profile_loads_convert_output_offloaded_and_bit_identical(
    checkpoints: tuple[Path, Path],
) -> None:
    """`auto` (the default profile on CUDA) sizes the cache from the converted block, then loads it."""
    _, converted = checkpoints
    config = ModelConfig.from_file(converted / "config.json")
    auto = load_profile("auto")
    roomy = plan_memory(config, auto, default_context(config, auto), free_memory_bytes=GIB)
    free = roomy.device_bytes - roomy.expert_slot_bytes + 5 * roomy.expert_bytes[0]  # room for 5 slots
    settings = resolve_settings(config, LoadFlags(profile="auto", device="cpu"), free_memory_bytes=free)
    slots = settings.offload.experts_per_layer
    assert sorted(slots) == [1, 2, 2], slots
    offloaded = load_model(converted, offload=settings.offload)
    resident = load_model(converted)
    sampling = SamplingParams(temperature=1.0, seed=5)
    with torch.no_grad():
        tokens = generate_ids(offloaded, PROMPT, max_new_tokens=8, sampling=sampling)
        assert tokens == generate_ids(resident, PROMPT, max_new_tokens=8, sampling=sampling)
    assert offloaded.expert_source.cache.experts_per_layer == tuple(slots)


def test_cpu_profile_counts_resident_experts_once(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Every expert resident: there is no host store behind the device tier to count a second time."""
    plan = _plan_json(monkeypatch, capsys, "-m", str(MIXTRAL), "-p", "cpu", "--free-gib", "120")
    assert plan["host_bytes"] == 0
    assert 85 * GIB < plan["needed_bytes"] < 92 * GIB  # Mixtral-8x7B in bf16 is about 87 GiB
    assert plan["fits"] is True
    two_slots = replace(load_profile("cpu"), cache=CacheSettings(2))
    offloaded = plan_memory(ModelConfig.from_file(MIXTRAL / "config.json"), two_slots, 4096, 120 * GIB)
    assert offloaded.host_bytes > 80 * GIB  # K < E: the host store holds every expert


@pytest.mark.parametrize("profile", ["rtx3060-12gb", "t4-16gb"])
def test_long_context_profiles_plan_a_short_context_model(profile: str, monkeypatch, capsys) -> None:
    demo = str(ROOT / "offload" / "demo")
    window = ModelConfig.from_file(ROOT / "offload" / "demo" / "config.json").max_position_embeddings
    assert _plan_json(monkeypatch, capsys, "-m", demo, "-p", profile, "--context", "2048")["context"] == 2048
    assert _plan_json(monkeypatch, capsys, "-m", demo, "-p", profile)["context"] == window  # 8192 clamped


@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "-1"])
def test_free_gib_out_of_range_is_one_line(value: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code, out, err = run_offload(monkeypatch, capsys, "plan", "-m", str(MIXTRAL), f"--free-gib={value}")
    assert code == 2 and out == ""
    assert "--free-gib" in err and "Traceback" not in err
