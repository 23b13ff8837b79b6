"""cross_consistency(sim, alpha) on a given (B, B) similarity matrix (SPS Eq. 9).

Model (e = bytes per element of sim): the forward reads S once, B^2 e bytes (tile pairs (i, j)
and (j, i) together); forward+backward also reads S and writes dS: 3 B^2 e. Memory-bound.
"""
import torch

from conftest import Work, embeddings, measure, params, similarity
from targets import SHAPES

ALPHA = 0.0  # the SPS code's value (no hinge)


def make(B, D, dtype, grad, gen):
    sim = similarity(*embeddings(B, 256, dtype, gen), dtype, grad)
    return Work(args=(sim, ALPHA), leaves=(sim,), upstream=(torch.ones((), device=sim.device),))


def cost(B, D, e, mode):
    return 0, (1 if mode == "fwd" else 3) * B * B * e


@params("cross_consistency", **SHAPES["cross_consistency"])
def bench_cross_consistency(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, cost=cost, alpha=ALPHA)
