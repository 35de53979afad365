"""`offload serve`: an OpenAI-compatible HTTP server and a web chat page over one loaded engine.

The server needs the optional ``serve`` extra (Starlette, uvicorn, sse-starlette). Importing this
package does not import them, so the engine stays usable without the extra; ``require_extra`` is
the one place that says what to install.
"""

from __future__ import annotations

import importlib

from offload.errors import OffloadError

EXTRA_MODULES = ("starlette", "uvicorn", "sse_starlette")


def require_extra() -> None:
    """Raise a one-line OffloadError naming the install command when the serve extra is missing."""
    missing = []
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OffloadError(
            f"offload serve needs the 'serve' extra ({', '.join(missing)} missing): pip install 'offload[serve]'"
        )
