"""Checkpoints on disk: finding a model directory, reading safetensors lazily, the weights as the loader
wants them (quantized now or as stored), and ``offload convert``'s writer.

May import ``offload.config``, ``offload.errors``, ``offload.atomic`` and ``offload.quant``; never ``bench``,
``trace`` or ``cli``.
"""
