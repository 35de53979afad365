"""The ``none`` backend: the matrix as it is, in the float type it came in (16-bit for the hub's checkpoints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from offload import f32_kernel
from offload.errors import QuantError
from offload.experts.source import one_token_layout

if TYPE_CHECKING:
    from offload.quant.spec import QuantSpec


def keys(spec: QuantSpec) -> tuple[str, ...]:
    """The tensor names ``quantize`` returns."""
    return ("weight",)


def check(spec: QuantSpec, shape: tuple[int, ...], name: str) -> None:
    """Raise QuantError unless the weight is a matrix."""
    if len(shape) != 2:
        raise QuantError(f"{spec} stores 2-D weights; {name} has shape {tuple(shape)}")


def nbytes(spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of a ``dtype`` matrix of ``shape``."""
    check(spec, shape, "weight")
    return shape[0] * shape[1] * dtype.itemsize


def quantize(weight: Tensor, spec: QuantSpec, name: str) -> dict[str, Tensor]:
    """Keep the weight's values and dtype, as a fresh contiguous CPU tensor.

    A copy, because a weight sliced out of a larger tensor would otherwise share its storage, which
    safetensors refuses to save.
    """
    check(spec, tuple(weight.shape), name)
    return {"weight": weight.detach().to("cpu").clone(memory_format=torch.contiguous_format)}


def dequantize(tensors: dict[str, Tensor], spec: QuantSpec) -> Tensor:
    """The stored matrix itself, not a copy."""
    return tensors["weight"]


def kernel_linear(
    tensors: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """A dense linear on ``device``: there are no codes to keep."""
    return DenseLinear(tensors["weight"].to(device=device, dtype=dtype))


def device_linear(tensors: dict[str, Tensor], spec: QuantSpec, device: torch.device) -> nn.Module | None:
    """None: ``kernel_linear``'s dense matmul is the device kernel."""
    return None


def host_fits(tensors: dict[str, Tensor], spec: QuantSpec) -> bool:
    """False: a float matrix has no codes for a CPU kernel to read."""
    return False


def host_linear(tensors: dict[str, Tensor], spec: QuantSpec, *, overwrite: bool = False) -> nn.Module | None:
    """None: a float matrix has no codes for a CPU kernel to read."""
    return None


class DenseLinear(nn.Module):
    """``nn.Linear`` without a bias, over a weight that is already in its final dtype and device (and in
    ``one_token_layout``: a decode step is one token)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", one_token_layout(weight))
        # Our one-token float32 kernel where it takes this weight (its shape, dtype and device do not change).
        self.one_token = f32_kernel.for_weight(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return f32_kernel.linear(x, self.weight, self.one_token)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return (
            f"in_features={in_features}, out_features={out_features}, bias=False, dtype={self.weight.dtype}"
        )
