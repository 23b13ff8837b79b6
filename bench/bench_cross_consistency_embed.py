"""cross_consistency_embed(img, txt, alpha): SPS Eq. 9 on img @ txt.T from the (B, D) embeddings
(the Triton kernel never materialises B x B; the references do).

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.

alpha is fastncl's default (0.01), so that the tile kernels are timed at every B. With the SPS
code's alpha = 0 the op takes the D x D closed form from B >= 8 D on (bf16; kernels/
consistency_embed.py): ``bench_cross_consistency_embed_alpha0`` times that choice on both sides of
the switch (bf16, forward+backward), recorded as "cross_consistency_embed (alpha=0)"; its roofline
is the tile kernels' below 8 D and the closed form's (on the fp32 units) from 8 D on.
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


@params("cross_consistency_embed", **SHAPES["cross_consistency_embed"])
def bench_cross_consistency_embed(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, alpha=ALPHA)


@pytest.mark.variant
@params("cross_consistency_embed", **SHAPES["cross_consistency_embed_alpha0"])
def bench_cross_consistency_embed_alpha0(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode,
            make=functools.partial(make, alpha=0.0), variant="alpha=0", alpha=0.0)
