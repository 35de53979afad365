"""Shared fixtures: baby checkpoints are made once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.baby import BABIES, BabySpec, write_baby


@pytest.fixture(scope="session")
def baby_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """name -> (checkpoint directory, transformers oracle) for every BabySpec in BABIES."""
    made = {}
    for spec in BABIES:
        directory = tmp_path_factory.mktemp(spec.name)
        made[spec.name] = (directory, write_baby(spec, directory))
    return made


@pytest.fixture(scope="session")
def baby_dir(baby_dirs: dict) -> Path:
    """The simplest baby checkpoint."""
    return baby_dirs["single-t5"][0]


def make_baby(tmp_path: Path, **changes: object) -> Path:
    """A fresh baby checkpoint with ``changes`` to the default spec, for tests that damage it."""
    spec = BabySpec("custom", **changes)
    write_baby(spec, tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`cuda`-marked tests run only where a GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _own_offload_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every process it starts) has its own $OFFLOAD_HOME: chats autosaved there and user
    profiles never touch the real one."""
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path_factory.mktemp("offload-home")))


def forget_cpu_kernels() -> None:
    """Drop the built-or-not decisions of our CPU kernels: modules built next follow the environment again."""
    from offload import f32_kernel
    from offload.quant import vnni_kernel

    f32_kernel.kernels.cache_clear()
    vnni_kernel.gemm.cache_clear()


@pytest.fixture
def torch_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch's CPU kernels instead of ours (``OFFLOAD_CPU_KERNEL=torch``) for modules built during one test."""
    monkeypatch.setenv("OFFLOAD_CPU_KERNEL", "torch")
    forget_cpu_kernels()
    yield
    forget_cpu_kernels()  # built afterwards, modules follow the environment again
