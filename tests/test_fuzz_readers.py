"""Fuzzing every reader of a file that may come from the internet: damage ends in an OffloadError, nothing else.

Each test starts from a valid file and damages it (truncation, wrong lengths and offsets, unknown dtypes,
absurd sizes, NaN and inf, hostile shard names, deep nesting, huge numbers, random bytes). The reader must
either accept the file (and then the rest of the path must work on it too) or raise an OffloadError
subclass: never another exception type, a crash or a hang.

The example count is bounded for CI; ``OFFLOAD_FUZZ_EXAMPLES=1000`` gives the full run recorded in
docs/RELIABILITY.md. Seeds are fixed (``derandomize``), so every run tries the same cases.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from benchmarks.soak import sentencepiece_model, write_random_mixtral
from offload.checkpoint.hub import resolve_model_dir
from offload.checkpoint.reader import INDEX_FILE, SINGLE_FILE, Checkpoint
from offload.config import ModelConfig
from offload.errors import CheckpointError, OffloadError
from offload.loading import OffloadOptions, load_model
from offload.quant.scheme import BLOCK_FORMAT, QuantScheme
from offload.settings.profile import BUNDLED_DIR, Profile

EXAMPLES = int(os.environ.get("OFFLOAD_FUZZ_EXAMPLES", "50"))
fuzz = settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
TINY = {
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_local_experts": 2,
    "num_experts_per_tok": 1,
    "max_position_embeddings": 64,
}
SAFETENSORS_DTYPES = [
    "BOOL",
    "U8",
    "I8",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "F64",
    "I64",
    "U64",
]
SAFETENSORS_DTYPES += ["F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "C64", "", "f32", "F128", "XYZ"]
ABSURD = [0, 1, 7, 2**31, 2**32, 2**60, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]
SPECS = ["none", "hqq:4:64", "hqq:3:64", "hqq:2:16", "hqq:8:128", "bnb:nf4", "bnb:fp4", "bnb:int8"]
SPECS += [
    "",
    "hqq",
    "hqq:5:64",
    "hqq:4:0",
    "hqq:4:-1",
    "hqq:²:64",
    "bnb:nf8",
    "gguf:q4",
    "none:4",
    "hqq:4:64:1",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([*ABSURD, -1, -(2**63)])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def one_in(draw: st.DrawFn, n: int) -> bool:
    """True about once in ``n`` draws; hypothesis favours the ends of a range, so the middle value decides."""
    return draw(st.integers(1, n)) == (n + 1) // 2


def refused_or_accepted(action: Callable[[], Any]) -> Any:
    """Run ``action``: an OffloadError is a clean refusal (None); any other exception fails the test."""
    try:
        result = action()
    except OffloadError as err:
        assert str(err).strip(), "an error must say what is wrong"
        event(f"refused: {type(err).__name__}")
        return None
    event("accepted")
    return result


def replace_file(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` as a new file (a new inode), so no old memory map sees it change."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@st.composite
def mangled(draw: st.DrawFn, valid: bytes, nest: bytes, huge_number: bytes) -> bytes:
    """``valid`` text damaged: cut, bytes changed or inserted, deep nesting, huge numbers, random bytes."""
    how = draw(st.sampled_from(["truncate", "flip", "insert", "nest", "number", "binary", "bom", "nan"]))
    if how == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if how == "flip":
        data = bytearray(valid)
        for index, value in draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=6)
        ):
            data[index] = value
        return bytes(data)
    if how == "insert":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.binary(min_size=1, max_size=16)) + valid[at:]
    if how == "nest":
        return nest * draw(st.sampled_from([10, 900, 1100, 5000, 100_000]))
    if how == "number":
        return huge_number.replace(b"N", b"9" * draw(st.sampled_from([19, 20, 400, 4300, 5000])))
    if how == "bom":
        return b"\xef\xbb\xbf" + valid
    if how == "nan":
        return valid.replace(b"1", b"NaN", 1).replace(b"2", b"Infinity", 1)
    return draw(st.binary(max_size=300))


def tiny_model(directory: Path, **changes: Any) -> Path:
    """A 16-tensor random Mixtral: small enough to load hundreds of times a second."""
    return write_random_mixtral(directory, **{**TINY, **changes})


def safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    """(header, body) of a safetensors file."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def safetensors_bytes(header: Any, body: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)  # safetensors aligns the body to 8 bytes
    return len(text).to_bytes(8, "little") + text + body


# --- the safetensors file (header and data), through Checkpoint and every weight-reading path -----------


@st.composite
def damaged_safetensors(draw: st.DrawFn, valid: bytes) -> tuple[bytes, str]:
    """A damaged copy of ``valid`` and what it must do: "refuse", "nonfinite" (refuse naming NaN) or "any"."""
    header, body = safetensors_parts(valid)
    names = sorted(name for name in header if name != "__metadata__")
    how = draw(st.sampled_from(["truncate", "length", "field", "header", "flip", "values", "nonfinite"]))
    if how == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))], "refuse"
    if how == "length":
        claimed = draw(st.sampled_from(ABSURD[:-2]) | st.integers(0, len(valid) + 16))
        return claimed.to_bytes(8, "little") + valid[8:], "any"
    if how == "field":
        name = draw(st.sampled_from(names))
        entry = header[name]
        change = draw(
            st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename", "extra", "metadata"])
        )
        dims = st.integers(-2, 40) | st.sampled_from(ABSURD)
        if change == "dtype":
            entry["dtype"] = draw(st.sampled_from(SAFETENSORS_DTYPES) | json_values)
        elif change == "shape":
            entry["shape"] = draw(st.lists(dims, max_size=4) | json_values)
        elif change == "data_offsets":
            offsets = st.integers(-1, len(body) + 8) | st.sampled_from(ABSURD)
            entry["data_offsets"] = draw(st.lists(offsets, max_size=3) | json_values)
        elif change == "drop":
            del header[name]
        elif change == "rename":
            new_name = draw(
                st.sampled_from(["", "../x", "a\nb", "x" * 1000, names[0]]) | st.text(max_size=20)
            )
            header[new_name] = header.pop(name)
        elif change == "extra":
            header[draw(st.text(max_size=10))] = draw(json_values)
        else:
            header["__metadata__"] = draw(json_values)
        return safetensors_bytes(header, body, pad=draw(st.booleans())), "any"
    if how == "header":
        text = draw(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
        return len(text).to_bytes(8, "little") + text + body, "any"
    if how == "flip":
        data = bytearray(valid)
        for index, value in draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1)
        ):
            data[index] = value
        return bytes(data), "any"
    name = draw(st.sampled_from(names))
    start, end = header[name]["data_offsets"]
    data = bytearray(body)
    if how == "values":  # random bits: finite ones load, NaN and inf must not
        data[start:end] = draw(st.binary(min_size=end - start, max_size=end - start))
        return safetensors_bytes(header, bytes(data), pad=False), "any"
    position = start + 4 * draw(st.integers(0, (end - start) // 4 - 1))
    data[position : position + 4] = struct.pack(
        "<f", draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    )
    return safetensors_bytes(header, bytes(data), pad=False), "nonfinite"


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


# --- config.json and its quantization block ----------------------------------------------------------

CONFIG_KEYS = [*TINY, "rope_theta", "rms_norm_eps", "head_dim", "sliding_window", "tie_word_embeddings"]
CONFIG_KEYS += ["bos_token_id", "eos_token_id", "torch_dtype", "dtype", "model_type", "rope_parameters"]
CONFIG_KEYS += ["quantization"]


@st.composite
def quant_blocks(draw: st.DrawFn, num_layers: int | None = None) -> Any:
    """A quantization block, valid or not in every way; ``num_layers`` makes the expert list mostly fit."""
    if one_in(draw, 10):
        return draw(json_values)
    bad = st.sampled_from(SPECS) | st.text(max_size=10) | json_scalars

    def spec(good: list[str]) -> Any:
        return draw(bad) if one_in(draw, 12) else draw(st.sampled_from(good))

    sizes = [0, 1, 2, 5] if num_layers is None or one_in(draw, 6) else [num_layers]
    bad_format = st.sampled_from(["offload-quant/2", 1, None])
    block: dict[str, Any] = {"format": draw(bad_format) if one_in(draw, 8) else BLOCK_FORMAT}
    for role in ("attention", "gate", "embed", "lm_head"):
        if not one_in(draw, 12):
            block[role] = spec(["none"] if role == "embed" else SPECS[:8])
    block["experts"] = [spec(SPECS[:8]) for _ in range(draw(st.sampled_from(sizes)))]
    if one_in(draw, 6):
        block[draw(st.text(max_size=8))] = draw(json_values)
    return block


@st.composite
def damaged_config(draw: st.DrawFn, valid: bytes) -> bytes:
    if one_in(draw, 4):
        return draw(mangled(valid, b'{"a":[', b'{"vocab_size": N}'))
    raw = json.loads(valid)
    values = (
        st.sampled_from([0, -1, 1, 2, 8, 16, 2**31, 2**62, 10**30, 0.0, -1.0, 1e-300, 1e308, 5e-324])
        | st.sampled_from(["mixtral", "bfloat16", "float64", "true", None, True, False])
        | json_values
    )
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=10))
        if one_in(draw, 5):
            raw.pop(key, None)
        elif key == "quantization":
            layers = raw.get("num_hidden_layers")
            fits = type(layers) is int and 0 < layers < 8  # an earlier change may have broken it
            raw[key] = draw(quant_blocks(layers if fits else None))
        elif key == "rope_parameters":
            raw[key] = draw(st.fixed_dictionaries({"rope_theta": values}) | values)
        else:
            raw[key] = draw(values)
    return json.dumps(raw).encode()


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tiny_model(tmp_path_factory.mktemp("fuzz-config") / "model")
    shutil.copy(directory / "config.json", directory.parent / "valid-config.json")
    return directory


@fuzz
@given(data=st.data())
def test_damaged_config_json_is_refused_cleanly(config_dir: Path, data: st.DataObject) -> None:
    valid = (config_dir.parent / "valid-config.json").read_bytes()
    replace_file(config_dir / "config.json", data.draw(damaged_config(valid)))
    config = refused_or_accepted(lambda: ModelConfig.from_file(config_dir / "config.json"))
    if config is not None:
        # Whatever the config says, loading against the real weights ends cleanly too.
        refused_or_accepted(lambda: load_model(config_dir, device="cpu"))


@fuzz
@given(data=st.data(), num_layers=st.integers(1, 4))
def test_damaged_quantization_block_is_refused_cleanly(data: st.DataObject, num_layers: int) -> None:
    block = data.draw(quant_blocks(num_layers))
    scheme = refused_or_accepted(lambda: QuantScheme.from_block(block, num_layers))
    if scheme is not None:
        assert QuantScheme.from_block(scheme.as_block(num_layers), num_layers) == scheme


# --- profiles ------------------------------------------------------------------------------------------

PROFILE_KEYS = {
    "device": ["kind", "memory_gib", "link_gbps"],
    "cache": ["experts_per_layer"],
    "prefetch": ["enabled", "experts"],
    "quant": ["attention", "experts", "gate", "embed", "lm_head", "experts_overrides"],
    "generation": ["max_new_tokens", "temperature", "top_p", "top_k", "context"],
}
toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([0, 1, 2, -1, 2**63 - 1, 10**30, "auto", "all", "cpu", "cuda", "²", "-1", "0", "99"])
    | st.floats()  # nan and inf included: TOML has both
    | st.text(max_size=12)
    | st.sampled_from(SPECS)
    | st.datetimes()
    | st.dates()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


GOOD_PROFILE_VALUES: dict[str, list[Any]] = {
    "memory_gib": [4.0, 12, 0.5],
    "link_gbps": [12.0, 1],
    "experts_per_layer": [1, 2, "auto", "all", [1], [2, 2]],
    "policy": ["lrfu", "lru"],
    "enabled": [True, False],
    "experts": [0, 1, 2],
    "experts_overrides": [{}, {"0": "hqq:3:64"}, {"-1": "none"}],
    "max_new_tokens": [1, 64],
    "temperature": [0, 0.7],
    "top_p": [0.9, 1.0],
    "top_k": [0, 40],
    "context": [16, 64, 4096],
}


@st.composite
def profile_tables(draw: st.DrawFn) -> dict[str, Any]:
    """Profile tables, mostly with good values; any key may hold something else entirely."""
    raw: dict[str, Any] = {}
    if draw(st.booleans()):
        raw["name"] = draw(st.just("fuzzed") | toml_values)
    for section, keys in PROFILE_KEYS.items():
        if one_in(draw, 4):
            continue
        if one_in(draw, 20):
            raw[section] = draw(toml_values)
            continue
        table = {}
        for key in draw(st.lists(st.sampled_from(keys), unique=True)):
            good = st.sampled_from(GOOD_PROFILE_VALUES.get(key, SPECS[:8]))
            table[key] = draw(good | good | good | toml_values)
        if section == "device" and not one_in(draw, 4):
            table["kind"] = draw(st.sampled_from(["cpu", "cuda"]))
        if section == "quant" and "experts_overrides" in table and one_in(draw, 4):
            keys = st.sampled_from(["0", "-1", "1", "²", "٣", "9" * 30, "x", ""]) | st.text(max_size=4)
            table["experts_overrides"] = draw(
                st.dictionaries(keys, st.sampled_from(SPECS) | toml_values, max_size=3)
            )
        raw[section] = table
    if one_in(draw, 10):
        raw[draw(st.text(max_size=6))] = draw(toml_values)
    return raw


@fuzz
@given(raw=profile_tables())
def test_damaged_profile_tables_are_refused_cleanly(raw: dict[str, Any]) -> None:
    config = ModelConfig.from_dict(TINY)
    profile = refused_or_accepted(lambda: Profile.from_dict(raw, source="fuzz.toml"))
    if profile is not None:
        refused_or_accepted(lambda: profile.for_model(config))
        again = Profile.from_dict(tomllib.loads(profile.to_toml()), source="fuzz.toml")
        assert again == profile, "to_toml must read back to the same profile"


@fuzz
@given(data=st.data())
def test_damaged_profile_file_is_refused_cleanly(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    valid = (BUNDLED_DIR / "rtx3060-12gb.toml").read_bytes()
    path = tmp_path_factory.getbasetemp() / "fuzz-profile.toml"
    path.write_bytes(data.draw(mangled(valid, b"a = [", b"[generation]\nmax_new_tokens = N\n")))
    profile = refused_or_accepted(lambda: Profile.from_file(path))
    if profile is not None:
        refused_or_accepted(lambda: profile.for_model(ModelConfig.from_dict(TINY)))


def test_profile_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    from offload.errors import ProfileError

    for path in (Path("/dev/zero"), tmp_path):  # /dev/zero would be read forever
        with pytest.raises(ProfileError, match="not a regular file"):
            Profile.from_file(path)


# --- chat save files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny model with Mixtral's real tokenizer, for ChatSession.load."""
    from offload.engine import Engine
    from offload.settings.flags import LoadFlags

    directory = tiny_model(
        tmp_path_factory.mktemp("fuzz-chat"), vocab_size=32000, max_position_embeddings=128
    )
    shutil.copy(sentencepiece_model(), directory / "tokenizer.model")
    return Engine.load(directory, LoadFlags(profile="cpu", device="cpu", dtype="float32"))


chat_text = (
    st.text(max_size=40)
    | st.text(st.characters(codec=None), max_size=10)
    | st.sampled_from(["", "\ud800", "[INST]", "</s>", "<s>", "\x00", "x" * 3000])
)


@st.composite
def chat_saves(draw: st.DrawFn) -> bytes:
    from offload.chat import SAVE_FORMAT

    if one_in(draw, 6):
        valid = json.dumps(
            {"format": SAVE_FORMAT, "system": "s", "messages": [{"role": "user", "content": "hi"}]}
        )
        return draw(mangled(valid.encode(), b'{"messages": [', b'{"format": N}'))
    # Mostly whole user/assistant pairs, as a session saves them; any part may be wrong.
    turns = 2 * draw(st.integers(0, 2)) + (one_in(draw, 8))
    messages: Any = []
    for index in range(turns):
        role = "user" if index % 2 == 0 else "assistant"
        if one_in(draw, 16):
            role = draw(st.sampled_from(["system", "tool", "", "User"]) | json_scalars)
        content = draw(chat_text | json_scalars if one_in(draw, 16) else chat_text)
        message: Any = {"role": role, "content": content}
        if one_in(draw, 20):
            message = draw(json_values)
        elif one_in(draw, 10):
            message["extra"] = draw(json_values)
        messages.append(message)
    payload: Any = {
        "format": draw(st.just("offload-chat/2") | json_scalars) if one_in(draw, 10) else SAVE_FORMAT,
        "system": draw(st.none() | st.just("Be brief.") | chat_text | json_scalars),
        "messages": messages if not one_in(draw, 20) else draw(json_values),
    }
    if one_in(draw, 20):
        payload = draw(json_values)
    return json.dumps(payload, ensure_ascii=True).encode()  # ensure_ascii writes a lone surrogate as \\ud800


@fuzz
@given(save=chat_saves())
def test_damaged_chat_save_is_refused_cleanly(
    chat_engine: Any, tmp_path_factory: pytest.TempPathFactory, save: bytes
) -> None:
    from offload.chat import ChatSession
    from offload.generate import SamplingParams

    path = tmp_path_factory.getbasetemp() / "fuzz-chat.json"
    path.write_bytes(save)
    session = ChatSession(chat_engine, sampling=SamplingParams(temperature=0), max_new_tokens=2)
    if refused_or_accepted(lambda: session.load(path) or True):
        # A chat that loads can go on: the next turn prefills it (dropping old turns if they do not fit).
        refused_or_accepted(lambda: list(session.send("And then?")))
        # Replied or refused (a system prompt longer than the context), the chat stays well formed.
        roles = [message["role"] for message in session.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


# --- routing traces --------------------------------------------------------------------------------------


def valid_trace_bytes() -> bytes:
    from safetensors.numpy import save

    from offload.trace.format import Trace

    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[3, 0], [1, 2]], [[0, 2], [1, 3]], [[2, 1], [3, 0]]])
    trace = Trace(
        model="fuzz",
        num_layers=2,
        num_experts=4,
        top_k=2,
        step_tokens=np.array([3, 1, 1], dtype=np.int32),
        ids=ids.astype(np.int32),
        weights=np.full((5, 2, 2), 0.5, dtype=np.float32),
        guess_counts=np.array([[0, 2], [0, 1], [0, 0]], dtype=np.int32),
        guesses=np.array([1, 3, 0], dtype=np.int32),
        expert_bytes=(100, 100),
    )
    trace.check("valid")
    from offload.trace.format import METADATA_KEY, TENSORS

    tensors = {
        name: np.ascontiguousarray(getattr(trace, name), dtype=dtype) for name, dtype in TENSORS.items()
    }
    return save(tensors, metadata={METADATA_KEY: json.dumps(trace.header())})


@st.composite
def damaged_traces(draw: st.DrawFn) -> bytes:
    from safetensors.numpy import load, save

    from offload.trace.format import METADATA_KEY

    valid = valid_trace_bytes()
    how = draw(st.sampled_from(["bytes", "header", "header", "tensor", "tensor"]))
    if how == "bytes":
        return draw(damaged_safetensors(valid))[0]
    header, _ = safetensors_parts(valid)
    tensors = load(valid)
    metadata = dict(header["__metadata__"])
    if how == "header":
        fields = json.loads(metadata[METADATA_KEY])
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(["format", "version", "model", "num_layers", "num_experts", "top_k"]))
            key = draw(st.sampled_from([key, "expert_bytes"]) | st.text(max_size=6))
            fields[key] = draw(
                st.sampled_from([0, 1, 2, 3, 4, 5, 4096, 4097, 2**40, 10**30, -1]) | json_values
            )
        metadata[METADATA_KEY] = json.dumps(fields) if not one_in(draw, 10) else draw(st.text(max_size=20))
    else:
        name = draw(st.sampled_from(sorted(tensors)))
        if not one_in(draw, 6):
            dtype = draw(
                st.sampled_from([np.int32, np.int32, np.float32, np.int64, np.float16, np.uint8, np.int8])
            )
            shape = draw(st.lists(st.integers(0, 6), max_size=3))
            values = draw(
                st.lists(st.integers(-3, 8) | st.sampled_from([2**31 - 1, -(2**31)]), min_size=1, max_size=8)
            )
            count = int(np.prod(shape)) if shape else 1
            with np.errstate(all="ignore"):  # wrapping into a narrow dtype is part of the damage
                tensors[name] = np.resize(np.array(values), count).reshape(shape).astype(dtype)
        else:
            del tensors[name]
    return save(tensors, metadata=metadata)


@fuzz
@given(data=damaged_traces())
def test_damaged_trace_is_refused_cleanly(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    from offload.trace.format import load_trace
    from offload.trace.replay import replay_table

    path = tmp_path_factory.getbasetemp() / "fuzz.trace"
    replace_file(path, data)
    trace = refused_or_accepted(lambda: load_trace(path))
    if trace is not None:
        results = replay_table(trace, ks=sorted({1, trace.num_experts}))
        assert all(result.misses <= result.accesses for result in results)


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
