"""The hqq backend: hqq's own quantizer and bit packing, our storage.

One (out, in) matrix is stored as three tensors:
- ``W_q``: hqq's packed codes (uint8 for 2, 4, 8 bits; int32 holding ten 3-bit codes for 3 bits);
- ``scale``, ``zero``: fp16, shape (out, in / group_size), one pair per group of ``group_size`` weights of a row.

Groups run along a row (hqq's ``axis=1``, its current default and the layout its fast kernels want). We require
``group_size`` to divide the row length, stricter than hqq's "divides the element count": no group then mixes two
output channels, and the matrix shape is read off ``scale``'s shape, so rebuilding never reads a tensor's
values back to the host (a device sync on CUDA). fp16 scale and zero are what HQQLinear keeps at its default
compute dtype.

hqq is imported inside the functions: importing it costs several seconds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from offload.errors import QuantError
from offload.quant.device_kernels import CudaInt4Linear, cuda_int4_fits
from offload.quant.host_kernels import (
    Int4Linear,
    int4_fits,
    kernel_pairs,
    pack_int4_halves,
    packs_as_blocks,
)
from offload.quant.spec import HQQ_GROUP_SIZES
from offload.scratch import thread_scratch

if TYPE_CHECKING:
    from offload.quant.spec import QuantSpec

AXIS = 1  # groups along the input dimension (see the module docstring)
META_DTYPE = torch.float16  # scale and zero


def keys(spec: QuantSpec) -> tuple[str, ...]:
    """The tensor names ``quantize`` returns."""
    return ("W_q", "scale", "zero")


def _codes_per_row(bits: int) -> int:
    """How many groups' codes hqq packs into one stored row (3-bit: ten codes per int32)."""
    return {8: 1, 4: 2, 3: 10, 2: 4}[bits]


def _allowed_groups(spec: QuantSpec, shape: tuple[int, int]) -> list[int]:
    out_features, in_features = shape
    allowed = []
    for group_size in HQQ_GROUP_SIZES:
        groups = out_features * in_features // group_size
        if in_features % group_size == 0 and (spec.bits == 3 or groups % _codes_per_row(spec.bits) == 0):
            allowed.append(group_size)
    return allowed


def check(spec: QuantSpec, shape: tuple[int, ...], name: str) -> None:
    """Raise QuantError unless ``spec`` can store a matrix of ``shape``."""
    if len(shape) != 2:
        raise QuantError(f"{spec} quantizes 2-D weights; {name} has shape {tuple(shape)}")
    out_features, in_features = shape
    group_size = spec.group_size
    groups = out_features * in_features // group_size
    packed = _codes_per_row(spec.bits)
    # hqq packs 2- and 4-bit codes by splitting the (groups, group_size) code matrix into equal row blocks;
    # a remainder would be silently dropped, so refuse it here.
    if in_features % group_size or (spec.bits != 3 and groups % packed):
        why = (
            f"group size {group_size} must divide the row length {in_features}"
            if in_features % group_size
            else f"the {groups} groups must split into {packed} equal blocks for {spec.bits}-bit packing"
        )
        fits = ", ".join(f"hqq:{spec.bits}:{g}" for g in _allowed_groups(spec, (out_features, in_features)))
        raise QuantError(
            f"{spec} cannot quantize {name} of shape {tuple(shape)}: {why}; "
            + (f"use {fits}" if fits else "no hqq group size fits; use bnb or none")
        )


def nbytes(spec: QuantSpec, shape: tuple[int, int]) -> int:
    """Exact bytes ``quantize`` stores for a matrix of ``shape``."""
    check(spec, shape, "weight")
    out_features, in_features = shape
    groups = out_features * in_features // spec.group_size
    if spec.bits == 3:
        # Rows are zero-padded to a multiple of ten, then ten 3-bit codes share one int32.
        codes = math.ceil(groups / 10) * spec.group_size * 4
    else:
        codes = groups * spec.group_size * spec.bits // 8
    return codes + 2 * groups * META_DTYPE.itemsize


def quantize(weight: Tensor, spec: QuantSpec, name: str) -> dict[str, Tensor]:
    """Quantize one (out, in) matrix on the CPU with hqq's quantizer (its HQQLinear settings)."""
    from hqq.core.quantize import Quantizer

    check(spec, tuple(weight.shape), name)
    out_features, in_features = weight.shape
    codes, meta = Quantizer.quantize(
        weight.detach().to("cpu", torch.float32),
        nbits=spec.bits,
        channel_wise=True,
        group_size=spec.group_size,
        optimize=True,
        round_zero=spec.bits == 4,  # what hqq_base_quant_config picks
        axis=AXIS,
        bitpack=True,
        view_as_float=False,
        device="cpu",  # hqq defaults to cuda and asserts without one
    )
    groups_per_row = in_features // spec.group_size
    return {
        "W_q": codes.contiguous(),
        "scale": meta["scale"].to(META_DTYPE).reshape(out_features, groups_per_row).contiguous(),
        "zero": meta["zero"].to(META_DTYPE).reshape(out_features, groups_per_row).contiguous(),
    }


def _meta(tensors: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype) -> dict:
    """Rebuild hqq's meta dict from our tensors; scale and zero in ``dtype``, as hqq's (groups, 1) columns."""
    from hqq.core.quantize import Quantizer

    scale = tensors["scale"]
    out_features, groups_per_row = scale.shape
    packing = Quantizer.bit_to_packing[spec.bits]
    return {
        "nbits": spec.bits,
        "group_size": spec.group_size,
        "shape": torch.Size((out_features, groups_per_row * spec.group_size)),
        "scale": scale.reshape(-1, 1).to(dtype),
        "zero": tensors["zero"].reshape(-1, 1).to(dtype),
        "axis": AXIS,
        "packing": packing,
        "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
        "view_as_float": False,
        "quant_scale": False,
        "quant_zero": False,
        "compute_dtype": dtype,
    }


def dequantize(tensors: dict[str, Tensor], spec: QuantSpec) -> Tensor:
    """The fp32 (out, in) matrix, on the tensors' device: hqq's dequantizer's arithmetic, without importing hqq.

    Importing ``hqq.core.quantize`` costs 2.5 to 8 s (it builds torch.compile'd functions at import). A
    checkpoint whose experts have no CPU kernel (3-bit) dequantizes at each cache miss, so on a CPU the first
    miss, inside the first reply's prefill, paid that import: the TTFT of ``offload chat -k 4`` on a 3-bit demo
    was 2.4 s, against 0.06 s here. The unpacking mirrors ``hqq.core.bitpack`` (tested bit for bit against it).
    """
    scale = tensors["scale"]
    out_features, groups_per_row = scale.shape
    groups = out_features * groups_per_row
    codes = _unpack(tensors["W_q"], spec.bits, groups)  # (groups, group_size)
    # fp32 throughout, then one rounding by the caller: the same result whatever dtype the model runs in.
    zero = tensors["zero"].reshape(-1, 1).float()
    weight = (codes.float() - zero) * scale.reshape(-1, 1).float()
    return weight.reshape(out_features, groups_per_row * spec.group_size)


def _unpack(packed: Tensor, bits: int, groups: int) -> Tensor:
    """hqq's packed codes -> (groups, group_size) codes, as ``hqq.core.bitpack.BitPack.unpack_*``.

    hqq packs by row blocks: the codes of row block i sit in the i-th field of each word from the top (3-bit:
    ten fields of an int32 from bit 27 down, with the rows zero-padded to a multiple of ten).
    """
    if bits == 8:
        return packed
    fields = _codes_per_row(bits)
    top = 30 if bits == 3 else 8  # bits above the first field: 3-bit leaves two of an int32's unused
    mask = (1 << bits) - 1
    codes = torch.cat([(packed >> (top - bits * (field + 1))) & mask for field in range(fields)])
    return codes[:groups]


def kernel_linear(
    tensors: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """An HQQLinear on ``device`` that keeps the codes and dequantizes in ``dtype`` at each forward (the CUDA
    path where ``device_linear`` does not fit)."""
    from hqq.core.quantize import HQQLinear, hqq_base_quant_config

    layer = HQQLinear(
        None,
        hqq_base_quant_config(nbits=spec.bits, group_size=spec.group_size, axis=AXIS),
        compute_dtype=dtype,
        device=str(device),
        initialize=False,
    )
    # The unencoded state-dict path: load_state_dict stores meta as given, then moves it to the device.
    state = _meta(tensors, spec, dtype)
    state["W_q"] = tensors["W_q"].to(device)
    layer.load_state_dict(state)
    return layer


def device_linear(
    tensors: dict[str, Tensor], spec: QuantSpec, device: torch.device
) -> torch.nn.Module | None:
    """torch's CUDA int4 kernel's linear over the stored 4-bit codes (``device_kernels``), built on ``device``
    from the tensors there; None when the spec, the shape or the device does not fit it.

    The same arithmetic as ``host_linear``: the kernel computes ``(q - 8) * scale + offset`` with the offset
    ``(8 - zero) * scale``, rounded once to bf16 with the scale. The packed tensors take the stored bytes' size.
    """
    scale = tensors["scale"]
    out_features, groups_per_row = scale.shape
    in_features = groups_per_row * spec.group_size
    if spec.bits != 4 or not cuda_int4_fits(out_features, in_features, spec.group_size, device):
        return None
    codes = codes4(tensors["W_q"].to(device), out_features, in_features)
    offset = (8 - tensors["zero"].float()) * scale.float()
    return CudaInt4Linear.from_affine(codes, scale.to(device), offset.to(device), spec.group_size)


def codes4(packed: Tensor, out_features: int, in_features: int) -> Tensor:
    """hqq's packed 4-bit codes -> the (out, in) uint8 codes (``_unpack``'s, as one matrix)."""
    return _unpack(packed, 4, out_features * in_features // packed.shape[-1]).reshape(
        out_features, in_features
    )


def host_fits(tensors: dict[str, Tensor], spec: QuantSpec) -> bool:
    """Whether ``host_linear`` builds a module (rather than None) for these tensors."""
    out_features, groups_per_row = tensors["scale"].shape
    return spec.bits == 4 and int4_fits(out_features, groups_per_row * spec.group_size, spec.group_size)


def host_linear(
    tensors: dict[str, Tensor], spec: QuantSpec, *, overwrite: bool = False
) -> torch.nn.Module | None:
    """The CPU int4 kernel's linear over the stored 4-bit codes, or None when the spec or shape does not fit it.

    hqq dequantizes ``(q - zero) * scale``; the kernel computes ``(q - 8) * scale + offset``, so the offset is
    ``(8 - zero) * scale``, rounded once to bf16 with the scale (the kernel's dtype). Both group along a row
    (axis 1), which is the kernel's K: no regrouping. hqq's layout holds the first half of the code rows in the
    high nibbles and the second half in the low ones; ``pack_int4_halves`` repacks that straight into torch's.

    With ``overwrite`` (the stored tensors are views of a slot that the built module may take over), the
    module's tensors are written over the stored ones: the packed codes over ``W_q`` (the same bytes), the
    (scale, offset) pairs over ``scale`` and the ``zero`` after it. The stored bytes are first copied to the
    thread's scratch, since the outputs would otherwise overwrite codes not yet read. That spares a fresh
    output's page faults and the move into the slot (docs/BENCHMARKS.md, "Repacking for the int4 kernel").
    """
    if not host_fits(tensors, spec):
        return None
    scale, zero, codes = tensors["scale"], tensors["zero"], tensors["W_q"]
    out_features, groups_per_row = scale.shape
    in_features = groups_per_row * spec.group_size
    if overwrite and _overwritable(codes, scale, zero):
        meta = scale.numel() * scale.element_size()
        scratch = thread_scratch(codes.numel() + 2 * meta)
        halves = scratch[: codes.numel()].view(out_features // 2, in_features)
        halves.copy_(codes.view(out_features // 2, in_features))
        kept_scale = scratch[codes.numel() : codes.numel() + meta].view(scale.dtype).view(scale.shape)
        kept_zero = scratch[codes.numel() + meta :].view(zero.dtype).view(zero.shape)
        kept_scale.copy_(scale)
        kept_zero.copy_(zero)
        packed = pack_int4_halves(halves, out=codes.view(out_features, in_features // 2))
        pairs = _bytes_from(scale, 2 * meta).view(torch.bfloat16).view(groups_per_row, out_features, 2)
        return Int4Linear.from_zero_point(packed, kept_scale, kept_zero, spec.group_size, out=pairs)
    # hqq's (groups / 2, group) rows are the (N / 2, K) matrix of code pairs, rows n and n + N/2 in one byte.
    halves = codes.reshape(out_features // 2, in_features)
    return Int4Linear.from_zero_point(pack_int4_halves(halves), scale, zero, spec.group_size)


def host_form_fits(tensors: dict[str, Tensor], spec: QuantSpec) -> bool:
    """Whether ``to_host_form`` gives a host form (rather than None) for these tensors, from shapes alone."""
    return host_fits(tensors, spec) and packs_as_blocks(tensors["scale"].shape[0])


def to_host_form(
    tensors: dict[str, Tensor], spec: QuantSpec, out: dict[str, Tensor] | None = None
) -> dict[str, Tensor] | None:
    """The matrix in the CPU int4 kernel's layout (``offload.quant.host_form``): ``packed`` (N, K / 2) uint8 codes
    and ``pairs`` (K / group, N, 2) bf16 (scale, offset), the bytes ``host_linear`` builds, written into ``out``'s
    tensors if given; None unless the kernel fits and this CPU's packing is one ``unpack_int4`` reads back."""
    if not host_form_fits(tensors, spec):
        return None
    scale, zero, codes = tensors["scale"], tensors["zero"], tensors["W_q"]
    out_features, groups_per_row = scale.shape
    halves = codes.reshape(out_features // 2, groups_per_row * spec.group_size)
    if out is None:
        return {"packed": pack_int4_halves(halves), "pairs": kernel_pairs(scale, zero)}
    return {
        "packed": pack_int4_halves(halves, out=out["packed"]),
        "pairs": kernel_pairs(scale, zero, out=out["pairs"]),
    }


def _overwritable(codes: Tensor, scale: Tensor, zero: Tensor) -> bool:
    """Whether the built tensors fit over the stored ones: all contiguous uint8 / fp16 in one storage, the
    (scale, offset) pairs (twice ``scale``'s bytes) ending within ``zero``, which follows ``scale``, and clear
    of the codes."""
    meta = scale.numel() * scale.element_size()
    return (
        codes.dtype == torch.uint8
        and scale.dtype == zero.dtype == META_DTYPE
        and all(t.is_contiguous() and t.device.type == "cpu" for t in (codes, scale, zero))
        and scale.untyped_storage().data_ptr() == zero.untyped_storage().data_ptr()
        and scale.data_ptr() % 4 == 0
        and zero.data_ptr() >= scale.data_ptr() + meta
        and not scale.data_ptr() - codes.numel() < codes.data_ptr() < scale.data_ptr() + 2 * meta
    )


def _bytes_from(tensor: Tensor, nbytes: int) -> Tensor:
    """``nbytes`` of ``tensor``'s storage from its first byte, as uint8 (``tensor`` contiguous)."""
    return tensor.view(torch.uint8).reshape(-1).as_strided((nbytes,), (1,))
