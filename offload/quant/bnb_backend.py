"""The bitsandbytes backend: bnb's own quantizers (nf4, fp4, int8), our storage.

nf4 / fp4, as Linear4bit quantizes them (blocks of 64 weights, absmax statistics compressed to 8 bits):
- ``weight``: uint8 (out, in / 2), two 4-bit codes per byte in bnb's order (bnb keeps it as a column);
- ``absmax``: uint8, one per block of 64 weights, quantized in blocks of 256 with bnb's dynamic map;
- ``absmax_scale``: fp32, one per 256 absmax values; ``absmax_offset``: fp32 (1,), their subtracted mean.

int8, as Linear8bitLt quantizes it (LLM.int8() row-wise absmax, no outlier columns):
- ``CB``: int8 (out, in); ``SCB``: fp32 (out,), each row's absmax.

The 16-entry nf4 / fp4 tables and the 256-entry dynamic map are bnb constants, rebuilt rather than stored.
The matrix shape is read off the tensors' shapes, never their values, so rebuilding on CUDA needs no sync.
bitsandbytes is imported inside the functions, through ``_bitsandbytes``: importing it costs seconds.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from offload.errors import QuantError
from offload.quant.host_kernels import Int8Linear, has_op

if TYPE_CHECKING:
    from offload.quant.spec import QuantSpec

# On CPUs with AVX512-BF16, importing bitsandbytes warns that the optional `kernels` package (a faster
# CPU 4-bit matmul fetched from the Hugging Face hub) is missing, on every bnb model. offload never runs
# that kernel (on a CPU it dequantizes once at load), so the warning only alarms users.
KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"

BLOCKSIZE = 64  # Linear4bit's default: one absmax per 64 weights
NESTED_BLOCKSIZE = 256  # bnb compresses the absmax values in blocks of 256


def _not_the_kernels_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(KERNELS_WARNING)


def _bitsandbytes() -> ModuleType:
    """bitsandbytes (with ``functional`` loaded), imported without its warning about `kernels`."""
    logging.getLogger(KERNELS_LOGGER).addFilter(_not_the_kernels_warning)  # added once: addFilter dedupes
    import bitsandbytes
    import bitsandbytes.functional

    return bitsandbytes


def keys(spec: QuantSpec) -> tuple[str, ...]:
    """The tensor names ``quantize`` returns for ``spec``."""
    if spec.kind == "int8":
        return ("CB", "SCB")
    return ("weight", "absmax", "absmax_scale", "absmax_offset")


def check(spec: QuantSpec, shape: tuple[int, ...], name: str) -> None:
    """Raise QuantError unless ``spec`` can store a matrix of ``shape``."""
    if len(shape) != 2:
        raise QuantError(f"{spec} quantizes 2-D weights; {name} has shape {tuple(shape)}")
    # Two codes per byte, kept row by row so the shape survives in the tensor's own shape.
    if spec.kind != "int8" and shape[1] % 2:
        raise QuantError(
            f"{spec} cannot quantize {name} of shape {tuple(shape)}: the row length must be even; use bnb:int8"
        )


def nbytes(spec: QuantSpec, shape: tuple[int, int]) -> int:
    """Exact bytes ``quantize`` stores for a matrix of ``shape``."""
    check(spec, shape, "weight")
    out_features, in_features = shape
    if spec.kind == "int8":
        return out_features * in_features + 4 * out_features
    blocks = math.ceil(out_features * in_features / BLOCKSIZE)
    return out_features * in_features // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4


def quantize(weight: Tensor, spec: QuantSpec, name: str) -> dict[str, Tensor]:
    """Quantize one (out, in) matrix on the CPU with bitsandbytes' quantizer."""
    bnb_functional = _bitsandbytes().functional

    check(spec, tuple(weight.shape), name)
    out_features, in_features = weight.shape
    if spec.kind == "int8":
        # Linear8bitLt rounds the weight to fp16 before quantizing; do the same.
        codes, row_absmax, _ = bnb_functional.int8_vectorwise_quant(weight.detach().to("cpu", torch.float16))
        return {"CB": codes.contiguous(), "SCB": row_absmax.float().contiguous()}
    codes, state = bnb_functional.quantize_4bit(
        weight.detach().to("cpu", torch.float32).contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=True,  # Linear4bit's default (QLoRA's double quantization)
        quant_type=spec.kind,
        quant_storage=torch.uint8,
    )
    return {
        "weight": codes.reshape(out_features, in_features // 2).contiguous(),
        "absmax": state.absmax.contiguous(),
        "absmax_scale": state.state2.absmax.float().contiguous(),
        "absmax_offset": state.offset.float().reshape(1).contiguous(),
    }


def _shape(tensors: dict[str, Tensor]) -> torch.Size:
    if "CB" in tensors:
        return tensors["CB"].shape
    out_features, half_row = tensors["weight"].shape
    return torch.Size((out_features, 2 * half_row))


def _quant_state(tensors: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype):
    """bnb's QuantState for a 4-bit matrix, producing ``dtype`` when dequantized."""
    bnb_functional = _bitsandbytes().functional

    device = tensors["weight"].device
    absmax_state = bnb_functional.QuantState(
        absmax=tensors["absmax_scale"],
        code=bnb_functional.create_dynamic_map().to(device),
        blocksize=NESTED_BLOCKSIZE,
        dtype=torch.float32,
    )
    return bnb_functional.QuantState(
        absmax=tensors["absmax"],
        shape=_shape(tensors),
        code=bnb_functional.get_4bit_type(spec.kind, device=device),
        blocksize=BLOCKSIZE,
        quant_type=spec.kind,
        dtype=dtype,
        offset=tensors["absmax_offset"].reshape(()),
        state2=absmax_state,
    )


def dequantize(tensors: dict[str, Tensor], spec: QuantSpec) -> Tensor:
    """The fp32 (out, in) matrix, with bitsandbytes' dequantizer, on the tensors' device."""
    bnb_functional = _bitsandbytes().functional

    if spec.kind == "int8":
        return bnb_functional.int8_vectorwise_dequant(tensors["CB"], tensors["SCB"])
    state = _quant_state(tensors, spec, torch.float32)
    return bnb_functional.dequantize_4bit(tensors["weight"].reshape(-1, 1), state)


class Bnb4bitLinear(nn.Module):
    """A bias-free linear that runs bitsandbytes' 4-bit matmul on the stored codes (the CUDA path)."""

    def __init__(self, tensors: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.codes = tensors["weight"].reshape(-1, 1)  # bnb's canonical ((out * in) / 2, 1)
        self.quant_state = _quant_state(tensors, spec, dtype)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        bnb = _bitsandbytes()

        return bnb.matmul_4bit(x.to(self.dtype), self.codes, quant_state=self.quant_state)


class BnbInt8Linear(nn.Module):
    """A bias-free linear that runs bitsandbytes' LLM.int8() matmul on the stored codes (the CUDA path)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        _bitsandbytes()
        from bitsandbytes.autograd._functions import MatmulLtState

        # Linear8bitLt's inference state: frozen int8 weights, no outlier decomposition.
        self.state = MatmulLtState()
        self.state.CB, self.state.SCB = tensors["CB"], tensors["SCB"]
        self.state.has_fp16_weights = False
        self.state.is_training = False

    def forward(self, x: Tensor) -> Tensor:
        bnb = _bitsandbytes()

        # bnb quantizes the activations from fp16 anyway, and logs a warning per call for any other dtype.
        return bnb.matmul(x.to(torch.float16), self.state.CB, state=self.state).to(x.dtype)


def kernel_linear(
    tensors: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """A module on ``device`` that keeps the codes and runs bitsandbytes' kernel."""
    on_device = {key: tensor.to(device) for key, tensor in tensors.items()}
    return BnbInt8Linear(on_device) if spec.kind == "int8" else Bnb4bitLinear(on_device, spec, dtype)


def device_linear(tensors: dict[str, Tensor], spec: QuantSpec, device: torch.device) -> nn.Module | None:
    """None: bitsandbytes' own CUDA kernels (``kernel_linear``) read its layout."""
    return None


def host_fits(tensors: dict[str, Tensor], spec: QuantSpec) -> bool:
    """Whether ``host_linear`` builds a module: int8, where this torch has the kernel."""
    return spec.kind == "int8" and has_op("_weight_int8pack_mm")


def host_linear(tensors: dict[str, Tensor], spec: QuantSpec, *, overwrite: bool = False) -> nn.Module | None:
    """For int8, the CPU int8 kernel's linear over the stored codes (W = CB * SCB / 127); None for nf4 / fp4.

    torch has no CPU kernel for bnb's 4-bit tables. The row scale is rounded to bf16, the kernel's dtype.
    ``overwrite`` changes nothing: the module keeps views of the stored codes.
    """
    if not host_fits(tensors, spec):
        return None
    return Int8Linear(tensors["CB"].contiguous(), tensors["SCB"].float() / 127)
