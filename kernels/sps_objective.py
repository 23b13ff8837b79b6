"""Triton: the SPS reliable-batch objective fused for the papers' small batches (B <= 256; the
papers use 128). One forward and one backward launch.

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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from ._launch import check_inputs, device_guard, finish_sum, reduction_counter, zero_scalar
from .infonce import LOG2E, infonce_dsim, online_lse


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


__all__ = ["sps_reliable_objective"]
