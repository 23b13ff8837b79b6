"""Triton: bidirectional InfoNCE terms straight from (B, D) embeddings, never materialising B x B.

What: ``reference.infonce_terms_embed`` is the definition: ``infonce_terms(img @ txt.T, tau)``
(SPS Eq. 1, 2, 15). With z = img @ txt.T / tau,
    loss_i2t[i] = logsumexp_j z[i, j] - z[i, i],   loss_t2i[i] = logsumexp_j z[j, i] - z[i, i],
    prob = exp(-loss).

Cost (B pairs, D features): eager computes S = img @ txt.T (2 B^2 D FLOPs) and then reads and
writes B^2 fp32 matrices about ten times (the upcast, z, the logsumexps, autograd's saved
softmaxes, dS): memory grows as B^2 (4 GiB of fp32 per matrix at B = 32768). Here the forward is
4 B^2 D FLOPs (S formed once for the row statistics and once for the column statistics), reads
the embeddings about 2 B / BLOCK_M times (from L2) and writes 6 B fp32 numbers; the backward is
8 B^2 D FLOPs for D <= 256 (FA-2 split: each direction recomputes S and multiplies dS by the
other tower), (4 ceil(D / 256) + 4) B^2 D above, and writes the two (B, D) gradients. Saved for
the backward: 2 B log-sum-exps and probabilities. Memory is linear in B.

Algorithm (forward, one launch): a 1-D grid of 2 * ceil(B / BLOCK_M) programs. The first half
owns image row blocks (queries = img, keys = txt), the second half caption blocks (queries = txt,
keys = img): S.T = txt @ img.T, so the column statistics are the row statistics of the swapped
towers (``_row_stats``, called in two branches of the kernel rather than on selected pointers,
so that each copy keeps its strides' specialised values and its loads vectorise). Each program
sweeps the keys in BLOCK_N tiles, forms each (BLOCK_M, BLOCK_N) tile of S with ``tl.dot`` and
keeps a running (max, sum) per row [online LSE] in fp32, base 2. No fixed shift: the embeddings
need not be normalised. When D fits one chunk (``embed_blocks``: D <= 256 on a GPU) the query
tile is loaded once and stays on chip; otherwise each tile reduces over D in chunks
(``gram_tile``). The diagonal is a row-wise dot product of the two towers in fp32.

Backward (one launch): with upstream gradients gl (losses) and gp (probabilities), a = gl - gp * prob
is each loss's effective gradient (the SPS/ESC per-sample weights enter here), and
    dS[i, j] = (a_r[i] softmax_row[i, j] + a_c[j] softmax_col[i, j] - [i == j] (a_r[i] + a_c[i])) / tau.
A grid of (2 * ceil(B / BLOCK_M), ceil(D / BLOCK_DO)) programs: the first half forms d_img = dS @ txt
for a row block, the second half d_txt = dS.T @ img for a caption block (``_grad_rows``), each
recomputing its S tiles and both softmaxes from the saved log-sum-exps and accumulating a
(BLOCK_M, BLOCK_DO) fp32 gradient block in registers; one store, no atomics. With one chunk the
key tile that formed S is also dS @ K's operand (grid dimension 1 is 1); above, each of the
ceil(D / 256) column blocks recomputes S.

Limits: fp16, bf16, fp32 embeddings of one dtype (tensor-core dots for 16-bit inputs with fp32
accumulation, IEEE fp32 dots on the FMA units for fp32), any B >= 1, D >= 1, any strides; outputs
fp32, gradients in the input dtype (dS is rounded to it before the gradient GEMM, as
FlashAttention does). Tested on CPU in the interpreter up to B = 130, D = 256.
[2026-12-07] Not yet run on a GPU: compiled ahead of time for sm_80 and sm_90 with Triton 3.9
(tools/aot_report.py, the table in docs/kernels.md): no register spills at B = 64 to 65536, D = 256
and 1024, fp32/bf16/fp16; at most 132 KiB of shared memory on sm_80 and 130 KiB on sm_90 (bf16,
D = 256, the backward). The fp32 backward spilled about 1.5 KB per thread on sm_80 with 64 keys per
step and 32-feature chunks, the bf16 one-chunk backward about 110 B on sm_90 with 3 stages
(``embed_blocks``). Launch shapes are not tuned.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from ._launch import (check_inputs, device_guard, dot_precision, embed_blocks, gram_tile, launch_target,
                      load_tile)
from .infonce import LOG2E, effective_grad, infonce_dsim, online_lse
from .reference import _check_features


@triton.jit
def _row_stats(q_ptr, k_ptr, lse_ptr, loss_ptr, prob_ptr,  # pointers: queries, keys; (2, B) fp32 outputs
               stride_qb, stride_qd, stride_kb, stride_kd,  # strides
               block, out, B, D, scale,  # row block; offset of this direction's outputs; sizes; log2(e) / tau
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
               ONE_CHUNK: tl.constexpr):
    """Log-sum-exp, loss and probability of the rows of q @ k.T in one row block."""
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    if ONE_CHUNK:  # the row block's features stay on chip for the whole sweep
        q = load_tile(q_ptr, offs_m, mask_m, stride_qb, stride_qd, 0, D, BLOCK_D, PRECISION)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # finite: a padded row never makes inf - inf
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # 1. [online LSE] recompute each (BLOCK_M, BLOCK_N) tile of S and fold it into (max, sum), base 2
    for start in range(0, B, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < B
        if ONE_CHUNK:
            k = load_tile(k_ptr, offs_n, mask_n, stride_kb, stride_kd, 0, D, BLOCK_D, PRECISION)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            s = gram_tile(q_ptr, k_ptr, offs_m, offs_n, mask_m, mask_n, stride_qb, stride_qd, stride_kb, stride_kd, D,
                          BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        m_i, l_i = online_lse(m_i, l_i, tl.where(mask_n[None, :], s * scale, float("-inf")))
    # 2. the diagonal S[i, i] = q[i] . k[i], a row-wise dot product in fp32
    diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        qd = load_tile(q_ptr, offs_m, mask_m, stride_qb, stride_qd, start, D, BLOCK_D, PRECISION)
        kd = load_tile(k_ptr, offs_m, mask_m, stride_kb, stride_kd, start, D, BLOCK_D, PRECISION)
        diag += tl.sum(qd.to(tl.float32) * kd.to(tl.float32), axis=1)
    # 3. outputs in natural-log units
    lse = (m_i + tl.log2(tl.where(mask_m, l_i, 1.0))) * 0.6931471805599453
    loss = tl.where(mask_m, lse - diag * scale * 0.6931471805599453, 0.0)
    tl.store(lse_ptr + out + offs_m, lse, mask=mask_m)
    tl.store(loss_ptr + out + offs_m, loss, mask=mask_m)
    tl.store(prob_ptr + out + offs_m, tl.exp(-loss), mask=mask_m)


@triton.jit
def _grad_rows(q_ptr, k_ptr, dq_ptr, lse_ptr, prob_ptr, gl_ptr, gp_ptr,  # pointers
               stride_qb, stride_qd, stride_kb, stride_kd, stride_gb, stride_gd,  # strides of q, k, dq
               block, col_block, own, other, B, D, scale, inv_tau,  # blocks; statistics offsets; sizes; scalars
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
               PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """dq[block rows, col_block columns] = (dS @ k) for the rows of q @ k.T ("own" statistics) whose
    columns carry the "other" statistics."""
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    offs_o = col_block * BLOCK_DO + tl.arange(0, BLOCK_DO)  # the gradient columns this program writes
    if ONE_CHUNK:  # the row block's features stay on chip for the whole sweep
        q = load_tile(q_ptr, offs_m, mask_m, stride_qb, stride_qd, 0, D, BLOCK_D, PRECISION)
    # 1. effective per-sample gradients a = gl - gp * prob, and the saved log-sum-exps (base 2)
    a_own = effective_grad(gl_ptr + own, 1, gp_ptr + own, 1, prob_ptr + own, offs_m, mask_m)
    a_diag = a_own + effective_grad(gl_ptr + other, 1, gp_ptr + other, 1, prob_ptr + other, offs_m, mask_m)
    lse_own = tl.load(lse_ptr + own + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for start in range(0, B, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < B
        a_other = effective_grad(gl_ptr + other, 1, gp_ptr + other, 1, prob_ptr + other, offs_n, mask_n)
        lse_other = tl.load(lse_ptr + other + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
        # 2. [recompute] the S tile and both softmaxes from the saved log-sum-exps; k: the key rows'
        #    columns this program writes (one chunk: the tile S was formed from)
        if ONE_CHUNK:
            k = load_tile(k_ptr, offs_n, mask_n, stride_kb, stride_kd, 0, D, BLOCK_D, PRECISION)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            s = gram_tile(q_ptr, k_ptr, offs_m, offs_n, mask_m, mask_n, stride_qb, stride_qd, stride_kb, stride_kd, D,
                          BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            k = load_tile(k_ptr, offs_n, mask_n, stride_kb, stride_kd, col_block * BLOCK_DO, D, BLOCK_DO, PRECISION)
        ds = infonce_dsim(s * scale, lse_own, lse_other, a_own, a_other, a_diag, offs_m, offs_n)
        ds = tl.where(mask_m[:, None] & mask_n[None, :], ds, 0.0)
        # 3. [FA-2 split] acc += dS_tile @ k[:, this program's columns]
        ds = ds.to(k_ptr.dtype.element_ty).to(k.dtype)  # dS rounded to 16 bits for 16-bit inputs (tensor cores)
        acc = tl.dot(ds, k, acc, input_precision=PRECISION)
    tl.store(dq_ptr + offs_m[:, None] * stride_gb + offs_o[None, :] * stride_gd,
             (acc * inv_tau).to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_o[None, :] < D))


@triton.jit
def _infonce_embed_fwd_kernel(
    img_ptr, txt_ptr, lse_ptr, loss_ptr, prob_ptr,  # pointers: (B, D) inputs; (2, B) fp32 outputs, row 0 = i2t
    stride_ib, stride_id, stride_tb, stride_td,  # strides of img and txt
    B, D, scale,  # sizes; scale = log2(e) / tau
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(B, BLOCK_M)
    # the column statistics of img @ txt.T are the row statistics of txt @ img.T: one helper, the
    # towers swapped (a branch, not a select of pointers, so that each copy keeps its strides' known
    # values and its loads vectorise)
    if pid < n_blocks:  # image rows: image -> text
        _row_stats(img_ptr, txt_ptr, lse_ptr, loss_ptr, prob_ptr, stride_ib, stride_id, stride_tb, stride_td,
                   pid, 0, B, D, scale, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ONE_CHUNK)
    else:  # caption columns: text -> image
        _row_stats(txt_ptr, img_ptr, lse_ptr, loss_ptr, prob_ptr, stride_tb, stride_td, stride_ib, stride_id,
                   pid - n_blocks, B, B, D, scale, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ONE_CHUNK)


@triton.jit
def _infonce_embed_bwd_kernel(
    img_ptr, txt_ptr, lse_ptr, prob_ptr, gl_ptr, gp_ptr, dimg_ptr, dtxt_ptr,  # pointers: inputs; (2, B) fp32; outputs
    stride_ib, stride_id, stride_tb, stride_td, stride_gb, stride_gd,  # strides of img, txt, the gradients
    B, D, scale, inv_tau,  # sizes; scale = log2(e) / tau
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(B, BLOCK_M)
    if pid < n_blocks:  # d_img = dS @ txt: rows carry the i2t statistics, columns the t2i ones
        _grad_rows(img_ptr, txt_ptr, dimg_ptr, lse_ptr, prob_ptr, gl_ptr, gp_ptr, stride_ib, stride_id, stride_tb,
                   stride_td, stride_gb, stride_gd, pid, tl.program_id(1), 0, B, B, D, scale, inv_tau,
                   BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO, PRECISION, ONE_CHUNK)
    else:  # d_txt = dS.T @ img: the same with the towers and the statistics swapped
        _grad_rows(txt_ptr, img_ptr, dtxt_ptr, lse_ptr, prob_ptr, gl_ptr, gp_ptr, stride_tb, stride_td, stride_ib,
                   stride_id, stride_gb, stride_gd, pid - n_blocks, tl.program_id(1), B, 0, B, D, scale, inv_tau,
                   BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO, PRECISION, ONE_CHUNK)


def _check(img: torch.Tensor, txt: torch.Tensor) -> tuple[int, int]:
    _check_features("infonce_terms_embed", img, txt)
    check_inputs("infonce_terms_embed", img, txt)
    if img.dtype != txt.dtype:
        raise ValueError(f"infonce_terms_embed: img and txt differ in dtype ({img.dtype} and {txt.dtype})")
    return img.shape


@custom_op("fastncl::infonce_embed_fwd", mutates_args=())
def infonce_embed_fwd(img: torch.Tensor, txt: torch.Tensor, tau: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, loss, prob), each (2, B) fp32: row 0 image -> text, row 1 text -> image."""
    n, d = _check(img, txt)
    lse, loss, prob = (torch.empty(2, n, device=img.device, dtype=torch.float32) for _ in range(3))
    blocks = embed_blocks(n, d, img.element_size(), target=launch_target(img.device))
    with device_guard(img):
        _infonce_embed_fwd_kernel[(2 * triton.cdiv(n, blocks.m),)](
            img, txt, lse, loss, prob, img.stride(0), img.stride(1), txt.stride(0), txt.stride(1), n, d, LOG2E / tau,
            BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, PRECISION=dot_precision(img.dtype),
            ONE_CHUNK=blocks.one_chunk, num_warps=blocks.warps, num_stages=blocks.stages)
    return lse, loss, prob


@infonce_embed_fwd.register_fake
def _(img, txt, tau):
    n, _ = _check(img, txt)
    return tuple(img.new_empty(2, n, dtype=torch.float32) for _ in range(3))


@custom_op("fastncl::infonce_embed_bwd", mutates_args=())
def infonce_embed_bwd(img: torch.Tensor, txt: torch.Tensor, lse: torch.Tensor, prob: torch.Tensor,
                      grad_loss: torch.Tensor, grad_prob: torch.Tensor, tau: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_img, d_txt), (B, D) in the inputs' dtype, from the (2, B) upstream gradients of losses and probabilities."""
    n, d = img.shape
    dimg, dtxt = (torch.empty(n, d, device=img.device, dtype=img.dtype) for _ in range(2))  # one layout, one stride pair
    grad_loss, grad_prob = grad_loss.float().contiguous(), grad_prob.float().contiguous()
    blocks = embed_blocks(n, d, img.element_size(), target=launch_target(img.device))
    with device_guard(img):
        _infonce_embed_bwd_kernel[(2 * triton.cdiv(n, blocks.m), triton.cdiv(d, blocks.do))](
            img, txt, lse, prob, grad_loss, grad_prob, dimg, dtxt, img.stride(0), img.stride(1), txt.stride(0),
            txt.stride(1), dimg.stride(0), dimg.stride(1), n, d, LOG2E / tau, 1.0 / tau,
            BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, BLOCK_DO=blocks.do, PRECISION=dot_precision(img.dtype),
            ONE_CHUNK=blocks.one_chunk, num_warps=blocks.warps, num_stages=blocks.stages)
    return dimg, dtxt


@infonce_embed_bwd.register_fake
def _(img, txt, lse, prob, grad_loss, grad_prob, tau):
    n, d = img.shape
    return img.new_empty(n, d), txt.new_empty(n, d)


def _setup_context(ctx, inputs, output):
    img, txt, tau = inputs
    lse, _, prob = output
    ctx.save_for_backward(img, txt, lse, prob)
    ctx.tau = tau


def _backward(ctx, grad_lse, grad_loss, grad_prob):
    img, txt, lse, prob = ctx.saved_tensors
    dimg, dtxt = infonce_embed_bwd(img, txt, lse, prob, grad_loss, grad_prob, ctx.tau)
    return dimg, dtxt, None


infonce_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


def infonce_terms_embed(img: torch.Tensor, txt: torch.Tensor, tau: float):
    """Triton twin of ``reference.infonce_terms_embed``: (loss_i2t, loss_t2i, prob_i2t, prob_t2i)."""
    _, loss, prob = infonce_embed_fwd(img, txt, float(tau))
    return loss[0], loss[1], prob[0], prob[1]


__all__ = ["infonce_terms_embed"]
