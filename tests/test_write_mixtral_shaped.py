"""benchmarks/write_mixtral_shaped.py writes what `offload convert` writes, and the engine reads it (issue 17)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from benchmarks.write_mixtral_shaped import main as write_main
from offload.checkpoint.convert import convert_checkpoint
from offload.checkpoint.reader import Checkpoint
from offload.quant.scheme import QuantScheme
from tests.baby import BabySpec, write_baby
from tests.test_cli_generate import offload_here

TINY = ["--layers", "2", "--hidden", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2"]
SPECS = ["--experts", "hqq:4:64", "--attention", "hqq:4:64"]


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("shaped") / "model"
    assert write_main([str(directory), *TINY, *SPECS]) == 0
    return directory


def layout(directory: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """Shard file -> tensor -> (dtype, shape), read from the safetensors headers."""
    shards = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            shards[path.name] = {
                name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                for name in handle.keys()  # noqa: SIM118 - a safetensors handle is not iterable
            }
    return shards


def test_plan_reads_the_stored_specs(shaped: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    code, out, err = offload_here(monkeypatch, capfd, "plan", "-m", str(shaped), "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["expert_specs"] == ["hqq:4:64", "hqq:4:64"]
    assert plan["num_local_experts"] == 8


def test_generate_runs_it(shaped: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    args = ["generate", "-m", str(shaped), "--max-new-tokens", "4", "--threads", "1", "--json", "Hello"]
    code, out, err = offload_here(monkeypatch, capfd, *args)
    assert code == 0, err
    result = json.loads(out)
    assert len(result["token_ids"]) == 4
    assert result["finish_reason"] == "length"
    assert result["load_seconds"] > 0  # what benchmarks/real_size_run.py reports as the load time


def test_same_files_names_dtypes_and_shapes_as_convert(shaped: Path, tmp_path: Path) -> None:
    source, converted = tmp_path / "float", tmp_path / "converted"
    assert write_main([str(source), *TINY, "--float"]) == 0
    convert_checkpoint(source, converted, QuantScheme.build(2, attention="hqq:4:64", experts="hqq:4:64"))
    assert sorted(p.name for p in shaped.iterdir()) == sorted(p.name for p in converted.iterdir())
    assert layout(shaped) == layout(converted)
    for name in ("config.json", "model.safetensors.index.json"):
        assert json.loads((shaped / name).read_text()) == json.loads((converted / name).read_text())
    assert (shaped / "tokenizer.model").read_bytes() == (converted / "tokenizer.model").read_bytes()


def test_float_form_has_the_hub_names_and_shapes(tmp_path: Path) -> None:
    """--float at the same dims holds exactly the tensors transformers' own Mixtral saves."""
    assert write_main([str(tmp_path / "float"), *TINY, "--float"]) == 0
    spec = BabySpec("shaped", hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=32000)
    write_baby(spec, tmp_path / "baby")
    ours, hub = Checkpoint(tmp_path / "float"), Checkpoint(tmp_path / "baby")
    shapes = {name: ours.shape(name) for name in ours.names()}
    assert shapes == {name: hub.shape(name) for name in hub.names()}


def test_other_expert_specs_and_packed_shards_load(tmp_path: Path, monkeypatch, capfd) -> None:
    directory = tmp_path / "model"
    args = [str(directory), *TINY, "--experts", "hqq:3:64", "--attention", "none", "--shard-gb", "0.005"]
    assert write_main(args) == 0
    assert len(list(directory.glob("*.safetensors"))) == 2  # 8 MB of embedding and lm_head, then the rest
    code, _, err = offload_here(monkeypatch, capfd, "generate", "-m", str(directory), "--json", "Hi")
    assert code == 0, err


def test_refuses_a_directory_that_is_not_empty(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert write_main([str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty directory" in err and str(tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_checks_free_space_before_writing(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 << 30))
    assert write_main([str(tmp_path / "real")]) == 2  # the real size, about 25 GB
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs 26." in err and "2.1 GB free" in err
    assert not (tmp_path / "real").exists()


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    import benchmarks.write_mixtral_shaped as writer

    real = writer.write_shard
    calls = []

    def fail_on_second(path, entries, rng):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, entries, rng)

    monkeypatch.setattr(writer, "write_shard", fail_on_second)
    assert write_main([str(tmp_path / "model"), *TINY]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the first shard's progress line
    assert error == f"error: {tmp_path / 'model'}: cannot write the checkpoint (No space left on device)"
    assert not (tmp_path / "model").exists()
    assert list(tmp_path.iterdir()) == []


def test_real_size_run_reports_rss_load_and_speed(shaped: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks.real_size_run import main as run_main

    assert run_main([str(shaped), "--tokens", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["generated_tokens"] == 4
    assert summary["peak_rss_bytes"] > summary["plan"]["dense_bytes"] > 0
    assert summary["load_seconds"] > 0 and summary["decode_tokens_per_second"] > 0
    assert summary["disk_read_bytes"] is not None
    assert "--threads 1" in summary["generate_command"]


def test_real_size_run_refuses_what_ram_cannot_hold(shaped: Path, monkeypatch, capsys) -> None:
    import benchmarks.real_size_run as runner

    monkeypatch.setattr(runner, "available_bytes", lambda: 1 << 20)
    assert runner.main([str(shaped)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host-memory" in err
