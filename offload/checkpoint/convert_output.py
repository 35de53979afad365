"""Where ``offload convert`` writes, and how its output replaces an earlier one without touching anything else.

Convert writes only these names: the shards (``model-00001-of-00003.safetensors``), the index, config.json
and the copied tokenizer files. A destination directory that exists may hold other files; they stay, with
or without ``--force``. Its convert-named files are replaced only when they are an earlier convert's output
(config.json holds a ``quantization`` block); otherwise convert refuses, since they are someone else's.

A new DST is written as ``DST.partial-PID-RANDOM`` beside it and renamed to DST at the end. Into an existing
DST (the current directory, say), the new files are written into ``DST/.offload-convert-partial-PID-RANDOM``
and then renamed into place: the old convert files are first moved into the partial directory (config.json
first, so the directory never loads as a mix), the new ones moved in (config.json last), and the old ones
deleted; a failure moves everything back. A killed run leaves a partial directory, which the next run
removes once its process is gone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from offload.checkpoint.reader import INDEX_FILE
from offload.errors import CheckpointError

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Tokenizer and generation settings travel with the weights; pickles and code never do.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
PARTIAL = ".partial-"  # DST.partial-PID-RANDOM: a new DST being written
INSIDE = ".offload-convert-partial-"  # DST/.offload-convert-partial-PID-RANDOM: new files for an existing DST
REPLACED = "replaced"  # inside that directory: the old convert files, until the new ones are in place


def is_convert_name(name: str) -> bool:
    """Whether convert writes (and may replace) a file of this name."""
    return name in ("config.json", INDEX_FILE, *COPIED_FILES) or SHARD_PATTERN.fullmatch(name) is not None


@dataclass(frozen=True)
class Destination:
    """What is at DST before convert writes: nothing, an empty directory, or a directory with files."""

    path: Path
    exists: bool
    previous: list[str]  # an earlier convert's files, which the new output replaces
    others: list[str]  # every other entry, which stays

    @property
    def needs_force(self) -> bool:
        """Writing changes what is there: old files are replaced, or new ones join other files."""
        return bool(self.previous or self.others)

    def question(self) -> str:
        """The overwrite question, saying exactly what is replaced and what stays."""
        parts = []
        if self.previous:
            parts.append(f"replace the converted checkpoint in {self.path} ({_names(self.previous)})")
        else:
            parts.append(f"write the converted checkpoint into {self.path}")
        if self.others:
            parts.append(f"other files there stay ({_names(self.others)})")
        return "; ".join(parts) + "?"


def inspect_destination(destination: Path) -> Destination:
    """What is at ``destination``; CheckpointError where convert would have to remove what it did not write."""
    if destination.is_symlink() and not destination.exists():
        raise CheckpointError(
            f"{destination}: a broken link; convert writes a directory and never replaces a link"
        )
    if not destination.exists():
        return Destination(destination, False, [], [])
    if not destination.is_dir():
        raise CheckpointError(f"{destination}: exists and is not a directory; convert writes a directory")
    try:
        entries = sorted(entry.name for entry in destination.iterdir())
    except OSError as err:
        raise CheckpointError(f"{destination}: cannot list it ({err.strerror or err})") from None
    entries = [name for name in entries if not name.startswith(INSIDE)]
    ours = [name for name in entries if is_convert_name(name)]
    others = [name for name in entries if not is_convert_name(name)]
    if ours and not _converted_before(destination):
        raise CheckpointError(
            f"{destination}: holds {_names(ours)}, which convert did not write; "
            "choose another directory (convert never removes files it did not write)"
        )
    return Destination(destination, True, ours, others)


def start(destination: Destination) -> Path:
    """Make the directory the new files are written into, after removing dead runs' leftovers."""
    path = destination.path
    _remove_stale(path)
    suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
    partial = (
        path / f"{INSIDE}{suffix}" if destination.exists else path.with_name(f"{path.name}{PARTIAL}{suffix}")
    )
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, destination: Destination) -> None:
    """Put the finished output at DST: rename the directory, or move its files into the existing DST."""
    path = destination.path
    if not destination.exists:
        if path.exists() or path.is_symlink():  # DST appeared while we were converting
            raise CheckpointError(f"{path} exists now; run convert again to decide what to do with it")
        partial.rename(path)
        _fsync(path.parent)
        return
    replaced = partial / REPLACED
    replaced.mkdir()
    moved_out: list[str] = []
    moved_in: list[str] = []
    # config.json first out and last in: between the two, the directory holds no loadable checkpoint.
    old = sorted(destination.previous, key=lambda name: name != "config.json")
    new = sorted(
        (entry.name for entry in partial.iterdir() if entry.name != REPLACED),
        key=lambda n: n == "config.json",
    )
    try:
        for name in old:
            (path / name).rename(replaced / name)
            moved_out.append(name)
        for name in new:
            (partial / name).rename(path / name)
            moved_in.append(name)
        _fsync(path)
    except BaseException:
        for name in reversed(moved_in):
            (path / name).unlink(missing_ok=True)
        for name in reversed(moved_out):
            (replaced / name).rename(path / name)
        raise
    shutil.rmtree(partial, ignore_errors=True)


def discard(partial: Path) -> None:
    """Remove a partial directory after a failure (its moved-out files are back in place by then)."""
    shutil.rmtree(partial, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    _fsync(path)


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _converted_before(destination: Path) -> bool:
    """DST's config.json (or the one a killed replacement had moved aside) has a quantization block."""
    configs = [destination / "config.json"]
    configs += [leftover / REPLACED / "config.json" for leftover in destination.glob(f"{INSIDE}*")]
    for config in configs:
        try:
            if "quantization" in json.loads(config.read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def _remove_stale(destination: Path) -> None:
    """Delete the partial directories that killed runs left beside DST or inside it."""
    places = [(destination.parent, destination.name + PARTIAL), (destination, INSIDE)]
    for directory, prefix in places:
        if not directory.is_dir():
            continue
        for leftover in directory.iterdir():
            if leftover.name.startswith(prefix) and not _running(leftover.name[len(prefix) :]):
                shutil.rmtree(leftover, ignore_errors=True)


def _running(suffix: str) -> bool:
    """Whether the process named by a ``PID-RANDOM`` suffix still runs (unknown suffixes count as running)."""
    pid = suffix.partition("-")[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:4])
    return f"{shown} and {len(names) - 4} more" if len(names) > 4 else shown
