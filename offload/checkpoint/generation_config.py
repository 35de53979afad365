"""What a checkpoint's generation_config.json says that changes a reply: the ids that end it.

Hugging Face checkpoints may list several end-of-sequence ids there (``eos_token_id``: one id or a list), beyond
config.json's one; a reply must stop at any of them, as transformers' ``generate`` does. Its sampling defaults
(``do_sample``, ``temperature``, ``top_p``, ``max_new_tokens``) are not read: a profile's [generation] table
and the flags set those.
"""

from __future__ import annotations

from pathlib import Path

from offload.config import read_json
from offload.errors import CheckpointError

FILE = "generation_config.json"


def end_ids(directory: Path, vocab_size: int) -> tuple[int, ...]:
    """The ``eos_token_id`` ids of ``directory``/generation_config.json; () without the file or the key."""
    path = directory / FILE
    if not path.is_file():
        return ()
    raw = read_json(path, CheckpointError)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    value = raw.get("eos_token_id")
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise CheckpointError(
                f"{path}: eos_token_id = {value!r}: allowed is a token id from 0 to {vocab_size - 1}, or a list of them"
            )
    return tuple(ids)
