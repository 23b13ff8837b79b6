"""Triton: ESC terms of each pair against its anchor pair (ESC Eq. 7, 8 and 14).

What: ``reference.esc_anchor_terms`` is the definition. With a_i the anchor of pair i (one for the
batch, or one per pair), x_i = S[a_i, i], y_i = S[i, a_i], q_i = x_i - y_i and d_i = q_i^2:
    normalize=False:  out_i = relu(d_i - alpha)                                (ESC Eq. 8, 14)
    normalize=True:   out_i = d_i / D_i,  D_i = max(sum_c (S[a_i, c] - y_i)^2, 1e-24)
(the official code's row-normalised variant; alpha unused). A pair that is its own anchor gets 0.

Cost: eager gathers a (B, B) copy of the anchor rows and its squared differences (normalize), or
three (B,) gathers; the kernel reads 2 B elements (normalize=False) or the B anchor rows once
(normalize=True; one row, L2-resident, for a shared anchor) and writes 6 B fp32 numbers. The
backward writes dsim once and reads O(B) numbers plus S itself only when normalizing.

Algorithm (forward, one launch): a 1-D grid over blocks of BLOCK_M pairs; each program gathers
x_I and y_I directly and, when normalizing, sweeps its pairs' anchor rows in (BLOCK_M, BLOCK_N)
tiles accumulating D and S1_i = sum_c (S[a_i, c] - y_i) in fp32. It saves (5, B) fp32 stats: q,
the scale k (relu's [d - alpha > 0], or 1 / D), S1, u = -2 out / D ([D unclamped], the gradient
of 1 / D's factor), and y.

Backward (2-D grid of dsim tiles, no atomics, no scatter): each element is computed once from
its row owner r and its column owner c. Pair c's x-term lands on (a_c, c) and pair r's y-term on
(r, a_r), so element (r, c) gets
    [a_c == r] 2 g_c q_c k_c  -  [a_r == c] (2 g_r q_r k_r + g_r u_r S1_r)
(mutual pseudo-negatives a_i = j, a_j = i put both terms of two pairs on one element, and both
are summed here). normalize=True adds the dense anchor-row term S[r, c] W_r - V_r with
W_r = sum_{i: a_i = r} g_i u_i and V_r = sum_{i: a_i = r} g_i u_i y_i: several pairs share an
anchor row, so W and V come from one small torch ``index_add_`` in the launcher (with the zero
fill, the products and the stack: 5 small launches besides the kernel). normalize=False: one
forward and one backward launch.

Limits: fp16, bf16, fp32 inputs (upcast on load), any B >= 1, any strides; an int anchor is
checked against B, an anchor tensor (0-d or (B,), any integer dtype) is not (no host sync: an
index outside [0, B) is undefined behaviour); outputs fp32, dsim in sim's dtype.
[2026-12-07] Compiled ahead of time for sm_80 and sm_90 with Triton 3.9 (tools/aot_report.py, the
table in docs/kernels.md): no register spills at B = 64 to 8192, ragged B included (8 warps from
4096 elements per tile, ``tile_warps``; at 4, a ragged B = 1000 spilled about 2 KB per thread
forward and 300 bytes backward).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from ._launch import check_inputs, col_block, device_guard, row_block, store_stats, tile_warps
from .reference import _check_square


@triton.jit
def esc_anchor_sweep(
    sim_ptr, stride_r, stride_c,  # (B, B) input and its strides
    a, offs_m, mask_m, B, alpha,  # (BLOCK_M,) int32 anchors of the pairs offs_m; sizes; the hinge's alpha
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward of pairs I = offs_m against anchors a: (out, q, scale, S1, u, y), each (BLOCK_M,)
    fp32 (out, then the module docstring's stats in their order)."""
    # the two gathered taps x = S[a, i], y = S[i, a]
    x = tl.load(sim_ptr + a * stride_r + offs_m * stride_c, mask=mask_m, other=0.0).to(tl.float32)
    y = tl.load(sim_ptr + offs_m * stride_r + a * stride_c, mask=mask_m, other=0.0).to(tl.float32)
    q = x - y  # exactly 0 for a pair that is its own anchor (x and y are one element)
    d = q * q
    if NORMALIZE:
        # [row sweep] D_i and S1_i over the anchor row of each pair, fp32
        den = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, B, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask = mask_m[:, None] & (offs_n[None, :] < B)
            t = tl.load(sim_ptr + a[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask,
                        other=0.0).to(tl.float32) - y[:, None]
            t = tl.where(mask, t, 0.0)
            den += tl.sum(t * t, axis=1)
            s1 += tl.sum(t, axis=1)
        # official code: F.normalize clamps the norm at 1e-12, the squared norm at 1e-24
        inv = 1.0 / tl.maximum(den, 1e-24)
        out = d * inv
        scale = inv
        u = tl.where(den >= 1e-24, -2.0 * out * inv, 0.0)  # clamp_min passes its gradient at >=
    else:
        z = d - alpha
        out = tl.where(z > 0, z, 0.0)  # strict '>': torch.relu's kink
        scale = tl.where(z > 0, 1.0, 0.0)
        s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        u = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return out, q, scale, s1, u, y


@triton.jit
def esc_anchor_dsim(
    s, stats_ptr,  # the fp32 (BLOCK_M, BLOCK_N) tile S[R, C] (used if NORMALIZE); (5, B) fp32 stats
    offs_m, offs_n, mask_m, mask_n, a_r, a_c, g_r, g_c, w, v, B,  # rows R, columns C: anchors, upstreams; W, V of R
    NORMALIZE: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_N) fp32 tile of dsim (module docstring, Backward) for upstream gradients
    g_r of the row owners and g_c of the column owners."""
    # [owner-computes] the x-term of each column owner and the y-term of each row owner
    x_term = 2.0 * g_c * tl.load(stats_ptr + offs_n, mask=mask_n, other=0.0) * \
        tl.load(stats_ptr + B + offs_n, mask=mask_n, other=0.0)
    y_term = 2.0 * g_r * tl.load(stats_ptr + offs_m, mask=mask_m, other=0.0) * \
        tl.load(stats_ptr + B + offs_m, mask=mask_m, other=0.0) + \
        g_r * tl.load(stats_ptr + 3 * B + offs_m, mask=mask_m, other=0.0) * \
        tl.load(stats_ptr + 2 * B + offs_m, mask=mask_m, other=0.0)
    ds = tl.where(a_c[None, :] == offs_m[:, None], x_term[None, :], 0.0) - \
        tl.where(a_r[:, None] == offs_n[None, :], y_term[:, None], 0.0)
    if NORMALIZE:
        # the dense term of the pairs whose anchor row is r: S[r, c] W_r - V_r
        ds += s * w[:, None] - v[:, None]
    return ds


@triton.jit
def _esc_anchor_fwd_kernel(
    sim_ptr, anchor_ptr, out_ptr, stats_ptr,  # pointers: (B, B) input; (B,) anchors; (B,) out; (5, B) fp32 stats
    stride_r, stride_c, stride_a,  # strides of sim and of the anchors
    B, anchor_index, alpha,  # sizes; scalars: the shared anchor (if not PER_PAIR), the hinge's alpha
    PER_PAIR: tl.constexpr, NORMALIZE: tl.constexpr,  # feature flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    # 1. the anchors
    if PER_PAIR:
        a = tl.load(anchor_ptr + offs_m * stride_a, mask=mask_m, other=0).to(tl.int32)
    else:
        a = tl.zeros((BLOCK_M,), dtype=tl.int32) + anchor_index
    # 2. the terms (and, when normalizing, the anchor-row sweep)
    out, q, scale, s1, u, y = esc_anchor_sweep(sim_ptr, stride_r, stride_c, a, offs_m, mask_m, B, alpha, NORMALIZE,
                                               BLOCK_M, BLOCK_N)
    tl.store(out_ptr + offs_m, out, mask=mask_m)
    store_stats(stats_ptr, offs_m, mask_m, B, q, scale, s1, u, y)


@triton.jit
def _esc_anchor_bwd_kernel(
    sim_ptr, anchor_ptr, stats_ptr, grad_ptr, wv_ptr, dsim_ptr,  # pointers: (B, B); (B,); (5, B); (B,); (2, B); out
    stride_r, stride_c, stride_a, stride_dr, stride_dc,  # strides of sim, the anchors and dsim
    B, anchor_index,  # sizes; scalars as in the forward
    PER_PAIR: tl.constexpr, NORMALIZE: tl.constexpr,  # feature flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows r: pair r's y-term sits in row r
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns c: pair c's x-term sits in column c
    mask_m, mask_n = offs_m < B, offs_n < B
    mask = mask_m[:, None] & mask_n[None, :]
    if PER_PAIR:
        a_r = tl.load(anchor_ptr + offs_m * stride_a, mask=mask_m, other=-1).to(tl.int32)
        a_c = tl.load(anchor_ptr + offs_n * stride_a, mask=mask_n, other=-1).to(tl.int32)
    else:
        a_r = tl.zeros((BLOCK_M,), dtype=tl.int32) + anchor_index
        a_c = tl.zeros((BLOCK_N,), dtype=tl.int32) + anchor_index
    g_r = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
    g_c = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)
    if NORMALIZE:  # the dense term reads S and the anchor rows' W, V
        s = tl.load(sim_ptr + offs_m[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask,
                    other=0.0).to(tl.float32)
        w = tl.load(wv_ptr + offs_m, mask=mask_m, other=0.0)
        v = tl.load(wv_ptr + B + offs_m, mask=mask_m, other=0.0)
    else:
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # unused: no load
        w = tl.zeros((BLOCK_M,), dtype=tl.float32)
        v = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ds = esc_anchor_dsim(s, stats_ptr, offs_m, offs_n, mask_m, mask_n, a_r, a_c, g_r, g_c, w, v, B, NORMALIZE)
    tl.store(dsim_ptr + offs_m[:, None] * stride_dr + offs_n[None, :] * stride_dc,
             ds.to(dsim_ptr.dtype.element_ty), mask=mask)


def _check(sim: torch.Tensor, anchor: Optional[torch.Tensor], anchor_index: int) -> int:
    _check_square("esc_anchor_terms", sim)
    check_inputs("esc_anchor_terms", sim)
    n = sim.shape[0]
    if anchor is None:
        if not 0 <= anchor_index < n:
            raise ValueError(f"esc_anchor_terms: anchor {anchor_index} is outside [0, {n})")
    elif anchor.shape != (n,) or anchor.is_floating_point() or anchor.is_complex() or anchor.device != sim.device:
        raise ValueError(f"esc_anchor_terms: anchor must be an int, a 0-d or a ({n},) integer tensor on {sim.device}, "
                         f"got {anchor.dtype} {tuple(anchor.shape)} on {anchor.device}")
    return n


def _anchor_args(sim, anchor):
    # the int form passes sim as an unused pointer: one kernel serves both forms
    return (sim, 0) if anchor is None else (anchor, anchor.stride(0))


@custom_op("fastncl::esc_anchor_fwd", mutates_args=())
def esc_anchor_fwd(sim: torch.Tensor, anchor: Optional[torch.Tensor], anchor_index: int, alpha: float,
                   normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B,), stats (5, B)) fp32; ``anchor`` (B,) per pair, or None and ``anchor_index`` for all."""
    n = _check(sim, anchor, anchor_index)
    out = torch.empty(n, device=sim.device, dtype=torch.float32)
    stats = torch.empty(5, n, device=sim.device, dtype=torch.float32)
    a_ptr, a_stride = _anchor_args(sim, anchor)
    block_m = row_block(n)
    with device_guard(sim):
        _esc_anchor_fwd_kernel[(triton.cdiv(n, block_m),)](
            sim, a_ptr, out, stats, sim.stride(0), sim.stride(1), a_stride, n, anchor_index, alpha,
            PER_PAIR=anchor is not None, NORMALIZE=normalize, BLOCK_M=block_m, BLOCK_N=col_block(n),
            num_warps=tile_warps(block_m, col_block(n)))
    return out, stats


@esc_anchor_fwd.register_fake
def _(sim, anchor, anchor_index, alpha, normalize):
    n = _check(sim, anchor, anchor_index)
    return sim.new_empty(n, dtype=torch.float32), sim.new_empty(5, n, dtype=torch.float32)


@custom_op("fastncl::esc_anchor_bwd", mutates_args=())
def esc_anchor_bwd(sim: torch.Tensor, anchor: Optional[torch.Tensor], anchor_index: int, stats: torch.Tensor,
                   grad: torch.Tensor, normalize: bool) -> torch.Tensor:
    """dsim (B, B) in sim's dtype from the (B,) upstream gradient of the terms."""
    n = sim.shape[0]
    dsim = torch.empty_like(sim, memory_format=torch.contiguous_format)
    grad = grad.float().contiguous()
    wv = stats  # unused pointer unless normalizing
    if normalize:
        # W_r, V_r: sums over the pairs anchored at row r (no atomics in the kernel)
        index = anchor.long() if anchor is not None else torch.full((n,), anchor_index, device=sim.device)
        gu = grad * stats[3]
        wv = torch.zeros(2, n, device=sim.device, dtype=torch.float32).index_add_(
            1, index, torch.stack((gu, gu * stats[4])))
    a_ptr, a_stride = _anchor_args(sim, anchor)
    block = row_block(n)
    with device_guard(sim):
        _esc_anchor_bwd_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
            sim, a_ptr, stats, grad, wv, dsim, sim.stride(0), sim.stride(1), a_stride, dsim.stride(0),
            dsim.stride(1), n, anchor_index, PER_PAIR=anchor is not None, NORMALIZE=normalize,
            BLOCK_M=block, BLOCK_N=block, num_warps=tile_warps(block, block))
    return dsim


@esc_anchor_bwd.register_fake
def _(sim, anchor, anchor_index, stats, grad, normalize):
    return torch.empty_like(sim, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    sim, anchor, anchor_index, alpha, normalize = inputs
    ctx.save_for_backward(sim, anchor, output[1])
    ctx.anchor_index, ctx.normalize = anchor_index, normalize


def _backward(ctx, grad_out, grad_stats):
    sim, anchor, stats = ctx.saved_tensors
    return esc_anchor_bwd(sim, anchor, ctx.anchor_index, stats, grad_out, ctx.normalize), None, None, None, None


esc_anchor_fwd.register_autograd(_backward, setup_context=_setup_context)


def esc_anchor_terms(sim: torch.Tensor, anchor, alpha: float = 0.0, normalize: bool = False) -> torch.Tensor:
    """Triton twin of ``reference.esc_anchor_terms``: (B,) terms of each pair against its anchor."""
    if isinstance(anchor, torch.Tensor):
        if anchor.dim() == 0:
            anchor = anchor.expand(sim.shape[0] if sim.dim() == 2 else 0)
        out, _ = esc_anchor_fwd(sim, anchor, 0, float(alpha), bool(normalize))
    else:
        out, _ = esc_anchor_fwd(sim, None, int(anchor), float(alpha), bool(normalize))
    return out


__all__ = ["esc_anchor_terms"]
