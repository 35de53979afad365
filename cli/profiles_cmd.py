"""`offload profiles list|show`: the bundled and user profiles."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from offload.settings.profile import list_profiles, load_profile

profiles_app = typer.Typer(
    help="List and show profiles (device classes).\n\nExample: offload profiles show rtx3060-12gb",
    no_args_is_help=True,
)


@profiles_app.command("list")
def list_command() -> None:
    """List every profile: bundled ones and those in $OFFLOAD_HOME/profiles.

    Example: offload profiles list
    """
    table = Table("name", "device", "memory", "K", "attention / experts", "description")
    broken = []
    for entry in list_profiles():
        profile = entry.profile
        if profile is None:
            table.add_row(escape(entry.name), "[red]error[/red]", "", "", "", "(below)")
            broken.append(entry)
            continue
        device, k = profile.device, profile.cache.experts_per_layer
        memory = "free" if device.memory_gib is None else f"{device.memory_gib:g} GiB"
        k_text = f"{min(k)}..{max(k)}" if isinstance(k, tuple) else str(k)
        quant = f"{profile.quant.attention} / {profile.quant.experts}"
        if profile.quant.experts_overrides:
            quant += f" (+{len(profile.quant.experts_overrides)} overrides)"
        description = profile.description
        if profile.name != entry.name:  # --profile takes the file's name; the name key is only a label
            description += f" (its name key says {profile.name!r})"
        table.add_row(escape(entry.name), device.kind, memory, k_text, quant, escape(description))
    console = Console(emoji=False)
    console.print(table)
    for entry in broken:  # whole, not squeezed into a column: the error names the file, key and value
        console.print(f"[red]error[/red] {escape(entry.name)}: {escape(entry.error or '')}", soft_wrap=True)


@profiles_app.command("show")
def show_command(
    name: Annotated[
        str, typer.Argument(help="A profile name or a path to a .toml file. Example: rtx3060-12gb")
    ],
) -> None:
    """Print a profile as resolved TOML, with the file it came from.

    Example: offload profiles show laptop-8gb
    """
    profile = load_profile(name)
    typer.echo(f"# {profile.source}")
    typer.echo(profile.to_toml(), nl=False)


def register(app: typer.Typer) -> None:
    """Add `profiles` to the app."""
    app.add_typer(profiles_app, name="profiles")
