"""cross_consistency(sim, alpha) on a given (B, B) similarity matrix (SPS Eq. 9).

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.
"""
import torch

from conftest import Work, embeddings, measure, params, similarity
from targets import SHAPES

ALPHA = 0.0  # the SPS code's value (no hinge)


def make(B, D, dtype, grad, gen):
    sim = similarity(*embeddings(B, 256, dtype, gen), dtype, grad)
    return Work(args=(sim, ALPHA), leaves=(sim,), upstream=(torch.ones((), device=sim.device),))


@params("cross_consistency", **SHAPES["cross_consistency"])
def bench_cross_consistency(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, alpha=ALPHA)
