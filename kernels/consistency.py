"""Triton: the consistency hinges of SPS on (B, B) similarity matrices (SPS Eq. 9 and 10).

What: ``reference.cross_consistency`` and ``reference.metric_consistency`` are the definitions:
    cross  = mean_{i,j} [(S_ij - S_ji)^2 - alpha]_+          (cross-transformation, Eq. 9)
    metric = mean_{i,j} [(C^I_ij - C^T_ij)^2 - alpha]_+      (metric, Eq. 10, intramodal matrices)

Cost: eager cross reads S twice (S and S^T) and writes four B^2 temporaries (difference,
square, hinge, its mask for the backward); this kernel reads S once and writes one number. The
backward reads S once and writes dS once (metric: reads both matrices, writes both gradients).

Algorithm: a 2-D grid of (BLOCK, BLOCK) tiles. Cross processes symmetric tile pairs: program
(I, J) with I <= J loads S[I, J] and S[J, I]^T, whose hinge terms are equal, so an off-diagonal
pair counts twice and the programs below the diagonal only report a zero; metric is elementwise.
Each program's fp32 sum (already divided by B^2) goes through ``finish_sum``: the last program
adds the partials in a fixed order, so the result is deterministic with no float atomics and the
op is one launch. The backward is one elementwise launch over the same tiles:
dS_ij = 4 g (S_ij - S_ji) [(S_ij - S_ji)^2 > alpha] / B^2 (written at (i, j) and, negated, at
(j, i)); dC^I = 2 g (C^I - C^T) [.] / B^2 = -dC^T.

Limits: fp16, bf16, fp32 inputs (upcast on load), any B >= 1, any strides; the value is fp32,
gradients in the inputs' dtype. The hinge passes no gradient at its kink (strict >, as relu).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from ._launch import check_inputs, device_guard, finish_scalar, row_block, scalar_workspace
from .reference import _check_square


@triton.jit
def _cross_difference(sim_ptr, bi, bj, stride_r, stride_c, B, BLOCK: tl.constexpr):
    """Rows I, columns J, their mask, and the fp32 tile S[I, J] - S[J, I]^T."""
    offs_i = bi * BLOCK + tl.arange(0, BLOCK)
    offs_j = bj * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_i[:, None] < B) & (offs_j[None, :] < B)
    s_ij = tl.load(sim_ptr + offs_i[:, None] * stride_r + offs_j[None, :] * stride_c, mask=mask, other=0.0)
    s_ji = tl.load(sim_ptr + offs_j[None, :] * stride_r + offs_i[:, None] * stride_c, mask=mask, other=0.0)
    return offs_i, offs_j, mask, s_ij.to(tl.float32) - s_ji.to(tl.float32)


@triton.jit
def _cross_consistency_fwd_kernel(
    sim_ptr, partials_ptr, counter_ptr, out_ptr,  # pointers: (B, B) input; workspace; 0-d fp32 out
    stride_r, stride_c,  # strides of sim
    B, alpha, inv_count,  # sizes; scalars (inv_count = 1 / B^2)
    BLOCK: tl.constexpr,
):
    bi, bj = tl.program_id(0), tl.program_id(1)
    value = tl.zeros((1,), dtype=tl.float32)
    if bj >= bi:  # 1. [symmetric tile pairs] (I, J) and (J, I) in one program
        offs_i, offs_j, mask, d = _cross_difference(sim_ptr, bi, bj, stride_r, stride_c, B, BLOCK)
        hinge = tl.maximum(d * d - alpha, 0.0)
        weight = tl.where(bj > bi, 2.0, 1.0) * inv_count  # an off-diagonal pair holds two equal terms
        value += tl.sum(tl.sum(hinge, axis=1), axis=0) * weight
    # 2. [deterministic reduction] the last program adds the partials in index order
    finish_scalar(partials_ptr, counter_ptr, out_ptr, value, bi * tl.num_programs(1) + bj,
                  tl.num_programs(0) * tl.num_programs(1), BLOCK=128)


@triton.jit
def _cross_consistency_bwd_kernel(
    sim_ptr, grad_ptr, dsim_ptr,  # pointers: (B, B) input; 0-d upstream gradient; (B, B) out
    stride_r, stride_c, stride_dr, stride_dc,  # strides of sim and dsim
    B, alpha, inv_count,
    BLOCK: tl.constexpr,
):
    bi, bj = tl.program_id(0), tl.program_id(1)
    if bj >= bi:
        offs_i, offs_j, mask, d = _cross_difference(sim_ptr, bi, bj, stride_r, stride_c, B, BLOCK)
        # S_ij enters the (i, j) and the (j, i) terms, each with derivative 2 d_ij
        g = tl.load(grad_ptr) * 4.0 * inv_count
        ds = tl.where(d * d > alpha, g * d, 0.0)
        tl.store(dsim_ptr + offs_i[:, None] * stride_dr + offs_j[None, :] * stride_dc,
                 ds.to(dsim_ptr.dtype.element_ty), mask=mask)
        if bj > bi:  # the mirrored tile: dS_ji = -dS_ij
            tl.store(dsim_ptr + offs_j[None, :] * stride_dr + offs_i[:, None] * stride_dc,
                     (-ds).to(dsim_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _metric_consistency_fwd_kernel(
    img_ptr, txt_ptr, partials_ptr, counter_ptr, out_ptr,  # pointers: two (B, B) inputs; workspace; out
    stride_ir, stride_ic, stride_tr, stride_tc,  # strides of the two inputs
    B, alpha, inv_count,
    BLOCK: tl.constexpr,
):
    bi, bj = tl.program_id(0), tl.program_id(1)
    offs_i = bi * BLOCK + tl.arange(0, BLOCK)
    offs_j = bj * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_i[:, None] < B) & (offs_j[None, :] < B)
    a = tl.load(img_ptr + offs_i[:, None] * stride_ir + offs_j[None, :] * stride_ic, mask=mask, other=0.0)
    t = tl.load(txt_ptr + offs_i[:, None] * stride_tr + offs_j[None, :] * stride_tc, mask=mask, other=0.0)
    d = a.to(tl.float32) - t.to(tl.float32)
    value = tl.zeros((1,), dtype=tl.float32) + tl.sum(tl.sum(tl.maximum(d * d - alpha, 0.0), axis=1), axis=0) * inv_count
    finish_scalar(partials_ptr, counter_ptr, out_ptr, value, bi * tl.num_programs(1) + bj,
                  tl.num_programs(0) * tl.num_programs(1), BLOCK=128)


@triton.jit
def _metric_consistency_bwd_kernel(
    img_ptr, txt_ptr, grad_ptr, dimg_ptr, dtxt_ptr,  # pointers: two inputs; 0-d upstream; two outputs
    stride_ir, stride_ic, stride_tr, stride_tc, stride_d,  # strides (the outputs are contiguous)
    B, alpha, inv_count,
    BLOCK: tl.constexpr,
):
    offs_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_i[:, None] < B) & (offs_j[None, :] < B)
    a = tl.load(img_ptr + offs_i[:, None] * stride_ir + offs_j[None, :] * stride_ic, mask=mask, other=0.0)
    t = tl.load(txt_ptr + offs_i[:, None] * stride_tr + offs_j[None, :] * stride_tc, mask=mask, other=0.0)
    d = a.to(tl.float32) - t.to(tl.float32)
    ds = tl.where(d * d > alpha, tl.load(grad_ptr) * 2.0 * inv_count * d, 0.0)
    out = offs_i[:, None] * stride_d + offs_j[None, :]
    tl.store(dimg_ptr + out, ds.to(dimg_ptr.dtype.element_ty), mask=mask)
    tl.store(dtxt_ptr + out, (-ds).to(dtxt_ptr.dtype.element_ty), mask=mask)


def _check_squares(op: str, *mats: torch.Tensor) -> int:
    for m in mats:
        _check_square(op, m)
    if len(mats) == 2 and mats[0].shape != mats[1].shape:
        raise ValueError(f"{op}: sim_img {tuple(mats[0].shape)} and sim_txt {tuple(mats[1].shape)} differ in shape")
    check_inputs(op, *mats)
    return mats[0].shape[0]


@custom_op("fastncl::cross_consistency_fwd", mutates_args=())
def cross_consistency_fwd(sim: torch.Tensor, alpha: float) -> torch.Tensor:
    n = _check_squares("cross_consistency", sim)
    block = row_block(n)
    grid = (triton.cdiv(n, block), triton.cdiv(n, block))
    partials, counter, out = scalar_workspace("cross_consistency", sim, grid[0] * grid[1])
    with device_guard(sim):
        _cross_consistency_fwd_kernel[grid](sim, partials, counter, out, sim.stride(0), sim.stride(1), n, alpha,
                                            1.0 / (n * n), BLOCK=block)
    return out


@cross_consistency_fwd.register_fake
def _(sim, alpha):
    _check_squares("cross_consistency", sim)
    return sim.new_empty((), dtype=torch.float32)


@custom_op("fastncl::cross_consistency_bwd", mutates_args=())
def cross_consistency_bwd(sim: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
    n = sim.shape[0]
    dsim = torch.empty_like(sim, memory_format=torch.contiguous_format)
    block = row_block(n)
    with device_guard(sim):
        _cross_consistency_bwd_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
            sim, grad.float(), dsim, sim.stride(0), sim.stride(1), dsim.stride(0), dsim.stride(1), n, alpha,
            1.0 / (n * n), BLOCK=block)
    return dsim


@cross_consistency_bwd.register_fake
def _(sim, grad, alpha):
    return torch.empty_like(sim, memory_format=torch.contiguous_format)


@custom_op("fastncl::metric_consistency_fwd", mutates_args=())
def metric_consistency_fwd(sim_img: torch.Tensor, sim_txt: torch.Tensor, alpha: float) -> torch.Tensor:
    n = _check_squares("metric_consistency", sim_img, sim_txt)
    block = row_block(n)
    grid = (triton.cdiv(n, block), triton.cdiv(n, block))
    partials, counter, out = scalar_workspace("metric_consistency", sim_img, grid[0] * grid[1])
    with device_guard(sim_img):
        _metric_consistency_fwd_kernel[grid](sim_img, sim_txt, partials, counter, out, sim_img.stride(0),
                                             sim_img.stride(1), sim_txt.stride(0), sim_txt.stride(1), n, alpha,
                                             1.0 / (n * n), BLOCK=block)
    return out


@metric_consistency_fwd.register_fake
def _(sim_img, sim_txt, alpha):
    _check_squares("metric_consistency", sim_img, sim_txt)
    return sim_img.new_empty((), dtype=torch.float32)


@custom_op("fastncl::metric_consistency_bwd", mutates_args=())
def metric_consistency_bwd(sim_img: torch.Tensor, sim_txt: torch.Tensor, grad: torch.Tensor,
                           alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = sim_img.shape[0]
    dimg = torch.empty(n, n, device=sim_img.device, dtype=sim_img.dtype)
    dtxt = torch.empty(n, n, device=sim_txt.device, dtype=sim_txt.dtype)
    block = row_block(n)
    with device_guard(sim_img):
        _metric_consistency_bwd_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
            sim_img, sim_txt, grad.float(), dimg, dtxt, sim_img.stride(0), sim_img.stride(1), sim_txt.stride(0),
            sim_txt.stride(1), n, n, alpha, 1.0 / (n * n), BLOCK=block)
    return dimg, dtxt


@metric_consistency_bwd.register_fake
def _(sim_img, sim_txt, grad, alpha):
    n = sim_img.shape[0]
    return sim_img.new_empty(n, n), sim_txt.new_empty(n, n)


def _cross_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.alpha = inputs[1]


def _cross_backward(ctx, grad):
    (sim,) = ctx.saved_tensors
    return cross_consistency_bwd(sim, grad, ctx.alpha), None


def _metric_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.alpha = inputs[2]


def _metric_backward(ctx, grad):
    sim_img, sim_txt = ctx.saved_tensors
    return *metric_consistency_bwd(sim_img, sim_txt, grad, ctx.alpha), None


cross_consistency_fwd.register_autograd(_cross_backward, setup_context=_cross_setup)
metric_consistency_fwd.register_autograd(_metric_backward, setup_context=_metric_setup)


def cross_consistency(sim: torch.Tensor, alpha: float) -> torch.Tensor:
    """Triton twin of ``reference.cross_consistency``."""
    return cross_consistency_fwd(sim, float(alpha))


def metric_consistency(sim_img: torch.Tensor, sim_txt: torch.Tensor, alpha: float) -> torch.Tensor:
    """Triton twin of ``reference.metric_consistency``."""
    return metric_consistency_fwd(sim_img, sim_txt, float(alpha))


__all__ = ["cross_consistency", "metric_consistency"]
