"""The VNNI kernel for 4-bit weights: on by default where this CPU has it, off with ``OFFLOAD_CPU_KERNEL=torch``;
it computes from ``Int4Linear``'s own bytes, close to the float product, each token's bits the same alone or in
a batch and at any thread count, and an offloaded model still gives its resident twin's bits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from offload import cpu_build, f32_kernel
from offload.checkpoint.convert import convert_checkpoint
from offload.loading import OffloadOptions, load_model
from offload.quant import vnni_kernel
from offload.quant.device_kernels import dequantized
from offload.quant.host_kernels import Int4Linear, packing_block
from offload.quant.scheme import QuantScheme
from tests.baby import BabySpec, write_baby
from tests.conftest import forget_cpu_kernels
from tests.test_offload_equivalence import run

HAS_KERNEL_CPU = vnni_kernel.cpu_has_flags() and packing_block() == vnni_kernel.GROUP


def _choose(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(vnni_kernel.ENV, raising=False)
    else:
        monkeypatch.setenv(vnni_kernel.ENV, value)
    forget_cpu_kernels()


@pytest.fixture
def vnni(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The kernel asked for during one test; modules built afterwards follow the environment again."""
    _choose(monkeypatch, "vnni")
    yield
    forget_cpu_kernels()


def _linear(out_features: int = 192, in_features: int = 512) -> tuple[Int4Linear, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scale = torch.rand(out_features, in_features // 64, generator=generator) / 50 + 1e-3
    offset = torch.randn(out_features, in_features // 64, generator=generator) / 20
    module = Int4Linear.from_affine(codes, scale, offset, 64)
    return module, dequantized(codes, module.scales_and_offsets, 64)


def test_on_by_default_where_this_cpu_has_it_and_off_when_torch_is_asked_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        _choose(monkeypatch, None)
        assert (_linear()[0]._fast is not None) == HAS_KERNEL_CPU
        _choose(monkeypatch, "torch")
        assert vnni_kernel.gemm() is None
        assert _linear()[0]._fast is None
        _choose(monkeypatch, "fastest")
        assert (vnni_kernel.gemm() is not None) == HAS_KERNEL_CPU
        assert "OFFLOAD_CPU_KERNEL=fastest is not one of auto, vnni, torch" in caplog.text
    finally:
        forget_cpu_kernels()


def test_a_failed_build_says_why_and_keeps_torchs_kernel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_compiler(build_directory: str | None = None) -> None:
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(vnni_kernel, "build_gemm", no_compiler)
    monkeypatch.setattr(vnni_kernel, "cpu_has_flags", lambda: True)
    monkeypatch.setattr("offload.quant.host_kernels.packing_block", lambda: vnni_kernel.GROUP)
    try:
        _choose(monkeypatch, None)
        assert vnni_kernel.gemm() is None
        assert (
            "torch's kernel is kept for 4-bit matrices, since it did not build (Error building extension"
            in caplog.text
        )
    finally:
        forget_cpu_kernels()


@pytest.mark.skipif(
    not HAS_KERNEL_CPU, reason="this CPU lacks AVX-512 VNNI and VBMI, or packs int4 otherwise"
)
def test_close_to_the_float_product_and_the_same_bits_alone_or_in_a_batch(vnni: None) -> None:
    module, weight = _linear()
    assert module._fast is not None
    x = torch.randn(11, weight.shape[1], generator=torch.Generator().manual_seed(1))
    want = x @ weight.T
    got = module(x)
    error = float((got - want).norm() / want.norm())
    assert error < 0.01  # int8 activations: about 0.6% (torch's bf16 kernel: about 0.24%)
    assert all(torch.equal(module(x[i : i + 1]), got[i : i + 1]) for i in range(len(x)))
    assert module(x.to(torch.bfloat16)).dtype == torch.bfloat16
    # A shape the kernel does not take keeps torch's kernel.
    assert _linear(out_features=48)[0]._fast is None


@pytest.mark.skipif(
    not HAS_KERNEL_CPU, reason="this CPU lacks AVX-512 VNNI and VBMI, or packs int4 otherwise"
)
def test_the_same_bits_at_any_thread_count(vnni: None) -> None:
    module, weight = _linear(out_features=1024, in_features=512)  # 16 blocks of rows: the threads split them
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outputs.append(module(x))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


@pytest.mark.skipif(
    not HAS_KERNEL_CPU, reason="this CPU lacks AVX-512 VNNI and VBMI, or packs int4 otherwise"
)
def test_an_offloaded_model_keeps_its_resident_twins_bits(tmp_path: Path, vnni: None) -> None:
    write_baby(BabySpec("vnni", num_hidden_layers=2, hidden_size=128, intermediate_size=256), tmp_path)
    scheme = QuantScheme.build(2, attention="hqq:4:64", experts="hqq:4:64")
    resident = load_model(tmp_path, dtype="float32", quant=scheme)
    expert = resident.expert_source.experts[0][0]
    assert any(getattr(m, "_fast", None) is not None for m in vars(expert).values()), "the kernel is used"
    prompt = list(range(3, 13))
    want = run(resident, prompt)
    options = OffloadOptions(experts_per_layer=2, prefetch=1, link="emulated:20")
    got = run(load_model(tmp_path, dtype="float32", quant=scheme, offload=options), prompt)
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_a_bench_report_says_which_cpu_kernel_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offload.bench.run import run_bench
    from offload.settings.flags import LoadFlags

    source = tmp_path / "src"
    write_baby(BabySpec("bench-kernel", num_hidden_layers=1, hidden_size=128, intermediate_size=256), source)
    converted = tmp_path / "q4"
    convert_checkpoint(source, converted, QuantScheme.build(1, attention="hqq:4:64", experts="hqq:4:64"))

    def kernels() -> tuple[str, str]:
        flags = LoadFlags(dtype="float32", quant=None, threads=1)
        machine = run_bench(converted, flags, prompt_tokens=4, new_tokens=2, runs=1).as_dict()["machine"]
        return machine["cpu_int4_kernel"], machine["cpu_f32_kernel"]  # the baby's lm_head stays float32

    try:
        _choose(monkeypatch, "torch")
        assert kernels() == ("torch", "torch")
        _choose(monkeypatch, None)
        f32 = "ours" if cpu_build.has_flags(f32_kernel.CPU_FLAGS) else "torch"
        assert kernels() == ("vnni" if HAS_KERNEL_CPU else "torch", f32)
    finally:
        forget_cpu_kernels()
