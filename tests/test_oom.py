"""Running out of memory: a clear error with advice while loading, and a chat that survives it mid-reply.

The allocator limit is simulated on the CPU: ``torch.zeros`` (what the host store, the expert cache and
the KV cache allocate with) raises once a byte budget is spent, or an expert raises after N calls.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console

from benchmarks.soak import sentencepiece_model
from offload.errors import CacheError
from tests.fuzz_support import tiny_model
from tests.test_cli_generate import offload_here

# Keys are test ids; none says "cuda", which would mark the test as needing a GPU (tests/conftest.py).
OUT_OF_MEMORY: dict[str, Callable[[str], BaseException]] = {
    "OutOfMemoryError": lambda what: torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {what}"),
    "cpu-allocator": lambda what: RuntimeError(
        f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {what}"
    ),
    "MemoryError": lambda what: MemoryError(what),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers of four experts, with the real tokenizer."""
    sizes = {"hidden_size": 32, "intermediate_size": 32, "num_local_experts": 4, "num_hidden_layers": 2}
    directory = tiny_model(tmp_path_factory.mktemp("oom"), vocab_size=32000, **sizes)
    shutil.copy(sentencepiece_model(), directory / "tokenizer.model")
    return directory


def limit_allocations(monkeypatch: pytest.MonkeyPatch, budget: int, dtype: torch.dtype, error: str) -> None:
    """``torch.zeros`` of ``dtype`` fails, as an allocator out of memory would, once ``budget`` bytes are spent."""
    real_zeros = torch.zeros
    spent = 0

    def zeros(*size: object, **kwargs: object) -> torch.Tensor:
        nonlocal spent
        tensor = real_zeros(*size, **kwargs)
        if tensor.dtype == dtype:
            spent += tensor.numel() * tensor.element_size()
            if spent > budget:
                raise OUT_OF_MEMORY[error](f"{tensor.numel() * tensor.element_size()} bytes")
        return tensor

    monkeypatch.setattr(torch, "zeros", zeros)


def store_bytes(model_dir: Path) -> int:
    """What the host store of ``model_dir`` takes: every expert of every layer, dense."""
    from offload.config import ModelConfig

    config = ModelConfig.from_file(model_dir / "config.json")
    expert = 3 * config.hidden_size * config.intermediate_size * 4  # fp32
    return config.num_hidden_layers * config.num_local_experts * expert


@pytest.mark.parametrize("error", sorted(OUT_OF_MEMORY))
def test_cache_allocation_out_of_memory_gives_advice(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, error: str
) -> None:
    # The host store fits, and one device slot more; the second slot does not.
    limit_allocations(monkeypatch, store_bytes(model_dir) + store_bytes(model_dir) // 8, torch.uint8, error)
    code, _, stderr = offload_here(
        monkeypatch, capfd,
        "generate", "--model", str(model_dir), "--dtype", "float32", "-k", "2", "--max-new-tokens", "2", "Hello",
    )  # fmt: skip
    assert code == 2
    assert "out of memory" in stderr and "allocating the expert cache" in stderr
    assert "use a smaller profile or fewer experts per layer (--experts-per-layer)" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_host_store_out_of_memory_gives_advice(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offload.loading import OffloadOptions, load_model

    limit_allocations(monkeypatch, store_bytes(model_dir) // 2, torch.uint8, "cpu-allocator")
    with pytest.raises(CacheError, match=r"out of host memory for layer 1.s experts .*lower-bit experts"):
        load_model(model_dir, device="cpu", offload=OffloadOptions(experts_per_layer=2))


def test_other_allocation_errors_are_not_mistaken_for_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from offload.experts.store import HostStore

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("pin_memory is not supported here")

    monkeypatch.setattr(torch, "zeros", broken)
    with pytest.raises(RuntimeError, match="pin_memory"):
        HostStore(1, 2).put(0, 0, {"w1.weight": torch.ones(2, 2)})


def fail_after(monkeypatch: pytest.MonkeyPatch, owner: type, method: str, calls: int) -> Callable[[], None]:
    """``owner.method`` raises torch.OutOfMemoryError from its call number ``calls`` on; returns a cure."""
    real = getattr(owner, method)
    state = {"calls": 0, "failing": True}

    def limited(self: object, *args: object, **kwargs: object) -> object:
        state["calls"] += 1
        if state["failing"] and state["calls"] > calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, limited)
    return lambda: state.update(failing=False)


@pytest.mark.parametrize("where", ["expert", "kv-cache"])
def test_out_of_memory_during_a_reply_keeps_the_chat(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from cli.chat_cmd import _reply
    from offload.chat import ChatSession
    from offload.engine import Engine
    from offload.experts.source import DenseExpert
    from offload.generate import SamplingParams
    from offload.kv_cache import KVCache
    from offload.settings.flags import LoadFlags

    engine = Engine.load(
        model_dir, LoadFlags(profile="cpu", device="cpu", dtype="float32", experts_per_layer=2)
    )
    session = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=6)
    text = io.StringIO()
    out = Console(file=text, width=200, highlight=False)
    if where == "expert":
        cure = fail_after(monkeypatch, DenseExpert, "__call__", 12)  # mid-reply: prefill and a few tokens
    else:
        session.cache = KVCache(engine.model.config, 2, dtype=torch.float32, device="cpu")
        session.cache.truncate(0)
        cure = fail_after(monkeypatch, KVCache, "reserve", 3)  # the cache must grow during the reply

    _reply(session, "Hello there", out)
    assert "out of memory during the reply; the conversation is kept" in text.getvalue()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"] == "Hello there"

    cure()  # memory is back: the same session goes on
    _reply(session, "Second try", out)
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert text.getvalue().count("out of memory") == 1
    assert "tok/s" in text.getvalue().splitlines()[-1]
