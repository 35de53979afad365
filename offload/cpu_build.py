"""Building our CPU kernels (``vnni_kernel``, ``f32_kernel``): the user's choice, the CPU's instruction sets, and
torch's ``load_inline``, with a notice while a first build runs.

``OFFLOAD_CPU_KERNEL``: ``auto`` (unset: ours where this CPU has them), ``vnni`` (the same, with a warning where
one cannot run) or ``torch`` (torch's kernels only). A build takes about 30 s once (g++ and ninja), then torch
caches it under ``~/.cache/torch_extensions``; a failed build says why in one warning and leaves torch's kernel.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "OFFLOAD_CPU_KERNEL"
CHOICES = ("auto", "vnni", "torch")
# Some virtual CPUs report AMX and fault on it (FACTS.md): never let the compiler use it.
NO_AMX = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
_BUILDING = threading.Lock()


def requested() -> str:
    """The user's choice, ``OFFLOAD_CPU_KERNEL`` (see the module's docstring); an unknown value warns, then auto."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        log.warning("%s=%s is not one of %s; using auto", ENV, value, ", ".join(CHOICES))
        return "auto"
    return value


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "flags:")
    return frozenset(line.split(":", 1)[1].split())


def has_flags(flags: Sequence[str]) -> bool:
    """Whether this CPU reports every one of ``flags`` (Linux's /proc/cpuinfo)."""
    return all(flag in _cpu_flags() for flag in flags)


def compiled(what: str, build: Callable[[], Any], why_not: str | None) -> Any | None:
    """``build()``'s kernel, unless the user chose torch's kernels or ``why_not`` says this machine cannot run it
    (None then). A failed build, or a refusal where the user asked for ``vnni``, says why in one warning."""
    choice = requested()
    if choice == "torch":
        return None
    if why_not is None:
        try:
            with _BUILDING:  # two threads' first use (a tier's readers, say) build once, one after the other
                return _with_notice(build)
        except Exception as error:  # a missing compiler, ninja or header: keep torch's kernel
            why_not = (
                f"it did not build ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
            )
            choice = "vnni"  # a failed build is always said
    if choice == "vnni":
        log.warning("%s: torch's kernel is kept for %s, since %s", ENV, what, why_not)
    else:
        log.info("torch's kernel is used for %s, since %s", what, why_not)
    return None


def _with_notice(build: Callable[[], Any]) -> Any:
    """``build()``, saying so where it takes long enough to be a first build rather than torch's cache."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")  # where torch keeps builds
    notice = threading.Timer(
        2.0,
        log.warning,
        (
            "Compiling offload's CPU kernels once (about 30 s; cached under %s; %s=torch skips them)",
            cache,
            ENV,
        ),
    )
    notice.daemon = True
    notice.start()
    try:
        return build()
    finally:
        notice.cancel()


def build(
    name: str, source: str, functions: Sequence[str], flags: Sequence[str], build_directory: str | None = None
) -> Any:
    """``source`` compiled with ``flags`` by torch's ``load_inline`` (cached by torch), as a module."""
    from torch.utils.cpp_extension import load_inline

    if shutil.which("ninja") is None:  # torch runs ``ninja`` from PATH; the ninja wheel's lies beside Python
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    return load_inline(
        name=name,
        cpp_sources=source,
        functions=list(functions),
        extra_cflags=[*flags, *NO_AMX],
        build_directory=build_directory,
    )
