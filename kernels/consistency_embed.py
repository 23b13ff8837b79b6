"""Triton: the two SPS consistency hinges straight from (B, D) embeddings, never materialising B x B.

What: ``reference.cross_consistency_embed`` and ``reference.metric_consistency_embed`` are the
definitions (SPS Eq. 9 and 10), both the mean over all B^2 pairs of max(delta^2 - alpha, 0):
    cross:  delta[i, j] = S[i, j] - S[j, i],   S = img @ txt.T  (img, txt: (B, D));
    metric: delta[i, j] = F[i] . F[j] - G[i] . G[j]              (F: (B, D1), G: (B, D2)).
With E = 4 g / B^2 * delta * [delta^2 > alpha] (g the upstream gradient; E is antisymmetric for
cross and symmetric for metric), the gradients are
    cross:  d_img = E @ txt,  d_txt = -E @ img;      metric: d_F = E @ F,  d_G = -E @ G.

Cost: eager forms two B x B products and about six B^2 temporaries (fp32: 4 B^2 bytes each, and
autograd keeps several for the backward); memory grows as B^2. Here the forward is 2 B^2 D FLOPs
(each symmetric tile pair is formed once: two tile products for half of the tile pairs) and writes
one fp32 partial per program; the backward is 8 B^2 D FLOPs for D <= 256 (each row block
recomputes its two tile products and multiplies E by both towers), more above (each block of 256
gradient columns recomputes delta), and writes the two (B, D) gradients. Nothing of size B^2 is
saved; the forward's partials are ceil(B / BLOCK)^2 fp32 (1 MiB at B = 32768, 1/1024 of one eager
B x B matrix): the only memory that is not linear in B.

Algorithm (forward, one launch): a 2-D grid of (nb, nb) programs over BLOCK x BLOCK tiles,
nb = ceil(B / BLOCK). Program (I, J) with I <= J forms the tile products of its symmetric tile pair
(``gram_tile``, fp32 accumulation; for cross, S[I, J] and S[J, I].T = txt[I] @ img[J].T) and sums the
hinge over the tile, twice for I < J (the tile (J, I) holds the same values) and once for I = J;
programs with I > J run no loop and contribute 0. ``finish_sum`` adds the partials in a fixed
order (deterministic) and scales by 1 / B^2.
Backward (one launch): a grid of (nb, ceil(max(D1, D2) / BLOCK_DO)) programs; each owns a row block
and BLOCK_DO gradient columns, sweeps the column tiles recomputing delta, and accumulates both
gradients in fp32 registers; one store each, no atomics. When D fits one chunk (``embed_blocks``)
the row block's two feature tiles stay on chip and the column block's two feature tiles serve
both the tile products and the gradient GEMMs. The hinge mirrors ``torch.relu``: a strict
``delta^2 > alpha``, so its kink gets gradient 0.

Limits: fp16, bf16, fp32 embeddings of one dtype (tensor-core dots for 16-bit inputs, IEEE fp32
dots for fp32), any B >= 1, D >= 1, any strides; the loss is fp32, gradients in the input dtype
(E is rounded to it before the gradient GEMM). Tested on CPU in the interpreter up to B = 130,
D = 300. For alpha <= 0 and B >= 8 D (fp32: 2 D) the ops take a closed form through D x D Grams
instead (``_ClosedForm``: torch matmuls, fp32 Grams, no Triton launch).
[2026-12-07] Not yet run on a GPU: compiled ahead of time for sm_80 and sm_90 with Triton 3.9
(tools/aot_report.py, the table in docs/kernels.md): at most 98 KiB (sm_80) and 128 KiB (sm_90) of
shared memory, and no register spills from B = 512 (EMBED_MIN_BATCH, where the trainer takes these
ops) to 65536 at D = 256 and 1024 in every dtype: on a GPU the backward's programs own 32 rows
(``embed_blocks``), whose two 32 x BLOCK_DO fp32 accumulators fit the registers where 64 rows
spilled 0.1-0.4 KB per thread (16-bit) and 2-3 KB (fp32). Below B = 512 three configs spill 8 to
56 bytes with 72-80 of their 255 registers in use (ptxas's allocator, not register pressure): the
fp32 backward at B = 64 and the 16-bit metric forward at B = 64 on sm_80, the fp32 metric forward
at B = 127 on sm_90. Launch shapes are not tuned.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from ._launch import (check_inputs, device_guard, dot_precision, embed_blocks, finish_scalar, gram_tile,
                      launch_target, load_tile, scalar_workspace)
from .reference import _check_features


@triton.jit
def _delta_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n,  # pointers; row indices and masks
                stride_xb, stride_xd, stride_yb, stride_yd,  # strides
                DX, DY,  # sizes (0 skips the tile products)
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, CROSS: tl.constexpr):
    """delta on the (BLOCK, BLOCK) tile (offs_m, offs_n), fp32: x[m] . y[n] - y[m] . x[n] (cross,
    x = img, y = txt) or x[m] . x[n] - y[m] . y[n] (metric)."""
    if CROSS:
        p = gram_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_xb, stride_xd, stride_yb, stride_yd, DX,
                      BLOCK, BLOCK, BLOCK_D, PRECISION)
        q = gram_tile(y_ptr, x_ptr, offs_m, offs_n, mask_m, mask_n, stride_yb, stride_yd, stride_xb, stride_xd, DX,
                      BLOCK, BLOCK, BLOCK_D, PRECISION)
    else:
        p = gram_tile(x_ptr, x_ptr, offs_m, offs_n, mask_m, mask_n, stride_xb, stride_xd, stride_xb, stride_xd, DX,
                      BLOCK, BLOCK, BLOCK_D, PRECISION)
        q = gram_tile(y_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_yb, stride_yd, stride_yb, stride_yd, DY,
                      BLOCK, BLOCK, BLOCK_D, PRECISION)
    return p - q


@triton.jit
def _consistency_embed_fwd_kernel(
    x_ptr, y_ptr, partials_ptr, counter_ptr, out_ptr,  # pointers: inputs; nb^2 fp32 partials; int32 counter; scalar
    stride_xb, stride_xd, stride_yb, stride_yd,  # strides of x and y
    B, DX, DY, alpha, scale,  # sizes; scalars: hinge threshold, 1 / B^2
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    CROSS: tl.constexpr,
):
    bi, bj = tl.program_id(0), tl.program_id(1)
    offs_m = bi * BLOCK + tl.arange(0, BLOCK)
    offs_n = bj * BLOCK + tl.arange(0, BLOCK)
    mask_m, mask_n = offs_m < B, offs_n < B
    # 1. [symmetric tile pairs] (I, J) and (J, I) hold the same hinge values: only I <= J computes
    weight = tl.where(bi < bj, 2.0, tl.where(bi == bj, 1.0, 0.0))
    active = bi <= bj
    delta = _delta_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_xb, stride_xd, stride_yb, stride_yd,
                        tl.where(active, DX, 0), tl.where(active, DY, 0), BLOCK, BLOCK_D, PRECISION, CROSS)
    # 2. the hinge max(delta^2 - alpha, 0) over the valid entries, summed in fp32
    hinge = delta * delta - alpha
    hinge = tl.where(mask_m[:, None] & mask_n[None, :] & (hinge > 0), hinge, 0.0)
    value = tl.zeros((1,), dtype=tl.float32) + tl.sum(tl.sum(hinge, axis=1), axis=0) * (weight * scale)
    # 3. [deterministic reduction] the last program adds the partials in order
    finish_scalar(partials_ptr, counter_ptr, out_ptr, value, bi * tl.num_programs(1) + bj,
                  tl.num_programs(0) * tl.num_programs(1), BLOCK=BLOCK_R)


@triton.jit
def _consistency_embed_bwd_kernel(
    x_ptr, y_ptr, grad_ptr, dx_ptr, dy_ptr,  # pointers: inputs; upstream scalar; gradients (B, DX) and (B, DY)
    stride_xb, stride_xd, stride_yb, stride_yd, stride_dxb, stride_dxd, stride_dyb, stride_dyd,  # strides
    B, DX, DY, alpha, scale,  # sizes; scalars: hinge threshold, 4 / B^2
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr,
    CROSS: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask_m = offs_m < B
    start_o = tl.program_id(1) * BLOCK_DO  # the gradient columns this program writes
    offs_o = start_o + tl.arange(0, BLOCK_DO)
    if ONE_CHUNK:  # the row block's features stay on chip for the whole sweep
        xm = load_tile(x_ptr, offs_m, mask_m, stride_xb, stride_xd, 0, DX, BLOCK_D, PRECISION)
        ym = load_tile(y_ptr, offs_m, mask_m, stride_yb, stride_yd, 0, DY, BLOCK_D, PRECISION)
    acc_x = tl.zeros((BLOCK, BLOCK_DO), dtype=tl.float32)
    acc_y = tl.zeros((BLOCK, BLOCK_DO), dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs_n = start + tl.arange(0, BLOCK)
        mask_n = offs_n < B
        # 1. [recompute] delta on this tile; the key tiles double as the gradient GEMMs' operands
        if ONE_CHUNK:
            xn = load_tile(x_ptr, offs_n, mask_n, stride_xb, stride_xd, 0, DX, BLOCK_D, PRECISION)
            yn = load_tile(y_ptr, offs_n, mask_n, stride_yb, stride_yd, 0, DY, BLOCK_D, PRECISION)
            if CROSS:
                delta = tl.dot(xm, tl.trans(yn), input_precision=PRECISION) - \
                    tl.dot(ym, tl.trans(xn), input_precision=PRECISION)
            else:
                delta = tl.dot(xm, tl.trans(xn), input_precision=PRECISION) - \
                    tl.dot(ym, tl.trans(yn), input_precision=PRECISION)
        else:
            delta = _delta_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_xb, stride_xd, stride_yb,
                                stride_yd, DX, DY, BLOCK, BLOCK_D, PRECISION, CROSS)
            xn = load_tile(x_ptr, offs_n, mask_n, stride_xb, stride_xd, start_o, DX, BLOCK_DO, PRECISION)
            yn = load_tile(y_ptr, offs_n, mask_n, stride_yb, stride_yd, start_o, DY, BLOCK_DO, PRECISION)
        # 2. E / (4 g / B^2) = delta where the hinge is active (strict >, as torch.relu), rounded to
        #    16 bits for 16-bit inputs (the tensor cores' operand)
        e = tl.where(mask_m[:, None] & mask_n[None, :] & (delta * delta - alpha > 0), delta, 0.0)
        e = e.to(x_ptr.dtype.element_ty).to(xn.dtype)
        # 3. [FA-2 split] both gradients of the row block: E @ (the other tower or the same one)
        if CROSS:
            acc_x = tl.dot(e, yn, acc_x, input_precision=PRECISION)
            acc_y = tl.dot(-e, xn, acc_y, input_precision=PRECISION)
        else:
            acc_x = tl.dot(e, xn, acc_x, input_precision=PRECISION)
            acc_y = tl.dot(-e, yn, acc_y, input_precision=PRECISION)
    g = tl.load(grad_ptr).to(tl.float32) * scale
    tl.store(dx_ptr + offs_m[:, None] * stride_dxb + offs_o[None, :] * stride_dxd,
             (acc_x * g).to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_o[None, :] < DX))
    tl.store(dy_ptr + offs_m[:, None] * stride_dyb + offs_o[None, :] * stride_dyd,
             (acc_y * g).to(dy_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_o[None, :] < DY))


def _check(op: str, x: torch.Tensor, y: torch.Tensor, cross: bool) -> None:
    _check_features(op, x, y, same_dim=cross)
    check_inputs(op, x, y)
    if x.dtype != y.dtype:
        raise ValueError(f"{op}: the two embeddings differ in dtype ({x.dtype} and {y.dtype})")


def _blocks(x: torch.Tensor, y: torch.Tensor, backward: bool = False):
    return embed_blocks(x.shape[0], max(x.shape[1], y.shape[1]), x.element_size(), towers=2,
                        target=launch_target(x.device), backward=backward)


@custom_op("fastncl::consistency_embed_fwd", mutates_args=())
def consistency_embed_fwd(x: torch.Tensor, y: torch.Tensor, alpha: float, cross: bool) -> torch.Tensor:
    """The hinge mean, a 0-d fp32 tensor: cross (x = img, y = txt) or metric (x, y = the two feature sets)."""
    op = "cross_consistency_embed" if cross else "metric_consistency_embed"
    _check(op, x, y, cross)
    n, blocks = x.shape[0], _blocks(x, y)
    nb = triton.cdiv(n, blocks.m)
    partials, counter, out = scalar_workspace(op, x, nb * nb)
    with device_guard(x):
        _consistency_embed_fwd_kernel[(nb, nb)](
            x, y, partials, counter, out, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            n, x.shape[1], y.shape[1], alpha, 1.0 / (n * n),
            BLOCK=blocks.m, BLOCK_D=blocks.d, BLOCK_R=min(1024, triton.next_power_of_2(nb * nb)),
            PRECISION=dot_precision(x.dtype), CROSS=cross, num_warps=blocks.warps, num_stages=blocks.stages)
    return out


@consistency_embed_fwd.register_fake
def _(x, y, alpha, cross):
    _check("cross_consistency_embed" if cross else "metric_consistency_embed", x, y, cross)
    return x.new_empty((), dtype=torch.float32)


@custom_op("fastncl::consistency_embed_bwd", mutates_args=())
def consistency_embed_bwd(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, alpha: float, cross: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dy) in the inputs' dtype and shapes, from the upstream gradient of the hinge mean."""
    n, blocks = x.shape[0], _blocks(x, y, backward=True)
    dx, dy = torch.empty(x.shape, device=x.device, dtype=x.dtype), torch.empty(y.shape, device=y.device, dtype=y.dtype)
    with device_guard(x):
        _consistency_embed_bwd_kernel[(triton.cdiv(n, blocks.m), triton.cdiv(max(x.shape[1], y.shape[1]), blocks.do))](
            x, y, grad, dx, dy, x.stride(0), x.stride(1), y.stride(0), y.stride(1), dx.stride(0), dx.stride(1),
            dy.stride(0), dy.stride(1), n, x.shape[1], y.shape[1], alpha, 4.0 / (n * n),
            BLOCK=blocks.m, BLOCK_D=blocks.d, BLOCK_DO=blocks.do, PRECISION=dot_precision(x.dtype), CROSS=cross,
            ONE_CHUNK=blocks.one_chunk, num_warps=blocks.warps, num_stages=blocks.stages)
    return dx, dy


@consistency_embed_bwd.register_fake
def _(x, y, grad, alpha, cross):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype), torch.empty(y.shape, device=y.device, dtype=y.dtype)


def _setup_context(ctx, inputs, output):
    x, y, alpha, cross = inputs
    ctx.save_for_backward(x, y)
    ctx.alpha, ctx.cross = alpha, cross


def _backward(ctx, grad):
    x, y = ctx.saved_tensors
    dx, dy = consistency_embed_bwd(x, y, grad, ctx.alpha, ctx.cross)
    return dx, dy, None, None


consistency_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# alpha <= 0: the hinge never clips, and the mean of delta^2 has a closed form in D x D Grams


# B >= ratio * D takes the closed form: estimated from FLOP rates, not timed (see _ClosedForm)
CLOSED_FORM_MIN_RATIO = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 2}
_CHUNK_BYTES = 4 * 2**20  # fp32 bytes of one upcast row chunk


def _chunks(n: int, d: int):
    rows = max(1, _CHUNK_BYTES // (4 * max(d, 1)))
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


class _ClosedForm(torch.autograd.Function):
    """The hinge mean for alpha <= 0, where max(delta^2 - alpha, 0) = delta^2 - alpha everywhere:
    with F = x.T x, G = y.T y, and M = y.T x (cross) or N = x.T y (metric), all fp32 and D x D,
        cross:  sum delta^2 = 2 <F, G> - 2 tr(M M),    d/dx = 4 (x G - y M.T),  d/dy = 4 (y F - x M);
        metric: sum delta^2 = |F|^2 + |G|^2 - 2 |N|^2, d/dx = 4 (x F - y N.T),  d/dy = 4 (y G - x N)
    (divided by B^2). These are the tile kernels' E @ y and -E @ x regrouped: (E @ y)_i sums
    delta_ij y_j over j, and sum_j (x_i . y_j) y_j = x_i G.

    Cost: about 6 B D^2 FLOPs forward and 8 B D^2 backward (D x D Grams, then (B, D) @ (D, D)), on
    the fp32 units (H100: 67 TFLOP/s), against the tile kernels' 10 B^2 D, which run on the tensor
    cores (a few hundred TFLOP/s) for 16-bit inputs and on the fp32 units for fp32 inputs: by those
    rates the closed form wins from B of about 5 to 6 D on for 16-bit inputs (``CLOSED_FORM_MIN_RATIO``
    rounds up to 8) and from B of about 1.5 D for fp32 (2); at B = 32768, D = 256 its FLOP time is
    about 1/20. Memory: the inputs are saved as they are, the Grams are 3 D^2 fp32, and rows are
    upcast 4 MiB at a time (16-bit inputs), so nothing beyond the gradients grows with B.

    Numerics: a difference of two sums of size |S|^2, which cancels as delta -> 0 (S symmetric, or
    the two Gram matrices equal): the Grams accumulate in fp32 with autocast off (16-bit inputs are
    upcast first, so their products are exact even where a float32 matmul precision of "high"
    allows TF32; fp32 inputs then lose TF32's rounding), their D^2-term sums are taken in float64,
    and the value is clamped at 0 (the gradient is not: it is about 0 there). The absolute error
    is then about 1e-7 of mean(S^2), not of the result (tests/test_kernels_triton.py).
    """

    @staticmethod
    def forward(ctx, x, y, alpha: float, cross: bool):
        n = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            ff = x.new_zeros((x.shape[1], x.shape[1]), dtype=torch.float32)
            gg = y.new_zeros((y.shape[1], y.shape[1]), dtype=torch.float32)
            m = x.new_zeros((y.shape[1], x.shape[1]) if cross else (x.shape[1], y.shape[1]), dtype=torch.float32)
            for start, stop in _chunks(n, max(x.shape[1], y.shape[1])):
                f, g = x[start:stop].float(), y[start:stop].float()
                ff.addmm_(f.T, f)
                gg.addmm_(g.T, g)
                if cross:
                    m.addmm_(g.T, f)
                else:
                    m.addmm_(f.T, g)
            f64, g64, m64 = ff.double(), gg.double(), m.double()
            if cross:
                total = 2.0 * (f64 * g64).sum() - 2.0 * (m64 * m64.T).sum()
            else:
                total = (f64 * f64).sum() + (g64 * g64).sum() - 2.0 * (m64 * m64).sum()
        ctx.save_for_backward(x, y, ff, gg, m)
        ctx.cross = cross
        return (total.clamp_min(0.0) / (n * n) - alpha).float()

    @staticmethod
    def backward(ctx, grad):
        x, y, ff, gg, m = ctx.saved_tensors
        n = x.shape[0]
        scale = grad.float() * (4.0 / (n * n))
        dx, dy = torch.empty_like(x), torch.empty_like(y)
        with torch.autocast(x.device.type, enabled=False):
            for start, stop in _chunks(n, max(x.shape[1], y.shape[1])):
                f, g = x[start:stop].float(), y[start:stop].float()
                if ctx.cross:  # d/dx = x G - y M.T, d/dy = y F - x M
                    dx[start:stop] = ((f @ gg - g @ m.T) * scale).to(x.dtype)
                    dy[start:stop] = ((g @ ff - f @ m) * scale).to(y.dtype)
                else:  # d/dx = x F - y N.T, d/dy = y G - x N
                    dx[start:stop] = ((f @ ff - g @ m.T) * scale).to(x.dtype)
                    dy[start:stop] = ((g @ gg - f @ m) * scale).to(y.dtype)
        return dx, dy, None, None


def _consistency(x: torch.Tensor, y: torch.Tensor, alpha: float, cross: bool) -> torch.Tensor:
    """The closed form for alpha <= 0 and B >= CLOSED_FORM_MIN_RATIO * D, else the tile kernels."""
    _check("cross_consistency_embed" if cross else "metric_consistency_embed", x, y, cross)
    if alpha <= 0.0 and x.shape[0] >= CLOSED_FORM_MIN_RATIO[x.dtype] * max(x.shape[1], y.shape[1]):
        return _ClosedForm.apply(x, y, alpha, cross)
    return consistency_embed_fwd(x, y, alpha, cross)


def cross_consistency_embed(img: torch.Tensor, txt: torch.Tensor, alpha: float) -> torch.Tensor:
    """Triton twin of ``reference.cross_consistency_embed``: a 0-d fp32 tensor."""
    return _consistency(img, txt, float(alpha), True)


def metric_consistency_embed(img_feats: torch.Tensor, txt_feats: torch.Tensor, alpha: float) -> torch.Tensor:
    """Triton twin of ``reference.metric_consistency_embed``: a 0-d fp32 tensor."""
    return _consistency(img_feats, txt_feats, float(alpha), False)


__all__ = ["cross_consistency_embed", "metric_consistency_embed"]
