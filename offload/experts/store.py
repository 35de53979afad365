"""The host store: every expert of the model, each one contiguous byte buffer, so a move is one copy.

Experts are packed one by one while the checkpoint loads (``put``), into one preallocated buffer
per layer, so RAM never holds a second copy of the model. Every expert of a layer shares that
layer's layout; layers may differ (mixed-bit experts). On CUDA the buffers are pinned, which
lets the link copy asynchronously.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor

from offload.errors import CacheError
from offload.experts.packing import ExpertLayout, pack_expert, unpack_expert

# An expert's stored tensors -> the form the store keeps instead (into ``out``'s tensors if given), or None to
# keep them as stored: a codec's ``host_form``.
HostForm = Callable[..., dict[str, Tensor] | None]


class HostStore:
    """``num_experts`` packed experts for each of ``num_layers`` layers, in host memory."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        device: torch.device | str = "cpu",
        *,
        input_major: bool | None = None,
        host_forms: Sequence[HostForm | None] | None = None,
    ) -> None:
        """``device`` is where the experts will be copied to; a CUDA device makes the store pinned.
        ``input_major`` stores dense experts' tall matrices transposed (``ExpertLayout.of``): pass
        ``prefers_input_major(compute dtype)``, so that they compute without a copy; None decides by the
        stored dtype. ``host_forms[layer]``, where given, turns that layer's experts into the layout the host
        computes from as they are put (``offload.quant.host_form``): the store then holds that form only.
        """
        if num_layers < 1 or num_experts < 1:
            raise CacheError(
                f"a store needs one layer and one expert or more, got {num_layers} and {num_experts}"
            )
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.pinned = torch.device(device).type == "cuda"
        self.input_major = input_major
        self._layouts: list[ExpertLayout | None] = [None] * num_layers
        self._host_forms = list(host_forms) if host_forms is not None else [None] * num_layers
        if len(self._host_forms) != num_layers:
            raise CacheError(f"got {len(self._host_forms)} host forms for {num_layers} layers")
        self._stored_layouts: list[ExpertLayout | None] = [None] * num_layers  # as put, before any host form
        self._buffers: list[Tensor | None] = [None] * num_layers  # (num_experts * layout.nbytes,) uint8
        self._present = [[False] * num_experts for _ in range(num_layers)]

    def put(self, layer: int, expert: int, tensors: dict[str, Tensor]) -> None:
        """Pack one expert's encoded tensors into its place; the caller may free ``tensors`` afterwards.

        The first expert put into a layer fixes that layer's layout and allocates its buffer.
        """
        self._check_index(layer, expert)
        layout = self._layouts[layer]
        host_form = self._host_forms[layer]
        converted = None
        if layout is None:
            self._stored_layouts[layer] = ExpertLayout.of(tensors)
            converted = None if host_form is None else host_form(tensors)
            if converted is None:
                self._host_forms[layer] = host_form = None  # the layer keeps its stored form
            else:
                tensors = converted  # this expert's bytes in that form: packed below, like any other
            layout = ExpertLayout.of(tensors, input_major=self.input_major)
            nbytes = self.num_experts * layout.nbytes
            try:
                self._buffers[layer] = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                raise CacheError(
                    f"out of host memory for layer {layer}'s experts ({nbytes / 2**20:.1f} MiB"
                    f"{', pinned' if self.pinned else ''}); use lower-bit experts (a profile or --experts "
                    "with fewer bits) or close other programs"
                ) from None
            self._layouts[layer] = layout
        try:
            if host_form is not None and converted is None:
                # Written straight into the buffer, once the stored tensors are known to have the layer's shapes.
                self._stored_layouts[layer].check(tensors)  # type: ignore[union-attr]  (set with the layout)
                host_form(tensors, out=unpack_expert(self._slice(layer, expert), layout))
            else:
                pack_expert(tensors, layout, out=self._slice(layer, expert))
        except CacheError as error:
            raise CacheError(f"layer {layer} expert {expert}: {error}") from None
        self._present[layer][expert] = True

    def layout(self, layer: int) -> ExpertLayout:
        """The layout every expert of ``layer`` is packed with."""
        self._check_index(layer, 0)
        layout = self._layouts[layer]
        if layout is None:
            raise CacheError(f"layer {layer} has no experts in the host store yet")
        return layout

    def buffer(self, layer: int, expert: int) -> Tensor:
        """The expert's packed bytes (a 1-D uint8 view into the layer's buffer): the source of a copy."""
        self._check_index(layer, expert)
        if not self._present[layer][expert]:
            raise CacheError(f"layer {layer} expert {expert} was never put into the host store")
        return self._slice(layer, expert)

    def tensors(self, layer: int, expert: int) -> dict[str, Tensor]:
        """Zero-copy views of the expert's encoded tensors in host memory."""
        return unpack_expert(self.buffer(layer, expert), self.layout(layer))

    def check_complete(self) -> None:
        """Raise CacheError naming the first expert that was never put."""
        for layer, present in enumerate(self._present):
            for expert, is_present in enumerate(present):
                if not is_present:
                    raise CacheError(f"layer {layer} expert {expert} was never put into the host store")

    @property
    def nbytes(self) -> int:
        """Host bytes held by the store's buffers."""
        return sum(buffer.numel() for buffer in self._buffers if buffer is not None)

    def in_host_form(self, layer: int) -> bool:
        """Whether ``layer``'s experts are held in the form the host computes from (``host_forms``)."""
        return self._host_forms[layer] is not None and self._layouts[layer] is not None

    def describe(self) -> str:
        converted = sum(self.in_host_form(layer) for layer in range(self.num_layers))
        form = (
            "" if converted == 0 else f" ({converted} of {self.num_layers} layers in the CPU kernel's layout)"
        )
        return f"{self.nbytes / 2**20:.1f} MiB in host RAM{form}"

    # The host tier's interface (``offload.experts.host_tier.HostTier``): a store holds every expert, so a
    # demand is always a hit, nothing is read, and nothing it holds can be evicted.
    stats = None

    def fetch(self, layer: int, expert: int) -> None:
        pass

    def prefetch(self, layer: int, expert: int) -> bool:
        return True

    def is_ready(self, layer: int, expert: int) -> bool:
        return True

    def buffer_on_arrival(self, layer: int, expert: int) -> tuple[Tensor, None]:
        return self.buffer(layer, expert), None  # in memory already: nothing to wait for

    def tensors_on_arrival(self, layer: int, expert: int) -> tuple[dict[str, Tensor], None]:
        return self.tensors(layer, expert), None

    def release(self, layer: int | None = None) -> None:
        pass

    def hold(self, layer: int, expert: int, done: Callable[[], bool], wait: Callable[[], None]) -> None:
        pass

    def note_step(self, layer: int, used: Collection[int]) -> None:
        pass

    def reset_stats(self) -> None:
        pass

    def _slice(self, layer: int, expert: int) -> Tensor:
        nbytes = self.layout(layer).nbytes
        buffer = self._buffers[layer]
        assert buffer is not None
        return buffer[expert * nbytes : (expert + 1) * nbytes]

    def _check_index(self, layer: int, expert: int) -> None:
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise CacheError(
                f"no expert ({layer}, {expert}) in a store of {self.num_layers} layers x {self.num_experts} experts"
            )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator running out of memory: CUDA's, the CPU's, or Python's."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
