"""Triton: bidirectional InfoNCE terms of a (B, B) similarity matrix (SPS Eq. 1, 2, 15).

What: ``reference.infonce_terms`` is the definition. With z = sim / tau,
    loss_i2t[i] = logsumexp_j z[i, j] - z[i, i],   loss_t2i[i] = logsumexp_j z[j, i] - z[i, i],
    prob = exp(-loss) (the diagonal softmax probabilities).

Cost: eager reads the B^2 matrix about six times and writes three B^2 temporaries (the upcast,
z, the exp of each logsumexp); this kernel reads it twice (once along rows, once along columns)
and writes 6 B fp32 numbers. The backward reads it once and writes dsim once.

Algorithm (forward, one launch): a 1-D grid of 2 * ceil(B / BLOCK_M) programs. The first half
owns row blocks, the second half column blocks: one helper (``_lse_sweep``) walks the transposed
matrix with the two strides swapped, called in two branches of the kernel rather than on strides
selected at run time, so that each copy keeps its strides' specialised values (a unit stride a
constant: vector loads). Each program sweeps its block in (BLOCK_M, BLOCK_N) tiles keeping a
running (max, sum) per row [online LSE] in fp32, in base 2 (log2(e) / tau folded into one scale),
and reads its diagonal entries directly. It writes the log-sum-exp (saved for the backward), the
loss and the probability of its rows (or columns).

Backward (one launch): with upstream gradients gl (of the losses) and gp (of the
probabilities), the effective gradient of each loss is a = gl - gp * prob, and
    dsim[i, j] = (a_r[i] softmax_row[i, j] + a_c[j] softmax_col[i, j] - [i == j] (a_r[i] + a_c[i])) / tau,
one elementwise pass over a 2-D grid of tiles that recomputes both softmaxes from the saved
log-sum-exps: the per-sample weights of SPS and ESC are folded in through a_r and a_c.

Limits: fp16, bf16, fp32 inputs (upcast on load), any B >= 1, any strides; outputs fp32, dsim in
the input's dtype.
[2026-12-07] Compiled ahead of time for sm_80 and sm_90 with Triton 3.9 (tools/aot_report.py, the
table in docs/kernels.md): no register spills at B = 64 to 8192, ragged B included (8 warps from
4096 elements per tile, ``tile_warps``); with the strides selected at run time the forward spilled
about 1.3 KB per thread from B = 256 on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from ._launch import check_inputs, col_block, device_guard, row_block, tile_warps, zero_scalar
from .reference import _check_square

LOG2E = 1.4426950408889634


@triton.jit
def online_lse(m_i, l_i, x):
    """Fold a (M, N) tile of base-2 logits into the running row (max, sum) [online LSE]."""
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    return m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)


@triton.jit
def infonce_dsim(x, lse_r, lse_c, a_r, a_c, a_diag, offs_m, offs_n):
    """tau * dsim of a tile: both softmaxes recomputed from the base-2 logits ``x`` and the base-2
    log-sum-exps of its rows and columns, weighted by the effective per-sample gradients of the
    row losses (a_r), column losses (a_c); on the diagonal minus both of pair i's (a_diag)."""
    ds = a_r[:, None] * tl.exp2(x - lse_r[:, None]) + a_c[None, :] * tl.exp2(x - lse_c[None, :])
    return tl.where(offs_m[:, None] == offs_n[None, :], ds - a_diag[:, None], ds)


@triton.jit
def _lse_sweep(sim_ptr, offs_m, mask_m, stride_keep, stride_red, B, scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The running base-2 (max, sum) [online LSE] of rows ``offs_m`` of the matrix whose (i, j)
    element is at i * stride_keep + j * stride_red: the rows of sim, or (strides swapped) its columns."""
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # finite: a padded row never makes inf - inf
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, B, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (offs_n[None, :] < B)
        x = tl.load(sim_ptr + offs_m[:, None] * stride_keep + offs_n[None, :] * stride_red, mask=mask,
                    other=float("-inf")).to(tl.float32) * scale
        m_i, l_i = online_lse(m_i, l_i, x)
    return m_i, l_i


@triton.jit
def _infonce_fwd_kernel(
    sim_ptr, lse_ptr, loss_r_ptr, loss_c_ptr, prob_r_ptr, prob_c_ptr,  # (B, B) input; (2, B) and (B,) fp32 out
    stride_r, stride_c,  # strides of sim
    B, scale,  # sizes; scale = log2(e) / tau
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(B, BLOCK_M)
    direction = pid // n_blocks  # 0: rows (image -> text), 1: columns (text -> image)
    offs_m = (pid % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    # 1.-2. [online LSE] fold each tile into the running (max, sum), base 2, fp32. Columns are rows of
    #    the transposed matrix: a branch per direction, not a select of strides, so that each copy
    #    keeps its strides' specialised values (a unit stride stays a constant: vector loads)
    if direction == 0:
        m_i, l_i = _lse_sweep(sim_ptr, offs_m, mask_m, stride_r, stride_c, B, scale, BLOCK_M, BLOCK_N)
    else:
        m_i, l_i = _lse_sweep(sim_ptr, offs_m, mask_m, stride_c, stride_r, B, scale, BLOCK_M, BLOCK_N)
    # 3. the diagonal, read directly, and the outputs in natural-log units
    diag = tl.load(sim_ptr + offs_m * (stride_r + stride_c), mask=mask_m, other=0.0).to(tl.float32) * scale
    lse = (m_i + tl.log2(tl.where(mask_m, l_i, 1.0))) * 0.6931471805599453
    loss = tl.where(mask_m, lse - diag * 0.6931471805599453, 0.0)  # padded rows: no inf in exp
    tl.store(lse_ptr + direction * B + offs_m, lse, mask=mask_m)
    if direction == 0:
        tl.store(loss_r_ptr + offs_m, loss, mask=mask_m)
        tl.store(prob_r_ptr + offs_m, tl.exp(-loss), mask=mask_m)
    else:
        tl.store(loss_c_ptr + offs_m, loss, mask=mask_m)
        tl.store(prob_c_ptr + offs_m, tl.exp(-loss), mask=mask_m)


@triton.jit
def effective_grad(gl_ptr, gl_stride, gp_ptr, gp_stride, prob_ptr, offs, mask):
    """a = gl - gp * prob: the effective upstream gradient of one direction's losses."""
    gl = tl.load(gl_ptr + offs * gl_stride, mask=mask, other=0.0).to(tl.float32)
    gp = tl.load(gp_ptr + offs * gp_stride, mask=mask, other=0.0).to(tl.float32)
    return gl - gp * tl.load(prob_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _infonce_bwd_kernel(
    sim_ptr, lse_ptr, prob_r_ptr, prob_c_ptr, dsim_ptr,  # (B, B) input; saved (2, B) and (B,) fp32; (B, B) out
    glr_ptr, glc_ptr, gpr_ptr, gpc_ptr,  # upstream gradients of loss_i2t, loss_t2i, prob_i2t, prob_t2i
    glr_stride, glc_stride, gpr_stride, gpc_stride,  # their strides (0: an unused output's zero)
    stride_r, stride_c, stride_dr, stride_dc,  # strides of sim and dsim
    B, scale, inv_tau,  # sizes; scale = log2(e) / tau
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < B, offs_n < B
    # 1. effective per-sample gradients of the two losses: a = gl - gp * prob
    a_r = effective_grad(glr_ptr, glr_stride, gpr_ptr, gpr_stride, prob_r_ptr, offs_m, mask_m)
    a_c = effective_grad(glc_ptr, glc_stride, gpc_ptr, gpc_stride, prob_c_ptr, offs_n, mask_n)
    lse_r = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    lse_c = tl.load(lse_ptr + B + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
    # 2. [recompute] both softmaxes of this tile from the saved log-sum-exps
    mask = mask_m[:, None] & mask_n[None, :]
    x = tl.load(sim_ptr + offs_m[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32) * scale
    # 3. the diagonal's own term, d(-z_ii), from both losses of pair i
    a_cm = effective_grad(glc_ptr, glc_stride, gpc_ptr, gpc_stride, prob_c_ptr, offs_m, mask_m)
    ds = infonce_dsim(x, lse_r, lse_c, a_r, a_c, a_r + a_cm, offs_m, offs_n) * inv_tau
    tl.store(dsim_ptr + offs_m[:, None] * stride_dr + offs_n[None, :] * stride_dc,
             ds.to(dsim_ptr.dtype.element_ty), mask=mask)


def _check(sim: torch.Tensor) -> int:
    _check_square("infonce_terms", sim)
    check_inputs("infonce_terms", sim)
    return sim.shape[0]


@custom_op("fastncl::infonce_fwd", mutates_args=())
def infonce_fwd(sim: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """(loss_i2t, loss_t2i, prob_i2t, prob_t2i) (B,) and the (2, B) log-sum-exps, all fp32."""
    n = _check(sim)
    outs = [torch.empty(n, device=sim.device, dtype=torch.float32) for _ in range(4)]
    lse = torch.empty(2, n, device=sim.device, dtype=torch.float32)
    block_m = row_block(n)
    with device_guard(sim):
        _infonce_fwd_kernel[(2 * triton.cdiv(n, block_m),)](
            sim, lse, *outs, sim.stride(0), sim.stride(1), n, LOG2E / tau, BLOCK_M=block_m, BLOCK_N=col_block(n),
            num_warps=tile_warps(block_m, col_block(n)))
    return (*outs, lse)


@infonce_fwd.register_fake
def _(sim, tau):
    n = _check(sim)
    return (*(sim.new_empty(n, dtype=torch.float32) for _ in range(4)), sim.new_empty(2, n, dtype=torch.float32))


@custom_op("fastncl::infonce_bwd", mutates_args=())
def infonce_bwd(sim: torch.Tensor, lse: torch.Tensor, prob_i2t: torch.Tensor, prob_t2i: torch.Tensor,
                grad_loss_i2t: torch.Tensor, grad_loss_t2i: torch.Tensor, grad_prob_i2t: torch.Tensor,
                grad_prob_t2i: torch.Tensor, tau: float) -> torch.Tensor:
    """dsim (B, B) in sim's dtype from the upstream gradients of the four outputs ((B,), or a
    0-d zero for an output that received none)."""
    n = sim.shape[0]
    dsim = torch.empty_like(sim, memory_format=torch.contiguous_format)
    grads = (grad_loss_i2t, grad_loss_t2i, grad_prob_i2t, grad_prob_t2i)
    strides = [g.stride(0) if g.dim() else 0 for g in grads]
    block = row_block(n)
    with device_guard(sim):
        _infonce_bwd_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
            sim, lse, prob_i2t, prob_t2i, dsim, *grads, *strides, sim.stride(0), sim.stride(1), dsim.stride(0),
            dsim.stride(1), n, LOG2E / tau, 1.0 / tau, BLOCK_M=block, BLOCK_N=block, num_warps=tile_warps(block, block))
    return dsim


@infonce_bwd.register_fake
def _(sim, lse, prob_i2t, prob_t2i, grad_loss_i2t, grad_loss_t2i, grad_prob_i2t, grad_prob_t2i, tau):
    return torch.empty_like(sim, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    sim, tau = inputs
    *_, prob_i2t, prob_t2i, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an unused output costs no zero-fill launch
    ctx.save_for_backward(sim, lse, prob_i2t, prob_t2i)
    ctx.tau = tau


def _backward(ctx, *grads):
    sim, lse, prob_i2t, prob_t2i = ctx.saved_tensors
    grads = [zero_scalar(sim) if g is None else g for g in grads[:4]]
    return infonce_bwd(sim, lse, prob_i2t, prob_t2i, *grads, ctx.tau), None


infonce_fwd.register_autograd(_backward, setup_context=_setup_context)


def infonce_terms(sim: torch.Tensor, tau: float):
    """Triton twin of ``reference.infonce_terms``: (loss_i2t, loss_t2i, prob_i2t, prob_t2i)."""
    return infonce_fwd(sim, float(tau))[:4]


# online_lse, infonce_dsim and effective_grad are shared with sps_objective.py and infonce_embed.py
__all__ = ["infonce_terms"]
