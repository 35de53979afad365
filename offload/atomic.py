"""Files written atomically: a reader sees the old file or the whole new one, never part of one.

The bytes go to a temporary file beside the target (``.NAME.PID-RANDOM.tmp``), are fsynced, and the
temporary is renamed over the target. The file gets the mode a plain ``open`` would give it (0o666
less the umask), not the owner-only mode of a temporary file. A writer killed midway cannot remove its temporary; the next
write to the same target removes the temporaries of writers that are no longer running.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename; OSError on failure, with nothing left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent
    )
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes files owner-only; the result is a normal file
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """``write_bytes_atomically`` for UTF-8 text."""
    write_bytes_atomically(path, text.encode("utf-8"))


def temporaries(path: Path) -> list[Path]:
    """The temporary files that writers of ``path`` have made beside it."""
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}."
    return [
        other
        for other in path.parent.iterdir()
        if other.name.startswith(prefix) and other.name.endswith(".tmp")
    ]


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` whose writing process is gone (killed mid-write)."""
    prefix = f".{path.name}."
    for temporary in temporaries(path):
        pid = temporary.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            temporary.unlink(missing_ok=True)


def _umask() -> int:
    # The only portable way to read the umask is to set it, so set it straight back. The brief
    # 0o077 in between can only make a file another thread creates meanwhile more private.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours, or this platform cannot tell: keep its file
        return True
    return True
