"""Triton: fused per-batch objectives for the papers' small batches (B <= 256; the papers use 128).

Two objectives: the SPS reliable-batch objective and ESC's division terms.

## sps_reliable_objective

What: ``reference.sps_reliable_objective`` is the definition: the SPS reliable-batch objective
    total = l_re + lambda1 * l_cro + lambda2 * l_met
with l_re = mean_i (loss_i2t[i] + loss_t2i[i]) (SPS Eq. 17 with y = 1, the InfoNCE of Eq. 1-2),
l_cro the cross-transformation hinge on S (Eq. 9) and l_met the metric hinge on the two intramodal
matrices (Eq. 10).

Cost: the unfused Triton ops take three forward and three backward launches plus the eager
arithmetic that combines them (about ten small kernels at B = 128, where every kernel is
launch-bound); this objective takes one forward and one backward launch.

Algorithm (forward, one launch): ceil(B / BLOCK_M) programs, each owning a block I of pairs. A
program sweeps column tiles J loading S[I, J], S[J, I]^T, C^I[I, J] and C^T[I, J]: the first
feeds the row log-sum-exps of I [online LSE], the second the column log-sum-exps of I, their
difference the cross hinge of every (i, j) with i in I (each pair once over the grid), the last
two the metric hinge. The (l_re, l_cro, l_met, total) partials go through ``finish_sum``
(deterministic, no float atomics); the log-sum-exps are saved for the backward.

Backward (one launch): a 2-D grid of tiles writes dS = InfoNCE term (``infonce_dsim`` with the
uniform per-sample weight w_re / B) + 4 w_cro (S_ij - S_ji) [.] / B^2, and dC^I = -dC^T =
2 w_met (C^I - C^T) [.] / B^2, where w_re, w_cro, w_met combine the upstream gradients of total
and of each term.

Limits: fp16, bf16, fp32 inputs (upcast on load), any B >= 1 (meant for B <= 256: one program
per 32 rows sweeps whole rows), any strides; outputs fp32, gradients in the inputs' dtypes.

## esc_division_terms

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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from typing import Optional

from ._launch import (check_inputs, col_block, device_guard, finish_sum, reduction_counter, row_block, store_stats,
                      zero_scalar)
from .anchor import esc_anchor_dsim, esc_anchor_sweep
from .infonce import LOG2E, infonce_dsim, online_lse
from .triplet import triplet_dsim, triplet_sweep


@triton.jit
def _pick(values, k: tl.constexpr, K: tl.constexpr):
    """Element k of a (K,) tensor, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, K) == k, values, 0.0), axis=0)


@triton.jit
def _sps_reliable_fwd_kernel(
    sim_ptr, img_ptr, txt_ptr,  # inputs: (B, B) S, C^I, C^T
    lse_ptr, partials_ptr, counter_ptr, total_ptr, re_ptr, cro_ptr, met_ptr,  # saved (2, B); workspace; 0-d outs
    stride_r, stride_c, stride_ir, stride_ic, stride_tr, stride_tc,  # strides of the inputs
    B, scale, alpha, w_cro, w_met,  # scale = log2(e) / tau; the weights lambda1, lambda2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    m_r = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_c = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cro = tl.zeros((BLOCK_M,), dtype=tl.float32)
    met = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, B, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (offs_n[None, :] < B)
        # 1. S[I, J] and S[J, I]^T: row and column log-sum-exps of I, and the cross hinge
        s_mn = tl.load(sim_ptr + offs_m[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask,
                       other=0.0).to(tl.float32)
        s_nm = tl.load(sim_ptr + offs_n[None, :] * stride_r + offs_m[:, None] * stride_c, mask=mask,
                       other=0.0).to(tl.float32)
        m_r, l_r = online_lse(m_r, l_r, tl.where(mask, s_mn * scale, float("-inf")))
        m_c, l_c = online_lse(m_c, l_c, tl.where(mask, s_nm * scale, float("-inf")))
        d = s_mn - s_nm
        cro += tl.sum(tl.where(mask, tl.maximum(d * d - alpha, 0.0), 0.0), axis=1)
        # 2. the metric hinge on the intramodal tiles
        a = tl.load(img_ptr + offs_m[:, None] * stride_ir + offs_n[None, :] * stride_ic, mask=mask, other=0.0)
        t = tl.load(txt_ptr + offs_m[:, None] * stride_tr + offs_n[None, :] * stride_tc, mask=mask, other=0.0)
        e = a.to(tl.float32) - t.to(tl.float32)
        met += tl.sum(tl.where(mask, tl.maximum(e * e - alpha, 0.0), 0.0), axis=1)
    # 3. per-pair InfoNCE losses of block I, natural-log units
    diag = tl.load(sim_ptr + offs_m * (stride_r + stride_c), mask=mask_m, other=0.0).to(tl.float32) * scale
    lse_r = m_r + tl.log2(tl.where(mask_m, l_r, 1.0))
    lse_c = m_c + tl.log2(tl.where(mask_m, l_c, 1.0))
    tl.store(lse_ptr + offs_m, lse_r * 0.6931471805599453, mask=mask_m)
    tl.store(lse_ptr + B + offs_m, lse_c * 0.6931471805599453, mask=mask_m)
    loss = tl.where(mask_m, (lse_r - diag) + (lse_c - diag), 0.0) * 0.6931471805599453
    # 4. [deterministic reduction] (l_re, l_cro, l_met, total) over the programs
    l_re = tl.sum(loss, axis=0) / B
    l_cro = tl.sum(cro, axis=0) / B / B
    l_met = tl.sum(met, axis=0) / B / B
    k = tl.arange(0, 4)
    values = tl.where(k == 0, l_re, tl.where(k == 1, l_cro, tl.where(k == 2, l_met,
                                                                    l_re + w_cro * l_cro + w_met * l_met)))
    is_last, totals = finish_sum(partials_ptr, counter_ptr, values, pid, tl.num_programs(0), K=4, BLOCK=8)
    if is_last:
        tl.store(re_ptr, _pick(totals, 0, 4))
        tl.store(cro_ptr, _pick(totals, 1, 4))
        tl.store(met_ptr, _pick(totals, 2, 4))
        tl.store(total_ptr, _pick(totals, 3, 4))


@triton.jit
def _sps_reliable_bwd_kernel(
    sim_ptr, img_ptr, txt_ptr, lse_ptr,  # inputs and the saved (2, B) log-sum-exps
    g_total_ptr, g_re_ptr, g_cro_ptr, g_met_ptr,  # 0-d upstream gradients of the four outputs
    dsim_ptr, dimg_ptr, dtxt_ptr,  # (B, B) contiguous outputs
    stride_r, stride_c, stride_ir, stride_ic, stride_tr, stride_tc,  # strides of the inputs
    B, scale, inv_tau, alpha, w_cro, w_met,
    BLOCK: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask_m, mask_n = offs_m < B, offs_n < B
    mask = mask_m[:, None] & mask_n[None, :]
    # 1. the weight of each term: upstream gradient of total times its lambda, plus its own
    g_total = tl.load(g_total_ptr)
    w_re = (g_total + tl.load(g_re_ptr)) / B
    w_c = (w_cro * g_total + tl.load(g_cro_ptr)) * 4.0 / B / B
    w_m = (w_met * g_total + tl.load(g_met_ptr)) * 2.0 / B / B
    # 2. [recompute] InfoNCE: every pair's two losses weigh w_re
    s_mn = tl.load(sim_ptr + offs_m[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask,
                   other=0.0).to(tl.float32)
    lse_r = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    lse_c = tl.load(lse_ptr + B + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
    a_r = tl.zeros((BLOCK,), dtype=tl.float32) + w_re
    ds = infonce_dsim(s_mn * scale, lse_r, lse_c, a_r, a_r, 2.0 * a_r, offs_m, offs_n) * inv_tau
    # 3. the cross hinge: S_ij enters the (i, j) and (j, i) terms, each with derivative 2 d_ij
    s_nm = tl.load(sim_ptr + offs_n[None, :] * stride_r + offs_m[:, None] * stride_c, mask=mask,
                   other=0.0).to(tl.float32)
    d = s_mn - s_nm
    ds += tl.where(d * d > alpha, w_c * d, 0.0)
    out = offs_m[:, None] * B + offs_n[None, :]
    tl.store(dsim_ptr + out, ds.to(dsim_ptr.dtype.element_ty), mask=mask)
    # 4. the metric hinge
    a = tl.load(img_ptr + offs_m[:, None] * stride_ir + offs_n[None, :] * stride_ic, mask=mask, other=0.0)
    t = tl.load(txt_ptr + offs_m[:, None] * stride_tr + offs_n[None, :] * stride_tc, mask=mask, other=0.0)
    e = a.to(tl.float32) - t.to(tl.float32)
    de = tl.where(e * e > alpha, w_m * e, 0.0)
    tl.store(dimg_ptr + out, de.to(dimg_ptr.dtype.element_ty), mask=mask)
    tl.store(dtxt_ptr + out, (-de).to(dtxt_ptr.dtype.element_ty), mask=mask)


def _check_sps(sim, sim_img, sim_txt) -> int:
    for name, m in (("sim", sim), ("sim_img", sim_img), ("sim_txt", sim_txt)):
        if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape != sim.shape:
            raise ValueError(f"sps_reliable_objective: {name} must be a square matrix of the batch's shape "
                             f"{tuple(sim.shape)}, got {tuple(m.shape)}")
    check_inputs("sps_reliable_objective", sim, sim_img, sim_txt)
    return sim.shape[0]


_BLOCK_M, _BLOCK_N = 32, 64


@custom_op("fastncl::sps_reliable_fwd", mutates_args=())
def sps_reliable_fwd(sim: torch.Tensor, sim_img: torch.Tensor, sim_txt: torch.Tensor, tau: float, alpha: float,
                     cross_weight: float, metric_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor, torch.Tensor]:
    """(total, l_re, l_cro, l_met), 0-d fp32, and the (2, B) log-sum-exps."""
    n = _check_sps(sim, sim_img, sim_txt)
    grid = (triton.cdiv(n, _BLOCK_M),)
    outs = [torch.empty((), device=sim.device, dtype=torch.float32) for _ in range(4)]
    lse = torch.empty(2, n, device=sim.device, dtype=torch.float32)
    partials = torch.empty(grid[0], 4, device=sim.device, dtype=torch.float32)
    with device_guard(sim):
        _sps_reliable_fwd_kernel[grid](
            sim, sim_img, sim_txt, lse, partials, reduction_counter("sps_reliable_objective", sim.device), *outs,
            sim.stride(0), sim.stride(1), sim_img.stride(0), sim_img.stride(1), sim_txt.stride(0), sim_txt.stride(1),
            n, LOG2E / tau, alpha, cross_weight, metric_weight, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N)
    return (*outs, lse)


@sps_reliable_fwd.register_fake
def _(sim, sim_img, sim_txt, tau, alpha, cross_weight, metric_weight):
    n = _check_sps(sim, sim_img, sim_txt)
    return (*(sim.new_empty((), dtype=torch.float32) for _ in range(4)), sim.new_empty(2, n, dtype=torch.float32))


@custom_op("fastncl::sps_reliable_bwd", mutates_args=())
def sps_reliable_bwd(sim: torch.Tensor, sim_img: torch.Tensor, sim_txt: torch.Tensor, lse: torch.Tensor,
                     grad_total: torch.Tensor, grad_re: torch.Tensor, grad_cro: torch.Tensor, grad_met: torch.Tensor,
                     tau: float, alpha: float, cross_weight: float,
                     metric_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = sim.shape[0]
    grads = [torch.empty(n, n, device=x.device, dtype=x.dtype) for x in (sim, sim_img, sim_txt)]
    block = _BLOCK_M
    with device_guard(sim):
        _sps_reliable_bwd_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
            sim, sim_img, sim_txt, lse, grad_total.float(), grad_re.float(), grad_cro.float(), grad_met.float(),
            *grads, sim.stride(0), sim.stride(1), sim_img.stride(0), sim_img.stride(1), sim_txt.stride(0),
            sim_txt.stride(1), n, LOG2E / tau, 1.0 / tau, alpha, cross_weight, metric_weight, BLOCK=block)
    return tuple(grads)


@sps_reliable_bwd.register_fake
def _(sim, sim_img, sim_txt, lse, grad_total, grad_re, grad_cro, grad_met, tau, alpha, cross_weight, metric_weight):
    n = sim.shape[0]
    return tuple(x.new_empty(n, n) for x in (sim, sim_img, sim_txt))


def _sps_setup(ctx, inputs, output):
    sim, sim_img, sim_txt, *ctx.scalars = inputs
    ctx.mark_non_differentiable(output[4])
    ctx.set_materialize_grads(False)  # an unused output costs no zero-fill launch
    ctx.save_for_backward(sim, sim_img, sim_txt, output[4])


def _sps_backward(ctx, *grads):
    sim, sim_img, sim_txt, lse = ctx.saved_tensors
    grads = [zero_scalar(sim) if g is None else g for g in grads[:4]]
    return *sps_reliable_bwd(sim, sim_img, sim_txt, lse, *grads, *ctx.scalars), None, None, None, None


sps_reliable_fwd.register_autograd(_sps_backward, setup_context=_sps_setup)


def sps_reliable_objective(sim, sim_img, sim_txt, tau, alpha, cross_weight, metric_weight):
    """Triton twin of ``reference.sps_reliable_objective``: (total, l_re, l_cro, l_met)."""
    return sps_reliable_fwd(sim, sim_img, sim_txt, float(tau), float(alpha), float(cross_weight),
                            float(metric_weight))[:4]


# ---------------------------------------------------------------------------------------------
# ESC's division terms: l_hard + beta l_ESC against the batch's anchor


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
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"esc_division_terms: expected a square (B, B) similarity matrix, got shape "
                         f"{tuple(sim.shape)}")
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
    block_m = row_block(n)
    with device_guard(sim):
        _esc_division_fwd_kernel[(triton.cdiv(n, block_m),)](
            sim, m_ptr, loss, anchor, stats, sim.stride(0), sim.stride(1), m_stride, n, per_pair, m_value,
            esc_weight, alpha, 1.0 / max(n - 1, 1), HARDEST=hardest, NORMALIZE=normalize, BLOCK_M=block_m,
            BLOCK_N=col_block(n))
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
    with device_guard(sim):
        _esc_division_bwd_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
            sim, m_ptr, anchor, stats, grad, dsim, sim.stride(0), sim.stride(1), m_stride, dsim.stride(0),
            dsim.stride(1), n, per_pair, m_value, esc_weight, 1.0 / max(n - 1, 1), HARDEST=hardest,
            NORMALIZE=normalize, BLOCK_M=block, BLOCK_N=block)
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


__all__ = ["sps_reliable_objective", "esc_division_terms"]
