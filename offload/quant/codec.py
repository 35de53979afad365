"""How one expert is stored and run: three matrices (w1, w3: (F, D); w2: (D, F)) as one dict of plain tensors.

The dict holds the codes and every piece of metadata as tensors named ``w1.<key>``, ``w2.<key>``, ``w3.<key>``,
so it can be packed into one contiguous byte buffer, moved, viewed back and saved to safetensors, and
``materialize`` rebuilds the expert from that alone. Shapes are read from tensor shapes, never tensor values.

Shapes: T tokens, D hidden, F expert width.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offload.errors import QuantError
from offload.experts.source import DenseExpert, Expert, SlotTensors
from offload.quant import host_form
from offload.quant.device_kernels import CudaInt4Linear
from offload.quant.host_kernels import Int4Linear
from offload.quant.linear import (
    build_linear,
    dequantize_linear,
    device_linear,
    host_fits,
    host_form_fits,
    host_linear,
    matrix_nbytes,
    quantize_linear,
    to_host_form,
)
from offload.quant.spec import QuantSpec

MATRICES = ("w1", "w2", "w3")  # gate projection, down projection, up projection (the hub's names)


class ExpertCodec(Protocol):
    """Encodes an expert's float weights to tensors, and rebuilds a runnable expert from them."""

    spec: QuantSpec

    def encode(self, w1: Tensor, w2: Tensor, w3: Tensor) -> dict[str, Tensor]:
        """Float weights in the hub's layout -> contiguous CPU tensors named ``w1.<key>``, ..."""
        ...

    def materialize(self, tensors: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> Expert:
        """The tensors ``encode`` made, or their ``host_form`` (or views of either) -> a deterministic (T, D) ->
        (T, D) callable."""
        ...

    def host_form(
        self, tensors: dict[str, Tensor], out: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor] | None:
        """The tensors in the layout the host computes from, into ``out`` if given; None where there is none."""
        ...


class QuantizedExpert:
    """A SwiGLU expert over three linear modules that keep their codes quantized (CUDA, or a CPU kernel)."""

    def __init__(self, w1: nn.Module, w2: nn.Module, w3: nn.Module) -> None:
        self.w1, self.w2, self.w3 = w1, w2, w3

    def __call__(self, x: Tensor) -> Tensor:
        # forward(), not __call__: no hooks go on an expert's matrices, and __call__ costs microseconds.
        return self.w2.forward(F.silu(self.w1.forward(x)) * self.w3.forward(x))

    def fused(self) -> QuantizedExpert:
        """This expert with w1 and w3 in one int4 module (CPU or CUDA) where that gives the same bits (else
        itself).

        One kernel call instead of two, and one rounding of the input to bf16: two 448 x 256 int4 matrices
        54 -> 33 us at one token, out of cache. Resident experts take it once at load (``ResidentExperts``).
        """
        for kind in (Int4Linear, CudaInt4Linear):
            if isinstance(self.w1, kind) and isinstance(self.w3, kind):
                w13 = kind.stacked([self.w1, self.w3])
                if w13 is not None:
                    return FusedInt4Expert(w13, self.w2, self.w1.out_features)
        return self


Int4Module = Int4Linear | CudaInt4Linear


class FusedInt4Expert(QuantizedExpert):
    """A QuantizedExpert whose w1 and w3 are the two halves of one int4 module, ``w13``."""

    def __init__(self, w13: Int4Module, w2: nn.Module, width: int) -> None:  # not the parent's: no w1, w3
        self.w13, self.w2, self.width = w13, w2, width

    @property
    def w1(self) -> Int4Module:
        return self.w13.rows(0, self.width)

    @property
    def w3(self) -> Int4Module:
        return self.w13.rows(self.width, 2 * self.width)

    def __call__(self, x: Tensor) -> Tensor:
        both = self.w13.forward(x)
        # As in FusedDenseExpert: silu gets the (T, F) block the unfused expert gives it.
        gate, up = both.chunk(2, dim=-1)  # one op for both halves
        return self.w2.forward(F.silu(gate.contiguous()) * up)

    def fused(self) -> QuantizedExpert:
        return self


class MatrixCodec:
    """The ExpertCodec for every backend: each of w1, w2, w3 quantized on its own by ``linear.py``.

    ``host_kernels=False`` makes a CPU expert dense even where a CPU kernel fits (the reference it is tested on).
    """

    def __init__(self, spec: QuantSpec, *, host_kernels: bool = True) -> None:
        self.spec = spec
        self.host_kernels = host_kernels

    def __repr__(self) -> str:
        return f"MatrixCodec({self.spec})"

    def encode(self, w1: Tensor, w2: Tensor, w3: Tensor, *, where: str = "expert") -> dict[str, Tensor]:
        """Quantize w1, w3 (F, D) and w2 (D, F) on the CPU with the backend's quantizer.

        ``where`` names the expert (e.g. ``layers.3.experts.5``) in errors.
        """
        ffn, hidden = w1.shape if w1.dim() == 2 else (-1, -1)
        if tuple(w3.shape) != (ffn, hidden) or tuple(w2.shape) != (hidden, ffn):
            raise QuantError(
                f"{where}: expected w1 and w3 of shape (F, D) and w2 of shape (D, F), got "
                f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, w3 {tuple(w3.shape)}"
            )
        tensors = {}
        for name, weight in zip(MATRICES, (w1, w2, w3), strict=True):
            for key, tensor in quantize_linear(weight, self.spec, name=f"{where}.{name}").items():
                tensors[f"{name}.{key}"] = tensor
        return tensors

    def host_form(
        self, tensors: dict[str, Tensor], out: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor] | None:
        """The expert's stored tensors in the host form (``offload.quant.host_form``), written into ``out``'s
        tensors if given (the views of a store's buffer, as laid out from an earlier result); None where some
        matrix has no host form, or ``host_kernels`` is off. Decided from shapes, so every expert of a layer
        gets the same answer."""
        if not self.host_kernels:
            return None
        parts = [_matrix(tensors, name) for name in MATRICES]
        if not all(
            host_form_fits(part, self.spec, name=name) for name, part in zip(MATRICES, parts, strict=True)
        ):
            return None  # before anything is written into ``out``
        forms = {}
        for name, part in zip(MATRICES, parts, strict=True):
            target = None if out is None else _matrix(out, name)
            form = to_host_form(part, self.spec, out=target, name=name)
            assert form is not None, "host_form_fits said it would"
            forms.update({f"{name}.{key}": tensor for key, tensor in form.items()})
        return forms

    def materialize(
        self, tensors: dict[str, Tensor], dtype: torch.dtype, device: torch.device | str
    ) -> Expert:
        """Rebuild the expert on ``device``, computing in ``dtype``.

        Tensors in the host form (``host_form``) run the CPU kernel on their own views on a CPU, and are repacked
        for torch's int4 kernel on a GPU (dequantized to dense where it does not run).

        On CUDA the matrices stay quantized: torch's int4 kernel runs them where all three fit it
        (``linear.device_linear``), else the library's kernels; one kind per expert, so that an in-place build
        (``offload.experts.in_place``) moves every tensor or none. On a CPU, a spec with a CPU kernel
        (``hqq:4:G``, ``bnb:int8``; ``linear.host_linear``) keeps its codes, repacked here once per
        materialization (so once per load into a slot, never per call). Otherwise the matrices are dequantized
        once into a DenseExpert, so that a cached expert costs a dense matmul rather than a dequantization per
        call (hqq's CPU forward dequantizes at every call, ~16-20 ms per expert). With ``none`` in the stored
        dtype the DenseExpert's weights are the given tensors themselves, not copies.
        """
        device = torch.device(device)
        parts = [_matrix(tensors, name) for name in MATRICES]
        if all(host_form.is_host_form(part) for part in parts):
            return _from_host_form(parts, dtype, device)
        if device.type == "cuda" and self.spec.backend != "none":
            kernels = [
                device_linear(part, self.spec, device, name=name)
                for name, part in zip(MATRICES, parts, strict=True)
            ]
            if any(kernel is None for kernel in kernels):
                kernels = [
                    build_linear(part, self.spec, dtype, device, device_kernels=False) for part in parts
                ]
            return QuantizedExpert(*kernels)
        if device.type == "cpu" and self.host_kernels:
            # Building over a slot's stored bytes only once every matrix is sure to build: the dense fallback
            # below reads them.
            overwrite = isinstance(tensors, SlotTensors) and all(
                host_fits(part, self.spec, name=name) for name, part in zip(MATRICES, parts, strict=True)
            )
            kernels = [
                host_linear(part, self.spec, name=name, overwrite=overwrite)
                for name, part in zip(MATRICES, parts, strict=True)
            ]
            if all(kernel is not None for kernel in kernels):
                return QuantizedExpert(*kernels)
        return DenseExpert(
            *(
                dequantize_linear(part, self.spec, dtype, device, name=name)
                for name, part in zip(MATRICES, parts, strict=True)
            )
        )


def _from_host_form(parts: list[dict[str, Tensor]], dtype: torch.dtype, device: torch.device) -> Expert:
    """An expert over host-form matrices: the CPU kernel on their views; on a GPU its kernel, repacked there;
    else (a GPU without that kernel) dense ``dtype`` matrices."""
    if device.type == "cpu":
        return QuantizedExpert(*(host_form.host_linear(part) for part in parts))
    if device.type == "cuda":
        kernels = [host_form.device_linear(part, device) for part in parts]
        if all(kernel is not None for kernel in kernels):
            return QuantizedExpert(*kernels)
    return DenseExpert(*(host_form.dequantize(part).to(device=device, dtype=dtype) for part in parts))


def _matrix(tensors: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The tensors of one matrix, with the ``name.`` prefix stripped."""
    prefix = f"{name}."
    return {key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}


def codec_for(spec: QuantSpec, *, host_kernels: bool = True) -> ExpertCodec:
    """The codec that stores experts as ``spec`` says; ``host_kernels`` as in ``MatrixCodec``."""
    return MatrixCodec(spec, host_kernels=host_kernels)


def expert_nbytes(spec: QuantSpec, hidden: int, ffn: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Exact bytes of one encoded expert (all tensors of ``encode``), by arithmetic, without any weights.

    ``dtype`` is the float type of the checkpoint, which is what ``none`` stores; quantized backends ignore it.
    """
    up = matrix_nbytes(spec, (ffn, hidden), dtype)  # w1 and w3
    return 2 * up + matrix_nbytes(spec, (hidden, ffn), dtype)
