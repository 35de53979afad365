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
    str | None, typer.Option(help="float32, bfloat16 or float16. Default: the checkpoint's own dtype.")
]
MaxNewTokens = Annotated[int, typer.Option(help="Stop after this many new tokens.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: keep tokens up to this total probability.")]
TopK = Annotated[int, typer.Option(help="Keep only the k most likely tokens; 0 keeps all.")]
Seed = Annotated[int | None, typer.Option(help="Random seed, for repeatable sampling.")]
System = Annotated[str | None, typer.Option(help="A system prompt, placed before the first user message.")]
