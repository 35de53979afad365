"""The `offload` command-line app (typer + rich). Commands import the engine lazily."""
