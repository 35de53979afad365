"""Routing traces: the file format, the recorder, and the trace commands (replay by hand: test_trace_replay)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from offload.errors import TraceError
from offload.trace.format import METADATA_KEY, Trace, load_trace, save_trace
from offload.trace.recorder import TraceRecorder
from offload.trace.replay import replay
from tests.baby import BabySpec, write_baby
from tests.test_trace_replay import make_trace, sequence

# --- the file ----------------------------------------------------------------------------------


def example() -> Trace:
    steps = [[[[0, 1], [2, 3]], [[1, 2], [0, 3]]], [[[0, 2]], [[1, 3]]]]
    return make_trace(steps, num_experts=4, guesses={(0, 1): [1, 0], (1, 1): [3]}, expert_bytes=(64, 128))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    trace = example()
    save_trace(trace, tmp_path / "t.trace")
    loaded = load_trace(tmp_path / "t.trace")
    assert loaded.header() == trace.header()
    for name in ("step_tokens", "ids", "weights", "guess_counts", "guesses"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
    assert loaded.needed(0, 1) == [0, 1, 2, 3] and loaded.guesses_for(0, 1) == [1, 0]
    assert loaded.guesses_for(1, 1) == [3] and loaded.guesses_for(1, 0) == []
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1]), path)
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TraceError, match="No space left"):
        save_trace(example(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace"]  # no temporary file left behind
    with pytest.raises(TraceError, match="cannot write"):
        save_trace(example(), tmp_path / "missing" / "t.trace")


def rewrite(path: Path, change) -> None:
    """Apply ``change(tensors, header)`` to a saved trace, bypassing save_trace's checks."""
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(str(path), framework="numpy") as file:
        header = json.loads(file.metadata()[METADATA_KEY])
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    change(tensors, header)
    path.write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(header)}))


def _set(mapping: dict, key: str, value: object) -> None:
    mapping[key] = value


DAMAGE = {
    "format": (lambda t, h: _set(h, "format", "npz"), "format 'npz'"),
    "version": (lambda t, h: _set(h, "version", 2), "version 2 is not supported"),
    "top_k": (lambda t, h: _set(h, "top_k", 0), "top_k"),
    "expert bytes": (lambda t, h: _set(h, "expert_bytes", [64]), "expert_bytes has 1 values"),
    "id too large": (lambda t, h: t["ids"].__setitem__((0, 0, 0), 4), "out of range"),
    "negative id": (lambda t, h: t["ids"].__setitem__((0, 0, 0), -1), "out of range"),
    "guess id": (lambda t, h: t["guesses"].__setitem__(0, 9), "guessed expert id is out of range"),
    "repeated id": (lambda t, h: t["ids"].__setitem__((0, 0, 1), t["ids"][0, 0, 0]), "same expert twice"),
    "token count": (lambda t, h: t["step_tokens"].__setitem__(1, 2), "ids has shape"),
    "guess count": (lambda t, h: t["guess_counts"].__setitem__((1, 1), 2), "guess_counts add up to 4"),
    "layer 0 guess": (lambda t, h: t["guess_counts"].__setitem__((0, 0), 1), "guesses has shape"),
    "empty step": (lambda t, h: t["step_tokens"].__setitem__(0, 0), "a step has no tokens"),
    "weights": (lambda t, h: t["weights"].__setitem__((0, 0, 0), np.nan), "not finite"),
    "missing": (lambda t, h: t.pop("guesses"), "missing tensor 'guesses'"),
    "extra": (lambda t, h: _set(t, "logits", np.zeros(1, np.float32)), "unexpected tensor 'logits'"),
    "dtype": (lambda t, h: _set(t, "ids", t["ids"].astype(np.float32)), "'ids' is float32"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_invalid_trace_is_a_one_line_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "bad.trace"
    save_trace(example(), path)
    change, message = DAMAGE[damage]
    rewrite(path, change)
    with pytest.raises(TraceError) as raised:
        load_trace(path)
    text = str(raised.value)
    assert message in text and str(path) in text and "\n" not in text


def test_a_checkpoint_shard_given_as_a_trace_is_refused_by_its_header(tmp_path: Path) -> None:
    # A bfloat16 shard, as `trace replay model-00001-of-00019.safetensors` by mistake: refused as "not a trace"
    # from the header, before any tensor is read (numpy cannot even hold bfloat16).
    from safetensors.torch import save_file

    path = tmp_path / "model-00001-of-00002.safetensors"
    save_file({"model.norm.weight": torch.ones(4096, dtype=torch.bfloat16)}, str(path))
    with pytest.raises(TraceError, match="not an offload routing trace"):
        load_trace(path)
    save_trace(example(), path)  # a valid trace, then one of its tensors made bfloat16
    tensors = {name: torch.from_numpy(array) for name, array in _tensors(path).items()}
    tensors["weights"] = tensors["weights"].to(torch.bfloat16)
    save_file(tensors, str(path), metadata={METADATA_KEY: _metadata(path)})
    with pytest.raises(TraceError, match="tensor 'weights' is bfloat16, expected float32"):
        load_trace(path)


def _metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as file:
        return file.metadata()[METADATA_KEY]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as file:
        return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)


def test_a_damaged_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    save_trace(example(), path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(TraceError, match=r"not an offload routing trace \(not a safetensors file"):
        load_trace(path)
    path.write_text("step,layer,expert\n0,0,1\n")
    with pytest.raises(TraceError, match=r"not an offload routing trace \(not a safetensors file"):
        load_trace(path)
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "none.trace")
    from safetensors.numpy import save

    path.write_bytes(save({"ids": np.zeros(1, np.int32)}))
    with pytest.raises(TraceError, match="not an offload routing trace"):
        load_trace(path)


# --- recording a model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three layers so guesses cross layers; Mixtral's tokenizer so the CLI can take text."""
    import mistral_common

    directory = tmp_path_factory.mktemp("trace-baby")
    write_baby(
        BabySpec("trace-baby", hidden_size=32, intermediate_size=48, num_hidden_layers=3, vocab_size=32000),
        directory,
    )
    shutil.copy(
        Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", directory / "tokenizer.model"
    )
    return directory


def load(directory: Path, experts_per_layer: int | None = None, prefetch: int = 0, policy: str = "lru"):
    from offload.loading import OffloadOptions, load_model

    options = OffloadOptions(experts_per_layer=experts_per_layer, prefetch=prefetch, cache_policy=policy)
    return load_model(directory, dtype="float32", offload=options)


def run(model, prompt: list[int], new_tokens: int) -> list[int]:
    from offload.generate import SamplingParams, generate_ids

    return generate_ids(
        model, prompt, max_new_tokens=new_tokens, sampling=SamplingParams(temperature=0), stop_ids=()
    )


@pytest.mark.parametrize(("experts_per_layer", "prefetch"), [(None, 0), (3, 2)])
def test_recording_leaves_the_logits_bit_identical(
    baby: Path, experts_per_layer: int | None, prefetch: int
) -> None:
    model = load(baby, experts_per_layer, prefetch)
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142]])
    source, gates = model.expert_source, [layer.block_sparse_moe.gate for layer in model.model.layers]
    with torch.inference_mode():
        before = model(ids)
        with TraceRecorder(model, model_name="baby") as recorder:
            during = model(ids)
        after = model(ids)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all(layer.block_sparse_moe.source is source for layer in model.model.layers)
    assert not any(gate._forward_hooks for gate in gates) and not model._forward_hooks
    trace = recorder.trace()
    assert trace.steps == 1 and trace.tokens == 6 and trace.model == "baby"
    assert trace.has_guesses == (prefetch > 0)
    assert trace.guess_counts[0, 0] == 0 and (trace.guess_counts[0, 1:] == prefetch).all()
    assert np.allclose(trace.weights.sum(-1), 1)


SHARED_COUNTERS = (
    "accesses",
    "hits",
    "misses",
    "loads",
    "prefetch_loads",
    "prefetch_hits",
    "wasted_prefetches",
)


REPLAYED_RUNS = [(2, 0, [1]), (3, 2, [1]), (8, 2, [1, 415, 2936, 9060])]


@pytest.mark.parametrize("policy", ["lru", "lrfu"])
@pytest.mark.parametrize(("experts_per_layer", "prefetch", "prompt"), REPLAYED_RUNS)
def test_replay_reproduces_the_offloaded_cache(
    baby: Path, experts_per_layer: int, prefetch: int, prompt: list[int], policy: str
) -> None:
    """With no step needing more than K experts, replay gives OffloadedExperts' very counters."""
    model = load(baby, experts_per_layer, prefetch, policy)
    with TraceRecorder(model) as recorder:
        run(model, prompt, 40)
    trace = recorder.trace()
    assert list(trace.step_tokens) == [len(prompt)] + [1] * 39
    expected = model.expert_source.stats.total()
    result = replay(trace, f"{policy}+prefetch" if prefetch else policy, experts_per_layer)
    for name in SHARED_COUNTERS:
        assert getattr(result, name) == getattr(expected, name), name
    assert result.bytes_moved == expected.bytes_moved
    assert result.streamed == 0


def test_the_replayed_runs_tell_the_policies_apart(baby: Path) -> None:
    """The runs above would hide an engine that ignored its policy unless LRU and LRFU differ on them.
    (At K = top-k = 2 no policy has a choice: a miss can only evict the one expert not needed.)"""
    model = load(baby, 3, 2)
    with TraceRecorder(model) as recorder:
        run(model, [1], 40)
    trace = recorder.trace()
    assert replay(trace, "lru", 3).misses != replay(trace, "lrfu", 3).misses
    assert replay(trace, "lru+prefetch", 3).loads != replay(trace, "lrfu+prefetch", 3).loads


# --- the commands ------------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    from cli.trace_cmd import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A stand-in for the offload app."""

    register(app)
    return app


@pytest.mark.parametrize(
    ("flags", "guesses"),
    [([], True), (["--experts-per-layer", "4", "--prefetch", "1"], True), (["--prefetch", "0"], False)],
)
def test_record(cli: typer.Typer, baby: Path, tmp_path: Path, flags: list[str], guesses: bool) -> None:
    out = tmp_path / "baby.trace"
    args = ["trace", "record", str(out), "--model", str(baby), "--prompt", "Hello", "--max-new-tokens", "4"]
    recorded = CliRunner().invoke(cli, [*args, "--dtype", "float32", *flags])
    assert recorded.exit_code == 0, recorded.output
    assert f"wrote {out}: 4 steps" in recorded.output
    trace = load_trace(out)
    assert trace.has_guesses == guesses and trace.model == baby.name
    assert trace.expert_bytes == (3 * 32 * 48 * 4,) * 3  # w1, w2, w3 in float32


def test_record_then_replay(cli: typer.Typer, baby: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "baby.trace"
    recorded = runner.invoke(
        cli, ["trace", "record", str(out), "--model", str(baby), "--prompt", "Hello there", "--max-new-tokens", "6",
              "--experts-per-layer", "4", "--prefetch", "2", "--dtype", "float32"],
    )  # fmt: skip
    assert recorded.exit_code == 0, recorded.output
    trace = load_trace(out)
    assert trace.steps == 6 and trace.has_guesses

    table = runner.invoke(cli, ["trace", "replay", str(out), "-k", "1-2,4"])
    assert table.exit_code == 0, table.output
    assert "belady" in table.output and "lru+prefetch" in table.output and "optimum" in table.output

    as_json = runner.invoke(cli, ["trace", "replay", str(out), "--policy", "lru,belady", "-k", "2", "--json"])
    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.output)
    assert [(r["policy"], r["experts_per_layer"]) for r in result["rows"]] == [("lru", 2), ("belady", 2)]
    assert result["rows"][1]["hits"] >= result["rows"][0]["hits"]
    assert result["rows"][0]["bytes_per_token"] > 0  # the recorder knew the expert size


def test_replay_without_guesses_or_sizes(cli: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1, 0, 2, 1, 2]), path)
    shown = CliRunner().invoke(cli, ["trace", "replay", str(path), "-k", "2"])
    assert shown.exit_code == 0, shown.output
    assert "lru+prefetch" not in shown.output.split("No prefetch")[0] and "--expert-bytes" in shown.output
    sized = CliRunner().invoke(
        cli, ["trace", "replay", str(path), "-k", "2", "--expert-bytes", "1048576", "--json"]
    )
    assert json.loads(sized.output)["rows"][0]["bytes_per_token"] == pytest.approx(4 * 2**20 / 6)


def test_replay_takes_the_issue_s_range_syntax(cli: typer.Typer, tmp_path: Path) -> None:
    """`--experts-per-layer 1..E`, as written in the issue, means the same as 1-E."""
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1, 0, 2, 1, 2]), path)
    rows = {}
    for ks in ("1..3", "1-3"):
        shown = CliRunner().invoke(
            cli, ["trace", "replay", str(path), "--policy", "lru", "--experts-per-layer", ks, "--json"]
        )
        assert shown.exit_code == 0, shown.output
        rows[ks] = json.loads(shown.output)["rows"]
    assert [r["experts_per_layer"] for r in rows["1..3"]] == [1, 2, 3]
    assert rows["1..3"] == rows["1-3"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], "out of range"),
        (["-k", "2-9"], "out of range"),
        (["-k", "two"], "expected numbers"),
        (["--policy", "lru,fifo"], "'fifo' is not a policy"),
        (["-k", "3-1"], "'3-1' is a reversed range: write 1-3"),
        (["--policy", "lru,,belady"], "'lru,,belady' has an empty name"),
    ],
)
def test_replay_rejects_bad_options(cli: typer.Typer, tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1]), path)
    result = CliRunner().invoke(cli, ["trace", "replay", str(path), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_replay_of_a_damaged_file_raises_a_trace_error(cli: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    path.write_text("not a trace")
    result = CliRunner().invoke(cli, ["trace", "replay", str(path)])
    assert isinstance(result.exception, TraceError)  # cli.main.run prints it as one line, exit code 2
    result = CliRunner().invoke(cli, ["trace", "replay", str(tmp_path)])
    assert "a directory, not a trace file" in str(result.exception)


def test_record_refuses_zero_new_tokens(cli: typer.Typer, baby: Path, tmp_path: Path) -> None:
    # A trace records decode steps: with none, it would be empty while saying it was written.
    out = tmp_path / "run.trace"
    result = CliRunner().invoke(
        cli, ["trace", "record", str(out), "--model", str(baby), "--max-new-tokens", "0"]
    )
    assert result.exit_code != 0 and not out.exists()
    assert "--max-new-tokens 0 is out of range: 1 to" in str(result.exception) + result.output
