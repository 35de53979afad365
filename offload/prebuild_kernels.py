"""``python -m offload.prebuild_kernels``: build our CPU kernels now (the Makefile's setup runs it), so that the
first chat does not wait half a minute for them. Where the CPU lacks them, the user chose torch's kernels
(``OFFLOAD_CPU_KERNEL=torch``) or a build fails, it says so and exits 0: torch's kernels serve instead."""

from __future__ import annotations

import logging


def main() -> None:
    """Build each kernel this CPU can run (torch caches them), and say which were built."""
    from offload import f32_kernel
    from offload.quant import vnni_kernel

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    built = {"float32 decode products": f32_kernel.product(), "4-bit matrices": vnni_kernel.gemm()}
    for what, kernel in built.items():
        print(f"CPU kernel for {what}: {'ours' if kernel is not None else 'torch'}")


if __name__ == "__main__":
    main()
