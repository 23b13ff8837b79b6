"""Triton: per-pair bidirectional hinge triplet loss (VSE++ / NCR / ESC Eq. 1 and 13).

What: ``reference.triplet_terms`` is the definition. For pair i with margin m_i and d_i = S[i, i],
    row cost    c^r_ij = (m_i + S[i, j]) - d_i   (image i against caption j),
    column cost c^c_ij = (m_i + S[j, i]) - d_i   (caption i against image j),
    out_i = max_j relu(c^r_ij) + max_j relu(c^c_ij)                  (hardest, VSE++), or
    out_i = (sum_j relu(c^r_ij) + sum_j relu(c^c_ij)) / (B - 1)      (mean),
over the negatives j != i. margin is a float or a (B,) tensor (pair i's margin, both directions),
or a (B, B) tensor M indexed like S (NCR's code's broadcast targets): each cost then takes the
margin of the entry it compares, c^r_ij = (M[i, j] + S[i, j]) - d_i and c^c_ij = (M[j, i] + S[j, i]) - d_i.

Cost: eager builds five B^2 temporaries (upcast, two costs, two masked hinges) and reads them back;
this kernel reads S twice (its rows and its columns) and writes 6 B fp32 numbers. The backward
reads S once and writes dsim once (dense, no atomics). A (B, B) margin is read like S: twice
forward, once backward, plus one B^2 write of its gradient when it needs one.

Algorithm (forward, one launch): a 1-D grid of ceil(B / BLOCK_M) programs; program p owns pairs
I = [p BLOCK_M, (p + 1) BLOCK_M) and sweeps S[I, :] and S[:, I] (the transposed tile, by swapped
strides) in (BLOCK_M, BLOCK_N) tiles, keeping per pair and direction in fp32 either a running
(max, tie count) [online max] or a running (sum, count of active hinges). It writes out and a
(5, B) fp32 stats tensor: the two maxima (or sums), the two tie counts (or active counts), and
share_i = d out_i / d m_i ([max^r > 0] + [max^c > 0], or active count / (B - 1)).

Backward (one launch, 2-D grid of (BLOCK_M, BLOCK_M) tiles of dsim): element (r, c), r != c,
belongs to the row direction of pair r and to the column direction of pair c; it gets
    g_r w^r_rc + g_c w^c_rc,   w = [cost > 0] / (B - 1) (mean) or [cost == max > 0] / ties (hardest),
and the diagonal gets -g_r share_r. The cost is recomputed with the forward's exact expression,
so the comparison with the saved max is bit-for-bit: this is torch.amax's gradient (split evenly
among the entries equal to the max), and torch.relu's convention (no gradient at 0: strict '>',
a row whose max is 0 passes nothing). The margin's gradient is g * share (one elementwise op).

The (B, B) margin has its own two kernels (``_triplet_matrix_*``: a third margin form would be a
third feature flag) around the same two helpers, whose ``MATRIX`` branch is compile-time: the
float and (B,) launches compile to the code they compiled to before. Forward, the sweep loads the
tiles M[I, J] and M[J, I]^T beside S's; backward, entry (r, c) is compared with margin M[r, c] in
both of its hinges (the row direction of pair r, the column direction of pair c), so one tile of M
serves both recomputed costs, and d out / d M[r, c] is dsim[r, c] off the diagonal and 0 on it (a
pair is never its own negative), written by the same launch in the margin's dtype.

Limits: fp16, bf16, fp32 inputs (upcast on load; the margin tensor may be any float dtype and gets
a gradient in its own dtype), any B >= 1, any strides (a (B, B) margin broadcast from (B, 1) or
(1, B) by ``expand``, stride 0, is read in place); out fp32, dsim in sim's dtype. Tested on CPU under
the interpreter at B <= 130.
[2026-12-07] Compiled ahead of time for sm_80 and sm_90 with Triton 3.9 (tools/aot_report.py, the
table in docs/kernels.md): no register spills at B = 64 to 8192, ragged B included, every margin
form. The forwards sweep 64 columns per step (``sweep_block``) at ``tile_warps``: with 128 columns
at 4 warps they spilled from B = 256 on, and up to 21 KB per thread at a ragged B = 1000.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from ._launch import check_inputs, device_guard, row_block, store_stats, sweep_block, tile_warps
from .reference import _check_square


@triton.jit
def triplet_sweep(
    sim_ptr, stride_r, stride_c,  # (B, B) input and its strides
    offs_m, mask_m, m, B, inv_neg,  # the block's pairs, their fp32 margins; sizes; 1 / max(B - 1, 1)
    HARDEST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    margin_ptr=None, stride_mr=0, stride_mc=0, MATRIX: tl.constexpr = False,  # a (B, B) margin instead of m
):
    """The forward of pairs I = offs_m: (out, max or sum^r, ties or active^r, max or sum^c, ties or
    active^c, share), each (BLOCK_M,) fp32 (the module docstring's stats, in its order). ``MATRIX``:
    the margins are the (B, B) tensor at ``margin_ptr``, one per entry of S, and ``m`` is unused."""
    d = tl.load(sim_ptr + offs_m * (stride_r + stride_c), mask=mask_m, other=0.0).to(tl.float32)
    # per direction: running max (or sum) of the hinges and tie (or active) count; a hinge is >= 0
    # and the reference's max also sees the masked diagonal's 0, so the max starts at 0
    acc_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, B, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (offs_n[None, :] < B)
        valid = mask & (offs_m[:, None] != offs_n[None, :])  # negatives only
        # [two directions, one sweep] S[I, J] and the transposed tile S[J, I]^T
        s_r = tl.load(sim_ptr + offs_m[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask,
                      other=0.0).to(tl.float32)
        s_c = tl.load(sim_ptr + offs_n[None, :] * stride_r + offs_m[:, None] * stride_c, mask=mask,
                      other=0.0).to(tl.float32)
        if MATRIX:
            # [per-entry margins] M[I, J] for the row direction, the transposed tile M[J, I]^T for the column's
            m_r = tl.load(margin_ptr + offs_m[:, None] * stride_mr + offs_n[None, :] * stride_mc, mask=mask,
                          other=0.0).to(tl.float32)
            m_c = tl.load(margin_ptr + offs_n[None, :] * stride_mr + offs_m[:, None] * stride_mc, mask=mask,
                          other=0.0).to(tl.float32)
            cost_r = (m_r + s_r) - d[:, None]  # triplet_dsim recomputes exactly these expressions
            cost_c = (m_c + s_c) - d[:, None]
        else:
            cost_r = (m[:, None] + s_r) - d[:, None]  # triplet_dsim recomputes exactly this expression
            cost_c = (m[:, None] + s_c) - d[:, None]
        hinge_r = tl.where(valid & (cost_r > 0), cost_r, 0.0)  # strict '>': torch.relu's kink
        hinge_c = tl.where(valid & (cost_c > 0), cost_c, 0.0)
        if HARDEST:
            # [online max with tie count] merge the tile's (max, count) into the running pair
            t_r = tl.max(hinge_r, axis=1)
            t_c = tl.max(hinge_c, axis=1)
            n_r = tl.sum(tl.where(valid & (hinge_r == t_r[:, None]), 1.0, 0.0), axis=1)
            n_c = tl.sum(tl.where(valid & (hinge_c == t_c[:, None]), 1.0, 0.0), axis=1)
            new_r = tl.maximum(acc_r, t_r)
            new_c = tl.maximum(acc_c, t_c)
            cnt_r = tl.where(acc_r == new_r, cnt_r, 0.0) + tl.where(t_r == new_r, n_r, 0.0)
            cnt_c = tl.where(acc_c == new_c, cnt_c, 0.0) + tl.where(t_c == new_c, n_c, 0.0)
            acc_r = new_r
            acc_c = new_c
        else:
            acc_r += tl.sum(hinge_r, axis=1)
            acc_c += tl.sum(hinge_c, axis=1)
            cnt_r += tl.sum(tl.where(hinge_r > 0, 1.0, 0.0), axis=1)
            cnt_c += tl.sum(tl.where(hinge_c > 0, 1.0, 0.0), axis=1)
    # the loss and d out / d margin (the backward's diagonal and the margin's gradient)
    if HARDEST:
        out = acc_r + acc_c
        share = tl.where(acc_r > 0, 1.0, 0.0) + tl.where(acc_c > 0, 1.0, 0.0)
    else:
        out = (acc_r + acc_c) * inv_neg
        share = (cnt_r + cnt_c) * inv_neg
    return out, acc_r, cnt_r, acc_c, cnt_c, share


@triton.jit
def triplet_dsim(
    s, sim_ptr, stats_ptr, stride_r, stride_c,  # the fp32 (BLOCK_M, BLOCK_N) tile S[R, C]; sim; (5, B) stats
    offs_m, offs_n, mask_m, mask_n, m_r, m_c, g_r, g_c, B, inv_neg,  # rows R, columns C: margins, upstreams
    HARDEST: tl.constexpr, MATRIX: tl.constexpr = False,
):
    """The (BLOCK_M, BLOCK_N) fp32 tile of dsim (module docstring, Backward) for upstream gradients
    g_r of the row owners and g_c of the column owners. Margins: m_r (BLOCK_M,) of the row owners and
    m_c (BLOCK_N,) of the column owners, or (``MATRIX``) m_r the fp32 tile M[R, C] and m_c unused."""
    mask = mask_m[:, None] & mask_n[None, :]
    valid = mask & (offs_m[:, None] != offs_n[None, :])
    d_r = tl.load(sim_ptr + offs_m * (stride_r + stride_c), mask=mask_m, other=0.0).to(tl.float32)
    d_c = tl.load(sim_ptr + offs_n * (stride_r + stride_c), mask=mask_n, other=0.0).to(tl.float32)
    # [recompute] both costs of this tile, bit-identical to the forward's
    if MATRIX:  # entry (r, c) carries M[r, c] in both of its hinges
        cost_r = (m_r + s) - d_r[:, None]
        cost_c = (m_r + s) - d_c[None, :]
    else:
        cost_r = (m_r[:, None] + s) - d_r[:, None]
        cost_c = (m_c[None, :] + s) - d_c[None, :]
    if HARDEST:
        # amax's gradient: an equal share for every entry equal to a positive max
        max_r = tl.load(stats_ptr + offs_m, mask=mask_m, other=0.0)
        ties_r = tl.load(stats_ptr + B + offs_m, mask=mask_m, other=1.0)
        max_c = tl.load(stats_ptr + 2 * B + offs_n, mask=mask_n, other=0.0)
        ties_c = tl.load(stats_ptr + 3 * B + offs_n, mask=mask_n, other=1.0)
        hit_r = valid & (cost_r == max_r[:, None]) & (max_r[:, None] > 0)
        hit_c = valid & (cost_c == max_c[None, :]) & (max_c[None, :] > 0)
        ds = tl.where(hit_r, (g_r / tl.maximum(ties_r, 1.0))[:, None], 0.0) + \
            tl.where(hit_c, (g_c / tl.maximum(ties_c, 1.0))[None, :], 0.0)
    else:
        ds = tl.where(valid & (cost_r > 0), g_r[:, None] * inv_neg, 0.0) + \
            tl.where(valid & (cost_c > 0), g_c[None, :] * inv_neg, 0.0)
    # the diagonal: minus everything pair r's two directions passed to their negatives
    share_r = tl.load(stats_ptr + 4 * B + offs_m, mask=mask_m, other=0.0)
    return tl.where(offs_m[:, None] == offs_n[None, :], -(g_r * share_r)[:, None], ds)


@triton.jit
def _triplet_fwd_kernel(
    sim_ptr, margin_ptr, out_ptr, stats_ptr,  # pointers: (B, B) input; (B,) margins; (B,) out; (5, B) fp32 stats
    stride_r, stride_c, stride_m,  # strides of sim and of the margins
    B, margin, inv_neg,  # sizes; scalars: the float margin (if not PER_PAIR), 1 / max(B - 1, 1)
    HARDEST: tl.constexpr, PER_PAIR: tl.constexpr,  # feature flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    # 1. the pairs' margins, fp32
    if PER_PAIR:
        m = tl.load(margin_ptr + offs_m * stride_m, mask=mask_m, other=0.0).to(tl.float32)
    else:
        m = tl.zeros((BLOCK_M,), dtype=tl.float32) + margin
    # 2. [row and column sweep] the hinges' maxima (or sums) and counts
    out, acc_r, cnt_r, acc_c, cnt_c, share = triplet_sweep(sim_ptr, stride_r, stride_c, offs_m, mask_m, m, B,
                                                           inv_neg, HARDEST, BLOCK_M, BLOCK_N)
    tl.store(out_ptr + offs_m, out, mask=mask_m)
    store_stats(stats_ptr, offs_m, mask_m, B, acc_r, cnt_r, acc_c, cnt_c, share)


@triton.jit
def _triplet_bwd_kernel(
    sim_ptr, margin_ptr, stats_ptr, grad_ptr, dsim_ptr,  # pointers: (B, B); (B,); (5, B) fp32; (B,) fp32; (B, B) out
    stride_r, stride_c, stride_m, stride_dr, stride_dc,  # strides of sim, the margins and dsim
    B, margin, inv_neg,  # sizes; scalars as in the forward
    HARDEST: tl.constexpr, PER_PAIR: tl.constexpr,  # feature flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows r: the row direction of pair r
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns c: the column direction of pair c
    mask_m, mask_n = offs_m < B, offs_n < B
    mask = mask_m[:, None] & mask_n[None, :]
    # 1. per-pair numbers of the row owners and the column owners
    if PER_PAIR:
        m_r = tl.load(margin_ptr + offs_m * stride_m, mask=mask_m, other=0.0).to(tl.float32)
        m_c = tl.load(margin_ptr + offs_n * stride_m, mask=mask_n, other=0.0).to(tl.float32)
    else:
        m_r = tl.zeros((BLOCK_M,), dtype=tl.float32) + margin
        m_c = tl.zeros((BLOCK_N,), dtype=tl.float32) + margin
    g_r = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
    g_c = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)
    # 2. the tile's gradient
    s = tl.load(sim_ptr + offs_m[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32)
    ds = triplet_dsim(s, sim_ptr, stats_ptr, stride_r, stride_c, offs_m, offs_n, mask_m, mask_n, m_r, m_c, g_r, g_c,
                      B, inv_neg, HARDEST)
    tl.store(dsim_ptr + offs_m[:, None] * stride_dr + offs_n[None, :] * stride_dc,
             ds.to(dsim_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _triplet_matrix_fwd_kernel(
    sim_ptr, margin_ptr, out_ptr, stats_ptr,  # pointers: (B, B) input; (B, B) margins; (B,) out; (5, B) fp32 stats
    stride_r, stride_c, stride_mr, stride_mc,  # strides of sim and of the margins
    B, inv_neg,  # sizes; scalars: 1 / max(B - 1, 1)
    HARDEST: tl.constexpr,  # feature flag
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    # [row and column sweep] as _triplet_fwd_kernel's, each tile's margins loaded beside it
    out, acc_r, cnt_r, acc_c, cnt_c, share = triplet_sweep(sim_ptr, stride_r, stride_c, offs_m, mask_m, None, B,
                                                           inv_neg, HARDEST, BLOCK_M, BLOCK_N, margin_ptr,
                                                           stride_mr, stride_mc, MATRIX=True)
    tl.store(out_ptr + offs_m, out, mask=mask_m)
    store_stats(stats_ptr, offs_m, mask_m, B, acc_r, cnt_r, acc_c, cnt_c, share)


@triton.jit
def _triplet_matrix_bwd_kernel(
    sim_ptr, margin_ptr, stats_ptr, grad_ptr, dsim_ptr, dmargin_ptr,  # pointers: (B, B); (B, B); (5, B) fp32;
    # (B,) fp32; (B, B) out; (B, B) out (MARGIN_GRAD)
    stride_r, stride_c, stride_mr, stride_mc, stride_dr, stride_dc,  # strides of sim, the margins, dsim (= dmargin's)
    B, inv_neg,  # sizes; scalars as in the forward
    HARDEST: tl.constexpr, MARGIN_GRAD: tl.constexpr,  # feature flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows r: the row direction of pair r
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns c: the column direction of pair c
    mask_m, mask_n = offs_m < B, offs_n < B
    mask = mask_m[:, None] & mask_n[None, :]
    # 1. the tile's margins and the upstreams of the row owners and the column owners
    m = tl.load(margin_ptr + offs_m[:, None] * stride_mr + offs_n[None, :] * stride_mc, mask=mask,
                other=0.0).to(tl.float32)
    g_r = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
    g_c = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)
    # 2. the tile's gradient
    s = tl.load(sim_ptr + offs_m[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32)
    ds = triplet_dsim(s, sim_ptr, stats_ptr, stride_r, stride_c, offs_m, offs_n, mask_m, mask_n, m, None, g_r, g_c,
                      B, inv_neg, HARDEST, MATRIX=True)
    tl.store(dsim_ptr + offs_m[:, None] * stride_dr + offs_n[None, :] * stride_dc,
             ds.to(dsim_ptr.dtype.element_ty), mask=mask)
    if MARGIN_GRAD:
        # 3. d out / d M[r, c] = d out / d S[r, c] off the diagonal; the diagonal's margin is never compared
        dm = tl.where(offs_m[:, None] == offs_n[None, :], 0.0, ds)
        tl.store(dmargin_ptr + offs_m[:, None] * stride_dr + offs_n[None, :] * stride_dc,
                 dm.to(dmargin_ptr.dtype.element_ty), mask=mask)


MARGIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(sim: torch.Tensor, margin: Optional[torch.Tensor]) -> int:
    _check_square("triplet_terms", sim)
    check_inputs("triplet_terms", sim)
    n = sim.shape[0]
    if margin is not None:
        if margin.shape not in ((n,), (n, n)) or not margin.is_floating_point() or margin.device != sim.device:
            raise ValueError(f"triplet_terms: margin must be a float, a 0-d, a ({n},) or a ({n}, {n}) floating tensor "
                             f"on {sim.device}, got {margin.dtype} {tuple(margin.shape)} on {margin.device}")
        if margin.dim() == 2:
            check_inputs("triplet_terms", margin, dtypes=MARGIN_DTYPES)  # its offsets are 32-bit too
    return n


def _margin_args(sim, margin, margin_value):
    # the float form passes sim as an unused pointer: one kernel serves both forms
    return (sim, 0, margin_value) if margin is None else (margin, margin.stride(0), 0.0)


@custom_op("fastncl::triplet_fwd", mutates_args=())
def triplet_fwd(sim: torch.Tensor, margin: Optional[torch.Tensor], margin_value: float,
                hardest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B,), stats (5, B)) fp32; ``margin`` (B,) per pair or (B, B) per entry of sim, or None and
    ``margin_value`` for all."""
    n = _check(sim, margin)
    out = torch.empty(n, device=sim.device, dtype=torch.float32)
    stats = torch.empty(5, n, device=sim.device, dtype=torch.float32)
    block_m, block_n = row_block(n), sweep_block(n)
    with device_guard(sim):
        if margin is not None and margin.dim() == 2:
            _triplet_matrix_fwd_kernel[(triton.cdiv(n, block_m),)](
                sim, margin, out, stats, sim.stride(0), sim.stride(1), margin.stride(0), margin.stride(1), n,
                1.0 / max(n - 1, 1), HARDEST=hardest, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=tile_warps(block_m, block_n))
            return out, stats
        m_ptr, m_stride, m_value = _margin_args(sim, margin, margin_value)
        _triplet_fwd_kernel[(triton.cdiv(n, block_m),)](
            sim, m_ptr, out, stats, sim.stride(0), sim.stride(1), m_stride, n, m_value, 1.0 / max(n - 1, 1),
            HARDEST=hardest, PER_PAIR=margin is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=tile_warps(block_m, block_n))
    return out, stats


@triplet_fwd.register_fake
def _(sim, margin, margin_value, hardest):
    n = _check(sim, margin)
    return sim.new_empty(n, dtype=torch.float32), sim.new_empty(5, n, dtype=torch.float32)


@custom_op("fastncl::triplet_bwd", mutates_args=())
def triplet_bwd(sim: torch.Tensor, margin: Optional[torch.Tensor], margin_value: float, stats: torch.Tensor,
                grad: torch.Tensor, hardest: bool) -> torch.Tensor:
    """dsim (B, B) in sim's dtype from the (B,) upstream gradient of the per-pair losses."""
    n = sim.shape[0]
    dsim = torch.empty_like(sim, memory_format=torch.contiguous_format)
    grad = grad.float().contiguous()
    m_ptr, m_stride, m_value = _margin_args(sim, margin, margin_value)
    block = row_block(n)
    with device_guard(sim):
        _triplet_bwd_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
            sim, m_ptr, stats, grad, dsim, sim.stride(0), sim.stride(1), m_stride, dsim.stride(0), dsim.stride(1),
            n, m_value, 1.0 / max(n - 1, 1), HARDEST=hardest, PER_PAIR=margin is not None,
            BLOCK_M=block, BLOCK_N=block, num_warps=tile_warps(block, block))
    return dsim


@triplet_bwd.register_fake
def _(sim, margin, margin_value, stats, grad, hardest):
    return torch.empty_like(sim, memory_format=torch.contiguous_format)


@custom_op("fastncl::triplet_matrix_bwd", mutates_args=())
def triplet_matrix_bwd(sim: torch.Tensor, margin: torch.Tensor, stats: torch.Tensor, grad: torch.Tensor,
                       hardest: bool, margin_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dsim (B, B) in sim's dtype, dmargin (B, B) in the margin's dtype, or empty without
    ``margin_grad``) from the (B,) upstream gradient, for a (B, B) margin."""
    n = sim.shape[0]
    dsim = torch.empty_like(sim, memory_format=torch.contiguous_format)
    dmargin = torch.empty((n, n) if margin_grad else (0,), device=sim.device, dtype=margin.dtype)
    grad = grad.float().contiguous()
    block = row_block(n)
    with device_guard(sim):
        _triplet_matrix_bwd_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
            sim, margin, stats, grad, dsim, dmargin if margin_grad else dsim, sim.stride(0), sim.stride(1),
            margin.stride(0), margin.stride(1), dsim.stride(0), dsim.stride(1), n, 1.0 / max(n - 1, 1),
            HARDEST=hardest, MARGIN_GRAD=margin_grad, BLOCK_M=block, BLOCK_N=block,
            num_warps=tile_warps(block, block))
    return dsim, dmargin


@triplet_matrix_bwd.register_fake
def _(sim, margin, stats, grad, hardest, margin_grad):
    n = sim.shape[0]
    return (torch.empty_like(sim, memory_format=torch.contiguous_format),
            margin.new_empty((n, n) if margin_grad else (0,)))


def _setup_context(ctx, inputs, output):
    sim, margin, margin_value, hardest = inputs
    ctx.save_for_backward(sim, margin, output[1])
    ctx.margin_value, ctx.hardest = margin_value, hardest


def _backward(ctx, grad_out, grad_stats):
    sim, margin, stats = ctx.saved_tensors
    if margin is not None and margin.dim() == 2:  # per entry: one launch for both gradients
        margin_grad = ctx.needs_input_grad[1]
        dsim, dmargin = triplet_matrix_bwd(sim, margin, stats, grad_out, ctx.hardest, margin_grad)
        return dsim if ctx.needs_input_grad[0] else None, dmargin if margin_grad else None, None, None
    dsim = triplet_bwd(sim, margin, ctx.margin_value, stats, grad_out, ctx.hardest) if ctx.needs_input_grad[0] else None
    dmargin = None
    if margin is not None and ctx.needs_input_grad[1]:
        dmargin = (grad_out.float() * stats[4]).to(margin.dtype)  # d out_i / d m_i = share_i
    return dsim, dmargin, None, None


triplet_fwd.register_autograd(_backward, setup_context=_setup_context)


def triplet_terms(sim: torch.Tensor, margin, hardest: bool) -> torch.Tensor:
    """Triton twin of ``reference.triplet_terms``: (B,) per-pair losses; a margin tensor (0-d, (B,) or
    (B, B)) gets a gradient."""
    if isinstance(margin, torch.Tensor):
        if margin.dim() == 0:
            margin = margin.expand(sim.shape[0] if sim.dim() == 2 else 0)  # autograd sums the expansion back
        out, _ = triplet_fwd(sim, margin, 0.0, bool(hardest))
    else:
        out, _ = triplet_fwd(sim, None, float(margin), bool(hardest))
    return out


__all__ = ["triplet_terms"]
