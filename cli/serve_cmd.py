"""`offload serve`: load once, then answer the OpenAI chat API and a web chat page over HTTP."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli import options
from offload.errors import FlagError, OffloadError
from offload.settings.flags import LoadFlags

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def register(app: typer.Typer) -> None:
    """Add `serve` to ``app``."""
    app.command(
        help="Serve the OpenAI chat API and a web chat page (needs the 'serve' extra).\n\n"
        "Example: offload serve, then open http://127.0.0.1:8000/\n\n"
        "Example: offload serve --port 9000 --api-key KEY --queue 8"
    )(options.load_flags()(serve))


def serve(
    model: options.Model = None,
    host: Annotated[
        str,
        typer.Option(help="The address to listen on; 0.0.0.0 lets other machines connect.", metavar="HOST"),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            help="The TCP port (0 picks a free one).",
            callback=options.bounded("--port", 0, 65535),
            metavar="PORT",
        ),
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' on every endpoint but /health and the page.",
            envvar="OFFLOAD_API_KEY",
            metavar="KEY",
        ),
    ] = None,
    queue: Annotated[
        int,
        typer.Option(
            help="Requests that may wait while one generates; more get 503 with Retry-After.",
            callback=options.bounded("--queue", 0, 1024),
            metavar="N",
        ),
    ] = 4,
    flags: LoadFlags = options.FLAGS,
) -> None:
    from offload.serve import require_extra

    require_extra()  # before anything heavy: a missing extra is one line, not an ImportError
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    import uvicorn

    from cli.loading_view import load_engine
    from offload.engine import resolve_model
    from offload.serve.app import create_app

    if api_key is not None and not api_key.strip():
        raise FlagError("--api-key is empty; give a key or leave the option out")
    resolved = resolve_model(model, flags)  # every flag checked before a weight is read
    listener = _listen(host, port)  # a port in use fails here, before the weights load
    engine = load_engine(resolved)
    name = served_name(model, engine.directory)
    app = create_app(engine, queue_size=queue, api_key=api_key, model_name=name)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    bound_port = listener.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    reach = (
        "only this machine can connect; --host 0.0.0.0 opens it to the network"
        if host in LOCAL_HOSTS
        else "reachable from other machines" + ("" if api_key else "; consider --api-key")
    )
    print(f"serving {name} at http://{shown}:{bound_port}/ ({reach}); Ctrl-C stops", flush=True)
    # uvicorn handles Ctrl-C and SIGTERM itself (streams end, the worker stops), then raises the signal
    # again for the handler it found: make that one a quiet exit rather than a traceback or a kill.
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[listener])
    print("stopped", file=sys.stderr, flush=True)


def served_name(model: str | None, directory: Path) -> str:
    """The model id the API serves: a Hugging Face repo id as given, else the directory's name."""
    # A repo id resolves to a snapshot folder named after a commit hash, which no client would send.
    return model if model is not None and not Path(model).expanduser().is_dir() else directory.name


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, or a one-line error naming them."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as err:
        reason = err.strerror or str(err)
        raise OffloadError(
            f"cannot listen on {host}:{port}: {reason}; pick another --port or --host"
        ) from None
    return listener
