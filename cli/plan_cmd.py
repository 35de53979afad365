"""`offload plan`: memory per tier and a predicted decode speed, before loading any weight."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from offload.checkpoint.hub import model_dir
from offload.config import ModelConfig
from offload.errors import OffloadError
from offload.settings.profile import load_profile

MAX_FREE_GIB = 1024**2  # a PiB: far beyond any machine, small enough that bytes stay exact integers


def plan_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model directory, its config.json, or a Hugging Face repo id. Default: the bundled demo. Example: ./mixtral",
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            "-p",
            help="Profile name or .toml path. Default: auto with CUDA, cpu without. Example: t4-16gb",
        ),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(
            min=1, help="KV cache length in tokens. Default: the profile's, else 4096. Example: 8192"
        ),
    ] = None,
    free_gib: Annotated[
        float | None,
        typer.Option(help="Free device memory in GiB, instead of measuring it. Example: 11.5"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON. Example: --json")] = False,
) -> None:
    """Show bytes per tier (device and host), whether they fit, and an estimated decode tok/s.

    Example: offload plan --model ./Mixtral-8x7B-Instruct-v0.1 --profile rtx3060-12gb
    """
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from offload.settings.plan import GIB, default_context, plan_memory

    if free_gib is not None and not 0 <= free_gib <= MAX_FREE_GIB:  # also refuses nan
        raise OffloadError(f"--free-gib {free_gib}: allowed is 0 to {MAX_FREE_GIB} (GiB of free memory)")
    config_path = _config_path(model)
    config = ModelConfig.from_file(config_path)
    chosen = load_profile(profile)
    free = None if free_gib is None else int(free_gib * GIB)
    if free is None and (chosen.device.memory_gib is None or chosen.cache.experts_per_layer == "auto"):
        free = _measure_free_memory(chosen.device.kind)
    plan = plan_memory(
        config, chosen, context or default_context(config, chosen), free, source=str(config_path)
    )
    if as_json:
        typer.echo(json.dumps(plan.as_dict(), indent=2))
        return
    _print_plan(plan)


def _config_path(model: str | None) -> Path:
    """plan reads config.json only: a file given directly is used as it is, else the model's directory's."""
    if model is not None and Path(model).expanduser().is_file():
        return Path(model).expanduser()
    return model_dir(model) / "config.json"


def _measure_free_memory(kind: str) -> int | None:
    """Free bytes on the device: CUDA's own figure, or the RAM the OS reports available."""
    if kind == "cuda":
        import torch  # deferred: torch takes seconds to import, and only a CUDA device needs it here

        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every OS names these
        return None


def _print_plan(plan) -> None:
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from offload.settings.plan import GIB

    console = Console(emoji=False)
    title = escape(f"profile {plan.profile} ({plan.device_kind}), context {plan.context} tokens")
    table = Table("tier", "item", "GiB", "note", title=title, caption=escape(plan.model))
    for tier, item, nbytes, note in plan.rows():
        style = "bold" if item == "total" else None
        table.add_row(tier, item, f"{nbytes / GIB:.2f}", note, style=style)
    console.print(table)
    used, budget = plan.needed_bytes / GIB, plan.budget_bytes / GIB
    where = "RAM (both tiers)" if plan.device_kind == "cpu" else "the device"
    if plan.fits:
        console.print(f"[green]FITS[/green]: {used:.2f} of {budget:.2f} GiB on {where}")
    else:
        console.print(
            f"[red]DOES NOT FIT[/red]: needs {used:.2f} GiB on {where}, the budget is {budget:.2f} GiB"
        )
    console.print(
        f"decode: ~{plan.predicted_tok_s:.2f} tok/s copying every miss (estimate; expected hit rate "
        f"{plan.expected_hit_rate:.0%}, {plan.miss_bytes_per_token / 1e6:.0f} MB over a {plan.link_gbps:g} GB/s "
        "link per token)"
    )
    speeds = plan.speeds
    if speeds is not None:
        shown = ", ".join(f"{policy} {tok_s:.2f}" for policy, tok_s in speeds.tok_s.items())
        console.print(f"decode by policy (estimates, tok/s): {shown}; the arithmetic:")
        for line in speeds.arithmetic:
            console.print(f"  {line}", style="dim", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `plan` to the app."""
    app.command("plan")(plan_command)
