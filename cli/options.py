"""Options shared by several commands, declared once; ``load_flags`` gives a command the LoadFlags.

Numeric options carry their bounds here (``bounded``), so that a value out of range is one line on
stderr before any model is read.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

import typer

from offload.errors import FlagError
from offload.settings.flags import FIELDS, LoadFlags
from offload.settings.limits import (  # the engine's limits, also the profile's and chat's /set
    MAX_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_PENALTY,
    MIN_TEMPERATURE,
    TEMPERATURES,
    temperature_allowed,
)
from offload.settings.plan_tiers import MAX_HOST_MEMORY_GIB  # the plan's --host-memory takes the same range

Command = TypeVar("Command", bound=Callable[..., Any])


def bounded(flag: str, low: float, high: float, *, above: bool = False) -> Callable[[Any], Any]:
    """A typer callback refusing a value outside ``low``..``high`` (``above``: strictly above ``low``), NaN or inf."""
    allowed = f"{'above ' if above else ''}{_shown(low)} to {_shown(high)}"

    def check(value: Any) -> Any:
        if value is None:
            return value
        inside = (value > low if above else value >= low) and value <= high
        if not (math.isfinite(value) and inside):
            raise FlagError(f"{flag} {value} is out of range: {allowed}")
        return value

    return check


def comma_items(text: str, flag: str) -> list[str]:
    """The names in a flag's comma list, stripped; an empty one (a doubled, leading or trailing comma) is refused."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise typer.BadParameter(
            f"{text!r} has an empty name: separate names with single commas", param_hint=flag
        )
    return items


def _shown(number: float) -> str:
    """A bound as a person writes it: 100 rather than 100.0, every digit of an integer."""
    return str(number) if isinstance(number, int) else f"{number:g}"


def temperature_check(value: float | None) -> float | None:
    """0 (greedy), or a temperature at which logits divided by it stay finite and still differ."""
    if value is not None and not temperature_allowed(value):
        raise FlagError(f"--temperature {value} is out of range: {TEMPERATURES}")
    return value


MAX_TOKENS = 1 << 31  # more than any context; the model's own context is checked once it is known

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="DIR|REPO",
        help="Model directory or Hugging Face repo id. Default: the bundled demo model.",
    ),
]
Device = Annotated[
    str | None, typer.Option(help="cpu, cuda or cuda:N. Default: cuda when present, else cpu.")
]
Dtype = Annotated[
    str | None,
    typer.Option(
        help="float32, bfloat16 or float16. Default: the checkpoint's own dtype, except float32 for a small half-precision model on a CPU (faster there)."
    ),
]
MaxNewTokens = Annotated[
    int | None,
    typer.Option(
        help="Stop after this many new tokens. Default: the profile's.",
        callback=bounded("--max-new-tokens", 0, MAX_TOKENS),
    ),
]
Temperature = Annotated[
    float | None,
    typer.Option(
        help=f"Sampling temperature: 0 is greedy, else {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}. "
        "Default: the profile's.",
        callback=temperature_check,
    ),
]
TopP = Annotated[
    float | None,
    typer.Option(
        help="Nucleus sampling: keep tokens up to this total probability (above 0, at most 1).",
        callback=bounded("--top-p", 0, 1, above=True),
    ),
]
TopK = Annotated[
    int | None,
    typer.Option(
        help="Keep only the k most likely tokens; 0 keeps all.", callback=bounded("--top-k", 0, MAX_TOP_K)
    ),
]
Profile = Annotated[
    str | None,
    typer.Option(
        "--profile",
        "-p",
        metavar="NAME|FILE",
        help="Profile name or TOML path (see `offload profiles list`).",
    ),
]
ExpertsPerLayer = Annotated[
    str | None,
    typer.Option(
        "--experts-per-layer",
        "-k",
        metavar="K",
        help="Device slots per layer: K, a list 'K0,K1,...', 'all' or 'auto'.",
    ),
]
Prefetch = Annotated[
    int | None,
    typer.Option(
        help="Guesses of the next layer's experts to prefetch; 0 is off. Above 0, needs offloaded experts "
        "(-k K) or a host tier (--host-memory)."
    ),
]
CachePolicy = Annotated[
    str | None,
    typer.Option(
        help="Which expert a full layer of the cache evicts: lrfu (least recently and frequently used) or lru. "
        "Needs offloaded experts (-k K)."
    ),
]
Link = Annotated[
    str | None,
    typer.Option(
        metavar="SPEC",
        help="How experts move: local, emulated:GBPS[:LATENCY_US] or cuda. Needs offloaded experts (-k K).",
    ),
]
HostCompute = Annotated[
    str | None,
    typer.Option(
        metavar="MODE",
        help="Where a cache miss is computed: auto (where the cost model measured at load finds it cheaper: "
        "copied to the device or on the host CPU), never (always copied) or always (always on the host). "
        "Needs offloaded experts (-k K).",
    ),
]
MAX_HOST_RATIO = 1e6
HostRatio = Annotated[
    float | None,
    typer.Option(
        metavar="R",
        help="Emulate the host CPU: a host expert completes in R times the device's measured time for the "
        "same expert (a laptop: 5 to 10). For a CPU-only machine, where host and device are one. Needs offloaded "
        "experts (-k K).",
        callback=bounded("--host-ratio", 0, MAX_HOST_RATIO, above=True),
    ),
]
HostMemory = Annotated[
    float | None,
    typer.Option(
        metavar="GIB",
        help="Host RAM for experts, in GiB: that many stay in RAM (the host tier) and the others are read from "
        "the checkpoint on disk when needed. With every expert resident (-k all), they run on the host CPU from "
        "the tier. "
        "Needs a converted checkpoint, or a float one at its stored dtype. Default: the profile's [host] "
        "memory_gib, else every expert in RAM. Example: --host-memory 8",
        callback=bounded("--host-memory", 0, MAX_HOST_MEMORY_GIB, above=True),
    ),
]
Disk = Annotated[
    str | None,
    typer.Option(
        metavar="SPEC",
        help="How the host tier reads experts: file (the default), or emulated:GBPS, real reads that complete at "
        "GBPS GB/s on a serial disk (for benchmarks: the page cache makes re-reads nearly free). Needs --host-memory.",
    ),
]
Quant = Annotated[str | None, typer.Option(help="'none' loads the checkpoint's weights unquantized.")]
Seed = Annotated[
    int | None,
    typer.Option(
        help=f"Random seed, for repeatable sampling: 0 to {MAX_SEED}.",
        callback=bounded("--seed", 0, MAX_SEED),
    ),
]
System = Annotated[str | None, typer.Option(help="A system prompt, placed before the first user message.")]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        "-t",
        help="torch's CPU threads. Default: the physical cores the current load leaves free "
        "(OMP_NUM_THREADS when set).",
    ),
]

FLAGS = LoadFlags()  # what a command's ``flags`` parameter defaults to; ``load_flags`` replaces it

# One typer option per LoadFlags field; the bounds that need the model are checked when it is resolved.
LOAD_FLAG_OPTIONS: dict[str, Any] = {
    "profile": Profile,
    "experts_per_layer": ExpertsPerLayer,
    "prefetch": Prefetch,
    "cache_policy": CachePolicy,
    "link": Link,
    "host_compute": HostCompute,
    "host_ratio": HostRatio,
    "host_memory": HostMemory,
    "disk": Disk,
    "quant": Quant,
    "dtype": Dtype,
    "device": Device,
    "threads": Threads,
}


def load_flags(*, omit: Iterable[str] = ()) -> Callable[[Command], Command]:
    """Give a command the load flags in place of its ``flags: LoadFlags`` parameter.

    typer has no parameter objects, so the command's signature, as typer reads it, gets one option per
    LoadFlags field where ``flags`` stood; the command is then called with the LoadFlags they make
    (``omit``-ted fields stay None).
    """
    omitted = set(omit)
    names = [name for name in FIELDS if name not in omitted]

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            if parameter.name != "flags":
                parameters.append(parameter)
                continue
            for name in names:
                kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
                parameters.append(
                    inspect.Parameter(name, kind, default=None, annotation=LOAD_FLAG_OPTIONS[name])
                )

        @functools.wraps(command)
        def with_flags(**given: Any) -> Any:
            flags = LoadFlags(**{name: given.pop(name) for name in names})
            return command(**given, flags=flags)

        with_flags.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        with_flags.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_flags  # type: ignore[return-value]

    return decorate


def check_max_new_tokens(max_new_tokens: int | None, config: Any) -> None:
    """Refuse --max-new-tokens that no prompt could fit in the model's context, before the model loads."""
    window = config.max_position_embeddings
    if max_new_tokens is not None and max_new_tokens >= window:
        raise FlagError(
            f"--max-new-tokens {max_new_tokens} does not fit the model's context of {window} tokens "
            f"with a prompt; give at most {window - 1}"
        )


MinP = Annotated[
    float | None,
    typer.Option(
        "--min-p",
        help="Drop tokens less likely than this times the likeliest one; 0 keeps all. Example: 0.05",
        callback=bounded("--min-p", 0, 1),
    ),
]
RepetitionPenalty = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty",
        help="Divide the logit of every token already in the text by this (multiply when negative); "
        f"1 is off, {_shown(MIN_PENALTY)} to {_shown(MAX_PENALTY)}. Example: 1.1",
        callback=bounded("--repetition-penalty", MIN_PENALTY, MAX_PENALTY),
    ),
]


def check_stop(values: list[str] | None) -> list[str] | None:
    """Refuse an empty --stop: no text would end a reply at it, and it would be ignored."""
    if values and not all(values):
        raise FlagError("--stop '' is empty: give the text that ends a reply, e.g. --stop '\\n\\n'")
    return values


Stop = Annotated[
    list[str] | None,
    typer.Option(
        "--stop",
        help="End the reply at this text, which is not printed; repeat for several. Example: --stop '\\n\\n'",
        callback=check_stop,
    ),
]


def stop_strings(values: list[str] | None) -> tuple[str, ...]:
    r"""--stop values with \n, \t and \\ read as a newline, a tab and a backslash (a shell cannot easily pass a newline)."""
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}

    def unescape(text: str) -> str:
        out, chars = [], iter(text)
        for char in chars:
            if char == "\\":
                following = next(chars, "")
                out.append(escapes.get(following, "\\" + following))
            else:
                out.append(char)
        return "".join(out)

    return tuple(unescape(value) for value in values or ())
