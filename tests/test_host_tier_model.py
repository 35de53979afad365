"""A model run from the host tier gives bit-identical logits and tokens to one holding every expert in RAM,
on checkpoints made by the real `offload convert` and on a float one run at its stored dtype."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload.errors import CheckpointError
from offload.experts.host_only import HostOnlyExperts
from offload.experts.offloaded import OffloadedExperts
from offload.experts.source import expert_tensors
from offload.generate import SamplingParams, generate_ids
from offload.loading import OffloadOptions, load_model
from offload.quant.scheme import QuantScheme
from tests.baby import BabySpec, write_baby
from tests.test_offload_equivalence import run

PROMPT = [1, 17, 42, 5, 99, 3, 64, 8, 12, 7]


def convert(source: Path, destination: Path, *flags: str) -> Path:
    command = [
        sys.executable,
        "-c",
        "from cli.main import run; run()",
        "convert",
        str(source),
        str(destination),
    ]
    done = subprocess.run([*command, *flags], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    return destination


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> directory: the float source, its hqq:4:64 and hqq:3:64 conversions."""
    root = tmp_path_factory.mktemp("tier")
    source = root / "float"
    write_baby(BabySpec("tier", hidden_size=64, intermediate_size=128, num_hidden_layers=3, seed=5), source)
    return {
        "float": source,
        "hqq4": convert(source, root / "hqq4", "--experts", "hqq:4:64", "--attention", "hqq:4:64"),
        "hqq3": convert(source, root / "hqq3", "--experts", "hqq:3:64"),
    }


def half_the_experts(model: torch.nn.Module) -> float:
    """A budget of half the model's experts, in GiB."""
    source = model.expert_source
    store = source.cache.store
    per_layer = [store.layout(layer).nbytes for layer in range(store.num_layers)]
    return max(per_layer) * store.num_layers * store.num_experts / 2 / 2**30


def greedy(model: torch.nn.Module) -> list[int]:
    return generate_ids(model, PROMPT, max_new_tokens=16, sampling=SamplingParams(temperature=0))


@pytest.mark.parametrize("name", ["float", "hqq4", "hqq3"])
def test_the_tier_changes_no_logit_and_no_token(checkpoints: dict[str, Path], name: str) -> None:
    directory = checkpoints[name]
    resident = load_model(directory)
    want_logits, want_tokens = run(resident, PROMPT)
    want_greedy = greedy(resident)
    in_ram = load_model(directory, offload=OffloadOptions(experts_per_layer=2))
    budget = half_the_experts(in_ram)
    variants = {
        "offloaded -k 2": OffloadOptions(experts_per_layer=2, host_memory_gib=budget),
        "emulated disk and link": OffloadOptions(
            experts_per_layer=2, host_memory_gib=budget, disk="emulated:5", link="emulated:5"
        ),
        # Reads of a few ms: copies wait for theirs on the link's worker while the caller computes the hits.
        "a slow emulated disk, copies waiting for their reads": OffloadOptions(
            experts_per_layer=2, host_memory_gib=budget, disk="emulated:0.05", link="emulated:5"
        ),
        "lru": OffloadOptions(experts_per_layer=2, host_memory_gib=budget, cache_policy="lru"),
        "the tier under lrfu": OffloadOptions(
            experts_per_layer=2, host_memory_gib=budget, host_policy="lrfu"
        ),
        "host-only (-k all on a cpu)": OffloadOptions(host_memory_gib=budget),
        "host-only, emulated disk": OffloadOptions(host_memory_gib=budget, disk="emulated:5"),
    }
    for where, options in variants.items():
        model = load_model(directory, offload=options)
        logits, tokens = run(model, PROMPT)
        assert torch.equal(logits, want_logits), where
        assert tokens == want_tokens, where
        assert greedy(model) == want_greedy, where
        source = model.expert_source
        assert isinstance(source, HostOnlyExperts if "host-only" in where else OffloadedExperts)
        tier = source.host_tier.stats.total()
        # Half the experts fit: the run must have read from disk and found some in RAM.
        assert tier.misses > 0 and tier.hits > 0 and tier.disk_bytes_read > 0, where
        assert source.memory().host_bytes <= budget * 2**30, where
        # The tier's policy is its own (adaptive unless the profile says otherwise), told what the slots hold.
        named = [policy for policy in ("lrfu", "cyclic") if policy in where]
        assert source.host_tier.policy == (named[0] if named else "adaptive"), where
        assert (source.host_tier.on_device is None) == ("host-only" in where), where


@pytest.mark.parametrize("disk", ["file", "emulated:0.01"])  # 1.3 ms a read: host jobs wait for theirs
@pytest.mark.parametrize(
    "slots", ["half", "top_k"]
)  # top_k: the prompt's steps need far more than the tier holds
def test_the_hybrid_host_path_reads_from_the_tier(
    checkpoints: dict[str, Path], disk: str, slots: str
) -> None:
    directory = checkpoints["hqq4"]
    want = greedy(load_model(directory))
    in_ram = load_model(directory, offload=OffloadOptions(experts_per_layer=2))
    budget = half_the_experts(in_ram)
    if slots == "top_k":  # the smallest budget the tier takes: one token's experts of one layer
        store = in_ram.expert_source.cache.store
        budget = (
            in_ram.config.num_experts_per_tok
            * max(store.layout(layer).nbytes for layer in range(store.num_layers))
            / 2**30
        )
    options = OffloadOptions(
        experts_per_layer=2,
        host_memory_gib=budget,
        host_compute="always",
        link="emulated:5",
        disk=disk,
    )
    model = load_model(directory, offload=options)
    assert greedy(model) == want
    assert model.expert_source.stats.total().host_computes > 0


def test_a_float_checkpoint_quantized_at_load_must_be_converted(checkpoints: dict[str, Path]) -> None:
    source = checkpoints["float"]
    scheme = QuantScheme.build(3, attention="none", experts="hqq:4:64")
    options = OffloadOptions(experts_per_layer=2, host_memory_gib=1.0)
    with pytest.raises(
        CheckpointError,
        match=r"--host-memory 1: the host tier reads experts from disk as they are stored.*"
        r"quantizes to hqq:4:64 at load; convert it once \(offload convert .*float DST",
    ):
        load_model(source, quant=scheme, offload=options)


def test_a_float_checkpoint_cast_at_load_is_refused(checkpoints: dict[str, Path]) -> None:
    options = OffloadOptions(experts_per_layer=2, host_memory_gib=1.0)
    with pytest.raises(
        CheckpointError,
        match=r"stores .*w1.weight as float32, but this run computes in bfloat16; "
        r"give --dtype float32",
    ):
        load_model(checkpoints["float"], dtype="bfloat16", offload=options)


@pytest.mark.cuda
def test_on_cuda_the_tier_is_pinned_and_changes_no_token(checkpoints: dict[str, Path]) -> None:
    directory = checkpoints["hqq4"]
    in_ram = load_model(directory, device="cuda", offload=OffloadOptions(experts_per_layer=2, link="cuda"))
    want_logits, want_tokens = run(in_ram, PROMPT)
    options = OffloadOptions(experts_per_layer=2, link="cuda", host_memory_gib=half_the_experts(in_ram))
    model = load_model(directory, device="cuda", offload=options)
    logits, tokens = run(model, PROMPT)
    assert torch.equal(logits, want_logits) and tokens == want_tokens
    tier = model.expert_source.host_tier
    assert tier.pinned and tier.stats.total().misses > 0


@pytest.mark.parametrize(("name", "in_place"), [("hqq4", True), ("float", True), ("hqq3", False)])
def test_host_only_experts_are_built_in_their_slots(
    checkpoints: dict[str, Path], name: str, in_place: bool
) -> None:
    """A 4-bit expert's int4-kernel form takes its stored bytes' place in the slot (no repacking per call, no
    second copy); a float expert runs on the stored bytes as they are; a 3-bit one, dequantized to a larger
    dense matrix on a CPU, cannot fit and is built for each use."""
    directory = checkpoints[name]
    resident = load_model(directory)
    model = load_model(directory, offload=OffloadOptions(host_memory_gib=1.0))
    tier = model.expert_source.host_tier
    assert tier.builds
    tier.fetch(1, 5)
    built = tier.expert(1, 5)
    assert (built is not None) == in_place
    if built is None:
        return
    assert tier.resident() == [(1, 5)]
    slot = tier.buffer(1, 5)
    start, end = slot.data_ptr(), slot.data_ptr() + slot.numel()
    assert all(start <= t.data_ptr() < end for t in expert_tensors(built))
    x = torch.randn(3, model.config.hidden_size, dtype=model.dtype)
    want = resident.expert_source.experts[1][5](x)
    assert torch.equal(built(x), want)


@pytest.mark.cuda
def test_on_cuda_every_expert_resident_with_a_budget_runs_on_the_host_from_the_tier(
    checkpoints: dict[str, Path],
) -> None:
    directory = checkpoints["hqq4"]
    model = load_model(directory, device="cuda", offload=OffloadOptions(host_memory_gib=1.0))
    source = model.expert_source
    assert isinstance(source, HostOnlyExperts) and not source.host_tier.pinned
    assert "host CPU" in source.describe()
    tokens = greedy(model)
    assert len(tokens) == 16 and source.host_tier.stats.total().misses > 0


def test_a_shard_cut_after_load_fails_the_next_read_in_one_line(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    directory = tmp_path / "cut"
    shutil.copytree(checkpoints["hqq4"], directory)
    model = load_model(directory, offload=OffloadOptions(experts_per_layer=2, host_memory_gib=1e-4))
    for shard in sorted(directory.glob("model-*.safetensors"))[1:]:  # every layer's shard, not the first
        shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(
        CheckpointError,
        match=r"model-0000\d-of-0000\d.safetensors: tensor model\.layers\.\d+\..* "
        r"the file changed size since it was loaded",
    ) as error:
        greedy(model)
    assert "\n" not in str(error.value)
