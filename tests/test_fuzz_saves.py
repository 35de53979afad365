"""Fuzzing the files offload writes and reads back: chat saves and routing traces (``tests/fuzz_support.py``
says how).
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.soak import sentencepiece_model
from tests.fuzz_support import (
    damaged_safetensors,
    fuzz,
    json_scalars,
    json_values,
    mangled,
    one_in,
    refused_or_accepted,
    replace_file,
    safetensors_parts,
    tiny_model,
)

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
