"""A process killed while writing a /save file or a trace leaves the old file or none, never half of one.

A forked child writes two large versions of the file in turn, as fast as it can; the parent kills it
with SIGKILL, at a random moment or just as a temporary file appears (mid-write), then loads what is
there. Forking (not a fresh interpreter) keeps each of the many kills to a few milliseconds.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

KILLS = 10  # per file kind: half at a random moment, half while a temporary file is being written


def kill_midway(writer: Callable[[int], None], load: Callable[[Path], None], path: Path, seed: int) -> int:
    """Run ``writer(i)`` for i = 0, 1, 2, ... in a child and SIGKILL it, KILLS times; after each kill,
    ``load`` must accept ``path`` (when it exists). Returns how many kills left a half-written temporary."""
    context = multiprocessing.get_context("fork")
    chance = random.Random(seed)
    torn = 0
    for kill in range(KILLS):
        child = context.Process(target=_write_forever, args=(writer,), daemon=True)
        child.start()
        if kill % 2:  # wait for a temporary file: the kill lands in the middle of a write
            deadline = time.monotonic() + 10
            while not _temporaries(path) and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(chance.uniform(0, 0.002))
        else:
            time.sleep(chance.uniform(0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        torn += any(f".{child.pid}-" in leftover.name for leftover in _temporaries(path))
        if path.exists():  # no file at all is fine: the first write never finished
            load(path)
    # A killed writer cannot clean up after itself; the next write removes what the dead ones left.
    writer(0)
    assert _temporaries(path) == []
    load(path)
    return torn


def _write_forever(writer: Callable[[int], None]) -> None:
    index = 0
    while True:
        writer(index)
        index += 1


def _temporaries(path: Path) -> list[Path]:
    """Every file a writer has made beside ``path`` (``.NAME.PID-RANDOM.tmp``)."""
    return [other for other in path.parent.iterdir() if other.name.startswith(f".{path.name}.")]


def chat_versions() -> list[SimpleNamespace]:
    """Two conversations of about 4 MB each, so a write takes a while."""
    return [
        SimpleNamespace(
            system=f"version {version}",
            messages=[{"role": role, "content": f"{version}-{turn}-" + "word " * 20_000} for turn in range(20)
                      for role in ("user", "assistant")],
        )
        for version in (0, 1)
    ]  # fmt: skip


def test_killed_chat_save_leaves_the_old_file_or_none(tmp_path: Path) -> None:
    from offload.chat import ChatSession, read_chat_save

    versions = chat_versions()
    path = tmp_path / "chat.json"

    def load(found: Path) -> None:
        system, messages = read_chat_save(found)
        version = versions[int(system.split()[-1])]
        assert messages == version.messages

    # ChatSession.save needs only these two attributes; the write path is the real one.
    torn = kill_midway(lambda i: ChatSession.save(versions[i % 2], path), load, path, seed=0)
    assert torn >= KILLS // 4, "too few kills landed mid-write to test anything"


def trace_versions() -> list[Any]:
    from offload.trace.format import Trace

    traces = []
    for version, tokens in enumerate((400_000, 300_000)):  # 6.4 MB and 4.8 MB of ids and weights
        ids = np.stack([np.arange(tokens) % 4, (np.arange(tokens) + 1) % 4], axis=-1).astype(np.int32)
        traces.append(
            Trace(
                model=f"version {version}",
                num_layers=1,
                num_experts=4,
                top_k=2,
                step_tokens=np.ones(tokens, dtype=np.int32),
                ids=ids[:, None, :],
                weights=np.full((tokens, 1, 2), 0.5, dtype=np.float32),
                guess_counts=np.zeros((tokens, 1), dtype=np.int32),
                guesses=np.zeros(0, dtype=np.int32),
            )
        )
    return traces


def test_killed_trace_save_leaves_the_old_file_or_none(tmp_path: Path) -> None:
    from offload.trace.format import load_trace, save_trace

    versions = trace_versions()
    path = tmp_path / "run.trace"

    def load(found: Path) -> None:
        trace = load_trace(found)
        assert np.array_equal(trace.ids, versions[int(trace.model.split()[-1])].ids)

    torn = kill_midway(lambda i: save_trace(versions[i % 2], path), load, path, seed=1)
    assert torn >= KILLS // 4, "too few kills landed mid-write to test anything"


@pytest.mark.parametrize("kept", [0.0, 0.001, 0.5, 0.999])
def test_a_half_written_save_never_loads(tmp_path: Path, kept: float) -> None:
    """What a non-atomic writer would leave behind is refused, not loaded as a shorter chat."""
    from offload.chat import ChatSession, read_chat_save
    from offload.errors import OffloadError

    path = tmp_path / "chat.json"
    ChatSession.save(chat_versions()[0], path)
    data = path.read_bytes()
    path.write_bytes(data[: int(kept * len(data))])
    with pytest.raises(OffloadError):
        read_chat_save(path)
