"""A layer's resident float32 experts in one block, so that a token's two experts compute in one call a matrix.

A decode step on a CPU reads each expert's weights once, through MKL's one-row kernel, which streams a small
matrix well below memory speed and pays a fixed cost a call. Held side by side in one (E, ...) tensor, the two
experts a token routes to are a strided view of it (expert ``b`` sits ``b - a`` strides after expert ``a``), and one
batched product per matrix computes both: the float32 demo's decode step 1.06x faster (paired runs, one
thread). At the demo's and Mixtral's shapes MKL's batched kernel computes each item as its one-matrix kernel
does, so the outputs keep every bit, but not at every shape: ``ExpertStack.check`` tries every pair once at load
against the unfused experts and leaves a layer unpaired where any bit differs.

Shapes: E experts, D hidden, F expert width.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from offload.experts.offloaded import computed
from offload.experts.source import (
    DenseExpert,
    Expert,
    FusedDenseExpert,
    Inputs,
    fuse,
    one_token_layout,
    prefers_input_major,
    same_bits,
)
from offload.huge_pages import huge_page_empty


class ExpertStack:
    """Builds a layer's experts into two stacked tensors as they load (``add``), checks that pairs keep their
    bits (``check``), then computes a one-token step's pair (``experts_for``).

    ``w13`` holds each expert's fused w1 and w3 input-major, as (E, D, 2F); ``w2`` each down projection in its
    one-token layout, (E, D, F) row-major (or (E, F, D) when it is input-major). Experts that are not dense
    float32 on a CPU, or that differ in shape from the first, are fused on their own and turn pairing off.
    """

    def __init__(self, experts: int) -> None:
        self.experts = experts
        self.w13: Tensor | None = None
        self.w2: Tensor | None = None
        self.w2_input_major = False
        self.usable = True
        self.members: dict[int, FusedDenseExpert] = {}
        # (a, b) -> the w13 and w2 of both, as bmm takes them; built by check()
        self.pairs: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.probe: Tensor | None = None  # one row every expert's output is checked on
        self.wanted: dict[int, Tensor] = {}  # the unfused expert's output on the probe

    def add(self, index: int, expert: Expert) -> Expert:
        """``expert`` in the form it computes in from now on: its weights copied into the stack where they fit
        and give the unfused expert's bits (else the expert fused on its own, where that keeps them)."""
        if not (self.usable and self._fits(expert)):
            self.usable = False
            return fuse(expert)
        assert isinstance(expert, DenseExpert)
        width, hidden = expert.w1.shape
        w2 = one_token_layout(expert.w2)  # already so: DenseExpert holds it that way
        if self.w13 is None:
            self.w13 = _stacked(self.experts, (hidden, 2 * width), expert.w1.dtype)
            self.w2_input_major = w2.stride(0) == 1
            down = w2.t() if self.w2_input_major else w2
            self.w2 = _stacked(self.experts, (down.shape[0], down.shape[1]), w2.dtype)
            self.probe = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)).to(
                expert.w1.dtype
            )
        assert self.w2 is not None and self.probe is not None
        w2_slot = self.w2[index].t() if self.w2_input_major else self.w2[index]
        w2_slot.copy_(w2)
        member = FusedDenseExpert(expert.w1, w2_slot, expert.w3, into=self.w13[index])
        if not same_bits(member, expert):
            self.usable = False
            return expert
        self.members[index] = member
        self.wanted[index] = expert(self.probe)
        return member

    def _fits(self, expert: Expert) -> bool:
        if not isinstance(expert, DenseExpert) or isinstance(expert, FusedDenseExpert):
            return False
        w1, w2, w3 = expert.w1, expert.w2, expert.w3
        if w1.device.type != "cpu" or not prefers_input_major(w1.dtype) or w1.shape != w3.shape:
            return False
        if self.w13 is None:
            return True
        return (
            w1.dtype == self.w13.dtype
            and tuple(self.w13.shape[1:]) == (w1.shape[1], 2 * w1.shape[0])
            and w2.shape == (w1.shape[1], w1.shape[0])
        )

    def check(self) -> ExpertStack | None:
        """This stack, once every expert is in it and every pair computes the bits of its two experts alone;
        else None. MKL's batched kernel offers no such promise, and it does not hold at every shape (hidden 36,
        width 37, say), so every pair is tried once, at load."""
        if not self.usable or len(self.members) != self.experts or self.experts < 2 or self.probe is None:
            return None
        if any(member.k13 is not None for member in self.members.values()):
            return None  # our float32 kernel computes each expert at the memory's speed; bmm's bits differ
        assert self.w13 is not None and self.w2 is not None
        for a in range(self.experts):
            for b in range(a + 1, self.experts):
                w2 = _two(self.w2, a, b)  # (2, D, F) row-major or (2, F, D) input-major
                self.pairs[a, b] = _two(self.w13, a, b), w2 if self.w2_input_major else w2.transpose(1, 2)
        for a in range(self.experts):
            for b in range(a + 1, self.experts):
                both = self.pair(a, b, self.probe)
                if not (torch.equal(both[0], self.wanted[a]) and torch.equal(both[1], self.wanted[b])):
                    return None
        return self

    def pair(self, a: int, b: int, x: Tensor) -> Tensor:
        """Experts ``a`` < ``b`` on the one row ``x`` (1, D) -> (2, 1, D): what each computes alone."""
        w13, w2 = self.pairs[a, b]
        both = torch.bmm(x.expand(2, 1, x.shape[1]), w13)  # (2, 1, 2F)
        width = w13.shape[2] // 2
        gate = both.narrow(2, 0, width)
        # In place: the same elementwise kernels, each row (F values) vectorised as one unfused row is.
        F.silu(gate, inplace=True).mul_(both.narrow(2, width, width))
        return torch.bmm(gate, w2)

    def experts_for(self, needed: list[int], inputs: Inputs | None) -> Iterator[tuple[int, Expert]] | None:
        """Both of a one-token step's experts, computed together, when the step asks for two on one row;
        else None (the caller computes them one by one)."""
        if inputs is None or len(needed) != 2:
            return None
        a, b = needed
        x = inputs(a)
        if x.shape[0] != 1 or inputs(b) is not x or a == b:
            return None
        if a > b:
            a, b = b, a
        first, second = self.pair(a, b, x)
        return iter(((a, computed(first)), (b, computed(second))))


def _stacked(experts: int, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """(E, *shape) in 2 MiB pages, each item starting on a 64-byte boundary as a tensor of its own does: MKL
    takes other paths (which round differently) through a matrix that does not."""
    element = torch.empty((), dtype=dtype).element_size()
    step = -(-shape[0] * shape[1] * element // 64) * 64 // element
    return huge_page_empty((experts * step,), dtype).as_strided((experts, *shape), (step, shape[1], 1))


def _two(stacked: Tensor, a: int, b: int) -> Tensor:
    """Items ``a`` < ``b`` of (E, ...) ``stacked`` as a (2, ...) view: one stride apart, no copy."""
    step = stacked.stride(0)
    return stacked.as_strided(
        (2, *stacked.shape[1:]), ((b - a) * step, *stacked.stride()[1:]), stacked.storage_offset() + a * step
    )
