"""The models on this machine: the bundled demo, huggingface_hub's cache and ``$OFFLOAD_HOME/models``, for
`offload models`.

Each entry says where it lives, its size on disk, and whether it is converted (its config.json has the
``quantization`` block that `offload convert` writes). Nothing here loads a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from offload.config import MAX_JSON_BYTES


@dataclass(frozen=True)
class LocalModel:
    name: str  # what --model takes: a repo id, or the directory's path
    source: str  # "bundled" (the demo), "hub" (huggingface_hub's cache) or "home" ($OFFLOAD_HOME/models)
    path: Path  # the directory offload reads (a hub snapshot or the converted directory)
    size_bytes: int  # on disk
    converted: bool  # config.json carries a quantization block
    model_type: str | None  # config.json's model_type ("mixtral"), None when unreadable

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": self.source,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "converted": self.converted,
            "model_type": self.model_type,
        }


def hub_models(cache_dir: str | Path | None = None) -> list[LocalModel]:
    """Every model repo in huggingface_hub's cache (its newest snapshot), by repo id."""
    # Deferred: huggingface_hub takes about half a second to import.
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        # The cache directory read now: scan_cache_dir's own default is bound when it is first imported.
        cache = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError):
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda revision: revision.last_modified)
        converted, model_type = _describe(newest.snapshot_path)
        found.append(
            LocalModel(repo.repo_id, "hub", newest.snapshot_path, repo.size_on_disk, converted, model_type)
        )
    return found


def bundled_models() -> list[LocalModel]:
    """The demo model shipped inside the package, under the name --model takes for it."""
    from offload.checkpoint.hub import DEMO_MODEL, DEMO_NAME

    if not (DEMO_MODEL / "config.json").is_file():
        return []
    return [_directory_model(DEMO_NAME, "bundled", DEMO_MODEL)]


def _directory_model(name: str, source: str, directory: Path) -> LocalModel:
    converted, model_type = _describe(directory)
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())
    return LocalModel(name, source, directory, size, converted, model_type)


def home_models(home: Path) -> list[LocalModel]:
    """Every directory with a config.json in ``home``/models (where converted checkpoints are kept)."""
    folder = home / "models"
    if not folder.is_dir():
        return []
    found = []
    for directory in sorted(folder.iterdir()):
        if directory.is_dir() and (directory / "config.json").is_file():
            found.append(_directory_model(str(directory), "home", directory))
    return found


def _describe(directory: Path) -> tuple[bool, str | None]:
    """(converted, model_type) from ``directory``/config.json; (False, None) when it cannot be read."""
    path = directory / "config.json"
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return False, None
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False, None
    if not isinstance(raw, dict):
        return False, None
    model_type = raw.get("model_type")
    return isinstance(raw.get("quantization"), dict), model_type if isinstance(model_type, str) else None
