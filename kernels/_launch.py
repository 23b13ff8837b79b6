"""Private helpers shared by the Triton modules: input checks, block sizes, device guard, and the
one in-kernel reduction every scalar-valued op uses.

Imported only when a Triton backend is used (``kernels/__init__.py`` imports the Triton modules
lazily), so the CPU reference path never imports ``triton``.

On CPU tensors the kernels run under Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` before ``triton`` is first imported (the test suite's conftest does this on
machines without a GPU); on CUDA tensors they are compiled.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Low-precision inputs are upcast to fp32 on load; everything accumulates in fp32.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_inputs(op: str, *tensors: torch.Tensor, dtypes=KERNEL_DTYPES) -> None:
    """One-line errors for inputs the kernels cannot take: device, dtype, mixed devices."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{op}: inputs are on different devices ({device} and {t.device})")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{op}: the Triton kernel takes {names} inputs, got {str(t.dtype).removeprefix('torch.')}"
                             " (backend='torch' takes any floating dtype)")
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise ValueError(f"{op}: backend='triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
                     "before importing triton to run the kernels in Triton's interpreter, or use backend='torch'")


def device_guard(t: torch.Tensor):
    """Launch on the tensor's own CUDA device (any device index); nothing to do on CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def row_block(n: int) -> int:
    """Rows (or columns) a program owns in a matrix sweep: 16 to 64, a power of two.

    Small matrices get small blocks so that several programs share the work; large ones get 64 so
    that a (64, 64) fp32 tile stays in registers.
    """
    return max(16, min(64, triton.next_power_of_2(max(n, 1)) // 4))


def feature_block(d: int) -> int:
    """Feature-axis chunk of a ``tl.dot`` (its K size): 16 (the smallest dot) to 64, a power of two."""
    return max(16, min(64, triton.next_power_of_2(max(d, 1))))


def col_block(n: int) -> int:
    """Columns a program loads per step of a sweep: 16 to 128, a power of two."""
    return max(16, min(128, triton.next_power_of_2(max(n, 1))))


_ZEROS: dict[torch.device, torch.Tensor] = {}


def zero_scalar(like: torch.Tensor) -> torch.Tensor:
    """An fp32 0-d zero on ``like``'s device: the upstream gradient of an output that received
    none (read with stride 0). Cached for real tensors, so that an eager backward needs no
    zero-fill launch; a fresh one while torch.compile traces (fake tensors must not be cached)."""
    if type(like) is not torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=like.device)
    zero = _ZEROS.get(like.device)
    if zero is None:
        zero = _ZEROS[like.device] = torch.zeros((), dtype=torch.float32, device=like.device)
    return zero


_COUNTERS: dict[tuple[str, torch.device], torch.Tensor] = {}


def reduction_counter(op: str, device: torch.device) -> torch.Tensor:
    """An int32 counter per op and device that ``finish_sum`` leaves at 0 after every launch.

    Allocated once (at the op's first call, outside any CUDA-graph capture), so that a reduction
    needs no zero-fill launch before its kernel. One per op: different ops may run on different
    streams; one op must not run on two streams at once.
    """
    counter = _COUNTERS.get((op, device))
    if counter is None:
        counter = _COUNTERS[op, device] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


@triton.jit
def finish_sum(partials_ptr, counter_ptr, values, pid, n_programs, K: tl.constexpr, BLOCK: tl.constexpr):
    """Deterministic one-launch sum over programs: store this program's K partial sums
    (``values``, a (K,) tensor); the last program to finish adds every program's partials in index
    order (no float atomics) and resets the counter. Returns (is_last, totals): the caller's last
    program stores the (K,) totals.

    Memory ordering (the CUDA threadfence-reduction pattern): the barrier makes every thread's
    part of the partial store precede the increment, which one thread performs with acq_rel
    semantics at GPU scope; the last program's loads come after its acquire and are volatile, so
    not served from a stale cache.
    """
    k = tl.arange(0, K)
    tl.store(partials_ptr + pid * K + k, values)
    tl.debug_barrier()
    finished = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    is_last = finished == n_programs - 1
    total = tl.zeros((BLOCK, K), dtype=tl.float32)
    if is_last:
        for start in range(0, n_programs, BLOCK):
            rows = start + tl.arange(0, BLOCK)
            total += tl.load(partials_ptr + rows[:, None] * K + k[None, :], mask=rows[:, None] < n_programs,
                             other=0.0, volatile=True)
        tl.atomic_xchg(counter_ptr, 0)
    return is_last, tl.sum(total, axis=0)


@triton.jit
def store_stats(stats_ptr, offs_m, mask_m, B, r0, r1, r2, r3, r4):
    """Store five (BLOCK_M,) rows of a (5, B) fp32 stats tensor for the pairs ``offs_m``."""
    tl.store(stats_ptr + offs_m, r0, mask=mask_m)
    tl.store(stats_ptr + B + offs_m, r1, mask=mask_m)
    tl.store(stats_ptr + 2 * B + offs_m, r2, mask=mask_m)
    tl.store(stats_ptr + 3 * B + offs_m, r3, mask=mask_m)
    tl.store(stats_ptr + 4 * B + offs_m, r4, mask=mask_m)


def dot_needs_fp32_operands(dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast ``dtype`` operands to fp32 before ``tl.dot`` (pass it as a constexpr).

    [2026-11-24] Triton 3.9 interpreter: ``tl.dot`` on bf16 operands multiplies their raw uint16 bits
    (the interpreter stores bf16 as uint16 and hands those arrays to numpy's matmul), so results
    are garbage; fp16 and fp32 are right. Compiled kernels keep the bf16 tensor-core dot, so on CPU
    the bf16 parity tests exercise the upcast path only. Reproducer: the bf16 cases of
    tests/test_kernels_triton.py::test_proxy_argmax_matches_reference fail without it.
    """
    return interpreting() and dtype == torch.bfloat16
