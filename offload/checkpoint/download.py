"""Downloading a Hugging Face repo that is not in the cache: safe files only, asked first on a terminal.

Only what offload reads is fetched (the patterns ``hub`` passes: JSON, safetensors, tokenizer.model,
chat_template.jinja), never a pickle or code, and never Mistral's duplicate ``consolidated`` weights.
The file list and sizes come first (a dry run), so that the question states what a "yes" costs and an
offline machine is told so in one line before anything starts. huggingface_hub draws the progress bars.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from offload.errors import CheckpointError, first_line

# Mistral's own format (consolidated.safetensors) repeats every weight of the hub's shards.
IGNORED_PATTERNS = ["consolidated*", "original/*"]
Ask = Callable[[str], bool]  # shown a question, says whether to go ahead


def download_repo(repo_id: str, allow_patterns: list[str], ask: Ask | None = None) -> Path:
    """Fetch ``repo_id`` into huggingface_hub's cache and return its snapshot directory.

    ``ask`` (default: a y/N question when stdin and stderr are terminals; yes otherwise) decides
    whether to go ahead once the size is known. Every failure is one CheckpointError line.
    """
    # Deferred: huggingface_hub takes about half a second to import, and only a repo id needs it.
    from huggingface_hub import constants, snapshot_download

    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(
            f"{repo_id}: not in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE is set; unset it to "
            "download, or pass a local model directory"
        )
    options = {"allow_patterns": allow_patterns, "ignore_patterns": IGNORED_PATTERNS}
    try:
        files = snapshot_download(repo_id, dry_run=True, **options)
    except (OSError, ValueError) as err:  # every huggingface_hub error is one of these (a bad id: ValueError)
        raise CheckpointError(_reason(repo_id, err, cache)) from None
    names = [file.filename for file in files]
    if "config.json" not in names or not any(name.endswith(".safetensors") for name in names):
        raise CheckpointError(
            f"{repo_id}: the repo has no config.json and safetensors weights; offload reads only safetensors "
            "(never pickled .bin or .pt files)"
        )
    size = sum(file.file_size or 0 for file in files if file.will_download)
    question = f"Download {repo_id} ({len(files)} files, {_gib(size)}) from Hugging Face into {cache}?"
    if not (ask or ask_on_terminal)(question):
        raise CheckpointError(f"{repo_id}: not downloaded (the answer was no); pass a local model directory")
    try:
        return Path(snapshot_download(repo_id, **options))
    except (OSError, ValueError) as err:
        raise CheckpointError(_reason(repo_id, err, cache)) from None


def ask_on_terminal(question: str) -> bool:
    """A y/N question on a terminal; elsewhere (a script, a pipe) the answer is yes, said on stderr."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        print(question.replace("?", " ...").replace("Download", "downloading", 1), file=sys.stderr)
        return True
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _reason(repo_id: str, err: Exception, cache: str) -> str:
    """One line saying why ``repo_id`` could not be fetched, and what to do."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    causes: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(causes) < 8:  # a dry run's error wraps the one that says why
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, GatedRepoError) for c in causes):
        return (
            f"{repo_id}: a gated repo; accept its terms on huggingface.co, then log in with `hf auth login`"
        )
    if any(isinstance(c, (RepositoryNotFoundError, RevisionNotFoundError)) for c in causes):
        return f"{repo_id}: no such model on the Hugging Face hub (a private one needs `hf auth login`)"
    if isinstance(err, ValueError):
        return f"{repo_id}: not a valid Hugging Face repo id ({first_line(err)})"
    return (
        f"{repo_id}: not in the Hugging Face cache ({cache}), and the hub cannot be reached (offline?); "
        "connect, or pass a local model directory"
    )


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
