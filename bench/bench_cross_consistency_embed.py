"""cross_consistency_embed(img, txt, alpha): SPS Eq. 9 on img @ txt.T from the (B, D) embeddings
(the Triton kernel never materialises B x B; the references do).

Model (e = bytes per element): forward 2 B^2 D FLOPs (every tile of S once, tile pairs (i, j) and
(j, i) together), 2 B D e bytes; forward+backward 8 B^2 D FLOPs, 6 B D e bytes.

alpha is fastncl's default (0.01), so that the tile kernels are timed at every B. With the SPS
code's alpha = 0 the op takes the D x D closed form from B >= 8 D on (bf16; kernels/
consistency_embed.py): ``bench_cross_consistency_embed_alpha0`` times that choice on both sides of
the switch (bf16, forward+backward), recorded as "cross_consistency_embed (alpha=0)"; its cost
model is the tile kernels' below 8 D and 14 B D^2 FLOPs (on the fp32 units) from 8 D on.
"""
import functools

import pytest
import torch

from conftest import Work, embeddings, measure, params
from targets import SHAPES

ALPHA = 0.01  # fastncl's consistency_margin (the tile kernels at every B)


def make(B, D, dtype, grad, gen, alpha=ALPHA):
    img, txt = embeddings(B, D, dtype, gen, grad)
    return Work(args=(img, txt, alpha), leaves=(img, txt), upstream=(torch.ones((), device=img.device),))


def cost(B, D, e, mode):
    return (2 if mode == "fwd" else 8) * B * B * D, (2 if mode == "fwd" else 6) * B * D * e


def cost_alpha0(B, D, e, mode):
    if B < 8 * D:
        return cost(B, D, e, mode)
    return (6 if mode == "fwd" else 14) * B * D * D, (2 if mode == "fwd" else 4) * B * D * e


@params("cross_consistency_embed", **SHAPES["cross_consistency_embed"])
def bench_cross_consistency_embed(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, cost=cost, alpha=ALPHA)


@pytest.mark.variant
@params("cross_consistency_embed", **SHAPES["cross_consistency_embed_alpha0"])
def bench_cross_consistency_embed_alpha0(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode,
            make=functools.partial(make, alpha=0.0), cost=cost_alpha0, variant="alpha=0", alpha=0.0)
