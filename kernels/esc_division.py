"""Triton: ESC's division terms fused for the papers' small batches (B <= 256; the papers use
128). One forward and one backward launch.

What: ``reference.esc_division_terms`` is the definition: ESC's per-pair division loss (Eq. 9)
    loss_i = l_hard_i + beta * l_ESC_i,   anchor a = argmax_i S[i, i] (Eq. 6, ties to the lowest index)
with l_hard = ``triplet_terms(S, margin, hardest)`` (Eq. 1) and l_ESC = ``esc_anchor_terms(S, a,
alpha, normalize)`` (Eq. 7-8). The margin is a float, or a 0-d or (B,) tensor (it gets a gradient).

Cost: unfused, the anchor is an argmax launch, and the two Triton ops take two forward launches,
two backward launches, and the eager scale-and-add (plus, normalizing,
the anchor module's five small torch launches for W and V). Fused: one forward launch and one
backward launch, normalizing or not (a margin tensor that needs a gradient adds one elementwise
op, g * share); no host synchronisation.

Algorithm (forward, one launch): ceil(B / BLOCK_M) programs, each owning a block I of pairs. Each
program first finds the anchor itself [online argmax over diagonal tiles: one running (max, first
index) per lane, strict '>' so a later equal value keeps the earlier index, then the lowest index
among the lanes holding the maximum] (B strided reads per program: cheap for B <= 256, correct
for any B); program 0 writes it. Then ``triplet_sweep`` (the triplet module's forward: S[I, :]
and S[:, I] in tiles, both directions, online max with tie counts or sums) and
``esc_anchor_sweep`` (the anchor module's forward against a: two gathered taps, and, normalizing,
the sweep of row a) give the two terms; it writes loss and a (10, B) fp32 stats tensor (the
triplet's five rows, then the anchor's five).

Backward (one launch, 2-D grid of dsim tiles, dense, no atomics): ``triplet_dsim`` of the tile
plus beta times ``esc_anchor_dsim`` of the tile, both with the same upstream g (the anchor is not
differentiable). Normalizing, every pair's anchor row is row a, so W_a = sum_i g_i u_i and
V_a = sum_i g_i u_i y_i are plain sums over the batch: the programs whose row block holds a
compute them in-kernel (O(B) reads; the loop is empty in the others), instead of the anchor
module's torch ``index_add_``.

Limits: fp16, bf16, fp32 inputs (upcast on load; the diagonal's argmax sees the same values as
torch's), any B >= 1 (B = 0 has no anchor: ValueError), any strides; a NaN on the diagonal is
not handled like torch.argmax (which picks it). Loss fp32, anchor 0-d int64, dsim in sim's dtype.
Tested on CPU under the interpreter at B <= 130.
[2026-12-07] Compiled ahead of time for sm_80 and sm_90 with Triton 3.9 (tools/aot_report.py, the
table in docs/kernels.md): no register spills at B = 64 to 8192, ragged B included, every variant
(the launchers' warps say where ptxas needed other than ``tile_warps``). With 128-column sweeps at
4 warps the forward spilled up to 21 KB per thread at a ragged B = 1000, 100-360 B at B = 1024.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from ._launch import check_inputs, device_guard, row_block, store_stats, sweep_block, tile_warps
from .anchor import esc_anchor_dsim, esc_anchor_sweep
from .reference import _check_square
from .triplet import triplet_dsim, triplet_sweep


@triton.jit
def _esc_division_fwd_kernel(
    sim_ptr, margin_ptr, loss_ptr, anchor_ptr, stats_ptr,  # (B, B); (B,) margins; (B,) out; 0-d int64; (10, B)
    stride_r, stride_c, stride_m,  # strides of sim and of the margins
    B, per_pair, margin, esc_weight, alpha, inv_neg,  # sizes; scalars (per_pair: 1 reads margin_ptr, 0 the float)
    HARDEST: tl.constexpr, NORMALIZE: tl.constexpr,  # feature flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    # 1. [online argmax] the batch's anchor argmax_i S[i, i]: per lane a running (max, first index),
    #    then the lowest index among the lanes holding the maximum (torch.argmax's tie rule)
    best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    first = tl.arange(0, BLOCK_N)  # an all -inf diagonal gives 0, like torch.argmax
    for start in range(0, B, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        v = tl.load(sim_ptr + offs_n * (stride_r + stride_c), mask=offs_n < B, other=float("-inf")).to(tl.float32)
        first = tl.where(v > best, offs_n, first)  # strict '>': a later equal value keeps the earlier index
        best = tl.maximum(best, v)
    anchor = tl.min(tl.where(best == tl.max(best, axis=0), first, B), axis=0)
    if pid == 0:
        tl.store(anchor_ptr, anchor.to(tl.int64))
    # 2. the pairs' margins: a masked-off load reads nothing when the margin is one float
    m = tl.load(margin_ptr + offs_m * stride_m, mask=offs_m < B * per_pair, other=0.0).to(tl.float32) + margin
    # 3. l_hard (row and column sweep) and l_ESC against the anchor (its row swept when normalizing)
    hard, acc_r, cnt_r, acc_c, cnt_c, share = triplet_sweep(sim_ptr, stride_r, stride_c, offs_m, mask_m, m, B,
                                                            inv_neg, HARDEST, BLOCK_M, BLOCK_N)
    a = tl.zeros((BLOCK_M,), dtype=tl.int32) + anchor
    esc, q, scale, s1, u, y = esc_anchor_sweep(sim_ptr, stride_r, stride_c, a, offs_m, mask_m, B, alpha, NORMALIZE,
                                               BLOCK_M, BLOCK_N)
    tl.store(loss_ptr + offs_m, hard + esc_weight * esc, mask=mask_m)
    store_stats(stats_ptr, offs_m, mask_m, B, acc_r, cnt_r, acc_c, cnt_c, share)
    store_stats(stats_ptr + 5 * B, offs_m, mask_m, B, q, scale, s1, u, y)


@triton.jit
def _esc_division_bwd_kernel(
    sim_ptr, margin_ptr, anchor_ptr, stats_ptr, grad_ptr, dsim_ptr,  # (B, B); (B,); 0-d; (10, B); (B,) fp32; out
    stride_r, stride_c, stride_m, stride_dr, stride_dc,  # strides of sim, the margins and dsim
    B, per_pair, margin, esc_weight, inv_neg,  # sizes; scalars as in the forward
    HARDEST: tl.constexpr, NORMALIZE: tl.constexpr,  # feature flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows r
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns c
    mask_m, mask_n = offs_m < B, offs_n < B
    mask = mask_m[:, None] & mask_n[None, :]
    # 1. per-pair numbers of the row and column owners, and the tile S[R, C]
    anchor = tl.load(anchor_ptr).to(tl.int32)
    m_r = tl.load(margin_ptr + offs_m * stride_m, mask=offs_m < B * per_pair, other=0.0).to(tl.float32) + margin
    m_c = tl.load(margin_ptr + offs_n * stride_m, mask=offs_n < B * per_pair, other=0.0).to(tl.float32) + margin
    g_r = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
    g_c = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)
    s = tl.load(sim_ptr + offs_m[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32)
    # 2. l_hard's tile
    ds = triplet_dsim(s, sim_ptr, stats_ptr, stride_r, stride_c, offs_m, offs_n, mask_m, mask_n, m_r, m_c, g_r, g_c,
                      B, inv_neg, HARDEST)
    # 3. l_ESC's tile: every pair's anchor row is row `anchor`, so W and V are sums over all pairs,
    #    computed in the one program row that holds it (the loop is empty elsewhere; no index_add)
    w_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if NORMALIZE:
        lo = tl.program_id(0) * BLOCK_M
        end = tl.where((anchor >= lo) & (anchor < lo + BLOCK_M), B, 0)
        for start in range(0, end, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            gu = tl.load(grad_ptr + offs, mask=offs < B, other=0.0) * \
                tl.load(stats_ptr + 8 * B + offs, mask=offs < B, other=0.0)
            w_acc += gu
            v_acc += gu * tl.load(stats_ptr + 9 * B + offs, mask=offs < B, other=0.0)
    w = tl.where(offs_m == anchor, tl.sum(w_acc, axis=0), 0.0)
    v = tl.where(offs_m == anchor, tl.sum(v_acc, axis=0), 0.0)
    a_r = tl.zeros((BLOCK_M,), dtype=tl.int32) + anchor
    a_c = tl.zeros((BLOCK_N,), dtype=tl.int32) + anchor
    ds += esc_weight * esc_anchor_dsim(s, stats_ptr + 5 * B, offs_m, offs_n, mask_m, mask_n, a_r, a_c, g_r, g_c, w, v,
                                       B, NORMALIZE)
    tl.store(dsim_ptr + offs_m[:, None] * stride_dr + offs_n[None, :] * stride_dc,
             ds.to(dsim_ptr.dtype.element_ty), mask=mask)


def _check_esc(sim: torch.Tensor, margin: Optional[torch.Tensor]) -> int:
    _check_square("esc_division_terms", sim)
    check_inputs("esc_division_terms", sim)
    n = sim.shape[0]
    if n == 0:
        raise ValueError("esc_division_terms: an empty batch has no anchor (B must be >= 1)")
    if margin is not None and (margin.shape != (n,) or not margin.is_floating_point() or margin.device != sim.device):
        raise ValueError(f"esc_division_terms: margin must be a float, a 0-d or a ({n},) floating tensor on "
                         f"{sim.device}, got {margin.dtype} {tuple(margin.shape)} on {margin.device}")
    return n


def _esc_margin_args(sim, margin, margin_value):
    # the float form passes sim as a pointer that the masked-off margin loads never read
    return (sim, 0, 0, margin_value) if margin is None else (margin, margin.stride(0), 1, 0.0)


@custom_op("fastncl::esc_division_fwd", mutates_args=())
def esc_division_fwd(sim: torch.Tensor, margin: Optional[torch.Tensor], margin_value: float, esc_weight: float,
                     alpha: float, hardest: bool, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (B,) fp32, anchor 0-d int64, stats (10, B) fp32: the triplet's five rows, the anchor's five)."""
    n = _check_esc(sim, margin)
    loss = torch.empty(n, device=sim.device, dtype=torch.float32)
    anchor = torch.empty((), device=sim.device, dtype=torch.int64)
    stats = torch.empty(10, n, device=sim.device, dtype=torch.float32)
    m_ptr, m_stride, per_pair, m_value = _esc_margin_args(sim, margin, margin_value)
    block_m, block_n = row_block(n), sweep_block(n)
    # tile_warps, but 2 warps for the smallest tiles (B <= 64: 16 x 64), where at 4 ptxas 13.4 (sm_90)
    # spills 12 bytes per thread with 80 registers in use (tools/aot_report.py)
    warps = 2 if block_m * block_n <= 1024 else tile_warps(block_m, block_n)
    with device_guard(sim):
        _esc_division_fwd_kernel[(triton.cdiv(n, block_m),)](
            sim, m_ptr, loss, anchor, stats, sim.stride(0), sim.stride(1), m_stride, n, per_pair, m_value,
            esc_weight, alpha, 1.0 / max(n - 1, 1), HARDEST=hardest, NORMALIZE=normalize, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=warps)
    return loss, anchor, stats


@esc_division_fwd.register_fake
def _(sim, margin, margin_value, esc_weight, alpha, hardest, normalize):
    n = _check_esc(sim, margin)
    return (sim.new_empty(n, dtype=torch.float32), sim.new_empty((), dtype=torch.int64),
            sim.new_empty(10, n, dtype=torch.float32))


@custom_op("fastncl::esc_division_bwd", mutates_args=())
def esc_division_bwd(sim: torch.Tensor, margin: Optional[torch.Tensor], margin_value: float, anchor: torch.Tensor,
                     stats: torch.Tensor, grad: torch.Tensor, esc_weight: float, hardest: bool,
                     normalize: bool) -> torch.Tensor:
    """dsim (B, B) in sim's dtype from the (B,) upstream gradient of the losses."""
    n = sim.shape[0]
    dsim = torch.empty_like(sim, memory_format=torch.contiguous_format)
    grad = grad.float().contiguous()
    m_ptr, m_stride, per_pair, m_value = _esc_margin_args(sim, margin, margin_value)
    block = row_block(n)
    # tile_warps, but 16 warps for 64 x 64 tiles (B >= 256), where at 8 a ragged B (no vector loads)
    # spills 8-16 bytes per thread at 128-190 registers (ptxas 12.9 and 13.4; tools/aot_report.py)
    warps = 16 if block * block >= 4096 else tile_warps(block, block)
    with device_guard(sim):
        _esc_division_bwd_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
            sim, m_ptr, anchor, stats, grad, dsim, sim.stride(0), sim.stride(1), m_stride, dsim.stride(0),
            dsim.stride(1), n, per_pair, m_value, esc_weight, 1.0 / max(n - 1, 1), HARDEST=hardest,
            NORMALIZE=normalize, BLOCK_M=block, BLOCK_N=block, num_warps=warps)
    return dsim


@esc_division_bwd.register_fake
def _(sim, margin, margin_value, anchor, stats, grad, esc_weight, hardest, normalize):
    return torch.empty_like(sim, memory_format=torch.contiguous_format)


def _esc_setup(ctx, inputs, output):
    sim, margin, ctx.margin_value, ctx.esc_weight, _, ctx.hardest, ctx.normalize = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # the anchor and stats get no zero-filled gradients
    ctx.save_for_backward(sim, margin, output[1], output[2])


def _esc_backward(ctx, grad_loss, grad_anchor, grad_stats):
    sim, margin, anchor, stats = ctx.saved_tensors
    dsim = dmargin = None
    if ctx.needs_input_grad[0]:
        dsim = esc_division_bwd(sim, margin, ctx.margin_value, anchor, stats, grad_loss, ctx.esc_weight, ctx.hardest,
                                ctx.normalize)
    if margin is not None and ctx.needs_input_grad[1]:
        dmargin = (grad_loss.float() * stats[4]).to(margin.dtype)  # d loss_i / d m_i = the triplet's share_i
    return dsim, dmargin, None, None, None, None, None


esc_division_fwd.register_autograd(_esc_backward, setup_context=_esc_setup)


def esc_division_terms(sim, margin, esc_weight, alpha=0.0, hardest=True, normalize=False):
    """Triton twin of ``reference.esc_division_terms``: ((B,) losses, the anchor's index, 0-d int64);
    a margin tensor (0-d or (B,)) gets a gradient."""
    if isinstance(margin, torch.Tensor):
        if margin.dim() == 0:
            margin = margin.expand(sim.shape[0] if sim.dim() == 2 else 0)  # autograd sums the expansion back
        loss, anchor, _ = esc_division_fwd(sim, margin, 0.0, float(esc_weight), float(alpha), bool(hardest),
                                           bool(normalize))
    else:
        loss, anchor, _ = esc_division_fwd(sim, None, float(margin), float(esc_weight), float(alpha), bool(hardest),
                                           bool(normalize))
    return loss, anchor


__all__ = ["esc_division_terms"]
