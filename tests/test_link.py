"""The links that move expert bytes: local, emulated (bandwidth and latency) and CUDA."""

import time

import pytest
import torch

from offload.errors import CacheError, OffloadError
from offload.experts.link import CudaLink, EmulatedLink, LocalLink, parse_link


def random_bytes(nbytes: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_local_link_copies_at_once_and_sizes_the_copy():
    src, dst = random_bytes(1000), torch.zeros(1000, dtype=torch.uint8)
    with LocalLink() as link:
        handle = link.submit(src, dst)
        assert link.is_done(handle) and torch.equal(dst, src)
        link.wait(handle)
        assert handle.nbytes == 1000


def test_emulated_copy_takes_at_least_bytes_over_bandwidth():
    nbytes, gbps = 4_000_000, 1.0  # 4 ms at 1 GB/s
    src, dst = random_bytes(nbytes), torch.zeros(nbytes, dtype=torch.uint8)
    with EmulatedLink(gbps) as link:
        started = time.perf_counter()
        handle = link.submit(src, dst)
        link.wait(handle)
        elapsed = time.perf_counter() - started
        assert link.is_done(handle)
    assert elapsed >= nbytes / (gbps * 1e9)
    assert torch.equal(dst, src)
    assert handle.nbytes == nbytes


def test_emulated_latency_adds_to_every_copy():
    src, dst = random_bytes(10), torch.zeros(10, dtype=torch.uint8)
    with EmulatedLink(gbps=100.0, latency_us=3000) as link:
        started = time.perf_counter()
        link.wait(link.submit(src, dst))
        assert time.perf_counter() - started >= 3e-3


def test_emulated_link_is_serial_and_ordered():
    nbytes, gbps = 2_000_000, 1.0  # 2 ms each
    sources = [random_bytes(nbytes, seed) for seed in range(3)]
    shared = torch.zeros(nbytes, dtype=torch.uint8)
    with EmulatedLink(gbps) as link:
        started = time.perf_counter()
        handles = [link.submit(src, shared) for src in sources]
        link.wait(handles[-1])
        elapsed = time.perf_counter() - started
        # The last copy queued behind the first two, and every earlier copy completed before it.
        assert all(link.is_done(handle) for handle in handles)
    assert elapsed >= 3 * nbytes / (gbps * 1e9)
    assert torch.equal(shared, sources[-1])


def test_an_idle_emulated_link_starts_the_next_copy_at_once():
    # The schedule, not the wall clock: a copy submitted after the link went idle completes
    # bytes/bandwidth after its own submission, not after the previous copy's completion.
    nbytes, gbps = 1_000_000, 1.0  # 1 ms
    src, dst = random_bytes(nbytes), torch.zeros(nbytes, dtype=torch.uint8)
    with EmulatedLink(gbps) as link:
        link.wait(link.submit(src, dst))
        time.sleep(0.003)
        before = time.perf_counter()
        handle = link.submit(src, dst)
        after = time.perf_counter()
        assert before + 1e-3 <= handle.done_at <= after + 1e-3
        link.wait(handle)


def test_close_joins_the_worker_after_pending_copies():
    src, dst = random_bytes(1000), torch.zeros(1000, dtype=torch.uint8)
    link = EmulatedLink(gbps=10.0)
    assert link._worker.daemon
    link.submit(src, dst)
    link.close()
    assert not link._worker.is_alive()
    assert torch.equal(dst, src)
    link.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        link.submit(src, dst)


def test_submit_rejects_mismatched_buffers():
    with LocalLink() as link, pytest.raises(ValueError, match="cannot copy"):
        link.submit(torch.zeros(4, dtype=torch.uint8), torch.zeros(5, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("spec", "kind", "gbps", "latency_us"),
    [
        ("local", LocalLink, None, None),
        ("emulated:12", EmulatedLink, 12.0, 0.0),
        ("emulated:0.5:20", EmulatedLink, 0.5, 20.0),
        (" emulated:16:0 ", EmulatedLink, 16.0, 0.0),
    ],
)
def test_parse_link(spec, kind, gbps, latency_us):
    with parse_link(spec) as link:
        assert type(link) is kind
        if gbps is not None:
            assert (link.gbps, link.latency_us) == (gbps, latency_us)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "pcie",
        "local:3",
        "emulated",
        "emulated:",
        "emulated:fast",
        "emulated:0",
        "emulated:-1",
        "emulated:12:-5",
        "emulated:12:5:1",
        "emulated:nan",
        "cuda:0x",
    ],
)
def test_parse_link_rejects_malformed_specs(spec):
    with pytest.raises(OffloadError) as raised:
        parse_link(spec)
    message = str(raised.value)
    assert isinstance(raised.value, CacheError)
    assert repr(spec) in message and "emulated:GBPS[:LATENCY_US]" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_link_without_a_gpu_is_one_clear_line():
    with pytest.raises(CacheError, match="needs a CUDA GPU") as raised:
        parse_link("cuda")
    assert "\n" not in str(raised.value)


def test_emulated_link_rejects_a_bad_bandwidth():
    with pytest.raises(CacheError, match="gbps > 0"):
        EmulatedLink(gbps=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_link_copies_on_a_side_stream():
    src = random_bytes(1 << 20).pin_memory()
    dst = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    with CudaLink() as link:
        handle = link.submit(src, dst)
        link.wait(handle)  # the compute stream now waits for the copy
        assert torch.equal(dst.cpu(), src)
        assert link.is_done(handle) and handle.nbytes == 1 << 20
