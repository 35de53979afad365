"""The `offload` app. `--help` stays instant: no command imports torch until it runs."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from offload import __version__

app = typer.Typer(
    name="offload",
    help="Run a quantized Mixtral on a GPU too small to hold it.\n\nExample: offload generate 'What does json.dumps do?'",
    no_args_is_help=True,
    add_completion=False,
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


def run() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    from offload.errors import OffloadError

    try:
        app(standalone_mode=False)
    except OffloadError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # click's usage errors carry their own exit codes
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    run()
