"""Two of typer's help conventions replaced by click's, which users of other CLIs know.

typer 0.29 writes a required argument as ``{prompt}`` in the usage line and puts ``<bool>`` after every
on/off flag (``--json``, ``--help``), which takes no value. Here an argument is ``PROMPT`` in the
usage line (an optional one ``[PROMPT]``), the help and the errors, and a flag shows no type. Where a typer release lacks the methods replaced,
its own conventions stay.
"""

from __future__ import annotations

from typing import Any


def apply() -> None:
    """Patch typer's TyperArgument and TyperOption once, before any help is shown."""
    from typer import core

    argument, option = getattr(core, "TyperArgument", None), getattr(core, "TyperOption", None)
    if argument is not None and hasattr(argument, "_usage_display_name"):
        argument._usage_display_name = _usage_display_name
    if argument is not None and hasattr(argument, "display_name_raw"):
        argument.display_name_raw = property(_display_name)  # the help panel and error messages
    if option is not None and hasattr(option, "display_type_rich"):
        option.display_type_rich = _flag_without_type(option.display_type_rich)


def _display_name(self: Any) -> str:
    return self.metavar or self.name.upper()


def _usage_name(self: Any) -> str:
    name = _display_name(self)
    return name if self.metavar is not None or self.nargs == 1 else name + "..."


def _usage_display_name(self: Any) -> str:
    name = _usage_name(self)
    return name if self.required else f"[{name}]"


def _flag_without_type(display_type_rich: Any) -> Any:
    def display(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return display_type_rich(self, ctx)

    return display
