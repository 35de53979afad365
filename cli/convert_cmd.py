"""`offload convert`: quantize a float checkpoint once and write it as a converted checkpoint."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli import options
from offload.checkpoint.hub import resolve_model_dir
from offload.config import ModelConfig
from offload.errors import QuantError
from offload.quant.scheme import QuantScheme
from offload.quant.spec import QuantSpec
from offload.settings.profile import load_profile

# The shipped profiles' scheme, used when neither --profile nor a spec flag says otherwise.
DEFAULT_ATTENTION = "hqq:4:64"
DEFAULT_EXPERTS = "hqq:4:64"


def register(app: typer.Typer) -> None:
    """Add `convert` to ``app``."""
    app.command(
        help="Quantize the float checkpoint SRC and write it to the new directory DST.\n\n"
        f"Without --profile or spec flags: attention {DEFAULT_ATTENTION}, experts {DEFAULT_EXPERTS}, "
        "gate, embedding and lm_head kept as they are. Flags override the profile.\n\n"
        "Example: offload convert ./mixtral ./mixtral-hqq3 --attention hqq:4:64 --experts hqq:3:64\n\n"
        "Example: offload convert ./mixtral ./mixtral-mixed --experts hqq:2:16 "
        "--experts-layer 0=hqq:3:64 --experts-layer -1=hqq:3:64"
    )(convert)


def convert(
    src: Annotated[str, typer.Argument(help="The float checkpoint: a directory or a Hugging Face repo id.")],
    dst: Annotated[
        Path,
        typer.Argument(help="The directory to write: new or empty (see --force). Other files there stay."),
    ],
    profile: options.Profile = None,
    attention: Annotated[
        str | None, typer.Option(help="Spec for the q, k, v and o projections, e.g. hqq:4:64.")
    ] = None,
    experts: Annotated[
        str | None, typer.Option(help="Spec for every layer's experts, e.g. hqq:3:64.")
    ] = None,
    experts_layer: Annotated[
        list[str] | None,
        typer.Option("--experts-layer", help="L=SPEC: layer L's experts (-1 is the last layer); repeatable."),
    ] = None,
    gate: Annotated[
        str | None,
        typer.Option(help="Spec for each layer's router; none by default, as routing is sensitive."),
    ] = None,
    lm_head: Annotated[
        str | None, typer.Option(help="Spec for the output projection, e.g. bnb:int8.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            "-f",
            help="Replace an earlier convert's output in DST; files convert did not write stay.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object instead of a table.")
    ] = False,
) -> None:
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from offload.checkpoint.convert import convert_checkpoint
    from offload.checkpoint.convert_output import inspect_destination

    source = resolve_model_dir(src)
    config = ModelConfig.from_file(source / "config.json")
    scheme = build_scheme(
        config,
        profile=profile,
        attention=attention,
        experts=experts,
        experts_layer=experts_layer or [],
        gate=gate,
        lm_head=lm_head,
    )
    destination = dst.expanduser()
    target = inspect_destination(destination.absolute())  # refuses what would remove files it did not write
    if target.needs_force and not force and sys.stdin.isatty():
        if not typer.confirm(target.question(), default=False, err=True):
            typer.echo("not converted: the destination was left as it is", err=True)
            raise typer.Exit(1)
        force = True
    err = Console(stderr=True, highlight=False, emoji=False)
    with _progress(err, quiet=as_json) as advance:
        report = convert_checkpoint(source, destination, scheme, force=force, progress=advance)
    if as_json:
        sys.stdout.write(json.dumps(report.as_dict()) + "\n")
    else:
        Console(highlight=False, emoji=False).print(report_table(report))


def build_scheme(
    config: Any,
    *,
    profile: str | None = None,
    attention: str | None = None,
    experts: str | None = None,
    experts_layer: Sequence[str] = (),
    gate: str | None = None,
    lm_head: str | None = None,
) -> Any:
    """The QuantScheme the flags ask for: the profile's (or the default) with each given flag on top."""
    # Parsed one by one first, so that an error names the option that holds the bad spec.
    for option, text in (
        ("--attention", attention),
        ("--experts", experts),
        ("--gate", gate),
        ("--lm-head", lm_head),
    ):
        if text is not None:
            QuantSpec.parse(text, where=option)
    layers = config.num_hidden_layers
    if profile is not None:
        base = QuantScheme.from_profile(load_profile(profile).for_model(config))
    else:
        base = QuantScheme.build(layers, attention=DEFAULT_ATTENTION, experts=DEFAULT_EXPERTS)
    per_layer = {layer: experts or str(base.expert_spec(layer)) for layer in range(layers)}
    given: dict[int, str] = {}  # layer -> the --experts-layer that set it
    for text in experts_layer:
        layer, equals, spec = text.partition("=")
        if not equals or not layer.strip().removeprefix("-").isdigit():
            raise QuantError(f"--experts-layer {text!r}: expected LAYER=SPEC, e.g. 0=hqq:3:64 or -1=hqq:3:64")
        index = int(layer)
        if not -layers <= index < layers:
            raise QuantError(f"--experts-layer {text!r}: layer {index} is out of range 0..{layers - 1}")
        if index % layers in given:  # one would silently win: say which two disagree, or repeat
            raise QuantError(
                f"--experts-layer {text!r}: layer {index % layers} is already set by "
                f"--experts-layer {given[index % layers]!r}; give each layer once"
            )
        given[index % layers] = text
        per_layer[index % layers] = str(QuantSpec.parse(spec, where=f"--experts-layer {text}"))
    return QuantScheme.build(
        layers,
        attention=attention or str(base.attention),
        experts=per_layer[0],
        expert_overrides=per_layer,
        gate=gate or str(base.gate),
        embed=str(base.embed),
        lm_head=lm_head or str(base.lm_head),
        where="convert",
    )


def report_table(report: Any) -> Any:
    """The report as a rich table, with a caption for the totals."""
    table = Table(
        title=escape(f"{report.source} -> {report.destination}"),
        caption=f"{report.total_bytes / 2**20:.1f} MiB in {report.shards} shards, "
        f"{report.bits_per_weight:.2f} bits/weight overall, {report.seconds:.1f} s; "
        "error: relative output error on a sample",
    )
    for column in ("role", "spec", "matrices", "tensors", "MiB", "bits/weight", "error"):
        table.add_column(column, justify="left" if column in ("role", "spec") else "right")
    for row in report.rows:
        error = row.output_error
        table.add_row(
            row.role,
            row.spec,
            str(row.matrices),
            str(row.tensors),
            f"{row.stored_bytes / 2**20:.2f}",
            f"{row.bits_per_weight:.2f}",
            "—" if error is None else f"{error:.4f}",
        )
    return table


@contextmanager
def _progress(console: Any, *, quiet: bool) -> Iterator[Callable[[Any], None]]:
    """Bars on a terminal (unless ``quiet``); elsewhere, such as a log file, one line per shard written."""
    if console.is_terminal:
        with _progress_bars(console, quiet=quiet) as advance:
            yield advance
        return
    shown = 0

    def line(step: Any) -> None:
        nonlocal shown
        if step.shards_done == shown:
            return
        shown = step.shards_done
        what = "embedding, norm and lm_head" if shown == 1 else f"layer {shown - 2}"
        sys.stderr.write(
            f"convert: shard {shown}/{step.shards_total} written ({what}); "
            f"{step.bytes_done / 2**20:.1f} of {step.bytes_total / 2**20:.1f} MiB\n"
        )
        sys.stderr.flush()

    yield line


@contextmanager
def _progress_bars(console: Any, *, quiet: bool) -> Iterator[Callable[[Any], None]]:
    """Two rich bars on stderr (source tensors read, bytes written); yields convert's progress hook."""
    columns = (
        TextColumn("{task.description:>8}"),
        BarColumn(),
        TextColumn("{task.fields[shown]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=quiet) as bars:
        tensors = bars.add_task("tensors", total=None, shown="")
        written = bars.add_task("written", total=None, shown="")

        def advance(step: Any) -> None:
            done, total = step.tensors_done, step.tensors_total
            bars.update(tensors, completed=done, total=total, shown=f"{done}/{total}")
            done, total = step.bytes_done, step.bytes_total
            bars.update(
                written, completed=done, total=total, shown=f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB"
            )

        yield advance
