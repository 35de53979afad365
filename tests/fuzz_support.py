"""What the fuzz tests of every file reader share (``tests/test_fuzz_*.py``): settings, strategies, a tiny model.

Each fuzz test starts from a valid file and damages it (truncation, wrong lengths and offsets, unknown dtypes,
absurd sizes, NaN and inf, hostile shard names, deep nesting, huge numbers, random bytes). The reader must
either accept the file (and then the rest of the path must work on it too) or raise an OffloadError
subclass: never another exception type, a crash or a hang.

The example count is bounded for CI; ``OFFLOAD_FUZZ_EXAMPLES=1000`` gives the full run recorded in
docs/RELIABILITY.md. Seeds are fixed (``derandomize``), so every run tries the same cases.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from benchmarks.soak import write_random_mixtral
from offload.errors import OffloadError

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
