"""Quantization: specs per role, the hqq / bitsandbytes / none backends, and how experts and linears are stored.

Importing this package is cheap: hqq and bitsandbytes are imported only when a matrix is quantized or rebuilt.
"""

from offload.quant.codec import ExpertCodec, QuantizedExpert, codec_for, expert_nbytes
from offload.quant.linear import build_linear, dequantize_linear, matrix_nbytes, quantize_linear
from offload.quant.spec import ROLES, QuantSpec

__all__ = [
    "ROLES",
    "ExpertCodec",
    "QuantSpec",
    "QuantizedExpert",
    "build_linear",
    "codec_for",
    "dequantize_linear",
    "expert_nbytes",
    "matrix_nbytes",
    "quantize_linear",
]
