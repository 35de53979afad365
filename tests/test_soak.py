"""A bounded soak in CI: chat turns on a small offloaded model leave memory and caches bounded.

The full run (1,000 turns) is ``python benchmarks/soak.py``; its figures are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import torch

from benchmarks.soak import run_soak


def test_chat_turns_keep_memory_and_caches_bounded() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a busy machine
    try:
        # A 256-token context fills within ten turns, so most turns drop old ones and prefill again.
        result = run_soak(30, experts_per_layer=2, max_new_tokens=6, context=256)
    finally:
        torch.set_num_threads(threads)
    assert result.ok, result.problems
    assert result.dropped_turns > 10
    assert result.resident_max == 2 and result.kv_capacity_max <= 256
    assert result.rss_growth < 0.05
