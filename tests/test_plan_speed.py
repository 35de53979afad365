"""`offload plan`'s prediction per policy (copy-only, host-only, hybrid), checked against hand arithmetic."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from offload.config import ModelConfig
from offload.errors import ProfileError
from offload.quant.spec import QuantSpec
from offload.settings.plan import plan_memory
from offload.settings.plan_speed import ENGINE_LAYER_OVERHEAD_S as OURS
from offload.settings.plan_speed import host_build_seconds
from offload.settings.profile import Profile
from tests.test_plan import MIXTRAL
from tests.test_profile import run_offload

PROFILES = Path(__file__).resolve().parents[1] / "profiles"  # the source tree's, which the package ships
DEMO = Path(__file__).resolve().parents[1] / "offload" / "demo"


@pytest.fixture(scope="module")
def mixtral() -> ModelConfig:
    return ModelConfig.from_file(MIXTRAL / "config.json")


def profile(host: dict, k: int = 4, capability: float | None = None) -> Profile:
    device = {"kind": "cuda", "memory_gib": 80.0, "link_gbps": 12.0}
    raw = {
        "device": device if capability is None else {**device, "compute_capability": capability},
        "cache": {"experts_per_layer": k},
        "host": host,
    }
    return Profile.from_dict(raw, source="test.toml")


def test_host_only_and_hybrid_match_hand_arithmetic(mixtral: ModelConfig) -> None:
    speeds = plan_memory(mixtral, profile({"expert_ms": 2.0, "device_expert_ms": 1.0}), 4096).speeds
    # our engine's measured overhead a layer + attention weights at 50e9 a second (no [device] memory_gbps here)
    dense = OURS + 2 * 4096 * (4096 + 1024) / 50e9
    head = 32000 * 4096 / 50e9
    crossing = 2 * 4096 * 2 / 12e9  # a bf16 hidden state there and back
    hit = 0.5 + 0.3 * 0.5 * 0.5  # K = 4 of 8, with the locality bonus
    assert speeds.miss_on_host  # 2 ms on the host against a 6.8 ms copy plus 1 ms on the device
    host_only = 32 * (dense + 2 * (2e-3 + crossing)) + head
    hybrid = 32 * (dense + max(2 * hit * 1e-3, 2 * (1 - hit) * (2e-3 + crossing))) + head
    assert speeds.tok_s["host-only"] == pytest.approx(1 / host_only)
    assert speeds.tok_s["hybrid"] == pytest.approx(1 / hybrid)
    assert speeds.tok_s["hybrid"] > speeds.tok_s["copy-only"]


def test_a_slow_host_leaves_hybrid_copying_every_miss_in_our_engines_terms(mixtral: ModelConfig) -> None:
    """The audit: hybrid's misses on the device were timed as copy-only, the paper's engine and constants, while
    its misses on the host (and host-only) were timed in ours. Both sides are ours now: our overhead, and the
    copied misses' link time with prefetch counted as copy-only counts it."""
    plan = plan_memory(mixtral, profile({"expert_ms": 100.0}), 4096)
    assert not plan.speeds.miss_on_host
    dense = OURS + 2 * 4096 * (4096 + 1024) / 50e9  # ours_l: no [device] memory_gbps, the paper's rate
    device_e, copy_e = 3 * 4096 * 14336 / 50e9, plan.expert_bytes[0] / 12e9
    hit = 0.5 + 0.3 * 0.5 * 0.5  # K = 4 of 8
    hits, misses = 2 * hit, 2 * (1 - hit)
    prefetched = min(0.6 * misses * copy_e, (dense + 2 * device_e) / 2)  # 2 guesses: recall 0.6
    layer = dense + misses * (copy_e + device_e) - prefetched + hits * device_e  # a 100 ms host takes no hit
    assert plan.speeds.tok_s["hybrid"] == pytest.approx(1 / (32 * layer + 32000 * 4096 / 50e9))
    assert plan.speeds.tok_s["hybrid"] > plan.speeds.tok_s["host-only"]
    assert plan.speeds.tok_s["copy-only"] == pytest.approx(plan.predicted_tok_s)
    line = next(line for line in plan.speeds.arithmetic if line.startswith("hybrid:"))
    assert "as copy-only" not in line and f"-> {plan.speeds.tok_s['hybrid']:.2f} tok/s" in line
    assert f"0.85 × ({copy_e * 1e3:.2f} + {device_e * 1e3:.2f}) - {prefetched * 1e3:.2f} prefetched" in line


@pytest.mark.parametrize("model", ["mixtral", "demo"])
@pytest.mark.parametrize("expert_ms", [None, 0.05, 0.5, 2.0, 10.0, 100.0])
@pytest.mark.parametrize("device_expert_ms", [None, 0.2, 4.0])
@pytest.mark.parametrize("k", [1, 2, 4, 7, 8])
def test_hybrid_is_never_slower_than_either_of_its_options_in_the_same_terms(
    mixtral: ModelConfig, model: str, expert_ms: float | None, device_expert_ms: float | None, k: int
) -> None:
    """Choosing per miss the cheaper place, hybrid is at least host-only's speed and at least that of copying
    every miss in our engine's terms (copy-only's sum with our overhead, kernels and lm_head). The audit's case:
    the demo's tiny experts, copied in 0.02 ms, got copy-only's figure (the paper's 2 ms a layer) for hybrid,
    below host-only's."""
    config = mixtral if model == "mixtral" else ModelConfig.from_file(DEMO / "config.json")
    host = {"expert_ms": expert_ms, "device_expert_ms": device_expert_ms}
    plan = plan_memory(config, profile({key: ms for key, ms in host.items() if ms is not None}, k=k), 512)
    speeds, layers, top_k = plan.speeds, config.num_hidden_layers, config.num_experts_per_tok
    assert speeds.tok_s["hybrid"] >= speeds.tok_s["host-only"] * (1 - 1e-12)
    p = min(1, k / 8)
    hits = top_k * (p + 0.3 * p * (1 - p))
    d = config.hidden_size
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    dense = OURS + 2 * d * (q_out + kv_out) / 50e9
    head = config.vocab_size * d / 50e9
    device_e, copy_e, misses = speeds.device_expert_s, speeds.copy_s, top_k - hits
    prefetched = min(0.6 * misses * copy_e, (dense + top_k * device_e) / 2)
    copy_every_miss = layers * (dense + misses * (copy_e + device_e) - prefetched + hits * device_e) + head
    assert speeds.tok_s["hybrid"] >= (1 / copy_every_miss) * (1 - 1e-12)


def test_no_hit_moves_to_a_host_whose_one_job_outlasts_the_devices_hits(mixtral: ModelConfig) -> None:
    """The cost model moves a hit to the host only where the host would finish it before the device finishes
    its hits: at 1.37 ms a host job against 1.82 hits of 0.23 ms, none (the plan moved 0.11 of one)."""
    from offload.settings.plan_hybrid import balanced, moved

    assert moved(1.82, 0.18, 0.23, 1.37) == 0
    assert balanced(1.82, 0.18, 0.23, 1.37) == pytest.approx(1.82 * 0.23)
    # a device slower per expert than the host: hits move until both sides end together
    assert moved(2.0, 0.0, 4.0, 1.0) == pytest.approx(8.0 / 5.0)


def test_host_time_comes_from_cores_or_memory_whichever_binds(mixtral: ModelConfig) -> None:
    few_cores = plan_memory(mixtral, profile({"cores": 1, "memory_gbps": 100.0}), 4096).speeds
    many_cores = plan_memory(mixtral, profile({"cores": 64, "memory_gbps": 40.0}), 4096).speeds
    expert_bytes = plan_memory(mixtral, profile({}), 4096).expert_bytes[0]
    assert few_cores.host_expert_s == pytest.approx(expert_bytes / 7.7e9 + 50e-6)
    assert many_cores.host_expert_s == pytest.approx(expert_bytes / 40e9 + 50e-6)


def test_every_gpu_profile_describes_a_plausible_host() -> None:
    for path in sorted(PROFILES.glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        host = raw.get("host")
        assert host is not None, f"{path.name} has no [host] table"
        cores = host["cores"]  # "auto": the machine the plan runs on (the cpu profile's)
        assert cores == "auto" or 1 <= cores <= 64, path.name
        assert 15 <= host["memory_gbps"] <= 120, path.name
        Profile.from_file(path)  # and it reads


def test_cli_plan_shows_each_policy_and_its_arithmetic(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    path = str(PROFILES / "rtx3060-12gb.toml")
    code, out, err = run_offload(monkeypatch, capsys, "plan", "-m", str(MIXTRAL), "--profile", path)
    assert code == 0, err
    assert "decode by policy (estimates, tok/s): copy-only" in out
    for text in (
        "host-only: 32 ×",
        "hybrid: a miss is cheaper on the host",
        "6 cores × 7.7 GB/s, 45 GB/s",
        "and host jobs would rebuild their experts",  # the kernel-less case keeps hqq's layout
    ):
        assert text in out


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ({"compute": "sometimes"}, "host.compute = \"sometimes\": allowed is 'auto' or 'never' or 'always'"),
        ({"memory_gbps": 0}, "host.memory_gbps = 0: allowed is a positive number of GB/s"),
        ({"cores": 0}, "host.cores = 0: allowed is a positive number of cores"),
        ({"threads": 4}, "unknown key host.threads"),
        ({"memory_gib": -8}, "host.memory_gib = -8: allowed is a positive number of GiB"),
        ({"disk_gbps": 0}, "host.disk_gbps = 0: allowed is a positive number of GB/s"),
    ],
)
def test_bad_host_tables_are_one_line(host: dict, message: str) -> None:
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        profile(host)


def test_hybrid_moves_hits_to_an_idle_host_when_the_device_is_slower(mixtral: ModelConfig) -> None:
    # every expert resident (K = 8): 2 hits of 4 ms on the device, a host at 1 ms. Moving x hits balances
    # 2·4 - 4x = (1 ms + crossing)·x: x = 8 / (4 + 1 ms + crossing) ≈ 1.6, the layer's experts ≈ 1.6 ms
    speeds = plan_memory(mixtral, profile({"expert_ms": 1.0, "device_expert_ms": 4.0}, k=8), 4096).speeds
    dense = OURS + 2 * 4096 * (4096 + 1024) / 50e9
    host_e = 1e-3 + 2 * 4096 * 2 / 12e9
    moved = 8e-3 / (4e-3 + host_e)
    experts = 8e-3 - moved * 4e-3
    assert experts == pytest.approx(moved * host_e)  # balanced: both sides end together
    assert speeds.tok_s["hybrid"] == pytest.approx(1 / (32 * (dense + experts) + 32000 * 4096 / 50e9))
    assert speeds.tok_s["hybrid"] > speeds.tok_s["host-only"] > speeds.tok_s["copy-only"]
    hybrid_line = next(line for line in speeds.arithmetic if line.startswith("hybrid:"))
    assert "hits a layer moved to the idle host" in hybrid_line
    # Without torch's int4 GPU kernel (no compute capability given) the host store keeps hqq's layout for
    # HQQLinear, so each host job rebuilds its expert: said beside the sums. Where the kernel runs, the store
    # holds the CPU kernel's layout and there is no rebuild to warn of.
    assert "rebuilds its expert" in speeds.arithmetic[-1]
    wired = plan_memory(
        mixtral, profile({"expert_ms": 1.0, "device_expert_ms": 4.0}, k=8, capability=8.6), 4096
    )
    assert wired.speeds.int4_gpu_kernel and wired.speeds.miss_on_host
    assert not any("rebuilds its expert" in line for line in wired.speeds.arithmetic)


def _plan(mixtral: ModelConfig, device: dict, quant: dict, host: dict, k: int | str = 4):
    raw = {"device": device, "cache": {"experts_per_layer": k}, "quant": quant, "host": host}
    return plan_memory(mixtral, Profile.from_dict(raw, source="test.toml"), 4096)


GPU = {"kind": "cuda", "memory_gib": 80.0, "link_gbps": 12.0, "memory_gbps": 360.0}


def test_a_streaming_gpu_kernel_reads_its_bytes_at_a_share_of_the_memory_bandwidth(
    mixtral: ModelConfig,
) -> None:
    # Float experts run cuBLAS: their bf16 bytes at 1397.31 / 2039 of 360 GB/s (gpt-fast's bf16 share).
    dense = _plan(mixtral, GPU, {"experts": "none", "attention": "none"}, {})
    assert dense.speeds.device_expert_s == pytest.approx(3 * 4096 * 14336 * 2 / (360e9 * 1397.31 / 2039))
    # Without the device's bandwidth, the paper's per-weight rate.
    no_bandwidth = _plan(mixtral, {"kind": "cuda", "memory_gib": 80.0}, {"experts": "none"}, {})
    assert no_bandwidth.speeds.device_expert_s == pytest.approx(3 * 4096 * 14336 / 50e9)


@pytest.mark.parametrize("capability", [None, 7.5])
def test_hqq_4bit_on_a_gpu_below_compute_capability_8_is_dequantized_per_call(
    mixtral: ModelConfig, capability: float | None
) -> None:
    device = GPU if capability is None else {**GPU, "compute_capability": capability}
    plan = _plan(mixtral, device, {"experts": "hqq:4:64"}, {"cores": 6, "memory_gbps": 45.0}, k=3)
    assert plan.speeds.device_expert_s == pytest.approx(
        3 * 4096 * 14336 / 50e9
    )  # HQQLinear: a T4, or unknown
    assert not plan.speeds.int4_gpu_kernel and plan.speeds.without_int4_kernel is None
    # The what-if, by hand: int4 experts and attention at 862.69 / 2039 of 360 GB/s, our overhead a layer.
    share = 360e9 * 862.69 / 2039
    device_e, attention = plan.expert_bytes[0] / share, plan.dense.attention / 32 / share
    host_e = plan.expert_bytes[0] / 45e9 + 50e-6 + 2 * 4096 * 2 / 12e9  # memory-bound: 6 x 7.7 > 45 GB/s
    hit = 3 / 8 + 0.3 * 3 / 8 * 5 / 8
    head = 32000 * 4096 * 2 / (360e9 * 1397.31 / 2039)  # the bf16 lm_head on cuBLAS
    experts = max(2 * hit * device_e, 2 * (1 - hit) * host_e)  # the device is faster: no hit moves
    hybrid = 1 / (32 * (OURS + attention + experts) + head)
    assert plan.speeds.with_int4_kernel["hybrid"] == pytest.approx(hybrid)
    why = "the profile gives no [device] compute_capability" if capability is None else "this GPU's is 7.5"
    assert any(f"it needs compute capability 8.0; {why}" in line for line in plan.speeds.arithmetic)


def test_hqq_4bit_on_an_ampere_gpu_runs_the_int4_kernel(mixtral: ModelConfig) -> None:
    device = {**GPU, "compute_capability": 8.6}
    host = {"cores": 6, "memory_gbps": 45.0}
    plan = _plan(mixtral, device, {"experts": "hqq:4:64"}, host, k=3)
    share = 360e9 * 862.69 / 2039
    assert plan.speeds.device_expert_s == pytest.approx(plan.expert_bytes[0] / share)
    assert plan.speeds.int4_gpu_kernel and plan.speeds.with_int4_kernel is None
    # the fallback, should the load-time check fail: HQQLinear's rate, what a T4 gets
    t4 = _plan(mixtral, {**GPU, "compute_capability": 7.5}, {"experts": "hqq:4:64"}, host, k=3)
    assert plan.speeds.without_int4_kernel == {p: t4.speeds.tok_s[p] for p in ("host-only", "hybrid")}
    assert t4.speeds.with_int4_kernel == {p: plan.speeds.tok_s[p] for p in ("host-only", "hybrid")}
    assert any(
        "run torch's int4 GPU kernel (compute capability 8.6 >= 8.0" in line
        for line in plan.speeds.arithmetic
    )
    # 3-bit has no int4 kernel, whatever the GPU
    three = _plan(mixtral, device, {"experts": "hqq:3:64", "attention": "hqq:3:64"}, host, k=3)
    assert not three.speeds.int4_gpu_kernel and three.speeds.without_int4_kernel is None


def test_rtx3060_reaches_8_tok_s_with_the_int4_gpu_kernel() -> None:
    """The figure docs/BENCHMARKS.md gives for issue 15's plan target, under its stated assumptions."""
    config = ModelConfig.from_file(MIXTRAL / "config.json")
    plan = plan_memory(config, Profile.from_file(PROFILES / "rtx3060-12gb.toml"), 8192)
    assert plan.speeds.int4_gpu_kernel
    assert plan.speeds.without_int4_kernel["hybrid"] < 8 <= plan.speeds.tok_s["hybrid"]
    t4 = plan_memory(config, Profile.from_file(PROFILES / "t4-16gb.toml"), 8192)
    assert not t4.speeds.int4_gpu_kernel  # Turing, 7.5


def test_a_cpu_device_runs_kernel_specs_at_the_measured_kernel_rates(mixtral: ModelConfig) -> None:
    cpu = {"kind": "cpu", "memory_gib": 200.0}
    host = {"cores": 2, "memory_gbps": 45.0}
    int4 = _plan(mixtral, cpu, {"experts": "hqq:4:64"}, host, k="all")
    assert int4.speeds.device_expert_s == pytest.approx(int4.expert_bytes[0] / (2 * 7.7e9))
    int8 = _plan(mixtral, cpu, {"experts": "bnb:int8"}, host, k="all")
    assert int8.speeds.device_expert_s == pytest.approx(int8.expert_bytes[0] / (2 * 6.8e9))
    # No CPU kernel for 3-bit: dequantized once when loaded, then a dense bf16 matmul on 2 cores.
    three = _plan(mixtral, cpu, {"experts": "hqq:3:64"}, host, k="all")
    assert three.speeds.device_expert_s == pytest.approx(3 * 4096 * 14336 / (2 * 3.67e9))
    assert int4.speeds.tok_s["host-only"] > three.speeds.tok_s["host-only"]
    # The copy-only figure `offload plan` leads with is the same engine's on a CPU (the paper has none):
    # every expert resident, so a layer is our overhead, 4-bit attention and two int4 experts.
    attention = int4.dense.attention / 32 / (2 * 7.7e9)
    head = 32000 * 4096 / (2 * 3.67e9)  # the bf16 lm_head, dense
    layer = OURS + attention + 2 * int4.speeds.device_expert_s
    assert int4.predicted_tok_s == pytest.approx(1 / (32 * layer + head))
    assert int4.speeds.tok_s["hybrid"] == int4.speeds.tok_s["host-only"] == int4.predicted_tok_s


def test_a_host_without_a_kernel_for_the_spec_dequantizes_per_call(mixtral: ModelConfig) -> None:
    plan = _plan(mixtral, GPU, {"experts": "hqq:3:64"}, {"cores": 4, "memory_gbps": 45.0})
    assert plan.speeds.host_expert_s == pytest.approx(3 * 4096 * 14336 / (4 * 0.65e9) + 50e-6)


def test_device_memory_gbps_must_be_positive() -> None:
    with pytest.raises(ProfileError, match=r"device\.memory_gbps = 0: allowed is a positive number of GB/s"):
        Profile.from_dict({"device": {**GPU, "memory_gbps": 0}}, source="test.toml")


@pytest.mark.parametrize("value", [0, "8.6", True, 120])
def test_device_compute_capability_must_be_a_capability(value: object) -> None:
    with pytest.raises(
        ProfileError, match=r"device\.compute_capability = .*: allowed is a CUDA compute capability"
    ):
        Profile.from_dict({"device": {**GPU, "compute_capability": value}}, source="test.toml")


@pytest.mark.parametrize(
    ("spec", "cores", "seconds"),
    [
        ("hqq:4:64", 1, 0.0715),
        ("hqq:4:128", 1, 0.0715),
        ("hqq:4:64", 2, 0.0715 * 0.75),  # half of it spread over 2 threads
        ("hqq:4:64", 4, 0.0715 * 0.625),
        ("hqq:3:64", 1, 0.0),
        ("bnb:int8", 1, 0.0),
        ("none", 4, 0.0),
    ],
)
def test_one_mixtral_experts_build_for_the_host_kernel(spec: str, cores: int, seconds: float) -> None:
    """The int4 repack of a host-tier read is the measured 71.5 ms at Mixtral's size on one core, half of it
    spread over more; a 3-bit expert is dequantized per call and an int8 or float one runs on its stored bytes:
    no build."""
    assert host_build_seconds(QuantSpec.parse(spec), 3 * 14336 * 4096, cores) == pytest.approx(
        seconds, abs=1e-12
    )
