"""`offload models`: what is on this machine, in huggingface_hub's cache and in $OFFLOAD_HOME/models."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from offload.checkpoint.catalog import bundled_models, home_models, hub_models
from offload.settings.profile import offload_home


def register(app: typer.Typer) -> None:
    """Add `models` to ``app``."""
    app.command(
        help="List the models on this machine: the Hugging Face cache and $OFFLOAD_HOME/models, with sizes and "
        "whether each is converted (quantized by `offload convert`).\n\n"
        "Example: offload models\n\nExample: offload generate --model mistralai/Mixtral-8x7B-Instruct-v0.1 'Hi'"
        " (downloads it first, after asking, if it is not listed)"
    )(models)


def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list instead of a table.")] = False,
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    elsewhere = [*hub_models(), *home_models(offload_home())]
    found = [*bundled_models(), *elsewhere]
    if as_json:
        typer.echo(json.dumps([model.as_dict() for model in found]))
        return
    out = Console(highlight=False, emoji=False)
    table = Table("where", "size", "converted", "type")
    # The name is what --model takes, so it is shown whole (folded), never cut with an ellipsis.
    table.add_column("name (--model)", overflow="fold")
    for model in found:
        table.add_row(
            WHERE[model.source],
            _size(model.size_bytes),
            "yes" if model.converted else "no",
            escape(model.model_type or "?"),
            escape(model.name),
        )
    out.print(table)
    if not elsewhere:
        out.print(
            f"No models in the Hugging Face cache or in {escape(str(offload_home() / 'models'))}. "
            "`offload generate --model ORG/NAME` downloads one; `offload convert SRC DST` converts one."
        )


WHERE = {"bundled": "bundled", "hub": "hub cache", "home": "$OFFLOAD_HOME"}


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
