"""infonce_terms(sim, tau) on a given (B, B) similarity matrix (SPS Eq. 1, 2, 15).

Model (e = bytes per element of sim): no matmul; the forward reads S once, B^2 e bytes; the
backward reads S again and writes dS, so forward+backward moves 3 B^2 e. Memory-bound.
"""
from conftest import Work, embeddings, measure, params, similarity, soft_labels
from targets import SHAPES

TAU = 0.07


def make(B, D, dtype, grad, gen):
    sim = similarity(*embeddings(B, 256, dtype, gen), dtype, grad)
    w = soft_labels(B, gen)
    return Work(args=(sim, TAU), leaves=(sim,), upstream=(w, w, None, None))


def cost(B, D, e, mode):
    return 0, (1 if mode == "fwd" else 3) * B * B * e


@params("infonce_terms", **SHAPES["infonce_terms"])
def bench_infonce_terms(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, cost=cost, tau=TAU)
