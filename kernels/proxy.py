"""Triton: for every query row, the key row with the largest dot product (SPS Eq. 11).

What: ``reference.proxy_argmax`` is the definition: scores = query @ keys.T (fp32 accumulation),
masked keys excluded, index = the first maximal key (ties go to the lowest index), value = its
score; a query with no valid key (all masked, or no keys at all) gets index -1 and value -inf.
Not differentiable (SPS picks proxy captions under no_grad).

Cost: eager writes the (Bq, Bk) fp32 score matrix (plus the masked copy and the upcasts) and
reads it back for the max; the kernel keeps each (BLOCK_M, BLOCK_N) score tile in registers and
writes 12 Bq bytes. FLOPs are the same 2 Bq Bk D.

Algorithm (one launch): a 1-D grid over blocks of BLOCK_M query rows. Each program walks the key
tiles in increasing index order; per tile it forms the scores with ``tl.dot`` over BLOCK_D chunks
of the feature axis (fp32 accumulation; input_precision "ieee", so fp32 inputs are not rounded to
TF32, and bf16/fp16 operands multiply exactly into the fp32 accumulator), sets masked or padded
keys to -inf, and folds the tile's (max, lowest maximal index) into the running pair with a
strict '>' [online argmax]: an equal score in a later tile never replaces an earlier index.

Limits: fp16, bf16, fp32 inputs, both of the same dtype; any Bq, Bk >= 0, D >= 1, any strides;
index int64, value fp32. NaN scores are not handled (never the maximum).
[2026-11-24] Triton 3.9 interpreter: bf16 ``tl.dot`` multiplies raw bits, so under the interpreter
bf16 operands are upcast to fp32 first (``_launch.dot_precision``); compiled kernels
use the bf16 dot, which the CPU tests therefore do not cover (GPU parity tests do).
[2026-12-07] Compiled ahead of time for sm_80 and sm_90 with Triton 3.9 (tools/aot_report.py, the
table in docs/kernels.md): no register spills at B = 64 to 65536, D = 256 and 1024, any dtype
(fp32 once took 64-feature chunks: about 2.2 KB of spills per thread on sm_80).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from ._launch import check_inputs, device_guard, dot_precision, feature_block, gram_tile, row_block


@triton.jit
def _proxy_argmax_fwd_kernel(
    query_ptr, keys_ptr, mask_ptr, index_ptr, value_ptr,  # pointers: (Bq, D), (Bk, D), (Bk,) bool; (Bq,) outputs
    stride_qm, stride_qd, stride_kn, stride_kd, stride_mask,  # strides
    n_query, n_keys, dim,  # sizes
    HAS_MASK: tl.constexpr,  # feature flag
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_query
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_index = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_keys
        # 1. the score tile, fp32 accumulation over chunks of the feature axis
        scores = gram_tile(query_ptr, keys_ptr, offs_m, offs_n, mask_m, mask_n, stride_qm, stride_qd, stride_kn,
                           stride_kd, dim, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        # 2. masked and padded keys can never be chosen
        valid = mask_n
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + offs_n * stride_mask, mask=mask_n, other=0) != 0)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        # 3. [online argmax] the tile's max and its lowest maximal index; strict '>' keeps earlier tiles' ties
        tile_max = tl.max(scores, axis=1)
        tile_index = tl.min(tl.where(scores == tile_max[:, None], offs_n[None, :], 2147483647), axis=1)
        better = tile_max > best
        best_index = tl.where(better, tile_index, best_index)
        best = tl.where(better, tile_max, best)
    tl.store(index_ptr + offs_m, best_index.to(tl.int64), mask=mask_m)
    tl.store(value_ptr + offs_m, best, mask=mask_m)


def _check(query: torch.Tensor, keys: torch.Tensor, key_mask: Optional[torch.Tensor]) -> None:
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"proxy_argmax: expected query (Bq, D) and keys (Bk, D), got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    check_inputs("proxy_argmax", query, keys)
    if query.dtype != keys.dtype:
        raise ValueError(f"proxy_argmax: the Triton kernel needs query and keys of one dtype, got {query.dtype} and "
                         f"{keys.dtype}")
    if key_mask is not None and (key_mask.shape != keys.shape[:1] or key_mask.dtype != torch.bool
                                 or key_mask.device != keys.device):
        raise ValueError(f"proxy_argmax: key_mask must be a ({keys.shape[0]},) bool tensor on {keys.device}, got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)} on {key_mask.device}")


@custom_op("fastncl::proxy_argmax_fwd", mutates_args=())
def proxy_argmax_fwd(query: torch.Tensor, keys: torch.Tensor,
                     key_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (Bq,) int64, value (Bq,) fp32): the best valid key of each query row."""
    _check(query, keys, key_mask)
    n_query, dim = query.shape
    index = torch.empty(n_query, device=query.device, dtype=torch.int64)
    value = torch.empty(n_query, device=query.device, dtype=torch.float32)
    if n_query == 0:
        return index, value
    if keys.shape[0] == 0:  # no key at all (an empty tensor's null pointer is no kernel argument on CUDA)
        return index.fill_(-1), value.fill_(float("-inf"))
    block_m = row_block(n_query)
    # fp32: 16-feature chunks (feature_block); 2 stages: at 3, ptxas spills 16 bytes per thread of the 16-bit
    # kernels at B = 127 and 128 on sm_80 with 72 registers in use (tools/aot_report.py)
    with device_guard(query):
        _proxy_argmax_fwd_kernel[(triton.cdiv(n_query, block_m),)](
            query, keys, key_mask if key_mask is not None else keys, index, value,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
            key_mask.stride(0) if key_mask is not None else 0, n_query, keys.shape[0], dim,
            HAS_MASK=key_mask is not None, PRECISION=dot_precision(query.dtype),
            BLOCK_M=block_m, BLOCK_N=row_block(keys.shape[0]), BLOCK_D=feature_block(dim, query.element_size()),
            num_stages=2)
    return index, value


@proxy_argmax_fwd.register_fake
def _(query, keys, key_mask):
    _check(query, keys, key_mask)
    n_query = query.shape[0]
    return query.new_empty(n_query, dtype=torch.int64), query.new_empty(n_query, dtype=torch.float32)


def proxy_argmax(query: torch.Tensor, keys: torch.Tensor, key_mask: Optional[torch.Tensor] = None):
    """Triton twin of ``reference.proxy_argmax``: (index int64, value fp32), each (Bq,); no gradient."""
    return proxy_argmax_fwd(query.detach(), keys.detach(), key_mask)


__all__ = ["proxy_argmax"]
