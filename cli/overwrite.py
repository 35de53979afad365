"""Files a command writes never silently replace one that exists: ask on a terminal, else refuse."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from offload.errors import OffloadError


def check_new_file(path: Path, *, force: bool, how_to_force: str, ask: Callable[[str], bool] | None) -> None:
    """Raise OffloadError unless ``path`` may be written: new, or ``force``, or the user says yes.

    ``ask`` puts a yes/no question to the user; None where no one can answer (not a terminal), which
    refuses with a line that says ``how_to_force``. A directory is never replaced.
    """
    if path.is_dir():
        raise OffloadError(f"{path}: is a directory; give a file name")
    if force or not (path.exists() or path.is_symlink()):
        return
    if ask is None:
        raise OffloadError(f"{path} exists; {how_to_force} to replace it")
    if not ask(f"{path} exists ({describe(path)}); replace it?"):
        raise OffloadError(f"{path} was left as it is")


def check_writable(path: Path, what: str) -> None:
    """Raise OffloadError if a file cannot be created at ``path``, before any long work is done.

    Creating (then removing) a file beside it is the only test that sees read-only mounts, a full
    disk's inode table and permissions alike (``os.access`` answers yes to root everywhere).
    """
    if path.is_dir():
        raise OffloadError(f"{what} {path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(handle)
        os.unlink(probe)
    except (OSError, ValueError) as err:
        reason = (err.strerror if isinstance(err, OSError) else None) or str(err)
        raise OffloadError(f"{what} {path}: cannot write there ({reason})") from None


def describe(path: Path) -> str:
    """A few words on what ``path`` holds, for a question about replacing it."""
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "a broken link"


def terminal_question(question: str) -> bool:
    """Ask on the terminal; only y or yes is a yes (Ctrl-C or Ctrl-D is a no)."""
    try:
        answer = input(f"{question} [y/N] ")
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return False
    return answer.strip().lower() in ("y", "yes")
