"""infonce_terms(sim, tau) on a given (B, B) similarity matrix (SPS Eq. 1, 2, 15).

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.
"""
from conftest import Work, embeddings, measure, params, similarity, soft_labels
from targets import SHAPES

TAU = 0.07


def make(B, D, dtype, grad, gen):
    sim = similarity(*embeddings(B, 256, dtype, gen), dtype, grad)
    w = soft_labels(B, gen)
    return Work(args=(sim, TAU), leaves=(sim,), upstream=(w, w, None, None))


@params("infonce_terms", **SHAPES["infonce_terms"])
def bench_infonce_terms(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, tau=TAU)
