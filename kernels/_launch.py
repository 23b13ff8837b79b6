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
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import KERNEL_DTYPES, interpreting


MAX_OFFSET = 2**31 - 1  # the kernels index elements with 32-bit integers


def check_inputs(op: str, *tensors: torch.Tensor, dtypes=KERNEL_DTYPES) -> None:
    """One-line errors for inputs the kernels cannot take: size, device, dtype, mixed devices.

    Size: element offsets (row * stride) are 32-bit in the kernels, as are the outputs' (allocated
    contiguous, of the inputs' shapes), so no input may span 2^31 elements or more: a (B, B)
    matrix from B = 46341 on. Such a batch gets an error instead of a wrong address.
    """
    for t in tensors:  # a contiguous tensor spans numel - 1 (the common case: no loop in Python)
        if t.numel() - 1 > MAX_OFFSET or (not t.is_contiguous() and MAX_OFFSET < sum(
                (size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)):
            raise ValueError(f"{op}: an input of shape {tuple(t.shape)} spans more than 2^31 elements, beyond the "
                             "Triton kernels' 32-bit offsets; use the embedding-level ops (linear in B) or "
                             "backend='torch'")
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


class LaunchTarget(NamedTuple):
    """The GPU a compiled launch is planned for."""

    capability: int  # compute capability x 10: 80 (A100), 90 (H100)
    shared_per_block: int  # bytes of shared memory one block may use (the opt-in maximum)


SM80 = LaunchTarget(80, 163 * 1024)  # cudaDevAttrMaxSharedMemoryPerBlockOptin of an A100
SM90 = LaunchTarget(90, 227 * 1024)  # and of an H100
_PLANNED: list[LaunchTarget] = []  # planned_for's targets, innermost last
_DEVICE_TARGETS: dict[int, LaunchTarget] = {}


@contextlib.contextmanager
def planned_for(target: LaunchTarget):
    """Within the block every launch is planned as a compiled launch on ``target`` (its tiles,
    warps, pipelining and dot precisions), CPU tensors under the interpreter included: how
    tools/aot_report.py records what a GPU launch compiles without a GPU."""
    _PLANNED.append(target)
    try:
        yield target
    finally:
        _PLANNED.pop()


def launch_target(device: torch.device) -> LaunchTarget | None:
    """The GPU a launch on ``device`` compiles for (read once per device), or None for the
    interpreter's launches on CPU tensors; inside ``planned_for``, that block's target."""
    if _PLANNED:
        return _PLANNED[-1]
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = _DEVICE_TARGETS.get(index)
    if target is None:
        props = torch.cuda.get_device_properties(index)
        target = _DEVICE_TARGETS[index] = LaunchTarget(props.major * 10 + props.minor,
                                                       props.shared_memory_per_block_optin)
    return target


def row_block(n: int) -> int:
    """Rows (or columns) a program owns in a matrix sweep: 16 to 64, a power of two.

    Small matrices get small blocks so that several programs share the work; large ones get 64 so
    that a (64, 64) fp32 tile stays in registers.
    """
    return max(16, min(64, triton.next_power_of_2(max(n, 1)) // 4))


def sweep_block(n: int) -> int:
    """Columns per step of a sweep that holds a row tile S[I, J] and a transposed tile S[J, I]^T
    (the triplet and ESC forwards; with a (B, B) margin, two more): ``col_block`` capped at 64.

    [2026-12-07] From tools/aot_report.py's ptxas reports, not timings: with 128 columns these sweeps
    spilled at a ragged B (no divisibility hints: a 64-bit address per element) even at 8 warps,
    about 1-2 KB per thread at B = 1000; with 64, none does.
    """
    return min(64, col_block(n))


def tile_warps(block_m: int, block_n: int) -> int:
    """Warps of a program that sweeps or writes (block_m, block_n) tiles of a (B, B) matrix: 8 from
    4096 elements on (64 x 64, 32 x 128, 64 x 128 tiles: at most 32 elements per thread), else 4.

    [2026-12-07] From tools/aot_report.py's ptxas reports (sm_80, sm_90; Triton 3.9), not timings: at 4
    warps the InfoNCE, triplet and ESC sweeps over 64 x 128 tiles spilled 100 bytes to 1.4 KB per
    thread from B = 256 on, and at a ragged B (no divisibility hints: no vector loads, a 64-bit
    address per element) up to 21 KB, the 64 x 64 backward tiles up to 650 bytes. Where 8 warps
    still spill, the launcher says so (``sweep_block``, esc_division.py).
    """
    return 8 if block_m * block_n >= 4096 else 4


def feature_block(d: int, elem_bytes: int = 2) -> int:
    """Feature-axis chunk of a ``tl.dot`` (its K size): 16 (the smallest dot) to 64, a power of two;
    16 for fp32 operands (``elem_bytes`` 4), whose IEEE dots run on the FMA units with the operands
    in registers, as ``embed_blocks`` takes them (proxy_argmax's fp32 kernel spilled about 2.2 KB per
    thread on sm_80 at 64, 32 B at 32: tools/aot_report.py)."""
    return max(16, min(16 if elem_bytes >= 4 else 64, triton.next_power_of_2(max(d, 1))))


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


def scalar_workspace(op: str, like: torch.Tensor, n_programs: int):
    """(partials, counter, out) of a one-launch scalar reduction (``finish_scalar``) over
    ``n_programs`` programs: fp32 partials, the op's counter, a 0-d fp32 output."""
    partials = torch.empty(n_programs, device=like.device, dtype=torch.float32)
    return partials, reduction_counter(op, like.device), torch.empty((), device=like.device, dtype=torch.float32)


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
def finish_scalar(partials_ptr, counter_ptr, out_ptr, value, pid, n_programs, BLOCK: tl.constexpr):
    """``finish_sum`` of one (1,) partial per program; the last program stores the 0-d total."""
    is_last, total = finish_sum(partials_ptr, counter_ptr, value, pid, n_programs, K=1, BLOCK=BLOCK)
    if is_last:
        tl.store(out_ptr + tl.arange(0, 1), total)


@triton.jit
def store_stats(stats_ptr, offs_m, mask_m, B, r0, r1, r2, r3, r4):
    """Store five (BLOCK_M,) rows of a (5, B) fp32 stats tensor for the pairs ``offs_m``."""
    tl.store(stats_ptr + offs_m, r0, mask=mask_m)
    tl.store(stats_ptr + B + offs_m, r1, mask=mask_m)
    tl.store(stats_ptr + 2 * B + offs_m, r2, mask=mask_m)
    tl.store(stats_ptr + 3 * B + offs_m, r3, mask=mask_m)
    tl.store(stats_ptr + 4 * B + offs_m, r4, mask=mask_m)


# ---------------------------------------------------------------------------------------------
# embedding-level ops: tiles of a @ b.T recomputed from (B, D) features, never stored


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of every ``tl.dot`` on operands of ``dtype`` (``gram_tile``'s PRECISION).

    "ieee" for fp32, so that fp32 inputs keep fp32 parity (Triton's default for fp32 is TF32, or
    TF32x3 in some versions); fp16/bf16 operands go to the tensor cores with fp32 accumulation
    ("tf32" is then only a label). Kernels upcast "ieee" operands to fp32 before ``tl.dot``.

    [2026-11-24] Triton 3.9 interpreter: ``tl.dot`` on bf16 operands multiplies their raw uint16
    bits (``interpreter.py``, ``create_dot``), so under the interpreter bf16 takes "ieee", i.e.
    exact fp32 products of the bf16 values, as the tensor cores compute them. Removing this makes
    the bf16 cases of tests/test_kernels_triton.py fail on CPU.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting() and not _PLANNED):
        return "ieee"
    return "tf32"


class EmbedBlocks(NamedTuple):
    """Launch shape of an embedding-level sweep (see ``embed_blocks``)."""

    m: int  # rows of the query tower per program
    n: int  # rows of the key tower per step
    d: int  # features per chunk of the reduction over D
    do: int  # gradient columns per backward program
    one_chunk: bool  # D <= d: the query tiles stay on chip and each key tile serves both GEMMs
    warps: int
    stages: int  # software-pipelining depth of the key-tile loop


# bytes of a block's shared memory the plan leaves to what it does not count (layout conversions,
# reductions, the pipeline's barriers): an H100 plans for 200 of its 227 KiB, an A100 for 136 of its 163
_SMEM_RESERVE = 27 * 1024


def embed_blocks(n: int, d: int, elem_bytes: int = 2, towers: int = 1,
                 target: LaunchTarget | None = None, backward: bool = False) -> EmbedBlocks:
    """The launch shape of a sweep over tiles of (n, d) @ (d, n) products recomputed from features.

    Rows: ``row_block`` (16 to 64) per program and per step. Features: when the whole row fits one
    chunk (BLOCK_D = next_pow2(d) <= 256) and ``towers`` query tiles plus one pipelined stage of
    ``towers`` key tiles (``elem_bytes`` per element) fit in shared memory, the query tiles stay on
    chip for the sweep and the backward reuses each key tile for dS @ K, as FlashAttention does up
    to head dim 256 (up to 3 stages, as many as fit the target's per-block shared memory less
    ``_SMEM_RESERVE``: an A100's 163 KiB, an H100's 227; at most 2 on sm_90). Otherwise D is
    reduced in chunks of 64 and the backward splits the gradient columns into blocks of up to 256,
    each program recomputing the similarities. fp32 inputs (IEEE dots on the FMA units, both
    operands in registers over the dot's whole K) take 16-feature chunks, 64 gradient columns, and
    with one tower 16 keys per step (the gradient GEMM's K), 8 warps and 2 stages. Two towers (the
    consistency ops) hold two fp32 gradient accumulators per backward program: on a GPU their
    ``backward`` programs own at most 32 rows (the forward keeps ``row_block``, so that its
    partials stay ceil(B / 64)^2). ``target`` is the GPU the launch compiles for
    (``launch_target``); None gives the interpreter's shapes (the CPU tests), where one chunk is at
    most 64 wide, so that D = 256 and D = 300 cover the chunked path and D <= 64 the one-chunk path.

    [2026-12-07] Chosen from ptxas's register, spill and shared-memory reports for sm_80 and sm_90
    (tools/aot_report.py, an ahead-of-time compile on a CPU machine), not from timings: no GPU was
    available to tune on. With 64-row backward programs for two towers, 32-feature chunks and
    64 keys for fp32, and 3 stages on sm_90, the backward kernels spilled 0.1 to 3 KB per thread.
    """
    gpu = target is not None
    budget = (target or SM90).shared_per_block - _SMEM_RESERVE  # the interpreter: any (stages unused)
    # fp32 operands take IEEE dots, which run on the FMA units with the operands in registers (each
    # thread holds its rows and columns of both operands over the whole K of a dot): small K there
    fma = elem_bytes >= 4 and gpu
    block = row_block(n)
    if gpu and towers == 2 and backward:  # two (rows, BLOCK_DO) fp32 gradient accumulators per program
        block = min(block, 32)
    keys = 16 if fma and towers == 1 else block  # the gradient GEMM's K
    dpow = max(16, triton.next_power_of_2(max(d, 1)))
    tile = block * dpow * elem_bytes * towers  # bytes of one set of query (or key) tiles
    stages = min(3, budget // tile - 1) if tile <= budget else 0
    one_chunk = dpow <= (256 if gpu else 64) and stages >= 1 and not fma
    chunk, out_chunk = (16, 64) if fma else (64, 256)
    if not one_chunk:
        stages = min(2 if fma and towers == 1 else 3, budget // ((block + keys) * chunk * elem_bytes * towers))
    elif gpu and target.capability >= 90:
        stages = min(stages, 2)  # sm_90's wgmma pipeline: a third stage of keys costs the backward its registers
    block_d = dpow if one_chunk else min(chunk, dpow)
    block_do = block_d if one_chunk else min(out_chunk, dpow)
    warps = 8 if (fma and towers == 1) or towers * block * block_do > 64 * 128 else 4
    return EmbedBlocks(block, keys, block_d, block_do, one_chunk, warps, max(1, stages))


@triton.jit
def load_tile(ptr, offs, mask, stride_b, stride_d, start, D,  # pointer; rows, their mask; strides; D chunk
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Rows ``offs`` x features [start, start + BLOCK_D) of a (B, D) tensor, zero-padded; upcast to
    fp32 for "ieee" dots (``dot_precision``), else in the tensor's dtype for the tensor cores."""
    d = start + tl.arange(0, BLOCK_D)
    x = tl.load(ptr + offs[:, None] * stride_b + d[None, :] * stride_d, mask=mask[:, None] & (d[None, :] < D),
                other=0.0)
    if PRECISION == "ieee":
        x = x.to(tl.float32)
    return x


@triton.jit
def gram_tile(a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n,  # pointers; row indices and masks
              stride_am, stride_ad, stride_bn, stride_bd,  # strides
              D,  # sizes
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) fp32 tile ``a[offs_m] @ b[offs_n].T``, reducing over D in BLOCK_D chunks
    (masked: any D >= 1, padded rows give 0; D = 0 gives zeros without loading anything)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        a = load_tile(a_ptr, offs_m, mask_m, stride_am, stride_ad, start, D, BLOCK_D, PRECISION)
        b = load_tile(b_ptr, offs_n, mask_n, stride_bn, stride_bd, start, D, BLOCK_D, PRECISION)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc
