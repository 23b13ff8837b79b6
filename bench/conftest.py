"""The one benchmark harness: CUDA-synchronised timing, side-by-side providers, extra_info.

Every benchmark compares providers measured in the same run: "eager" (the reference in
fastncl.kernels.reference), "compiled" (torch.compile of the reference) and, once the kernels
issue lands, "triton". Inputs are built outside the timed region. Without a GPU the GPU
benchmarks are skipped with the reason; CPU benchmarks (whole training runs) say so in their name.
"""
from __future__ import annotations

import platform

import pytest
import torch


def gpu_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: GPU benchmarks need one (see bench/results/ for committed runs)")
    return torch.device("cuda")


def run_synchronized(benchmark, fn, rounds: int = 50, warmup: int = 5):
    """Time fn with a device synchronisation inside the timed target; record peak memory."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    def target():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(target, rounds=rounds, iterations=1)
    benchmark.extra_info.update(gpu_info())
    benchmark.extra_info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
