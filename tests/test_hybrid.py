"""Hybrid execution: misses computed on the host give the same bits as on the device (the CPU emulation runs
one kernel on both sides), ``never`` is today's copy-only engine, and the emulated host keeps its clock."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from offload.errors import CacheError
from offload.experts.host import EmulatedHost, ThreadHost
from offload.generate import SamplingParams, generate_ids
from offload.kv_cache import KVCache
from offload.loading import OffloadOptions, load_model
from tests.baby import BabySpec, write_baby


@pytest.fixture(scope="module")
def baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hybrid")
    write_baby(BabySpec("hybrid", num_local_experts=8, num_hidden_layers=3, seed=11), directory)
    return directory


def run(model: torch.nn.Module, prompt: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
    """Prefill logits, a sampled continuation and a greedy one."""
    cache = KVCache(model.config, 64, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=model.device), cache)
    sampled = generate_ids(model, prompt, max_new_tokens=10, sampling=SamplingParams(temperature=1.0, seed=3))
    greedy = generate_ids(model, prompt, max_new_tokens=10, sampling=SamplingParams(temperature=0))
    return logits, sampled, greedy


PROMPT = list(range(7, 19))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("mode", "ratio", "link", "on_host"),
    [
        ("always", None, "local", True),
        ("auto", 1.0, "emulated:0.05", True),  # a slow link and a host as fast as the device: the host wins
        ("auto", 10.0, "emulated:50:5", None),  # a fast link: mostly copies, whatever the timings say
        ("never", None, "emulated:50:5", False),
    ],
)
def test_hybrid_output_is_bit_identical_to_resident(
    baby: Path, dtype: str, mode: str, ratio: float | None, link: str, on_host: bool | None
) -> None:
    want = run(load_model(baby, dtype=dtype), PROMPT)
    for slots in (1, 2, 7):
        options = OffloadOptions(
            experts_per_layer=slots, prefetch=2, link=link, host_compute=mode, host_ratio=ratio
        )
        model = load_model(baby, dtype=dtype, offload=options)
        logits, sampled, greedy = run(model, PROMPT)
        where = f"{mode} ratio={ratio} K={slots}"
        assert torch.equal(logits, want[0]), where
        assert (sampled, greedy) == want[1:], where
        stats = model.expert_source.stats.total()
        if on_host is False:
            assert stats.host_computes == 0 and stats.bytes_moved > 0, where
        elif on_host:
            assert stats.host_computes > 0, where  # the host really computed some experts


def test_hybrid_with_quantized_experts_is_bit_identical(tmp_path: Path) -> None:
    from offload.quant.scheme import QuantScheme

    write_baby(BabySpec("mixed", num_hidden_layers=3, hidden_size=64, intermediate_size=128), tmp_path)
    scheme = QuantScheme.build(3, attention="hqq:4:64", experts="hqq:4:64", expert_overrides={-1: "bnb:int8"})
    want = run(load_model(tmp_path, dtype="float32", quant=scheme), PROMPT)
    options = OffloadOptions(experts_per_layer=[1, 3, 2], prefetch=1, host_compute="always")
    model = load_model(tmp_path, dtype="float32", quant=scheme, offload=options)
    got = run(model, PROMPT)
    assert torch.equal(got[0], want[0])
    assert got[1:] == want[1:]
    assert model.expert_source.stats.total().host_computes > 0


def test_auto_on_a_cpu_device_without_an_emulated_host_copies_every_miss(baby: Path) -> None:
    """On a CPU the host is the device: nothing to gain, so auto keeps the copy-only engine."""
    model = load_model(baby, dtype="float32", offload=OffloadOptions(experts_per_layer=2, link="local"))
    run(model, PROMPT)
    assert model.expert_source.host_path is None
    assert model.expert_source.stats.total().host_computes == 0


def test_describe_names_the_host(baby: Path) -> None:
    options = OffloadOptions(experts_per_layer=2, host_ratio=10.0)
    described = load_model(baby, dtype="float32", offload=options).expert_source.describe()
    assert "emulated host, 10x the device's time per expert" in described


def test_emulated_host_completes_at_ratio_times_the_device_time_serially() -> None:
    with EmulatedHost(4.0, lambda tokens: 100.0 * tokens) as host:  # 400 s a token: never done in a test
        x = torch.ones(3, 5)
        before = time.perf_counter()
        first = host.submit(lambda v: v * 2, x)
        second = host.submit(lambda v: v + 1, x[:1])
        assert first.done_at >= before + 4.0 * 300.0
        assert second.done_at == pytest.approx(first.done_at + 4.0 * 100.0)  # behind the first, as a queue
        first.finished.wait()
        assert not host.is_done(first)  # computed, but not delivered before its emulated time
        assert torch.equal(first.output, x * 2)


def test_emulated_host_delivers_the_computed_output_and_errors() -> None:
    with EmulatedHost(2.0, lambda tokens: 1e-4) as host:
        x = torch.arange(6.0).view(2, 3)
        job = host.submit(lambda v: v.flip(0), x)
        assert torch.equal(host.wait(job), x.flip(0))
        assert host.is_done(job) and time.perf_counter() >= job.done_at

        def broken(v: torch.Tensor) -> torch.Tensor:
            raise ValueError("kernel failed")

        with pytest.raises(ValueError, match="kernel failed"):
            host.wait(host.submit(broken, x))
    with pytest.raises(CacheError, match="--host-ratio must be > 0"):
        EmulatedHost(0.0, lambda tokens: 1.0)


def test_thread_host_runs_on_another_thread_with_the_callers_threads() -> None:
    import threading

    seen: list[tuple[str, int]] = []

    def record(v: torch.Tensor) -> torch.Tensor:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return v

    with ThreadHost() as host:
        host.wait(host.submit(record, torch.zeros(1, 2)))
    assert seen == [("HostExperts", torch.get_num_threads())]


def test_a_profiles_host_table_sets_the_mode_and_the_costs_and_a_flag_wins(
    baby: Path, tmp_path: Path
) -> None:
    from offload.config import ModelConfig
    from offload.hybrid import build_host_path
    from offload.settings.flags import LoadFlags
    from offload.settings.resolve import resolve_settings

    toml = tmp_path / "p.toml"
    toml.write_text(
        '[device]\nkind = "cpu"\n[cache]\nexperts_per_layer = 2\n'
        '[host]\ncompute = "always"\nexpert_ms = 3.0\ndevice_expert_ms = 0.5\n'
    )
    config = ModelConfig.from_file(baby / "config.json")
    offload = resolve_settings(config, LoadFlags(profile=str(toml))).offload
    assert offload.host_compute == "always"
    assert (offload.host_costs.host_expert_ms, offload.host_costs.device_expert_ms) == (3.0, 0.5)
    flagged = resolve_settings(config, LoadFlags(profile=str(toml), host_compute="never")).offload
    assert flagged.host_compute == "never"

    model = load_model(baby, dtype="float32", offload=offload)
    source = model.expert_source
    inputs = source.host_path.model.inputs
    assert inputs.host.at(1) == pytest.approx(3e-3) and inputs.device.at(1) == pytest.approx(0.5e-3)
    assert build_host_path(
        source.cache.store, [], source.cache.link, dtype=model.dtype, device=model.device, hidden_size=1,
        mode="never",
    ) is None  # fmt: skip


@pytest.mark.cuda
def test_cuda_device_with_cpu_host_stays_close_to_resident() -> None:
    """Different kernels on each side (CUDA device, CPU host): logits close, 64 greedy tokens equal."""
    from offload.checkpoint.hub import default_model

    demo = default_model()
    prompt = list(range(1, 33))
    resident = load_model(demo, device="cuda", dtype="float32")
    options = OffloadOptions(experts_per_layer=4, prefetch=2, link="cuda", host_compute="always")
    hybrid = load_model(demo, device="cuda", dtype="float32", offload=options)
    with torch.no_grad():
        ids = torch.tensor([prompt], device="cuda")
        want = resident(ids, KVCache(resident.config, 64, dtype=torch.float32, device=torch.device("cuda")))
        got = hybrid(ids, KVCache(hybrid.config, 64, dtype=torch.float32, device=torch.device("cuda")))
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)
    greedy = SamplingParams(temperature=0)
    assert generate_ids(hybrid, prompt, max_new_tokens=64, sampling=greedy) == generate_ids(
        resident, prompt, max_new_tokens=64, sampling=greedy
    )
    assert hybrid.expert_source.stats.total().host_computes > 0
