"""Fuzzing the weight files: safetensors headers and data, the shard index and its names, links out of the
model directory, and NaN or inf weights on every path (``tests/fuzz_support.py`` says how).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.soak import sentencepiece_model
from offload.checkpoint.hub import resolve_model_dir
from offload.checkpoint.reader import INDEX_FILE, SINGLE_FILE, Checkpoint
from offload.errors import CheckpointError
from offload.loading import OffloadOptions, load_model
from tests.fuzz_support import (
    damaged_safetensors,
    fuzz,
    json_values,
    mangled,
    refused_or_accepted,
    replace_file,
    safetensors_bytes,
    safetensors_parts,
    tiny_model,
)

# --- the safetensors file (header and data), through Checkpoint and every weight-reading path -----------


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model; the valid weights are kept beside it, as the fuzz test overwrites them."""
    directory = tiny_model(tmp_path_factory.mktemp("fuzz-single") / "model")
    shutil.copy(directory / SINGLE_FILE, directory.parent / "valid.safetensors")
    return directory


@fuzz
@given(data=st.data(), offloaded=st.booleans())
def test_damaged_safetensors_is_refused_cleanly(
    single_dir: Path, data: st.DataObject, offloaded: bool
) -> None:
    damaged, expected = data.draw(damaged_safetensors((single_dir.parent / "valid.safetensors").read_bytes()))
    replace_file(single_dir / SINGLE_FILE, damaged)
    options = OffloadOptions(experts_per_layer=1) if offloaded else None
    model = refused_or_accepted(lambda: load_model(single_dir, device="cpu", offload=options))
    if expected != "any":
        assert model is None, "a damaged file was loaded"
    if expected == "nonfinite":
        with pytest.raises(CheckpointError, match="NaN or inf"):
            load_model(single_dir, device="cpu", offload=options)


def test_absurd_sizes_are_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    """Headers claiming 2^60 bytes, or tensors of 2^80 elements, fail fast under a tight address-space limit."""
    directory = tiny_model(tmp_path / "model")
    valid = (directory / SINGLE_FILE).read_bytes()
    header, body = safetensors_parts(valid)
    name = "model.embed_tokens.weight"
    cases = {"header-2^60": (2**60).to_bytes(8, "little") + valid[8:]}
    for label, change in {
        "shape-2^80": {"shape": [2**40, 2**40]},
        "shape-2^62-by-0": {"shape": [2**62, 0]},
        "offsets-2^62": {"data_offsets": [0, 2**62]},
    }.items():
        cases[label] = safetensors_bytes({**header, name: {**header[name], **change}}, body)
    for label, data in cases.items():
        (tmp_path / label).mkdir()
        shutil.copy(directory / "config.json", tmp_path / label)
        (tmp_path / label / SINGLE_FILE).write_bytes(data)
    script = f"""
import resource, sys
from offload.errors import CheckpointError
from offload.loading import load_model
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
# 512 MiB more address space than the interpreter already has: any giant allocation fails loudly.
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**29, vm + 2**29))
for label in {sorted(cases)!r}:
    try:
        load_model({str(tmp_path)!r} + "/" + label, device="cpu")
    except CheckpointError as err:
        print(label, "refused:", err)
    else:
        sys.exit(label + " loaded")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("refused:") == len(cases), done.stdout


# --- model.safetensors.index.json and shard names ----------------------------------------------------


SHARD_NAMES = [
    "a.safetensors",
    "b.safetensors",
    "../a.safetensors",
    "/etc/passwd.safetensors",
    "sub/../../a.safetensors",
    "./a.safetensors",
    "sub/copy.safetensors",
    "sub/outside.safetensors",  # a link out of the model directory
    "sub/loop.safetensors",  # a link to itself
    "sub/dir.safetensors",  # a directory
    "missing.safetensors",
    "a.bin",
    "",
    "a.safetensors\x00.txt.safetensors",
]


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in two shards with an index, plus hostile files under sub/ for the index to name."""
    root = tmp_path_factory.mktemp("fuzz-sharded")
    directory = tiny_model(root / "model")
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / SINGLE_FILE)
    (directory / SINGLE_FILE).unlink()
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(directory / shard))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sub = directory / "sub"
    sub.mkdir()
    shutil.copy(directory / "a.safetensors", sub / "copy.safetensors")
    (root / "outside.safetensors").write_bytes((directory / "a.safetensors").read_bytes())
    (sub / "outside.safetensors").symlink_to(root / "outside.safetensors")
    (sub / "loop.safetensors").symlink_to(sub / "loop.safetensors")
    (sub / "dir.safetensors").mkdir()
    shutil.copy(directory / INDEX_FILE, root / "valid-index.json")
    return directory


@st.composite
def damaged_index(draw: st.DrawFn, valid: bytes) -> bytes:
    index = json.loads(valid)
    how = draw(st.sampled_from(["entries", "entries", "weight_map", "whole", "text"]))
    if how == "text":
        return draw(mangled(valid, b'{"weight_map":', b'{"weight_map": {"x": N}}'))
    if how == "whole":
        return json.dumps(draw(json_values)).encode()
    if how == "weight_map":
        index["weight_map"] = draw(json_values)
        return json.dumps(index).encode()
    weight_map = index["weight_map"]
    shard = st.sampled_from(SHARD_NAMES) | st.text(max_size=20) | json_values
    for _ in range(draw(st.integers(1, 4))):
        change = draw(st.sampled_from(["value", "drop", "add", "metadata", "same"]))
        name = draw(st.sampled_from(sorted(weight_map))) if weight_map else "x"
        if change == "value":
            weight_map[name] = draw(shard)
        elif change == "drop":
            weight_map.pop(name, None)
        elif change == "add":
            weight_map[draw(st.text(max_size=20))] = draw(shard)
        elif change == "metadata":
            index["metadata"] = draw(json_values)
        elif isinstance(weight_map.get(name), str):  # the same shard, spelled another way
            weight_map[name] = "./" + weight_map[name]
    return json.dumps(index).encode()


@fuzz
@given(data=st.data())
def test_damaged_shard_index_is_refused_cleanly(sharded_dir: Path, data: st.DataObject) -> None:
    valid = (sharded_dir.parent / "valid-index.json").read_bytes()
    replace_file(sharded_dir / INDEX_FILE, data.draw(damaged_index(valid)))
    refused_or_accepted(lambda: load_model(sharded_dir, device="cpu"))


def test_shard_names_that_leave_the_directory_are_refused(sharded_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "model"
    shutil.copytree(sharded_dir, directory, symlinks=True)
    valid = (sharded_dir.parent / "valid-index.json").read_text()
    for name, message in [
        ("../a.safetensors", "points outside the model directory"),
        ("/etc/passwd.safetensors", "points outside the model directory"),
        ("sub/../../a.safetensors", "points outside the model directory"),
        ("sub/outside.safetensors", "outside the model directory"),
        ("sub/loop.safetensors", "is missing"),
        ("a.bin", "is not a .safetensors file name"),
    ]:
        index = json.loads(valid)
        index["weight_map"]["model.norm.weight"] = name
        (directory / INDEX_FILE).write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=message):
            Checkpoint(directory)


# --- links out of the model directory, and huggingface_hub's cache -------------------------------------


def test_links_out_of_the_model_directory_are_refused(tmp_path: Path) -> None:
    source = tiny_model(tmp_path / "source")
    shutil.copy(sentencepiece_model(), source / "tokenizer.model")
    (source / "tokenizer.json").write_text("{}")
    for name in ("config.json", SINGLE_FILE, "tokenizer.model", "tokenizer.json", INDEX_FILE):
        directory = tmp_path / f"links-{name}"
        shutil.copytree(source, directory)
        target = tmp_path / f"elsewhere-{name}"
        if name == INDEX_FILE:
            target.write_text(json.dumps({"weight_map": {}}))
        else:
            shutil.move(directory / name, target)
        (directory / name).symlink_to(target)
        with pytest.raises(CheckpointError, match="outside the model directory"):
            resolve_model_dir(directory)
        with pytest.raises(CheckpointError, match="outside the model directory"):
            Checkpoint(directory)


def test_links_inside_the_model_directory_and_a_linked_directory_are_fine(tmp_path: Path) -> None:
    directory = tiny_model(tmp_path / "model")
    (directory / "weights").mkdir()
    shutil.move(directory / SINGLE_FILE, directory / "weights" / "w.safetensors")
    (directory / SINGLE_FILE).symlink_to(Path("weights") / "w.safetensors")
    (tmp_path / "alias").symlink_to(directory)  # ~/models/mixtral -> /data/mixtral is common
    load_model(tmp_path / "alias", device="cpu")


def test_a_symlink_loop_is_a_clean_error(tmp_path: Path) -> None:
    directory = tiny_model(tmp_path / "model")
    (directory / "tokenizer.json").symlink_to(directory / "tokenizer.json")
    with pytest.raises(CheckpointError, match="cannot follow this link"):
        resolve_model_dir(directory)


def hub_snapshot(cache: Path, repo: str, source: Path, escape: str | None = None) -> Path:
    """Lay ``source`` out as huggingface_hub does: files in blobs/, linked from snapshots/REV/."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for index, path in enumerate(sorted(source.iterdir())):
        blob = folder / "blobs" / f"blob{index:04d}"
        shutil.copy(path, blob)
        link = Path("..", "..", "blobs", blob.name)
        if path.name == escape:
            outside = cache / "elsewhere"
            shutil.copy(path, outside)
            link = Path("..", "..", "..", "elsewhere")
        (snapshot / path.name).symlink_to(link)
    return snapshot


def test_a_hub_cache_snapshot_loads_and_a_link_out_of_its_repo_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tiny_model(tmp_path / "source")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    snapshot = hub_snapshot(cache, "someone/tiny", source)
    assert resolve_model_dir("someone/tiny") == snapshot
    load_model("someone/tiny", device="cpu")
    load_model(snapshot, device="cpu")

    bad = hub_snapshot(cache / "other", "someone/tiny", source, escape="config.json")
    with pytest.raises(CheckpointError, match="outside the model directory"):
        resolve_model_dir(bad)


# --- every weight goes through Checkpoint.get (and so through its NaN check) -------------------------


def test_only_checkpoint_and_trace_open_safetensors_files() -> None:
    """A second reader of weights would skip the NaN and inf check; there is none."""
    root = Path(__file__).resolve().parent.parent
    readers = set()
    for path in [*root.glob("offload/**/*.py"), *root.glob("cli/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        if any(
            word in text
            for word in ("safe_open", "load_file(", "get_tensor(", "safetensors.torch import load")
        ):
            readers.add(path.relative_to(root).as_posix())
    assert readers <= {"offload/checkpoint/reader.py", "offload/trace/format.py"}, readers


@pytest.mark.parametrize("offloaded", [False, True])
@pytest.mark.parametrize("name", ["model.layers.0.block_sparse_moe.experts.1.w2.weight", "model.norm.weight"])
def test_nan_and_inf_weights_are_reported_on_every_path(tmp_path: Path, name: str, offloaded: bool) -> None:
    from safetensors.torch import load_file, save_file

    directory = tiny_model(tmp_path / "model")
    tensors = load_file(directory / SINGLE_FILE)
    tensors[name].view(-1)[-1] = float("nan")
    save_file(tensors, str(directory / SINGLE_FILE))
    options = OffloadOptions(experts_per_layer=1) if offloaded else None
    with pytest.raises(CheckpointError, match=f"{name} holds NaN or inf"):
        load_model(directory, device="cpu", offload=options)
