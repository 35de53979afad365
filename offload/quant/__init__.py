"""Quantization: specs per role, the hqq / bitsandbytes / none backends, and how experts and linears are stored.

``spec`` and ``scheme`` import neither torch nor a backend, so profiles and flags are checked without them;
hqq and bitsandbytes are imported only when a matrix is quantized or rebuilt. ``spec`` must not import
``linear`` (the byte arithmetic lives next to each backend, and ``linear`` imports ``spec``).

May import ``offload.errors`` and ``offload.experts.source`` (the Expert that a codec materializes); never
``bench``, ``trace`` or ``cli``.
"""
