"""The plan's three tiers (issue 17): the host budget, the experts left on disk, the disk reads per token
and the tok/s with them, and the predicted peak RSS, by hand for the demo model's shape and for Mixtral."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from offload.config import ModelConfig
from offload.errors import ProfileError
from offload.settings.plan import GIB, plan_memory
from offload.settings.profile import CacheSettings, Profile
from tests.test_plan import EXPERT_3_64
from tests.test_profile import run_offload

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "offload" / "demo" / "config.json"
MIXTRAL = Path(__file__).parent / "fixtures" / "mixtral-8x7b-instruct-v0.1"
MIB = 1024**2
RUNTIME = 240 * MIB  # python + torch + tokenizer, as plan_tiers states it
CUDA_RUNTIME = GIB  # the CUDA runtime's host memory, as plan_tiers assumes it

# The demo's shape (D 256, F 448, 4 layers, 8 experts, top-2, vocab 5120) in bf16, unquantized.
DEMO_EXPERT = 3 * 256 * 448 * 2  # 688,128 bytes
DEMO_EMBED = 5120 * 256 * 2  # the largest tensor: the embedding (the lm_head is as large)
# hit(n) = p + 0.3 p (1 - p), p = n / 8
HIT_2 = 2 / 8 + 0.3 * (2 / 8) * (6 / 8)  # 0.30625
# Ten slots shared by four layers: 2.5 per layer, p = 2.5 / 8 = 0.3125.
HIT_TIER = 0.3125 + 0.3 * 0.3125 * 0.6875  # 0.376953125


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path / "home"))


# A T4-like profile with Mixtral's 3-bit experts, independent of the bundled profiles' choices.
T4_3BIT = """
name = "t4-3bit"
[device]
kind = "cuda"
memory_gib = 15.0
link_gbps = 10.0
[cache]
experts_per_layer = 4
[quant]
attention = "hqq:4:64"
experts = "hqq:3:64"
[generation]
context = 8192
"""


@pytest.fixture
def t4_path(tmp_path: Path) -> Path:
    path = tmp_path / "t4-3bit.toml"
    path.write_text(T4_3BIT)
    return path


def _t4(**host: float) -> Profile:
    t4 = Profile.from_dict(tomllib.loads(T4_3BIT), source="t4-3bit.toml")
    return replace(t4, host=replace(t4.host, **host))


def _demo_profile(kind: str = "cuda", k: int | str = 2, **host: float) -> Profile:
    raw = {
        "device": {"kind": kind, "memory_gib": 80.0, "link_gbps": 12.0},
        "cache": {"experts_per_layer": k},
        "quant": {"experts": "none", "attention": "none"},
        "host": {"disk_gbps": 2.0, **host},
    }
    return Profile.from_dict(raw, source="test.toml")


def test_a_budget_of_ten_experts_by_hand() -> None:
    """Ten and a half experts' bytes: 10 slots of any layer (2.5 a layer); 22 experts stay on disk."""
    demo = ModelConfig.from_file(DEMO)
    base = plan_memory(demo, _demo_profile(), 64)
    plan = plan_memory(demo, _demo_profile(memory_gib=10.5 * DEMO_EXPERT / GIB), 64)
    tier = plan.host_tier
    assert (tier.slots, tier.experts) == (10, 32)
    assert plan.host_bytes == tier.bytes == 10 * DEMO_EXPERT
    assert (tier.disk_experts, plan.disk_bytes) == (22, 22 * DEMO_EXPERT)
    # Per layer: top_k x device miss rate (K = 2) x the tier's miss rate (2.5 of 8); 4 layers.
    reads = 4 * 2 * (1 - HIT_2) * (1 - HIT_TIER)
    assert tier.disk_reads_per_token == pytest.approx(reads) == pytest.approx(3.45791015625)
    assert tier.disk_bytes_per_token == round(reads * DEMO_EXPERT)
    assert tier.disk_seconds_per_token == pytest.approx(reads * DEMO_EXPERT / 2e9)
    assert tier.hit_rate == pytest.approx(HIT_TIER)
    # The reads overlap nothing: their time adds to the token's.
    assert plan.predicted_tok_s == pytest.approx(1 / (1 / base.predicted_tok_s + reads * DEMO_EXPERT / 2e9))
    assert plan.tok_s_with_disk["copy-only"] == pytest.approx(plan.predicted_tok_s)
    # Host-only has no slot in front of the tier: every chosen expert reaches it.
    host_only = 1 / (1 / base.speeds.tok_s["host-only"] + 4 * 2 * (1 - HIT_TIER) * DEMO_EXPERT / 2e9)
    assert plan.tok_s_with_disk["host-only"] == pytest.approx(host_only)
    # The device tier does not change; the process holds the tier, the runtimes and one tensor being read.
    assert plan.device_bytes == base.device_bytes
    rss = plan.peak_rss
    assert (rss.host_tier, rss.device_tier_in_ram, rss.load_staging) == (10 * DEMO_EXPERT, 0, DEMO_EMBED)
    assert rss.total == 10 * DEMO_EXPERT + RUNTIME + CUDA_RUNTIME + DEMO_EMBED


def test_a_cpu_with_a_budget_computes_the_experts_from_the_tier() -> None:
    """Every expert "resident" on a CPU, but a budget: no slots; the host computes the experts from the
    tier (host-only's arithmetic), and RAM holds both tiers."""
    demo = ModelConfig.from_file(DEMO)
    plan = plan_memory(demo, _demo_profile("cpu", "all", memory_gib=10.5 * DEMO_EXPERT / GIB), 64)
    # A run with the tier keeps the stored bf16 (resolve_settings); without it a CPU runs this small model in
    # float32: the resident plan is pinned to bf16 to compare like with like.
    resident = plan_memory(demo, _demo_profile("cpu", "all"), 64, compute_dtype="bfloat16")
    assert plan.experts_from_host_tier and plan.expert_slot_bytes == 0
    assert resident.host_tier is None and resident.expert_slot_bytes == 32 * DEMO_EXPERT
    assert plan.device_bytes == resident.device_bytes - 32 * DEMO_EXPERT
    reads = 4 * 2 * (1 - HIT_TIER)  # nothing in front of the tier
    assert plan.host_tier.disk_reads_per_token == pytest.approx(reads)
    host_only = resident.speeds.tok_s["host-only"]
    assert plan.predicted_tok_s == pytest.approx(1 / (1 / host_only + reads * DEMO_EXPERT / 2e9))
    assert plan.needed_bytes == plan.device_bytes + 10 * DEMO_EXPERT
    rss = plan.peak_rss
    assert (rss.device_tier_in_ram, rss.cuda_runtime) == (plan.device_bytes, 0)
    assert rss.total == 10 * DEMO_EXPERT + plan.device_bytes + RUNTIME + DEMO_EMBED


def test_mixtral_with_8_gib_on_a_t4() -> None:
    mixtral = ModelConfig.from_file(MIXTRAL / "config.json")
    plan = plan_memory(mixtral, _t4(memory_gib=8.0), 8192)
    # 8 GiB / 81,474,816 bytes = 105.4: 105 slots, 3.28 per layer.
    assert plan.host_tier.slots == 105
    assert plan.host_bytes == 105 * EXPERT_3_64 == 8_554_855_680
    assert plan.disk_bytes == 151 * EXPERT_3_64
    p = 105 / 32 / 8
    hit_4, hit_tier = 0.5 + 0.3 * 0.5 * 0.5, p + 0.3 * p * (1 - p)
    reads = 32 * 2 * (1 - hit_4) * (1 - hit_tier)  # K = 4 on the T4
    assert plan.host_tier.disk_bytes_per_token == round(reads * EXPERT_3_64)
    assert plan.peak_rss.total == 105 * EXPERT_3_64 + RUNTIME + CUDA_RUNTIME + 32000 * 4096 * 2
    assert plan.fits  # the device tier is as without a budget


def test_with_a_budget_the_host_no_longer_needs_every_expert() -> None:
    """On a CPU with 16 GiB, Mixtral's 19.4 GiB of 3-bit experts do not fit; with 8 GiB of them, they do."""
    mixtral = ModelConfig.from_file(MIXTRAL / "config.json")
    t4 = _t4()
    laptop = replace(t4, device=replace(t4.device, kind="cpu", memory_gib=16.0), cache=CacheSettings("all"))
    assert not plan_memory(mixtral, laptop, 4096).fits
    plan = plan_memory(mixtral, replace(laptop, host=replace(laptop.host, memory_gib=8.0)), 4096)
    assert plan.fits and plan.needed_bytes == plan.device_bytes + 105 * EXPERT_3_64 < 11 * GIB
    assert plan.host_bytes == 105 * EXPERT_3_64 and plan.expert_slot_bytes == 0


def test_a_budget_above_every_expert_keeps_them_all_and_reads_nothing() -> None:
    mixtral = ModelConfig.from_file(MIXTRAL / "config.json")
    base = plan_memory(mixtral, _t4(), 8192)
    plan = plan_memory(mixtral, _t4(memory_gib=1000.0), 8192)
    assert plan.host_tier.slots == 256 and plan.host_bytes == base.host_bytes
    assert (plan.disk_bytes, plan.host_tier.disk_bytes_per_token) == (0, 0)
    assert plan.predicted_tok_s == pytest.approx(base.predicted_tok_s)


def test_a_budget_below_one_expert_per_layer_is_refused() -> None:
    demo = ModelConfig.from_file(DEMO)
    with pytest.raises(ProfileError, match=r"test.toml: host.memory_gib = .*: holds 1 experts of 0.7 MiB, "):
        plan_memory(demo, _demo_profile(memory_gib=1.5 * DEMO_EXPERT / GIB), 64)  # top-2 needs 2


# A host-computed tier miss is then rebuilt in its slot for the CPU int4 kernel (plan_speed's
# HOST_INT4_BUILD_WEIGHTS_PER_S: 71.5 ms for a Mixtral expert's 3 x 14336 x 4096 weights at one thread), half of
# it spread over the profile's 4 cores (HOST_INT4_BUILD_PARALLEL_SHARE).
DEMO_BUILD = 0.0715 * (3 * 256 * 448) / (3 * 14336 * 4096) * (0.5 + 0.5 / 4)  # one demo expert: 0.0873 ms
DEMO_EXPERT_4_64 = 3 * 256 * 448 // 2 + 2 * 2 * (3 * 256 * 448 // 64)  # codes + fp16 scale and zero: 193,536


def _quantized(kind: str, k: int | str, experts: str = "hqq:4:64", **host: float) -> Profile:
    raw = {
        "device": {"kind": kind, "memory_gib": 80.0, "link_gbps": 12.0},
        "cache": {"experts_per_layer": k},
        "quant": {"experts": experts, "attention": "none"},
        "host": {"disk_gbps": 2.0, **host},
    }
    return Profile.from_dict(raw, source="test.toml")


def _ten_slots(profile: Profile) -> Profile:
    """``profile`` with a budget of ten and a half of its experts (the demo's 4 x 8)."""
    expert = plan_memory(ModelConfig.from_file(DEMO), profile, 64).expert_bytes[0]
    return replace(profile, host=replace(profile.host, memory_gib=10.5 * expert / GIB))


def test_experts_computed_from_the_tier_add_each_read_experts_int4_build() -> None:
    """A CPU with every expert "resident" and a budget computes from the tier: each of the 4 x 2 x (1 - hit)
    reads a token is then built for the int4 kernel, serially with the reads."""
    demo = ModelConfig.from_file(DEMO)
    resident = plan_memory(demo, _quantized("cpu", "all"), 64)
    plan = plan_memory(demo, _ten_slots(_quantized("cpu", "all")), 64)
    tier = plan.host_tier
    assert plan.experts_from_host_tier and tier.slots == 10
    reads = 4 * 2 * (1 - HIT_TIER)
    assert tier.disk_reads_per_token == pytest.approx(reads)
    assert tier.expert_build_seconds == pytest.approx(DEMO_BUILD)
    assert tier.build_seconds_per_token == pytest.approx(reads * DEMO_BUILD)  # 4.98 reads x 0.087 ms
    seconds = 1 / resident.speeds.tok_s["host-only"] + tier.disk_seconds_per_token + reads * DEMO_BUILD
    assert plan.predicted_tok_s == pytest.approx(1 / seconds)
    assert all(tok_s == pytest.approx(1 / seconds) for tok_s in plan.tok_s_with_disk.values())


def test_a_copy_needs_no_host_build_and_host_only_builds_every_read() -> None:
    """Slots on a GPU in front of the tier: copy-only (and hybrid, where the cost model sends a miss to the
    device) adds the reads alone; host-only has no slot in front and builds every read expert."""
    demo = ModelConfig.from_file(DEMO)
    base = plan_memory(demo, _quantized("cuda", 2), 64)
    plan = plan_memory(demo, _ten_slots(_quantized("cuda", 2)), 64)
    assert not plan.speeds.miss_on_host
    device_reads = 4 * 2 * (1 - HIT_2) * (1 - HIT_TIER)
    assert plan.host_tier.build_seconds_per_token == pytest.approx(device_reads * DEMO_BUILD)
    disk = plan.host_tier.disk_seconds_per_token
    for policy in ("copy-only", "hybrid"):
        expected = 1 / (1 / base.speeds.tok_s[policy] + disk)
        assert plan.tok_s_with_disk[policy] == pytest.approx(expected), policy
    assert plan.predicted_tok_s == pytest.approx(1 / (1 / base.predicted_tok_s + disk))
    host_reads = 4 * 2 * (1 - HIT_TIER)
    host_only = (
        1 / base.speeds.tok_s["host-only"] + host_reads * DEMO_EXPERT_4_64 / 2e9 + host_reads * DEMO_BUILD
    )
    assert plan.tok_s_with_disk["host-only"] == pytest.approx(1 / host_only)


def test_hybrid_builds_the_misses_it_sends_to_the_host() -> None:
    """A host cheaper than a copy (the profile's host.expert_ms): hybrid computes its misses on the host, so each
    expert read for them is built; copy-only still adds the reads alone."""
    demo = ModelConfig.from_file(DEMO)
    base = plan_memory(demo, _quantized("cuda", 2, expert_ms=0.001), 64)
    plan = plan_memory(demo, _ten_slots(_quantized("cuda", 2, expert_ms=0.001)), 64)
    assert plan.speeds.miss_on_host
    reads = 4 * 2 * (1 - HIT_2) * (1 - HIT_TIER)
    disk = plan.host_tier.disk_seconds_per_token
    hybrid = 1 / base.speeds.tok_s["hybrid"] + disk + reads * DEMO_BUILD
    assert plan.tok_s_with_disk["hybrid"] == pytest.approx(1 / hybrid)
    assert plan.tok_s_with_disk["copy-only"] == pytest.approx(1 / (1 / base.speeds.tok_s["copy-only"] + disk))


@pytest.mark.parametrize("experts", ["hqq:3:64", "none"])
def test_specs_without_an_int4_build_add_the_reads_alone(experts: str) -> None:
    """3-bit experts are dequantized at every call (priced per call), float ones run as stored: no build."""
    demo = ModelConfig.from_file(DEMO)
    resident = plan_memory(
        demo, _quantized("cpu", "all", experts), 64, compute_dtype="bfloat16"
    )  # as the tier's
    plan = plan_memory(demo, _ten_slots(_quantized("cpu", "all", experts)), 64)
    assert plan.host_tier.build_seconds_per_token == 0 == plan.host_tier.expert_build_seconds
    expected = 1 / (1 / resident.speeds.tok_s["host-only"] + plan.host_tier.disk_seconds_per_token)
    assert plan.predicted_tok_s == pytest.approx(expected)


def test_without_a_budget_nothing_is_read_or_built() -> None:
    demo = ModelConfig.from_file(DEMO)
    plan = plan_memory(demo, _quantized("cuda", 2), 64)
    assert plan.host_tier.build_seconds_per_token == 0
    assert plan.tok_s_with_disk == pytest.approx(plan.speeds.tok_s)
    assert plan_memory(demo, _quantized("cpu", "all"), 64).host_tier is None


# Through the CLI.


def _plan(monkeypatch: pytest.MonkeyPatch, capsys, profile: Path, *args: str) -> tuple[int, str, str]:
    return run_offload(monkeypatch, capsys, "plan", "-m", str(MIXTRAL), "-p", str(profile), *args)


def test_cli_plan_shows_three_tiers(t4_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = _plan(monkeypatch, capsys, t4_path, "--host-memory", "8", "--disk-gbps", "6")
    assert code == 0, err
    for text in ("expert slots", "expert tier", "105 of 256 experts", "experts beyond the budget", "151 experts",
                 "at 6 GB/s", "peak RSS", "overlapping nothing", "FITS"):  # fmt: skip
        assert text in out, text
    assert "11.46" in out  # 151 x 81,474,816 bytes in GiB


def test_cli_plan_json_keeps_its_keys_and_adds_the_tiers(
    t4_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    code, out, _ = _plan(monkeypatch, capsys, t4_path, "--json")
    without = json.loads(out)
    code, out, _ = _plan(monkeypatch, capsys, t4_path, "--host-memory", "8", "--disk-gbps", "6", "--json")
    plan = json.loads(out)
    assert code == 0 and set(without) == set(plan)  # the same keys, budget or not
    for key in ("device_bytes", "needed_bytes", "fits", "speeds", "predicted_tok_s", "expected_hit_rate"):
        assert key in plan
    assert without["host_bytes"] == 256 * EXPERT_3_64 and without["disk_bytes"] == 0
    assert plan["host_bytes"] == plan["host_tier"]["bytes"] == 105 * EXPERT_3_64
    assert plan["disk_bytes"] == plan["host_tier"]["disk_bytes"] == 151 * EXPERT_3_64
    assert plan["host_tier"]["memory_gib"] == 8 and plan["host_tier"]["disk_gbps"] == 6
    assert plan["predicted_peak_rss_bytes"] == plan["peak_rss"]["total"]
    assert plan["predicted_tok_s"] < without["predicted_tok_s"]
    assert set(plan["tok_s_with_disk"]) == set(plan["speeds"]["tok_s"])


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e9"])
def test_cli_bad_host_memory_is_one_line(
    t4_path: Path, value: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    code, out, err = _plan(monkeypatch, capsys, t4_path, f"--host-memory={value}")
    assert code == 2 and out == ""
    assert "--host-memory" in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_too_small_a_budget_is_one_line_naming_the_flag(
    t4_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    code, out, err = _plan(monkeypatch, capsys, t4_path, "--host-memory", "0.1")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--host-memory 0.1: holds 1 experts of 77.7 MiB, and one layer's step needs 2" in err


def test_cli_bad_disk_gbps_is_one_line(t4_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code, out, err = _plan(monkeypatch, capsys, t4_path, "--disk-gbps=0")
    assert code == 2 and out == "" and "--disk-gbps" in err and err.count("\n") == 1


CPU_INT4 = """
name = "cpu-int4"
[device]
kind = "cpu"
memory_gib = 16.0
[cache]
experts_per_layer = "all"
[quant]
attention = "hqq:4:64"
experts = "hqq:4:64"
[host]
cores = 1
"""


def test_cli_plan_prints_the_build_of_host_computed_misses(
    tmp_path: Path, t4_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Mixtral's 4-bit experts computed from the tier on one core: one build is the measured 71.5 ms; the T4's
    3-bit experts (dequantized per call) and its copies print no build."""
    monkeypatch.setenv("COLUMNS", "400")  # the build line on one line
    profile = tmp_path / "cpu-int4.toml"
    profile.write_text(CPU_INT4)
    code, out, err = _plan(monkeypatch, capsys, profile, "--host-memory", "8")
    assert code == 0, err
    assert (
        "converts each read in its slot to the int4 kernel's layout, 71.5 ms each, serial with the reads"
        in out
    )
    assert "counted for every policy" in out
    code, out, err = _plan(monkeypatch, capsys, t4_path, "--host-memory", "8")
    assert code == 0 and "converts each read" not in out


def test_a_hybrid_run_on_a_gpu_with_the_int4_kernel_builds_every_read() -> None:
    """Beside a GPU that runs torch's int4 kernel, a hybrid run's tier converts every read for the host's kernel,
    also those it copies to the device (``offload.loading``): hybrid adds the builds even where its misses go to
    the device; a copy-only run's tier converts nothing."""
    demo = ModelConfig.from_file(DEMO)

    def gpu(profile: Profile) -> Profile:
        device = replace(profile.device, compute_capability=8.9, memory_gbps=256.0)
        return replace(profile, device=device)

    base = plan_memory(demo, gpu(_quantized("cuda", 2)), 64)
    plan = plan_memory(demo, _ten_slots(gpu(_quantized("cuda", 2))), 64)
    assert plan.speeds.int4_gpu_kernel and not plan.speeds.miss_on_host
    tier = plan.host_tier
    reads = 4 * 2 * (1 - HIT_2) * (1 - HIT_TIER)
    assert tier.build_seconds_per_token == pytest.approx(reads * DEMO_BUILD)
    hybrid = 1 / base.speeds.tok_s["hybrid"] + tier.disk_seconds_per_token + tier.build_seconds_per_token
    assert plan.tok_s_with_disk["hybrid"] == pytest.approx(1 / hybrid)
    copy_only = 1 / base.speeds.tok_s["copy-only"] + tier.disk_seconds_per_token
    assert plan.tok_s_with_disk["copy-only"] == pytest.approx(1 / copy_only)
    assert plan.tok_s_by_mode == {
        "never": plan.tok_s_with_disk["copy-only"],
        "auto": plan.tok_s_with_disk["hybrid"],
        "always": pytest.approx(
            1 / (1 / base.speeds.always_tok_s + tier.disk_seconds_per_token + tier.build_seconds_per_token)
        ),
    }
