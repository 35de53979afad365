"""`offload convert`: a converted checkpoint loads to the same bits as quantizing at load time, and only ever
appears complete."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from offload.checkpoint.convert import SLOW_ENV, convert_checkpoint
from offload.checkpoint.convert_output import PARTIAL
from offload.checkpoint.reader import INDEX_FILE
from offload.checkpoint.weights import converted_names
from offload.errors import CheckpointError, OffloadError, QuantError
from offload.generate import SamplingParams, generate_ids
from offload.kv_cache import KVCache
from offload.loading import OffloadOptions, load_model
from offload.quant.codec import expert_nbytes
from offload.quant.scheme import QuantScheme
from tests.baby import BabySpec, write_baby
from tests.test_cli_generate import offload_here

REPO = Path(__file__).resolve().parent.parent
LAYERS = 2
EXPERT_SPECS = ["hqq:2:16", "hqq:3:64", "hqq:4:64", "hqq:8:64", "bnb:nf4", "bnb:fp4", "bnb:int8", "none"]
OFFLOADED = OffloadOptions(experts_per_layer=2, prefetch=1, link="emulated:50")
PROMPT = [1, 17, 42, 5, 99, 3, 64, 8, 120, 33]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float baby whose every matrix fits every hqq group (hidden 64, FFN 128), with tokenizer-side files."""
    directory = tmp_path_factory.mktemp("convert-src")
    write_baby(BabySpec("convert", hidden_size=64, intermediate_size=128, max_shard_size="60KB"), directory)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    (directory / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    (directory / "modeling_evil.py").write_text("raise SystemExit('never copied, never run')")
    (directory / "training_args.bin").write_bytes(b"\x80\x04 a pickle")
    return directory


def outputs(model: torch.nn.Module) -> tuple[torch.Tensor, list[int]]:
    """Prefill logits, then a sampled continuation (sampling turns any logit difference into other tokens)."""
    cache = KVCache(model.config, 64, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]), cache)
    tokens = generate_ids(model, PROMPT, max_new_tokens=8, sampling=SamplingParams(temperature=1.0, seed=3))
    return logits, tokens


def assert_loads_identically(source: Path, converted: Path, scheme: QuantScheme) -> None:
    """Converted-then-loaded equals quantized-in-memory, bit for bit, with offloading off and on."""
    for offload in (None, OFFLOADED):
        want_logits, want_tokens = outputs(load_model(source, quant=scheme, offload=offload))
        model = load_model(converted, offload=offload)
        assert model.quant_scheme == scheme
        logits, tokens = outputs(model)
        assert torch.equal(logits, want_logits), f"offload={offload}"
        assert tokens == want_tokens, f"offload={offload}"


@pytest.mark.parametrize("experts", EXPERT_SPECS)
def test_every_expert_spec_loads_bit_identically(source: Path, tmp_path: Path, experts: str) -> None:
    scheme = QuantScheme.build(LAYERS, attention="hqq:4:64", experts=experts)
    convert_checkpoint(source, tmp_path / "out", scheme)
    assert_loads_identically(source, tmp_path / "out", scheme)


@pytest.mark.parametrize(
    ("attention", "experts", "overrides", "gate", "lm_head"),
    [
        ("none", "hqq:2:16", {0: "hqq:3:64"}, "none", "none"),  # mixed-bit experts, float attention
        ("none", "bnb:nf4", {}, "hqq:8:64", "bnb:int8"),
        ("hqq:4:64", "hqq:2:16", {-1: "bnb:fp4"}, "none", "hqq:4:64"),
    ],
)
def test_mixed_schemes_load_bit_identically(
    source: Path, tmp_path: Path, attention: str, experts: str, overrides: dict, gate: str, lm_head: str
) -> None:
    scheme = QuantScheme.build(
        LAYERS, attention=attention, experts=experts, expert_overrides=overrides, gate=gate, lm_head=lm_head
    )
    convert_checkpoint(source, tmp_path / "out", scheme)
    assert_loads_identically(source, tmp_path / "out", scheme)


def test_layout_config_and_report(source: Path, tmp_path: Path) -> None:
    scheme = QuantScheme.build(LAYERS, attention="hqq:4:64", experts="hqq:3:64", expert_overrides={1: "none"})
    seen = []
    report = convert_checkpoint(source, tmp_path / "out", scheme, progress=seen.append)
    out = tmp_path / "out"
    raw_source = json.loads((source / "config.json").read_text())
    raw = json.loads((out / "config.json").read_text())
    assert raw == {**raw_source, "quantization": scheme.as_block(LAYERS)}
    config = load_model(out).config
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(converted_names(config, scheme))
    assert report.shards == 1 + LAYERS == len(set(index["weight_map"].values()))
    on_disk = sum(
        t.numel() * t.element_size() for f in out.glob("*.safetensors") for t in load_file(f).values()
    )
    assert report.total_bytes == index["metadata"]["total_size"] == on_disk
    copied = {"tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}
    assert {p.name for p in out.iterdir() if not p.name.endswith(".safetensors")} == {
        "config.json", INDEX_FILE, *copied,
    }  # fmt: skip
    assert not list(tmp_path.glob(f"out{PARTIAL}*"))

    rows = {(row.role, row.spec): row for row in report.rows}
    experts = rows["experts", "hqq:3:64"]
    assert experts.stored_bytes == config.num_local_experts * expert_nbytes(scheme.experts[0], 64, 128)
    assert experts.bits_per_weight == 8 * experts.stored_bytes / experts.weights
    assert experts.sampled == 3 and 0.1 < experts.output_error < 0.3  # hqq 3-bit g64: about 0.19
    assert 0.04 < rows["attention", "hqq:4:64"].output_error < 0.15  # hqq 4-bit g64: about 0.087
    assert rows["experts", "none"].output_error == 0.0
    assert rows["norms", "none"].output_error is None
    source_tensors = json.loads((source / INDEX_FILE).read_text())["weight_map"]
    assert seen[-1].tensors_done == seen[-1].tensors_total == len(source_tensors)
    assert seen[-1].bytes_done == seen[-1].bytes_total == report.total_bytes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experts", "gptq:4"], "unknown backend 'gptq'"),
        (["--experts", "hqq:5:64"], "hqq bits must be one of 2, 3, 4, 8"),
        (["--attention", "hqq:4:48"], "hqq group size must be one of 16, 32, 64, 128"),
        (["--experts-layer", "7=hqq:3:64"], "layer 7 is out of range"),
        (["--experts-layer", "first=hqq:3:64"], "expected LAYER=SPEC"),
        (["--experts-layer", "0=bnb:nf5"], "--experts-layer 0=bnb:nf5"),
        (
            ["--experts-layer", "0=hqq:3:64", "--experts-layer", "-2=hqq:2:16"],  # -2 is layer 0 of 2
            "layer 0 is already set by --experts-layer '0=hqq:3:64'",
        ),
        (["--attention", "hqq:4:128"], "group size 128 must divide the row length 64"),
        (["--profile", "no-such-profile"], "profile 'no-such-profile' not found"),
    ],
)
def test_bad_specs_are_one_line_and_write_nothing(
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    args: list[str],
    message: str,
) -> None:
    code, _, err = offload_here(monkeypatch, capfd, "convert", str(source), str(tmp_path / "out"), *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_cli_json_and_table(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code, stdout, err = offload_here(
        monkeypatch, capfd, "convert", str(source), str(out), "--experts", "hqq:2:16",
        "--experts-layer", "-1=hqq:3:64", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["quantization"]["experts"] == ["hqq:2:16", "hqq:3:64"]
    assert report["quantization"]["attention"] == "hqq:4:64"  # the default scheme's
    assert {row["spec"] for row in report["roles"] if row["role"] == "experts"} == {"hqq:2:16", "hqq:3:64"}
    code, stdout, err = offload_here(
        monkeypatch, capfd, "convert", str(source), str(out), "--profile", "cpu", "--force"
    )
    assert code == 0, err
    assert "bits/weight" in stdout and "experts" in stdout
    assert load_model(out).quant_scheme == QuantScheme.build(LAYERS)  # the cpu profile keeps every weight


def test_existing_destination(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = offload_here(monkeypatch, capfd, "convert", str(source), str(out), "--experts", "bnb:nf4")
    assert code == 2 and "exists and is not empty; pass --force" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    question = f"write the converted checkpoint into {out}; other files there stay (keep.txt)? [y/N]"
    assert convert_tty(monkeypatch, capfd, source, out, answer="n\n", question=question) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert convert_tty(monkeypatch, capfd, source, out, answer="y\n", question=question) == 0
    assert (out / "keep.txt").read_text() == "mine"
    load_model(out)
    question = f"replace the converted checkpoint in {out} (config.json, "
    assert convert_tty(monkeypatch, capfd, source, out, answer="n\n", question=question) == 1

    scheme = QuantScheme.build(LAYERS, experts="bnb:int8")
    convert_checkpoint(source, out, scheme, force=True)
    assert load_model(out).quant_scheme == scheme
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside
    assert (out / "keep.txt").read_text() == "mine"


class _Terminal(io.TextIOWrapper):
    def isatty(self) -> bool:
        return True


def convert_tty(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    source: Path,
    out: Path,
    answer: str,
    question: str,
) -> int:
    """Run convert in this process as if stdin were a terminal that types ``answer``."""
    from cli.main import run

    monkeypatch.setattr(sys, "argv", ["offload", "convert", str(source), str(out), "--experts", "bnb:nf4"])
    monkeypatch.setattr(sys, "stdin", _Terminal(io.BytesIO(answer.encode())))
    with pytest.raises(SystemExit) as exited:
        run()
        sys.exit(0)
    _, err = capfd.readouterr()
    assert question in err.replace("\n", "")
    return exited.value.code or 0


def test_refuses_converted_or_nested(source: Path, tmp_path: Path) -> None:
    scheme = QuantScheme.build(LAYERS, experts="bnb:nf4")
    convert_checkpoint(source, tmp_path / "out", scheme)
    with pytest.raises(CheckpointError, match="already converted"):
        convert_checkpoint(tmp_path / "out", tmp_path / "again", scheme)
    with pytest.raises(CheckpointError, match="must not be the source"):
        convert_checkpoint(source, source / "inside", scheme, force=True)
    with pytest.raises(CheckpointError, match="must not contain the source"):
        convert_checkpoint(source, source.parent, scheme, force=True)


def _edit_block(out: Path, change) -> None:
    raw = json.loads((out / "config.json").read_text())
    change(raw)
    (out / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw.update(quantization="hqq"), "quantization must be an object"),
        (lambda raw: raw["quantization"].update(format="other/9"), '"format": "offload-quant/1"'),
        (lambda raw: raw["quantization"].update(experts=["hqq:3:64"]), "one spec per layer (2)"),
        (lambda raw: raw["quantization"].update(attention="hqq:5:64"), "hqq bits must be one of"),
        (lambda raw: raw["quantization"].pop("gate"), "quantization.gate must be a spec string"),
        (lambda raw: raw["quantization"].update(attention="hqq:4:16"), "does not match the tensors"),
        (lambda raw: raw["quantization"].update(experts=["hqq:2:64"] * 2), "does not match the tensors"),
        (lambda raw: raw.pop("quantization"), "is missing"),
    ],
    ids=["not-object", "format", "layers", "bad-spec", "no-gate", "other-group", "other-bits", "no-block"],
)
def test_damaged_quantization_block(source: Path, tmp_path: Path, damage, message: str) -> None:
    out = tmp_path / "out"
    convert_checkpoint(source, out, QuantScheme.build(LAYERS, attention="hqq:4:64", experts="hqq:3:64"))
    _edit_block(out, damage)
    with pytest.raises(OffloadError) as raised:
        load_model(out)
    text = str(raised.value)
    assert message in text and str(out) in text and "\n" not in text


@pytest.mark.parametrize("key", ["W_q", "scale", "zero"])
def test_missing_metadata_tensor(source: Path, tmp_path: Path, key: str) -> None:
    out = tmp_path / "out"
    convert_checkpoint(source, out, QuantScheme.build(LAYERS, attention="hqq:4:64", experts="hqq:3:64"))
    name = f"model.layers.1.block_sparse_moe.experts.5.w2.{key}"
    shard = out / json.loads((out / INDEX_FILE).read_text())["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {name} is missing"):
        load_model(out)


def test_no_expert_spec_for_some_layers_is_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="expert specs for 3 layers"):
        convert_checkpoint(source, tmp_path / "out", QuantScheme.build(3, experts="bnb:nf4"))


def test_killed_convert_leaves_nothing_loadable_and_reruns(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    args = ["convert", str(source), str(out), "--experts", "hqq:2:16", "--experts-layer", "0=hqq:3:64"]
    process = subprocess.Popen(
        [sys.executable, "-c", "from cli.main import run; run()", *args],
        cwd=REPO,
        env={**os.environ, SLOW_ENV: "60"},  # the test hook: sleep after each shard
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f"out{PARTIAL}*/*.safetensors")):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "convert never wrote a shard"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    (partial,) = tmp_path.glob(f"out{PARTIAL}*")
    assert not out.exists() and not (partial / "config.json").exists()
    with pytest.raises(OffloadError):
        load_model(out)

    code, _, err = offload_here(monkeypatch, capfd, *args)
    assert code == 0, err
    assert not partial.exists(), "the dead run's partial directory is cleaned up"
    scheme = QuantScheme.build(
        LAYERS, attention="hqq:4:64", experts="hqq:2:16", expert_overrides={0: "hqq:3:64"}
    )
    assert_loads_identically(source, out, scheme)
    shutil.rmtree(out)


def test_leftovers_of_dead_runs_are_removed(source: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its process id now names no running process
    partial = tmp_path / f"out{PARTIAL}{dead.pid}-0"
    partial.mkdir()
    scheme = QuantScheme.build(LAYERS, experts="bnb:nf4")
    convert_checkpoint(source, tmp_path / "out", scheme)
    assert not partial.exists()
    convert_checkpoint(source, tmp_path / "out", scheme, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
