"""Building an expert's runnable form inside the slot that holds its stored bytes (a host-tier slot, or a device
cache slot: ``ExpertCache``).

On a CPU, a 4-bit expert runs torch's int4 kernel, whose layout differs from the stored one: building it
(``codec.materialize``) repacks every matrix, about 40 ms for one 14336 x 4096 matrix at one thread (docs/
BENCHMARKS.md, "Repacking for the int4 kernel"), against 7 ms for the matmul. Building at every call would cost
that per expert per token; keeping the built tensors beside the stored ones would halve what the budget holds. The built tensors of a 4-bit expert take the same
bytes as its stored ones (the codes stay 4-bit, the scales and offsets 16-bit), so once built they are copied
over the stored bytes in the slot itself, and the expert computes on views of the slot: hits cost only the
matmul, and the slot still holds one expert's bytes. On CUDA, torch's int4 kernel's layout
(``offload.quant.device_kernels``) has the same property: the packed codes take the stored codes' bytes.

``materialize`` gets the stored tensors as ``SlotTensors``: a codec that can builds each matrix straight over
its own stored bytes (the CPU int4 build, ``hqq_backend.host_linear``), sparing fresh outputs' page faults and
the move, about a third of the build; what it built elsewhere (CUDA, int8) is moved here as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

from offload.experts.packing import ALIGNMENT, ExpertLayout, unpack_expert
from offload.experts.source import Expert, SlotTensors
from offload.memory_release import release_freed_memory

Materialize = Callable[[dict[str, Tensor]], Expert]


def build_in_place(buffer: Tensor, layout: ExpertLayout, materialize: Materialize) -> Expert | None:
    """The expert built from ``buffer``'s stored tensors, its tensors moved into ``buffer`` itself.

    Returns the expert when it runs on views of ``buffer`` alone (as built, for an expert that computes from the
    stored tensors, or once moved); None when its built tensors do not fit the buffer (a spec dequantized to a
    dense float matrix): such an expert must be built for each use instead. An expert that keeps some views of
    the stored bytes has them copied out first. The stored bytes are overwritten, so ``buffer`` may then serve
    only this expert.
    """
    expert, in_place = build_into(buffer, layout, materialize)
    return expert if in_place else None


def build_into(buffer: Tensor, layout: ExpertLayout, materialize: Materialize) -> tuple[Expert, bool]:
    """The expert built from ``buffer``'s stored tensors and whether it runs on views of ``buffer`` alone
    (``build_in_place``'s expert, True); else, its built tensors not fitting, the expert as built, beside the
    untouched stored bytes (False)."""
    # The codec may build straight over the stored bytes (an int4 expert on a CPU): then nothing is moved.
    expert = materialize(SlotTensors(unpack_expert(buffer, layout)))
    try:
        moved = _moved_into(buffer, expert)
    finally:
        if buffer.device.type == "cpu":
            # A Mixtral expert built elsewhere and moved (or dequantized) frees ~0.3 GB of temporaries on the
            # reader's thread, whose glibc arena would keep them: the tier's RSS would grow past its budget by
            # that much per reading thread. One built over its stored bytes frees a few MB; the trim is then
            # about free. (Device memory goes back to torch's caching allocator, not to glibc.)
            release_freed_memory()
    return (expert, False) if moved is None else (moved, True)


def _moved_into(buffer: Tensor, expert: Expert) -> Expert | None:
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()

    def inside(tensor: Tensor) -> bool:
        return start <= tensor.data_ptr() < end

    held = list(_held_tensors(expert))
    outside = [(owner, name, tensor) for owner, name, tensor in held if not inside(tensor)]
    if not outside:
        return expert  # it computes from the stored tensors as they are
    if not all(_dense_in_memory(tensor) for _, _, tensor in outside):
        return None
    if _packed_size(tensor for _, _, tensor in held) > buffer.numel():
        return None  # checked before anything is detached: the expert stays as built
    if len(outside) != len(held):
        # Some views of the stored bytes stay (a float expert's wide w2 beside its re-laid-out w1, w3): copy them
        # out first, since the moved tensors overwrite the stored bytes under them.
        outside = [
            (owner, name, tensor if not inside(tensor) else _detached(owner, name, tensor))
            for owner, name, tensor in held
        ]
    offsets, offset = [], 0
    for _, _, tensor in outside:
        offsets.append(offset)
        offset = _packed_size([tensor], offset)
    for (owner, name, tensor), at in zip(outside, offsets, strict=True):
        raw = buffer[at : at + tensor.numel() * tensor.element_size()].view(tensor.dtype)
        # An input-major matrix (``one_token_layout``) keeps its layout: the summation order depends on it.
        view = raw.view(tensor.shape) if tensor.is_contiguous() else raw.view(tensor.shape[::-1]).t()
        view.copy_(tensor)  # the stored bytes under it were read by materialize and are no longer needed
        setattr(
            owner, name, nn.Parameter(view, requires_grad=False) if isinstance(tensor, nn.Parameter) else view
        )
    return expert


def _packed_size(tensors: Iterable[Tensor], offset: int = 0) -> int:
    """Where ``tensors`` end, moved one after another from ``offset``, each to an ALIGNMENT boundary."""
    for tensor in tensors:
        offset = -(-(offset + tensor.numel() * tensor.element_size()) // ALIGNMENT) * ALIGNMENT
    return offset


def _detached(owner: object, name: str, tensor: Tensor) -> Tensor:
    copy = tensor.clone()
    setattr(
        owner, name, nn.Parameter(copy, requires_grad=False) if isinstance(tensor, nn.Parameter) else copy
    )
    return copy


def _dense_in_memory(tensor: Tensor) -> bool:
    """Contiguous, or the transpose of a contiguous matrix (an input-major one)."""
    return tensor.is_contiguous() or (tensor.dim() == 2 and tensor.t().is_contiguous())


def _held_tensors(expert: object):
    """(owner, attribute, tensor) for every tensor the expert holds: its own, and its modules' buffers and
    parameters."""
    for attribute, value in vars(expert).items():
        if isinstance(value, Tensor):
            yield expert, attribute, value
        elif isinstance(value, nn.Module):
            for module in value.modules():
                for name, tensor in module.named_buffers(recurse=False):
                    yield module, name, tensor
                for name, tensor in module.named_parameters(recurse=False):
                    yield module, name, tensor
