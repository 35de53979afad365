"""Loading the engine with a rich progress bar on stderr (tensors and bytes), then one summary line."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def load_engine(resolved: Any, *, quiet: bool = False, summary: bool = True) -> Any:
    """``Engine.load`` of a ResolvedModel with progress on stderr when it is a terminal, then a summary line."""
    from offload.engine import Engine

    err = Console(stderr=True, highlight=False, emoji=False)
    total = sum(path.stat().st_size for path in resolved.directory.glob("*.safetensors"))
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

        engine = Engine.load(resolved, progress=advance)
    if summary and not quiet:
        err.print(f"[dim]{escape(engine.summary())}[/dim]", soft_wrap=True)
    return engine
