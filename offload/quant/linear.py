"""One quantized matrix: quantize it to plain tensors, count its bytes, rebuild it as a bias-free linear.

Used directly for the attention, gate and lm_head roles, and three times per expert by ``codec.py``.
Every backend module (hqq_backend, bnb_backend, dense) offers the same functions: ``keys``, ``check``,
``nbytes``, ``quantize``, ``dequantize`` (to fp32, or the stored dtype for ``none``), ``kernel_linear`` (CUDA, the
library's kernel), ``device_linear`` (torch's CUDA int4 kernel over the codes, or None) and ``host_linear`` (a CPU
kernel over the codes, or None).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor, nn

from offload.errors import QuantError
from offload.quant import bnb_backend, dense, hqq_backend
from offload.quant.dense import DenseLinear
from offload.quant.device_kernels import CudaInt4Linear
from offload.quant.host_kernels import Int4Linear
from offload.quant.spec import QuantSpec

_BACKENDS: dict[str, ModuleType] = {"hqq": hqq_backend, "bnb": bnb_backend, "none": dense}


def backend_for(spec: QuantSpec) -> ModuleType:
    """The module that stores matrices for ``spec.backend``."""
    return _BACKENDS[spec.backend]


def matrix_nbytes(spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> int:
    """Exact bytes that ``quantize_linear`` stores for an (out, in) matrix, without quantizing anything.

    ``dtype`` is the float type of the weights, which is what ``none`` stores; quantized backends ignore it.
    """
    if spec.backend == "none":
        return dense.nbytes(spec, shape, dtype)
    return backend_for(spec).nbytes(spec, shape)


def bits_per_weight(spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> float:
    """Stored bits per weight of an (out, in) matrix, metadata included, from the exact stored byte count.

    ``dtype`` is the float type a ``none`` matrix is kept in; the quantized backends ignore it.
    """
    out_features, in_features = shape
    return 8 * matrix_nbytes(spec, shape, dtype) / (out_features * in_features)


def quantize_linear(weight: Tensor, spec: QuantSpec, *, name: str = "weight") -> dict[str, Tensor]:
    """Quantize an (out, in) weight on the CPU with the backend's own quantizer.

    Returns contiguous CPU tensors holding the codes and all metadata (``{"weight": W}`` for ``none``);
    ``build_linear`` needs nothing else. ``name`` appears in the error when the spec does not fit.
    """
    if not weight.is_floating_point():
        raise QuantError(f"{spec} quantizes float weights; {name} is {weight.dtype}")
    return backend_for(spec).quantize(weight, spec, name)


def _checked(tensors: dict[str, Tensor], spec: QuantSpec, name: str) -> dict[str, Tensor]:
    wanted = backend_for(spec).keys(spec)
    missing = [key for key in wanted if key not in tensors]
    if missing:
        raise QuantError(
            f"{spec} needs tensors {', '.join(wanted)} for {name}; missing {', '.join(missing)} "
            f"(got {', '.join(sorted(tensors)) or 'none'})"
        )
    return {key: tensors[key] for key in wanted}


def dequantize_linear(
    tensors: dict[str, Tensor],
    spec: QuantSpec,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    name: str = "weight",
) -> Tensor:
    """The dense (out, in) weight in ``dtype`` on ``device``.

    Dequantized in fp32 and rounded once, so the result does not depend on where it is computed. For ``none``
    in the stored dtype and device it is the stored tensor itself, not a copy.
    """
    weight = backend_for(spec).dequantize(_checked(tensors, spec, name), spec)
    return weight.to(device=device, dtype=dtype)


def host_linear(
    tensors: dict[str, Tensor], spec: QuantSpec, *, name: str = "weight", overwrite: bool = False
) -> nn.Module | None:
    """A CPU module that computes from the stored codes (``offload.quant.host_kernels``), built once.

    None when no CPU kernel fits (``host_fits``): bnb's 4-bit tables, hqq at 2, 3 or 8 bits, an output width
    that is not a multiple of 16, a group of 16, or ``none``. With ``overwrite``, the stored tensors are views
    of a slot that the module may take over: a backend that can builds its tensors over them.
    """
    return backend_for(spec).host_linear(_checked(tensors, spec, name), spec, overwrite=overwrite)


def to_host_form(
    tensors: dict[str, Tensor], spec: QuantSpec, *, out: dict[str, Tensor] | None = None, name: str = "weight"
) -> dict[str, Tensor] | None:
    """The matrix in the CPU int4 kernel's layout (``offload.quant.host_form``), written into ``out`` if given;
    None where it has none (every spec but ``hqq:4:G`` where the kernel fits the shape)."""
    if not host_form_fits(tensors, spec, name=name):
        return None
    return hqq_backend.to_host_form(_checked(tensors, spec, name), spec, out)


def host_form_fits(tensors: dict[str, Tensor], spec: QuantSpec, *, name: str = "weight") -> bool:
    """Whether ``to_host_form`` gives a host form for these tensors (decided from shapes, reading no values)."""
    return spec.backend == "hqq" and hqq_backend.host_form_fits(_checked(tensors, spec, name), spec)


def host_fits(tensors: dict[str, Tensor], spec: QuantSpec, *, name: str = "weight") -> bool:
    """Whether ``host_linear`` builds a module for these tensors (decided from shapes, reading no values)."""
    return backend_for(spec).host_fits(_checked(tensors, spec, name), spec)


def device_linear(
    tensors: dict[str, Tensor], spec: QuantSpec, device: torch.device | str, *, name: str = "weight"
) -> nn.Module | None:
    """A CUDA module over the stored codes that torch's int4 kernel runs (``offload.quant.device_kernels``),
    built on ``device`` from the tensors there; None unless ``hqq:4:G`` (G 32 to 256) fits the kernel, the shape
    and the device (compute capability 8.0 or more, probed once)."""
    return backend_for(spec).device_linear(_checked(tensors, spec, name), spec, torch.device(device))


def build_linear(
    tensors: dict[str, Tensor],
    spec: QuantSpec,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    host_kernels: bool = True,
    device_kernels: bool = True,
) -> nn.Module:
    """A module whose forward(x) is ``F.linear(x, W)`` for the stored weight W.

    On CUDA the codes stay quantized: torch's int4 kernel runs them where ``device_linear`` fits (unless
    ``device_kernels=False``), else the library's kernel (hqq's HQQLinear, bitsandbytes' matmul).
    On a CPU, a spec with a CPU kernel (``hqq:4:G`` with G 32 to 128, ``bnb:int8``) keeps its codes, repacked once
    for that kernel, which computes in bf16 (``host_kernels=False`` turns this off). Any other weight is
    dequantized once to a dense ``dtype`` matrix: hqq's CPU forward dequantizes at every call (tens of ms per
    matrix), so a dense copy trades memory (``dtype``'s bits per weight) for speed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        module = device_linear(tensors, spec, device) if device_kernels else None
        if module is not None:
            return module
        return backend_for(spec).kernel_linear(_checked(tensors, spec, "weight"), spec, dtype, device)
    if host_kernels and device.type == "cpu":
        module = host_linear(tensors, spec)
        if module is not None:
            return module
    return DenseLinear(dequantize_linear(tensors, spec, dtype, device))


def stacked_linear(modules: Sequence[nn.Module]) -> tuple[nn.Module, list[nn.Module]] | None:
    """One module whose outputs are ``modules``' outputs side by side, and the modules rebuilt over its
    memory (so the weights are held once); None unless they are all dense in one dtype and device, all
    CPU int4 with one group size and whole packing blocks, or all CUDA int4 with one K and group size.

    A decode step then makes one matrix call where it made several (attention's q, k and v: three).
    """
    if all(isinstance(m, DenseLinear) for m in modules):
        weights = [m.weight for m in modules]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return None
        stacked = DenseLinear(torch.cat(weights))
        return stacked, [DenseLinear(part) for part in _row_blocks(stacked.weight, weights)]
    for kind in (Int4Linear, CudaInt4Linear):
        if all(isinstance(m, kind) for m in modules):
            fused = kind.stacked(modules)
            if fused is None:
                return None
            bounds = _bounds([m.out_features for m in modules])
            return fused, [fused.rows(start, end) for start, end in bounds]
    return None


def _bounds(heights: Sequence[int]) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(heights))
    return [(end - height, end) for end, height in zip(ends, heights, strict=True)]


def _row_blocks(stacked: Tensor, parts: Sequence[Tensor]) -> list[Tensor]:
    return [stacked[start:end] for start, end in _bounds([part.shape[0] for part in parts])]
