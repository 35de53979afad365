"""A host tier's slots in the host form: each read converted in its slot, on the reader's thread, as it lands.

The host store keeps 4-bit experts in the CPU int4 kernel's layout from load (``HostStore``'s ``host_forms``). A
host tier reads hqq's layout from the checkpoint, so where the host computes from the tier (a CPU device, or
hybrid host jobs beside a GPU), each read is converted in its slot once, after its bytes land and on the thread
that read them, overlapping the caller's compute. Every consumer (a host job, a CPU slot's copy, a GPU's copy)
then finds the host form, and none builds per call. The conversion must not write over bytes it has not read
yet, so the stored bytes are first copied to the thread's scratch: one expert's bytes per reading thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from offload.experts.packing import ExpertLayout, unpack_expert
from offload.experts.store import HostForm
from offload.scratch import thread_scratch


@dataclass(frozen=True)
class TierForm:
    """How one layer's read experts become the host form: ``stored`` is what lands, ``layout`` what is kept."""

    stored: ExpertLayout
    layout: ExpertLayout
    host_form: HostForm

    @classmethod
    def of(cls, stored: ExpertLayout, host_form: HostForm) -> TierForm | None:
        """The conversion of ``stored`` experts, or None where ``host_form`` keeps them as stored. The host form's
        layout is taken from one expert of zeros: shapes decide it, not values."""
        zeros = {piece.name: torch.zeros(piece.shape, dtype=piece.dtype) for piece in stored.slices}
        converted = host_form(zeros)
        if converted is None:
            return None
        layout = ExpertLayout.of(converted)
        assert layout.nbytes <= stored.nbytes, "the host form takes the stored bytes, no more"
        return cls(stored, layout, host_form)

    @classmethod
    def per_layer(
        cls, layouts: Sequence[ExpertLayout], host_forms: Sequence[HostForm | None] | None
    ) -> list[TierForm | None]:
        """``of`` for each layer (None where a layer has no host form, or ``host_forms`` is None)."""
        if host_forms is None:
            return [None] * len(layouts)
        # Layers of one stored layout share one answer: the layout's names and shapes fix the spec.
        known: dict[ExpertLayout, TierForm | None] = {}
        forms = []
        for layout, host_form in zip(layouts, host_forms, strict=True):
            if host_form is None:
                forms.append(None)
                continue
            if layout not in known:
                known[layout] = cls.of(layout, host_form)
            forms.append(known[layout])
        return forms

    def convert(self, slot: Tensor) -> None:
        """Rewrite the stored bytes at the start of ``slot`` (1-D uint8) as the host form, in place."""
        scratch = thread_scratch(self.stored.nbytes)
        scratch.copy_(slot[: self.stored.nbytes])
        self.host_form(
            unpack_expert(scratch, self.stored), out=unpack_expert(slot[: self.layout.nbytes], self.layout)
        )
