"""One expert's tensors packed into one contiguous byte buffer, so moving an expert is one copy.

A codec turns an expert's w1, w2, w3 into a dict of named tensors (dense weights, or quantized
weights with their scales and zeros). ``ExpertLayout`` records where each tensor sits in the
buffer; ``unpack_expert`` gives zero-copy views back, from which a ``materialize`` function
builds a runnable ``Expert``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from offload.errors import CacheError
from offload.experts.source import DenseExpert, input_major_shape, prefers_input_major

# Every tensor starts on a 64-byte boundary: a uint8 view can then be reinterpreted as any dtype,
# and matmul kernels see the same alignment as a fresh allocation (so results stay bit-identical).
ALIGNMENT = 64


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class TensorSlice:
    """Where one named tensor lives inside an expert's buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer; a multiple of ALIGNMENT
    nbytes: int  # the tensor's own size, without padding
    input_major: bool = False  # an (out, in) matrix stored as its contiguous (in, out) transpose


@dataclass(frozen=True)
class ExpertLayout:
    """The byte layout shared by every expert of one layer."""

    slices: tuple[TensorSlice, ...]
    nbytes: int  # the whole buffer, padded to ALIGNMENT so buffers can sit back to back

    @classmethod
    def of(cls, tensors: dict[str, Tensor], *, input_major: bool | None = None) -> ExpertLayout:
        """The layout that packs ``tensors`` in their dict order, each aligned to ALIGNMENT bytes.

        With ``input_major``, every float matrix (a dense expert's) that ``input_major_shape`` holds
        input-major is stored transposed, so that its view is already in ``one_token_layout``: a slot or
        the host store then computes from its bytes without a copy. Pass whether the compute dtype
        ``prefers_input_major``; None decides by each tensor's own dtype (the experts compute as stored).
        """
        slices = []
        offset = 0
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            wanted = prefers_input_major(tensor.dtype) if input_major is None else input_major
            transposed = wanted and _is_input_major_matrix(tensor)
            slices.append(TensorSlice(name, tensor.dtype, tuple(tensor.shape), offset, nbytes, transposed))
            offset = _align(offset + nbytes)
        return cls(tuple(slices), max(offset, ALIGNMENT))

    def check(self, tensors: dict[str, Tensor]) -> None:
        """Raise CacheError unless ``tensors`` have exactly this layout's names, dtypes and shapes."""
        expected = {s.name: (s.dtype, s.shape) for s in self.slices}
        got = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        if got != expected:
            raise CacheError(
                f"expert tensors {_describe(got)} do not match the layer's layout {_describe(expected)}; "
                "every expert of a layer must be encoded with the same spec"
            )


def _describe(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> str:
    parts = (
        f"{name}: {str(dtype).removeprefix('torch.')}{list(shape)}"
        for name, (dtype, shape) in tensors.items()
    )
    return "{" + ", ".join(parts) + "}"


def _is_input_major_matrix(tensor: Tensor) -> bool:
    return tensor.is_floating_point() and tensor.dim() == 2 and input_major_shape(*tensor.shape)


def _view(buffer: Tensor, piece: TensorSlice) -> Tensor:
    raw = buffer[piece.offset : piece.offset + piece.nbytes]
    if piece.input_major:
        return raw.view(piece.dtype).view(piece.shape[::-1]).t()
    return raw.view(piece.dtype).view(piece.shape)


def pack_expert(tensors: dict[str, Tensor], layout: ExpertLayout, out: Tensor | None = None) -> Tensor:
    """Copy ``tensors`` into ``out`` (or a new buffer): a 1-D uint8 tensor of ``layout.nbytes``.

    ``out`` may be a slice of a larger buffer; its start must be ALIGNMENT-aligned.
    """
    layout.check(tensors)
    if out is None:
        out = torch.zeros(layout.nbytes, dtype=torch.uint8)
    assert out.dtype == torch.uint8 and out.shape == (layout.nbytes,), "out must match the layout"
    for piece in layout.slices:
        _view(out, piece).copy_(tensors[piece.name])
    return out


def unpack_expert(buffer: Tensor, layout: ExpertLayout) -> dict[str, Tensor]:
    """Zero-copy views of every tensor in ``buffer``, by name; writing to them writes the buffer."""
    assert buffer.dtype == torch.uint8 and buffer.shape == (layout.nbytes,), "buffer must match the layout"
    return {piece.name: _view(buffer, piece) for piece in layout.slices}


def materialize_dense(tensors: dict[str, Tensor]) -> DenseExpert:
    """The ``materialize`` for unquantized experts: a DenseExpert over the buffer's w1, w2, w3."""
    return DenseExpert(tensors["w1"], tensors["w2"], tensors["w3"])
