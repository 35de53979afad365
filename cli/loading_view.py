"""Loading the engine with a rich progress bar on stderr (tensors and bytes), then one summary line."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def load_engine(model: str | None, *, quiet: bool = False, summary: bool = True, **flags: Any) -> Any:
    """``Engine.load`` with progress on stderr when it is a terminal, then a summary line; returns the Engine."""
    from offload.checkpoint.hub import resolve_model_dir
    from offload.engine import Engine, default_model

    err = Console(stderr=True, highlight=False)
    directory = resolve_model_dir(model) if model is not None else default_model()
    total = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    columns = (
        SpinnerColumn(),
        TextColumn("loading {task.fields[tensors]} tensors"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=quiet or not err.is_terminal) as progress:
        task = progress.add_task("load", total=total or None, tensors=0)

        def advance(_: str, nbytes: int) -> None:
            progress.update(task, advance=nbytes, tensors=progress.tasks[0].fields["tensors"] + 1)

        engine = Engine.load(directory, progress=advance, **flags)
    if summary and not quiet:
        err.print(f"[dim]{engine.summary()}[/dim]", soft_wrap=True)
    return engine
