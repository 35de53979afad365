"""Finding a model directory: a local path, or a Hugging Face repo id in huggingface_hub's cache.

Model files come from the internet, so a directory is accepted only if no file that offload reads there
(``ALLOWED_PATTERNS``) is a symbolic link that leads out of it; a snapshot in huggingface_hub's cache
(``models--ORG--NAME/snapshots/REV/``) may link into that repo's ``blobs/`` folder, where the hub keeps
the real files. ``offload.checkpoint.reader`` applies the same rule to every shard it opens.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from offload.checkpoint.download import download_repo
from offload.errors import CheckpointError, first_line

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo"  # shipped inside the package
DEMO_NAME = "demo"  # what --model calls it when no local directory has that name
# What a model directory may hold that we read; never pickles, never code.
ALLOWED_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "chat_template.jinja"]


def default_model() -> Path:
    """The bundled demo model, used when no --model is given."""
    if not (DEMO_MODEL / "config.json").is_file():
        raise CheckpointError(f"the bundled demo model is missing from {DEMO_MODEL}; pass --model DIR")
    return DEMO_MODEL


def model_dir(model: str | Path | None) -> Path:
    """The directory of ``model`` (see ``resolve_model_dir``), or the bundled demo model when it is None."""
    return default_model() if model is None else resolve_model_dir(model)


def resolve_model_dir(model: str | Path) -> Path:
    """A local directory, or a Hugging Face repo id found in huggingface_hub's cache or downloaded into it
    (``offload.checkpoint.download``: safe files only, asked first on a terminal).

    Either way, no file that offload reads may be a link out of it (see ``check_links``).
    """
    return check_links(_find_model_dir(model))


def _find_model_dir(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model directory, found a file")
        return path
    text = str(model)
    if text == DEMO_NAME:  # no local directory of that name: the bundled demo, wherever offload is installed
        return DEMO_MODEL
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"{path}: no such model directory ('{DEMO_NAME}' names the bundled demo model)")
    # Deferred: huggingface_hub takes about half a second to import, and only a repo id needs it.
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=ALLOWED_PATTERNS, local_files_only=True))
    except (FileNotFoundError, OSError, ValueError):  # LocalEntryNotFoundError is an OSError
        pass
    return download_repo(text, ALLOWED_PATTERNS)


def check_links(directory: Path) -> Path:
    """Refuse ``directory`` if a file offload may read there is a link that leads out of it.

    A hostile download could otherwise make ``tokenizer.model`` or a shard a link to any file on the
    machine. A snapshot in huggingface_hub's cache is made of links into its repo's ``blobs/``
    folder; those are allowed, and nothing further out. Returns ``directory``.
    """
    roots = allowed_roots(directory)
    try:
        entries = sorted(directory.iterdir())
    except OSError as err:
        raise CheckpointError(
            f"{directory}: cannot list the model directory ({err.strerror or err})"
        ) from None
    for path in entries:
        if any(fnmatch(path.name, pattern) for pattern in ALLOWED_PATTERNS):
            check_inside(path, roots)
    return directory


def allowed_roots(directory: Path) -> list[Path]:
    """Where the files of ``directory`` may really live (resolved)."""
    real = _resolve(directory)
    roots = [real]
    repo = real.parent.parent
    # huggingface_hub's layout: CACHE/models--ORG--NAME/{blobs,refs,snapshots/REV}, files linking to ../../blobs.
    if real.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        roots.append(repo / "blobs")
    return roots


def check_inside(path: Path, roots: list[Path]) -> None:
    """Refuse ``path`` unless it resolves inside one of ``roots`` (from ``allowed_roots``)."""
    real = _resolve(path)
    if not any(real.is_relative_to(root) for root in roots):
        raise CheckpointError(
            f"{path}: a link to {real}, outside the model directory; offload reads only files inside it "
            "(copy the file in instead of linking it)"
        )


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # Python 3.11 raises RuntimeError on a symlink loop
        raise CheckpointError(f"{path}: cannot follow this link ({first_line(err)})") from None
