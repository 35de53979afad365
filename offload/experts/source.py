"""Where the MoE block gets its experts from, without knowing where they live.

Shapes: T tokens, D hidden, F expert width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offload import f32_kernel
from offload.experts.stats import CacheStats


class SlotTensors(dict):
    """An expert's stored tensors (name -> tensor) as views of a slot that its built form may take over
    (``offload.experts.in_place``): a ``materialize`` may write the built tensors over them, once it is sure
    to build a form that fits the slot (else it must leave them as they are)."""


class Expert(Protocol):
    """One SwiGLU expert, ready to run on the compute device."""

    def __call__(self, x: Tensor) -> Tensor:  # (T, D) -> (T, D)
        ...


Inputs = Callable[[int], Tensor]  # expert id -> the (T, D) rows of the layer's input routed to it


def prefers_input_major(dtype: torch.dtype) -> bool:
    """Whether a tall ``dtype`` matrix (out >= in) computes one token faster stored input-major.

    MKL's one-row kernel over (out, in) rows computes one short dot product per output and reads about
    7 GB/s on one core, against 18 GB/s for its kernel over an input-major matrix (the transpose of a
    contiguous (in, out) tensor). Measured at one thread in float32, out of cache: the demo's 5120 x 256
    lm_head 0.72 -> 0.29 ms, an expert's 448 x 256 up projection 63 -> 48 us. A wide matrix (the down
    projection) is slower so; in bfloat16 the input-major kernel is up to 2x slower. cuBLAS runs both
    layouts at full speed, so the rule does not depend on the device, only on the dtype.
    """
    return dtype == torch.float32


def input_major_shape(out_features: int, in_features: int) -> bool:
    """Whether an (out, in) matrix of a dtype that ``prefers_input_major`` is held input-major: a tall one
    always; a wide one (the down projection) too where our float32 kernel runs (``offload.f32_kernel``),
    which reads every input-major matrix at the memory's speed and row-major wide ones a third slower."""
    if out_features <= 1 or in_features <= 1:
        return False
    return out_features >= in_features or f32_kernel.product() is not None


def one_token_layout(weight: Tensor) -> Tensor:
    """``weight`` (out, in) with the same values, in the memory layout a one-token ``F.linear`` runs fastest in
    (``prefers_input_major``); the tensor itself when it already is, else one copy.

    Every dense matrix goes through this before it computes, wherever it was built (loaded resident, copied
    into a cache slot, read from the host store): the layout decides the summation order, so one rule keeps
    resident and offloaded experts bit-identical.
    """
    out_features, in_features = weight.shape
    # stride(0) == 1: input-major already, maybe a row block of a taller input-major matrix (fused q, k, v).
    if not prefers_input_major(weight.dtype) or weight.stride(0) == 1:
        return weight
    if not input_major_shape(out_features, in_features):
        return weight
    return weight.t().contiguous().t()


class DenseExpert:
    """An expert held as three dense matrices in the hub's layout: w1, w3 are (F, D); w2 is (D, F).

    Each in ``one_token_layout``: the host store keeps float32 experts that way (``HostStore``'s
    ``input_major``), so the views of a slot or of the store need no copy here.
    """

    def __init__(self, w1: Tensor, w2: Tensor, w3: Tensor) -> None:
        self.w1, self.w2, self.w3 = one_token_layout(w1), one_token_layout(w2), one_token_layout(w3)
        # Our one-token float32 kernel per matrix, where it takes it (decided by the weight alone).
        self.k1, self.k2, self.k3 = (f32_kernel.for_weight(w) for w in (self.w1, self.w2, self.w3))

    def __call__(self, x: Tensor) -> Tensor:
        linear = f32_kernel.linear
        return linear(F.silu(linear(x, self.w1, self.k1)) * linear(x, self.w3, self.k3), self.w2, self.k2)

    def fused(self) -> DenseExpert:
        """This expert with w1 and w3 in one matrix, where that gives the same bits (else itself).

        On a CPU in float32 (input-major matrices), MKL computes each output column of an input-major matrix
        the same whether it sits alone or beside others (checked at 1 and 2 threads, 1 to 100 tokens, widths
        16 to 3584), so one (2F, D) product equals the two (F, D) ones bit for bit, and reads the weights
        faster: two 448 x 256 matrices 95 -> 61 us out of cache. Costs one copy of w1 and w3: for resident
        experts, built once at load; offloaded ones keep computing from their slot's separate views.
        """
        if (
            self.w1.device.type != "cpu"
            or not prefers_input_major(self.w1.dtype)
            or self.w1.shape != self.w3.shape
        ):
            return self
        fused = FusedDenseExpert(self.w1, self.w2, self.w3)
        return fused if same_bits(fused, self) else self


def same_bits(fused: Expert, plain: DenseExpert) -> bool:
    """Whether ``fused`` computes ``plain``'s bits on one and on three tokens of a fixed input.

    The column property that fusing relies on holds at the demo's and Mixtral's shapes, but not at every shape
    (hidden 72, width 50 gives other bits): the check, at load, costs two products of each expert.
    """
    hidden = plain.w1.shape[1]
    rows = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0)).to(plain.w1.dtype)
    return all(torch.equal(fused(x), plain(x)) for x in (rows[:1], rows))


class FusedDenseExpert(DenseExpert):
    """A DenseExpert whose w1 and w3 are the halves of one input-major (2F, D) matrix, ``w13``."""

    def __init__(self, w1: Tensor, w2: Tensor, w3: Tensor, *, into: Tensor | None = None) -> None:
        """``into``, when given, is the (D, 2F) memory to hold w13 transposed in (``ExpertStack``'s)."""
        width, hidden = w1.shape  # not DenseExpert.__init__: no w1, w3
        stacked = torch.empty(hidden, 2 * width, dtype=w1.dtype, device=w1.device) if into is None else into
        stacked[:, :width].copy_(w1.t())
        stacked[:, width:].copy_(w3.t())
        self.w13, self.w2, self.width = stacked.t(), one_token_layout(w2), width
        self.k13, self.k2 = f32_kernel.for_weight(self.w13), f32_kernel.for_weight(self.w2)

    @property
    def w1(self) -> Tensor:
        return self.w13[: self.width]

    @property
    def w3(self) -> Tensor:
        return self.w13[self.width :]

    def __call__(self, x: Tensor) -> Tensor:
        both = f32_kernel.linear(x, self.w13, self.k13)
        # silu's vectorised loop rounds differently in a row's tail: give it the (T, F) block the unfused
        # expert gives it (a copy only when T > 1; at one token the half is already contiguous).
        gate, up = both.chunk(2, dim=-1)  # one op for both halves
        return f32_kernel.linear(F.silu(gate.contiguous()) * up, self.w2, self.k2)

    def fused(self) -> DenseExpert:
        return self


@dataclass(frozen=True)
class ExpertMemory:
    """The bytes that a source's experts take in each tier."""

    device_bytes: int  # every expert's tensors (resident), or the slots plus what is built from them
    host_bytes: int  # the host store: every expert packed once (0 when every expert is resident)


class PairedExperts(Protocol):
    """A layer's experts that can compute a one-token step's two together (``offload.experts.stacked``)."""

    def experts_for(self, needed: list[int], inputs: Inputs | None) -> Iterator[tuple[int, Expert]] | None:
        """Every expert in ``needed``, already computed on its input; None where they cannot be paired."""
        ...


class ExpertSource(Protocol):
    """Hands the MoE block its experts. Implementations: ResidentExperts, OffloadedExperts.

    Besides the two calls the block makes, a source declares what the engine, the bench and the trace
    recorder ask of it, so that no caller has to probe which kind of source it holds.
    """

    @property
    def stats(self) -> CacheStats | None:
        """The cache's counters; None when nothing is cached or moved (every expert resident)."""
        ...

    def speculate(self, layer: int, hidden: Tensor) -> Tensor | None:
        """Guess layer+1's experts from layer's normalised input (T, D), on the device, without syncing.

        Returns a 1-D tensor of expert ids, or None when there is nothing to guess.
        """
        ...

    def experts_for(
        self, layer: int, needed: list[int], guesses: list[int], inputs: Inputs | None = None
    ) -> Iterator[tuple[int, Expert]]:
        """Yield (expert id, expert) for every id in ``needed``, in the order they become usable.

        ``guesses`` are the ids that ``speculate`` returned for layer+1, already on the host.
        ``inputs(id)``, when given, is the (T, D) input the caller will pass to expert ``id``: a source
        may then start computing an expert elsewhere (on the host) before yielding the others, and the
        expert it yields for that id returns the output already computed for that input.
        The caller finishes with each expert before asking for the next.
        """
        ...

    def reset_stats(self) -> None:
        """Zero the counters; the experts stay where they are."""
        ...

    def flush(self) -> None:
        """Empty the device tier, so that the next step loads every expert it needs."""
        ...

    def memory(self) -> ExpertMemory:
        """The bytes the experts take on the device and in host RAM."""
        ...

    def expert_bytes(self) -> tuple[int, ...] | None:
        """One expert's bytes per layer, as a load moves them; None when that is not known."""
        ...

    def describe(self) -> str:
        """One line for the load summary: where the experts live."""
        ...


class ResidentExperts:
    """Every expert on the device: the reference that offloading must reproduce bit for bit."""

    stats: CacheStats | None = None  # nothing is cached or moved

    def __init__(
        self, experts: list[list[Expert]], stacks: Sequence[PairedExperts | None] | None = None
    ) -> None:
        """``experts[layer][expert]``; the lists become this source's own. ``stacks[layer]``, where given,
        computes a one-token step's two experts of that layer together (``offload.experts.stacked``).

        Each expert may take a faster fused form here (w1 and w3 in one matrix: the same bits). It replaces
        the expert in its list at once, so the unfused one is freed before the next is fused: the load's peak
        RSS grows by one expert, not by every expert's w1 and w3.
        """
        for layer in experts:
            for index, expert in enumerate(layer):
                layer[index] = fuse(expert)
        self.experts = experts  # [layer][expert]
        self.stacks = list(stacks) if stacks is not None else [None] * len(experts)

    def speculate(self, layer: int, hidden: Tensor) -> Tensor | None:
        return None

    def experts_for(
        self, layer: int, needed: list[int], guesses: list[int], inputs: Inputs | None = None
    ) -> Iterator[tuple[int, Expert]]:
        stack = self.stacks[layer]
        together = None if stack is None else stack.experts_for(needed, inputs)
        if together is not None:
            yield from together
            return
        for expert_id in needed:
            yield expert_id, self.experts[layer][expert_id]

    def reset_stats(self) -> None:
        pass

    def flush(self) -> None:
        pass  # every expert stays on the device

    def memory(self) -> ExpertMemory:
        held = sum(_nbytes(t) for layer in self.experts for e in layer for t in expert_tensors(e))
        return ExpertMemory(device_bytes=held, host_bytes=0)

    def expert_bytes(self) -> tuple[int, ...] | None:
        """A dense expert's weights per layer; None when a layer's experts are quantized modules."""
        if not self.experts or not all(isinstance(layer[0], DenseExpert) for layer in self.experts):
            return None
        return tuple(sum(_nbytes(w) for w in expert_tensors(layer[0])) for layer in self.experts)

    def describe(self) -> str:
        return "every expert resident on the device"


def fuse(expert: Expert) -> Expert:
    """``expert.fused()`` where the expert offers one (dense and CPU int4 experts), else ``expert``: the form a
    resident expert computes in (``ResidentExperts``); a loader may call it as each expert is built."""
    fused = getattr(expert, "fused", None)
    return fused() if callable(fused) else expert


def expert_tensors(expert: object) -> Iterator[Tensor]:
    """The tensors an expert holds (its attributes, and the parameters and buffers of its modules)."""
    for value in vars(expert).values():
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, nn.Module):
            yield from value.parameters()
            yield from value.buffers()


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def route(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Mixtral's router: softmax in fp32 over all experts, top-k, renormalise.

    (T, E) logits -> (T, k) weights in fp32 and (T, k) expert ids.
    Computed as the softmax of the k best logits, which is the renormalised top-k of the softmax over all
    (the softmax keeps the order, and its normaliser cancels): two ops instead of four, on every layer of
    every decode step.
    """
    best, ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(best, dim=-1, dtype=torch.float32), ids  # upcast inside, as the reference
