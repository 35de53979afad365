"""offload: run a quantized Mixtral with its experts offloaded to host RAM."""

__version__ = "0.1.0"
