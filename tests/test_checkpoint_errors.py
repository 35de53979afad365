"""Damaged checkpoints give one clean line through the CLI, never a traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.test_cli_generate import offload_here


def small_tokenizer(directory: Path) -> None:
    """A word-level tokenizer.json within the baby's 97 ids (a larger one is refused at load)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2, "Hello": 3, "[INST]": 4, "[/INST]": 5}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))


def _sharded(directory: Path) -> dict:
    return json.loads((directory / "model.safetensors.index.json").read_text())


def drop_config_key(directory: Path) -> None:
    raw = json.loads((directory / "config.json").read_text())
    del raw["num_local_experts"]
    (directory / "config.json").write_text(json.dumps(raw))


def wrong_config_value(directory: Path) -> None:
    raw = json.loads((directory / "config.json").read_text())
    raw["num_key_value_heads"] = 3
    (directory / "config.json").write_text(json.dumps(raw))


def remove_config(directory: Path) -> None:
    (directory / "config.json").unlink()


def remove_a_shard(directory: Path) -> None:
    shard = sorted(set(_sharded(directory)["weight_map"].values()))[1]
    (directory / shard).unlink()


def truncate_a_shard(directory: Path) -> None:
    shard = directory / sorted(set(_sharded(directory)["weight_map"].values()))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def reshape_a_tensor(directory: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = directory / _sharded(directory)["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})


def drop_a_tensor(directory: Path) -> None:
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    shard = directory / _sharded(directory)["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})


def shard_outside(directory: Path) -> None:
    index = _sharded(directory)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def only_pickle(directory: Path) -> None:
    for path in directory.glob("model*"):
        path.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (remove_config, "config.json: no such file"),
        (drop_config_key, "missing key 'num_local_experts'"),
        (wrong_config_value, "num_key_value_heads 3"),
        (remove_a_shard, "is missing"),
        (truncate_a_shard, "not a readable safetensors file"),
        (reshape_a_tensor, "q_proj.weight has shape [72, 71], expected [72, 72]"),
        (drop_a_tensor, "experts.3.w2.weight is missing"),
        (shard_outside, "outside the model directory"),
        (only_pickle, "safetensors only"),
    ],
)
def test_damaged_checkpoint_is_one_line(
    damage: Callable[[Path], None],
    message: str,
    baby_dirs: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    directory = tmp_path / "model"
    shutil.copytree(baby_dirs["sharded-tied-window"][0], directory)
    small_tokenizer(directory)
    damage(directory)
    code, _, stderr = offload_here(monkeypatch, capfd, "generate", "--model", str(directory), "Hello")
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
