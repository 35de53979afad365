"""Checkpoints on disk: finding a model directory (``hub``; ``download`` fetches a repo that is not cached,
``catalog`` lists what is on this machine), reading safetensors lazily (``reader``), the
weights as the loader wants them, quantized now or as stored (``weights``), and ``offload convert``'s writer.

May import ``offload.config``, ``offload.errors``, ``offload.atomic`` and ``offload.quant``; never
``offload.loading`` (which builds on this package), ``bench``, ``trace`` or ``cli``.
"""
