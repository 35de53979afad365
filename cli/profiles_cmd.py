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
    for entry in list_profiles():
        profile = entry.profile
        if profile is None:
            table.add_row(escape(entry.name), "[red]error[/red]", "", "", "", escape(entry.error or ""))
            continue
        device, k = profile.device, profile.cache.experts_per_layer
        memory = "free" if device.memory_gib is None else f"{device.memory_gib:g} GiB"
        k_text = f"{min(k)}..{max(k)}" if isinstance(k, tuple) else str(k)
        quant = f"{profile.quant.attention} / {profile.quant.experts}"
        if profile.quant.experts_overrides:
            quant += f" (+{len(profile.quant.experts_overrides)} overrides)"
        table.add_row(escape(profile.name), device.kind, memory, k_text, quant, escape(profile.description))
    Console(emoji=False).print(table)


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
