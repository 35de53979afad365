"""Nothing a model file holds is ever executed: no pickle, no torch.load, no remote code.

Three layers of proof: the source never imports an unpickler or calls ``torch.load``; a directory with
only pickle weights is refused before anything reads them, even a pickle that would run code; and every
supported format loads with every unpickling entry point booby-trapped.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.soak import sentencepiece_model
from offload.checkpoint.reader import INDEX_FILE, SINGLE_FILE, Checkpoint
from offload.errors import CheckpointError
from tests.fuzz_support import tiny_model

ROOT = Path(__file__).resolve().parent.parent
UNPICKLERS = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "jsonpickle",
}
REMOTE_CODE = "trust_remote" + "_code"  # spelled in two parts so this file does not contain the word


def source_files() -> list[Path]:
    """Every Python file that ships or runs outside the tests."""
    folders = ("offload", "cli", "scripts", "benchmarks")
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def test_no_unpickler_no_torch_load_and_no_remote_code_in_the_source() -> None:
    problems = []
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules = {(node.module or "").split(".")[0]}
                if node.module in ("torch", "torch.serialization") and any(
                    a.name == "load" for a in node.names
                ):
                    problems.append(f"{where}:{node.lineno}: imports torch.load")
            else:
                modules = set()
            if modules & UNPICKLERS:
                problems.append(f"{where}:{node.lineno}: imports {sorted(modules & UNPICKLERS)}")
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads", "Unpickler"):
                owner = ast.unparse(node.value)
                if owner in ("torch", "torch.serialization", "pickle", "np", "numpy"):
                    problems.append(f"{where}:{node.lineno}: calls {owner}.{node.attr}")
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                problems.append(f"{where}:{node.lineno}: passes allow_pickle")
    for path in [*source_files(), *ROOT.glob("*.toml"), *(ROOT / "profiles").glob("*.toml")]:
        if REMOTE_CODE in path.read_text(encoding="utf-8"):
            problems.append(f"{path.relative_to(ROOT)}: mentions {REMOTE_CODE}")
    assert not problems, "\n".join(problems)


class _Payload:
    """Unpickling this runs ``marker.touch()``: what a hostile pytorch_model.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.00.pt"])
def test_pickle_only_directory_is_refused_with_advice_and_never_read(tmp_path: Path, name: str) -> None:
    directory = tiny_model(tmp_path / "model")
    (directory / SINGLE_FILE).unlink()
    marker = tmp_path / "code-ran"
    (directory / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError) as refused:
        Checkpoint(directory)
    message = str(refused.value)
    assert "safetensors only" in message
    assert "save_pretrained(safe_serialization=True)" in message  # says how to convert
    assert not marker.exists()


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every unpickling entry point raises, so a format that needs one fails loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle")

    class RefusingUnpickler:
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse()

    for owner, name in [(torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(owner, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)


def _sharded(directory: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / SINGLE_FILE)
    (directory / SINGLE_FILE).unlink()
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(directory / shard))
        weight_map |= dict.fromkeys(part, shard)
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_every_supported_format_loads_without_unpickling(tmp_path: Path, no_unpickling: None) -> None:
    from offload.chat import ChatSession
    from offload.checkpoint.convert import convert_checkpoint
    from offload.engine import Engine
    from offload.generate import SamplingParams, generate_ids
    from offload.loading import OffloadOptions, load_model
    from offload.quant.scheme import QuantScheme
    from offload.settings.flags import LoadFlags
    from offload.settings.profile import Profile, load_profile
    from offload.tokenizer import Tokenizer
    from offload.trace.format import load_trace, save_trace
    from offload.trace.recorder import TraceRecorder
    from tests.test_tokenizer import train_metaspace_bpe

    sizes = {"hidden_size": 64, "intermediate_size": 64, "vocab_size": 32000, "num_hidden_layers": 2}
    single = tiny_model(tmp_path / "single", **sizes)
    shutil.copy(sentencepiece_model(), single / "tokenizer.model")
    sharded = _sharded(tiny_model(tmp_path / "sharded", **sizes))
    tokenizer_json = train_metaspace_bpe(
        tmp_path / "tokenizer.json", ["<unk>", "<s>", "</s>"], vocab_size=400
    )

    load_model(sharded, device="cpu")
    assert Tokenizer.from_file(tokenizer_json).encode("hello")
    assert Tokenizer.from_file(single / "tokenizer.model").encode("hello")
    assert load_profile("cpu").name == "cpu"
    (tmp_path / "mine.toml").write_text(load_profile("rtx3060-12gb").to_toml())
    assert Profile.from_file(tmp_path / "mine.toml").name == "rtx3060-12gb"

    engine = Engine.load(single, LoadFlags(profile="cpu", device="cpu", dtype="float32"))
    session = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=3)
    list(session.send("Hello"))
    session.save(tmp_path / "chat.json")
    ChatSession(engine).load(tmp_path / "chat.json")

    model = load_model(single, device="cpu", offload=OffloadOptions(experts_per_layer=1))
    with TraceRecorder(model, model_name="tiny") as recorder:
        generate_ids(model, [1, 5, 6], max_new_tokens=3, sampling=SamplingParams(temperature=0))
    save_trace(recorder.trace(), tmp_path / "run.trace")
    assert np.array_equal(load_trace(tmp_path / "run.trace").ids, recorder.trace().ids)

    scheme = QuantScheme.build(2, attention="hqq:4:64", experts="hqq:2:16")
    convert_checkpoint(single, tmp_path / "converted", scheme)
    load_model(tmp_path / "converted", device="cpu")
