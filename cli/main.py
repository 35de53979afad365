"""The `offload` app. `--help` stays instant: no command imports torch until it runs."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cli import (
    bench_cmd,
    chat_cmd,
    convert_cmd,
    generate_cmd,
    help_format,
    models_cmd,
    plan_cmd,
    profiles_cmd,
    serve_cmd,
    trace_cmd,
)
from offload import __version__
from offload.errors import OffloadError

help_format.apply()

app = typer.Typer(
    name="offload",
    help="Run a quantized Mixtral on a GPU too small to hold it.\n\nExample: offload generate 'What does json.dumps do?'",
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion for bash, zsh, fish and PowerShell
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"offload {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_show_version, is_eager=True),
    ] = False,
) -> None:
    """Run a quantized Mixtral on a GPU too small to hold it."""


def _register_commands() -> None:
    bench_cmd.register(app)
    chat_cmd.register(app)
    convert_cmd.register(app)
    generate_cmd.register(app)
    models_cmd.register(app)
    plan_cmd.register(app)
    profiles_cmd.register(app)
    serve_cmd.register(app)
    trace_cmd.register(app)


_register_commands()


def run() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()  # typer's standalone mode handles usage errors (exit 2) and --help itself
    except OffloadError as err:
        # A name read from a file may hold a newline; the error must stay one line.
        print("error: " + str(err).replace("\n", "\\n"), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
