"""`offload plan`: memory per tier and a predicted decode speed, before loading any weight."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli import options
from offload.checkpoint.hub import model_dir
from offload.config import ModelConfig
from offload.errors import FlagError, OffloadError
from offload.settings.plan_tiers import MAX_DISK_GBPS, MAX_HOST_MEMORY_GIB
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
            min=1,
            help="KV cache length in tokens, at most the model's context. Default: the profile's (capped at "
            "the model's), else 4096. Example: 8192",
        ),
    ] = None,
    free_gib: Annotated[
        float | None,
        typer.Option(help="Free device memory in GiB, instead of measuring it. Example: 11.5"),
    ] = None,
    host_memory: Annotated[
        float | None,
        typer.Option(
            help="Host RAM for experts in GiB; the rest stay on disk. Default: the profile's host.memory_gib, "
            "else every expert in RAM. Example: --host-memory 8",
            callback=options.bounded("--host-memory", 0, MAX_HOST_MEMORY_GIB, above=True),
        ),
    ] = None,
    disk_gbps: Annotated[
        float | None,
        typer.Option(
            help="The disk's read bandwidth in GB/s. Default: the profile's host.disk_gbps. Example: 3.5",
            callback=options.bounded("--disk-gbps", 0, MAX_DISK_GBPS, above=True),
        ),
    ] = None,
    dtype: options.Dtype = None,
    host_compute: Annotated[
        str | None,
        typer.Option(
            metavar="MODE",
            help="Where the run computes cache misses, as generate's --host-compute: auto (hybrid: where the "
            "cost model finds it cheaper), never (copied to the device) or always (on the host). The headline "
            "is that run's speed. Default: the profile's host.compute, else auto. Example: --host-compute never",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON. Example: --json")] = False,
) -> None:
    """Show bytes per tier (device, host and disk), whether they fit, the peak RSS and an estimated decode tok/s.

    Example: offload plan --model ./Mixtral-8x7B-Instruct-v0.1 --profile rtx3060-12gb
    """
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from offload.settings.plan import GIB, plan_memory
    from offload.settings.plan_inputs import requested_context
    from offload.settings.plan_policy import check_host_compute

    if free_gib is not None and not 0 <= free_gib <= MAX_FREE_GIB:  # also refuses nan
        raise OffloadError(f"--free-gib {free_gib}: allowed is 0 to {MAX_FREE_GIB} (GiB of free memory)")
    if host_compute is not None:
        check_host_compute(host_compute)  # a bad mode is one line, before anything is read
    config_path = _config_path(model)
    config = ModelConfig.from_file(config_path)
    window = config.max_position_embeddings
    if context is not None and context > window:  # as generate refuses a --max-new-tokens beyond it
        raise FlagError(
            f"--context {context} does not fit the model's context of {window} tokens; give at most {window}"
        )
    chosen = load_profile(profile)
    if host_memory is not None or disk_gbps is not None:
        host = chosen.host
        chosen = replace(
            chosen,
            host=replace(
                host,
                memory_gib=host.memory_gib if host_memory is None else host_memory,
                disk_gbps=host.disk_gbps if disk_gbps is None else disk_gbps,
            ),
        )
    if dtype is not None:
        from offload.checkpoint.weights import parse_dtype  # deferred, as above

        parse_dtype(dtype, config)  # a bad --dtype is one line, as in generate
    free = None if free_gib is None else int(free_gib * GIB)
    if free is None and (chosen.device.memory_gib is None or chosen.cache.experts_per_layer == "auto"):
        free = _measure_free_memory(chosen.device.kind)
    plan = plan_memory(
        config,
        chosen,
        context or requested_context(chosen),  # a profile's context beyond the window: capped, and said
        free,
        source=str(config_path),
        host_memory_source=None if host_memory is None else f"--host-memory {host_memory:g}",
        compute_dtype=dtype,
        host_compute=host_compute,
    )
    if host_compute is not None and not plan.offloaded:  # as generate refuses it where there is no miss
        where = "runs on the host from the host tier" if plan.experts_from_host_tier else "is resident"
        raise FlagError(
            f"--host-compute {host_compute}: every expert {where} (profile {plan.profile}), so there is no cache "
            "miss to place on the host; plan a profile with offloaded experts (cache.experts_per_layer = K) or "
            "leave the flag out"
        )
    if as_json:
        typer.echo(json.dumps(plan.as_dict(), indent=2))
        return
    _print_plan(plan, host_compute)


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


def _print_plan(plan, given: str | None = None) -> None:
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from offload.settings.plan import GIB

    console = Console(emoji=False)
    title = escape(f"profile {plan.profile} ({plan.device_kind}), context {plan.context} tokens")
    table = Table("tier", "item", "GiB", "note", title=title, caption=escape(plan.model))
    for tier, item, nbytes, note in plan.rows():
        style = "bold" if item == "total" else None
        table.add_row(tier, item, f"{nbytes / GIB:.2f}", note, style=style)
    console.print(table)
    for notice in plan.notices:
        console.print(f"[yellow]note[/yellow]: {escape(notice)}", highlight=False)
    used, budget = plan.needed_bytes / GIB, plan.budget_bytes / GIB
    where = "RAM (both tiers)" if plan.device_kind == "cpu" else "the device"
    if plan.fits:
        console.print(f"[green]FITS[/green]: {used:.2f} of {budget:.2f} GiB on {where}")
    else:
        console.print(
            f"[red]DOES NOT FIT[/red]: needs {used:.2f} GiB on {where}, the budget is {budget:.2f} GiB"
        )
    tier = plan.host_tier
    disk = tier is not None and tier.memory_gib is not None
    console.print(_headline(plan, disk, given), highlight=False)
    note = _faster_note(plan, given)
    if note is not None:
        console.print(f"[yellow]note[/yellow]: {escape(note)}", highlight=False)
    if disk:
        console.print(
            f"disk: ~{tier.disk_reads_per_token:.2f} experts ({tier.disk_bytes_per_token / 1e6:.0f} MB) read per "
            f"token at {tier.disk_gbps:g} GB/s, {tier.disk_seconds_per_token * 1e3:.1f} ms a token, overlapping "
            "nothing: added to each policy's time below",
            highlight=False,
        )
        if tier.build_seconds_per_token > 0:
            console.print(
                f"build: where the host computes read experts, the tier's reader thread converts each read in its "
                f"slot to the int4 kernel's layout, {tier.expert_build_seconds * 1e3:.1f} ms each, serial with "
                f"the reads: +{tier.build_seconds_per_token * 1e3:.1f} ms a token, counted for "
                f"{_building_policies(plan)}",
                highlight=False,
            )
    if plan.peak_rss is not None:
        console.print(f"host: peak RSS ~{plan.peak_rss.total / GIB:.2f} GiB (predicted)", highlight=False)
    speeds = plan.speeds
    if speeds is not None:
        # With experts on disk, each policy's figure counts their reads; the arithmetic's last line adds them.
        figures = plan.tok_s_with_disk if disk and plan.tok_s_with_disk else speeds.tok_s
        shown = ", ".join(f"{policy} {tok_s:.2f}" for policy, tok_s in figures.items())
        what = "estimates, tok/s, with the disk reads" if disk else "estimates, tok/s"
        console.print(f"decode by policy ({what}): {shown}; the arithmetic:", highlight=False)
        for line in speeds.arithmetic:
            console.print(f"  {line}", style="dim", highlight=False)
        if plan.tok_s_by_mode is not None and plan.host_compute == "always":
            always, with_disk = speeds.always_tok_s, plan.tok_s_by_mode["always"]
            reads = (
                f"; with the disk reads and builds {1e3 / with_disk:.2f} ms -> {with_disk:.2f} tok/s"
                if disk
                else ""
            )
            console.print(
                f"  always (--host-compute always): hybrid's sum with every miss on the host and no hit moved, "
                f"{1e3 / always:.1f} ms a token -> {always:.2f} tok/s{reads}",
                style="dim",
                highlight=False,
            )


def _headline(plan, disk: bool, given: str | None) -> str:
    """The predicted decode speed of the run these settings make, and what it counts: the policy, the device
    cache's hit rate, the host tier's. ``given``: the --host-compute flag, None when the mode is the profile's."""
    from offload.settings.plan_policy import run_policy  # deferred, as above

    tier, speed = plan.host_tier, f"decode: ~{plan.run_tok_s:.2f} tok/s"
    tier_hit = "" if tier is None or tier.hit_rate is None else f"{tier.hit_rate:.0%}"
    if plan.experts_from_host_tier:
        return (
            f"{speed}, the host computing every expert from the host tier (estimate; host tier hit rate "
            f"{tier_hit} of the chosen experts; the sums below time every expert as resident, then add the disk "
            "reads and builds)"
        )
    if not plan.offloaded:
        return f"{speed}, every expert resident on the device (estimate; no miss, nothing over the link)"
    then = (
        ""
        if not disk
        else "; no miss reaches the host tier: the device cache holds every expert"
        if tier_hit == ""
        else f"; the host tier hits {tier_hit} of those misses, the disk reads below included"
    )
    mode, policy = plan.host_compute, run_policy(plan.host_compute, plan.device_kind)
    source = (
        f"--host-compute {mode}"
        if given is not None
        else "--host-compute auto, the default"
        if mode == "auto"
        else f'the profile\'s host.compute = "{mode}"'
    )
    hit = f"device cache hit rate {plan.expected_hit_rate:.0%}"
    if policy == "hybrid":
        side = "host" if plan.speeds.miss_on_host else "device"
        return (
            f"{speed} hybrid, each miss where the cost model finds it cheaper, here the {side} ({source}; "
            f"estimate; {hit}{then})"
        )
    if policy == "always":
        return f"{speed} with every miss on the host ({source}; estimate; {hit}{then})"
    stays = (
        ": on a CPU device misses stay on the device" if plan.device_kind == "cpu" and mode == "auto" else ""
    )
    return (
        f"{speed} copying every miss ({source}{stays}; estimate; {hit}, "
        f"{plan.miss_bytes_per_token / 1e6:.0f} MB over a {plan.link_gbps:g} GB/s link per token{then})"
    )


def _faster_note(plan, given: str | None) -> str | None:
    """The note when another --host-compute mode than the run's is predicted faster."""
    from offload.settings.plan_policy import faster_mode_note, hybrid_builds  # deferred, as above

    if plan.tok_s_by_mode is None or plan.speeds is None:
        return None
    mode, tier = plan.host_compute, plan.host_tier
    builds = mode == "always" or (mode == "auto" and hybrid_builds(plan.speeds))
    builds_ms = tier.build_seconds_per_token * 1e3 if builds and tier is not None else 0.0
    where = (
        "the default" if given is None and mode == "auto" else "the profile's" if given is None else "given"
    )
    where = f"--host-compute {mode}, {where}"
    return faster_mode_note(mode, plan.tok_s_by_mode, plan.device_kind, where, builds_ms)


def _building_policies(plan) -> str:
    """The policies whose tier misses the host computes (and so builds)."""
    from offload.settings.plan_policy import hybrid_builds  # deferred, as above

    if plan.experts_from_host_tier:
        return "every policy (the experts run on the host from the tier)"
    always = " and --host-compute always" if plan.host_compute == "always" else ""
    if plan.speeds is None or not hybrid_builds(plan.speeds):
        return f"host-only{always}"
    why = (
        "its misses go to the host"
        if plan.speeds.miss_on_host
        else "its tier converts every read for the host's kernel, those it copies to the device too"
    )
    return f"host-only, hybrid ({why}){always}"


def register(app: typer.Typer) -> None:
    """Add `plan` to the app."""
    app.command("plan")(plan_command)
