"""A stand-in for huggingface_hub.snapshot_download (there is no hub access here): it serves the files of
a local directory as the repo, honours allow/ignore patterns as the hub does, and logs every call."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def install(source: Path, cache: Path, log: Path, setattr: Callable[..., None] = setattr) -> None:
    """Patch huggingface_hub so that every repo id is ``source``, downloaded into ``cache``.

    In a test's own process, pass ``monkeypatch.setattr`` so that the patch ends with the test.
    """
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot_download(repo_id: str, **options: Any) -> Any:
        with log.open("a") as file:
            file.write(json.dumps({"repo_id": repo_id, **options}) + "\n")
        snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0000"
        wanted = [
            path
            for path in sorted(source.iterdir())
            if any(fnmatch(path.name, p) for p in options.get("allow_patterns") or ["*"])
            and not any(fnmatch(path.name, p) for p in options.get("ignore_patterns") or [])
        ]
        if options.get("local_files_only"):
            if not snapshot.is_dir():
                raise LocalEntryNotFoundError("not in the cache")
            return str(snapshot)
        if options.get("dry_run"):
            return [
                SimpleNamespace(filename=p.name, file_size=p.stat().st_size, will_download=True)
                for p in wanted
            ]
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in wanted:
            shutil.copy(path, snapshot / path.name)
        return str(snapshot)

    setattr(huggingface_hub, "snapshot_download", snapshot_download)


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
