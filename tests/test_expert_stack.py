"""Resident float32 experts stacked per layer (issue 15's per-token overhead): a one-token step computes its two
experts in one batched call a matrix, and every result keeps the bits an offloaded (unfused, unstacked) expert
computes, at every shape; where a shape would change a bit, the layer is not paired (or not fused)."""

import pytest
import torch

from offload.experts.source import DenseExpert, ResidentExperts
from offload.experts.stacked import ExpertStack
from offload.huge_pages import HUGE_PAGE, huge_page_empty, into_huge_pages
from offload.kv_cache import KVCache
from offload.loading import load_model

EXPERTS = 4


@pytest.fixture(params=["torch", "ours"])
def kernels(request: pytest.FixtureRequest) -> str:
    """Each kind of CPU kernel in turn: torch's (MKL, where pairs run one bmm) and ours (``f32_kernel``, one
    expert at a time at the memory's speed: no pairs), both keeping every expert's unfused bits."""
    if request.param == "torch":
        request.getfixturevalue("torch_cpu_kernels")
    return request.param


def weights(hidden: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(width, hidden, generator=generator) / hidden**0.5,
        "w2": torch.randn(hidden, width, generator=generator) / width**0.5,
        "w3": torch.randn(width, hidden, generator=generator) / hidden**0.5,
    }


def resident_and_plain(hidden: int, width: int) -> tuple[ResidentExperts, list[DenseExpert]]:
    """A one-layer resident source built the way the loader builds it, and the same experts unfused."""
    stack = ExpertStack(EXPERTS)
    layer, plain = [], []
    for index in range(EXPERTS):
        tensors = weights(hidden, width, seed=index)
        plain.append(DenseExpert(**{name: t.clone() for name, t in tensors.items()}))
        layer.append(stack.add(index, DenseExpert(**tensors)))
    return ResidentExperts([layer], [stack.check()]), plain


# (256, 448) is the demo's layer, (512, 1792) a Mixtral layer / 8; the others are shapes where fusing or pairing
# would change bits on at least some BLAS builds.
@pytest.mark.parametrize("hidden, width", [(256, 448), (512, 1792), (16, 24), (36, 37), (72, 50), (128, 24)])
def test_resident_experts_give_the_bits_of_unfused_experts_alone_and_in_pairs(hidden, width, kernels):
    source, plain = resident_and_plain(hidden, width)
    row = torch.randn(1, hidden, generator=torch.Generator().manual_seed(9))
    rows = torch.randn(5, hidden, generator=torch.Generator().manual_seed(10))
    for a in range(EXPERTS):
        for b in range(EXPERTS):
            if a == b:
                continue
            # The MoE block's one-token step: one input object for both experts.
            got = dict(source.experts_for(0, [a, b], [], lambda _: row))
            assert set(got) == {a, b}
            assert torch.equal(got[a](row), plain[a](row)) and torch.equal(got[b](row), plain[b](row))
        # Several tokens, or one token's rows as separate tensors: one expert at a time.
        for inputs in (lambda _: rows, lambda _: row.clone()):
            for expert_id, expert in source.experts_for(0, [a], [], inputs):
                x = inputs(expert_id)
                assert torch.equal(expert(x), plain[expert_id](x))


def test_the_demo_model_pairs_every_layer_and_decodes_as_the_unpaired_model(torch_cpu_kernels: None):
    paired = load_model("offload/demo", dtype="float32")
    assert all(stack is not None for stack in paired.expert_source.stacks)
    unpaired = load_model("offload/demo", dtype="float32")
    unpaired.expert_source.stacks = [None] * len(unpaired.expert_source.stacks)
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.inference_mode():
        outputs = []
        for model in (paired, unpaired):
            cache = KVCache(model.config, 16, dtype=torch.float32, device="cpu")
            steps = [model(ids, cache)]
            steps += [model(torch.tensor([[token]]), cache) for token in (7, 8, 9)]
            outputs.append(torch.cat(steps, dim=1))
    assert torch.equal(outputs[0], outputs[1])


def test_huge_page_copies_keep_values_strides_and_shared_storage():
    fused = torch.randn(96, 64)
    part = fused[32:64]  # a view, as q_proj is of the fused q, k, v matrix
    transposed = torch.randn(64, 32).t()
    codes = torch.arange(10, dtype=torch.int32)
    moved = into_huge_pages([fused, part, transposed, codes])
    for before, after in zip([fused, part, transposed, codes], moved, strict=True):
        assert (
            torch.equal(before, after) and before.stride() == after.stride() and before.dtype == after.dtype
        )
        assert after.untyped_storage().data_ptr() != before.untyped_storage().data_ptr()
    assert moved[1].untyped_storage().data_ptr() == moved[0].untyped_storage().data_ptr()
    assert moved[1].data_ptr() - moved[0].data_ptr() == part.data_ptr() - fused.data_ptr()


def test_a_large_huge_page_tensor_starts_on_a_page_boundary():
    block = huge_page_empty((HUGE_PAGE // 4 + 5,), torch.float32)
    assert block.shape == (HUGE_PAGE // 4 + 5,)
    if block.untyped_storage().nbytes() > block.numel() * 4:  # madvise was there to ask
        assert block.data_ptr() % HUGE_PAGE == 0


def test_moving_weights_into_huge_pages_frees_the_originals_and_keeps_values():
    import gc
    import weakref

    from torch import nn

    from offload.loading import move_into_huge_pages

    holder = nn.Module()
    base = torch.randn(64, 96)  # an input-major weight is a view of its (in, out) base
    holder.register_buffer("weight", base.t())
    holder.scale = nn.Parameter(torch.randn(96), requires_grad=False)
    gone = [weakref.ref(base), weakref.ref(holder.scale)]
    expected = holder.weight.clone(), holder.scale.clone()
    del base
    move_into_huge_pages([(holder, "weight", holder.weight), (holder, "scale", holder.scale)], block_bytes=1)
    gc.collect()
    assert all(ref() is None for ref in gone)
    assert torch.equal(holder.weight, expected[0]) and holder.weight.stride() == (1, 96)
    assert isinstance(holder.scale, nn.Parameter) and torch.equal(holder.scale, expected[1])
