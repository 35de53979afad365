"""The benchmark's prompt: deterministic token ids, from real text when the model has a tokenizer.

Routing depends on the text, and so does every cache figure: random ids route differently from prose.
With a tokenizer, the prompt is English prose the demo model never trained on: the first chunk of each
pydoc topic that ``scripts/build_demo_corpus.py`` holds out (a CRC of the chunk's key, ~5% of them),
read from the standard library's ``pydoc_data.topics``, so it is offline and the same on every machine
with the same Python. Without a tokenizer, the ids are drawn from a fixed seed.
"""

from __future__ import annotations

import pydoc_data.topics
import random
import zlib
from pathlib import Path

from offload.errors import TokenizerError
from offload.tokenizer import Tokenizer

HELD_OUT_PERCENT = 5  # as scripts/build_demo_corpus.py: a chunk is held out when crc32(key) % 100 < 5
CHUNK_CHARS = 2000  # as scripts/build_demo_corpus.py: chunks end at the first blank line past 2000 chars
RANDOM_SEED = 0
FIRST_ORDINARY_ID = 3  # ids 0, 1, 2 are <unk>, <s>, </s> in Mixtral's vocabularies


def held_out_text() -> str:
    """The first chunk of every held-out pydoc topic, in topic order, separated by blank lines."""
    chunks = []
    for topic in sorted(pydoc_data.topics.topics):
        if zlib.crc32(f"topic:{topic}:0".encode()) % 100 < HELD_OUT_PERCENT:
            chunks.append(_first_chunk(pydoc_data.topics.topics[topic]))
    return "\n\n".join(chunks)


def _first_chunk(text: str) -> str:
    kept, size = [], 0
    for paragraph in text.split("\n\n"):
        kept.append(paragraph)
        size += len(paragraph) + 2
        if size >= CHUNK_CHARS:
            break
    return "\n\n".join(kept).strip()


def bench_prompt(
    directory: Path, vocab_size: int, tokens: int, bos_id: int | None = 1
) -> tuple[list[int], str]:
    """``tokens`` prompt ids for the model in ``directory`` and a line saying where they came from.

    The held-out text (repeated if it is too short) after BOS when the directory has a tokenizer;
    otherwise BOS then ids drawn uniformly from the ordinary ids with a fixed seed.
    """
    try:
        tokenizer = Tokenizer.from_dir(directory)
    except TokenizerError:
        tokenizer = None
    if tokenizer is not None:
        tokenizer.check_fits(vocab_size, directory / "config.json")
        text_ids = tokenizer.encode(held_out_text())
        ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        while len(ids) < tokens:
            ids.extend(text_ids)
        return ids[:tokens], "held-out pydoc topics (text)"
    rng = random.Random(RANDOM_SEED)
    ids = [] if bos_id is None else [bos_id]
    ids += [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(tokens)]
    return ids[:tokens], f"random ids (seed {RANDOM_SEED}, no tokenizer)"
