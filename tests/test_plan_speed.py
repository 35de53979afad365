"""`offload plan`'s prediction per policy (copy-only, host-only, hybrid), checked against hand arithmetic."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from offload.config import ModelConfig
from offload.errors import ProfileError
from offload.settings.plan import plan_memory
from offload.settings.profile import Profile
from tests.test_plan import MIXTRAL
from tests.test_profile import run_offload

PROFILES = Path(__file__).resolve().parents[1] / "profiles"  # the source tree's, which the package ships


@pytest.fixture(scope="module")
def mixtral() -> ModelConfig:
    return ModelConfig.from_file(MIXTRAL / "config.json")


def profile(host: dict, k: int = 4) -> Profile:
    raw = {
        "device": {"kind": "cuda", "memory_gib": 80.0, "link_gbps": 12.0},
        "cache": {"experts_per_layer": k},
        "host": host,
    }
    return Profile.from_dict(raw, source="test.toml")


def test_host_only_and_hybrid_match_hand_arithmetic(mixtral: ModelConfig) -> None:
    speeds = plan_memory(mixtral, profile({"expert_ms": 2.0, "device_expert_ms": 1.0}), 4096).speeds
    dense = 2e-3 + 2 * 4096 * (4096 + 1024) / 50e9  # layer overhead + attention weights at 50e9 a second
    head = 32000 * 4096 / 50e9
    crossing = 2 * 4096 * 2 / 12e9  # a bf16 hidden state there and back
    hit = 0.5 + 0.3 * 0.5 * 0.5  # K = 4 of 8, with the locality bonus
    assert speeds.miss_on_host  # 2 ms on the host against a 6.8 ms copy plus 1 ms on the device
    host_only = 32 * (dense + 2 * (2e-3 + crossing)) + head
    hybrid = 32 * (dense + max(2 * hit * 1e-3, 2 * (1 - hit) * (2e-3 + crossing))) + head
    assert speeds.tok_s["host-only"] == pytest.approx(1 / host_only)
    assert speeds.tok_s["hybrid"] == pytest.approx(1 / hybrid)
    assert speeds.tok_s["hybrid"] > speeds.tok_s["copy-only"]


def test_a_slow_host_leaves_hybrid_copying_every_miss(mixtral: ModelConfig) -> None:
    plan = plan_memory(mixtral, profile({"expert_ms": 100.0}), 4096)
    assert not plan.speeds.miss_on_host
    assert plan.speeds.tok_s["hybrid"] == pytest.approx(plan.speeds.tok_s["copy-only"])
    assert plan.speeds.tok_s["copy-only"] == pytest.approx(plan.predicted_tok_s)


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
        assert 1 <= host["cores"] <= 64 and 15 <= host["memory_gbps"] <= 120, path.name
        Profile.from_file(path)  # and it reads


def test_cli_plan_shows_each_policy_and_its_arithmetic(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    path = str(PROFILES / "rtx3060-12gb.toml")
    code, out, err = run_offload(monkeypatch, capsys, "plan", "-m", str(MIXTRAL), "--profile", path)
    assert code == 0, err
    assert "decode by policy (estimates, tok/s): copy-only" in out
    for text in ("host-only: 32 ×", "hybrid: a miss is cheaper on the host", "6 cores × 7.7 GB/s, 45 GB/s"):
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
    dense = 2e-3 + 2 * 4096 * (4096 + 1024) / 50e9
    host_e = 1e-3 + 2 * 4096 * 2 / 12e9
    moved = 8e-3 / (4e-3 + host_e)
    experts = 8e-3 - moved * 4e-3
    assert experts == pytest.approx(moved * host_e)  # balanced: both sides end together
    assert speeds.tok_s["hybrid"] == pytest.approx(1 / (32 * (dense + experts) + 32000 * 4096 / 50e9))
    assert speeds.tok_s["hybrid"] > speeds.tok_s["host-only"] > speeds.tok_s["copy-only"]
    assert "hits a layer moved to the idle host" in speeds.arithmetic[-1]
