"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

Model = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Model directory or Hugging Face repo id. Default: the bundled demo model."
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
    int | None, typer.Option(help="Stop after this many new tokens. Default: the profile's.")
]
Temperature = Annotated[
    float | None, typer.Option(help="Sampling temperature; 0 is greedy. Default: the profile's.")
]
TopP = Annotated[
    float | None, typer.Option(help="Nucleus sampling: keep tokens up to this total probability.")
]
TopK = Annotated[int | None, typer.Option(help="Keep only the k most likely tokens; 0 keeps all.")]
Profile = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="Profile name or TOML path (see `offload profiles list`)."),
]
ExpertsPerLayer = Annotated[
    str | None,
    typer.Option(
        "--experts-per-layer", "-k", help="Device slots per layer: K, a list 'K0,K1,...', 'all' or 'auto'."
    ),
]
Prefetch = Annotated[
    int | None, typer.Option(help="Guesses of the next layer's experts to prefetch; 0 is off.")
]
CachePolicy = Annotated[
    str | None,
    typer.Option(
        help="Which expert a full layer of the cache evicts: lrfu (least recently and frequently used) or lru."
    ),
]
Link = Annotated[
    str | None, typer.Option(help="How experts move: local, emulated:GBPS[:LATENCY_US] or cuda.")
]
Quant = Annotated[str | None, typer.Option(help="'none' loads the checkpoint's weights unquantized.")]
Seed = Annotated[int | None, typer.Option(help="Random seed, for repeatable sampling.")]
System = Annotated[str | None, typer.Option(help="A system prompt, placed before the first user message.")]
