"""triplet_terms(sim, margin, hardest=True): VSE++ hardest-negative hinge in both directions with
per-pair (soft) margins (ESC Eq. 1, 13; NCR).

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.
"""
from conftest import Work, embeddings, measure, params, similarity, soft_labels
from targets import SHAPES


def make(B, D, dtype, grad, gen):
    sim = similarity(*embeddings(B, 256, dtype, gen), dtype, grad)
    margin = 0.1 + 0.1 * soft_labels(B, gen)  # (B,) soft margins in [0.1, 0.2), as ESC's soft margin gives
    return Work(args=(sim, margin, True), leaves=(sim,), upstream=(soft_labels(B, gen),))


@params("triplet_terms", **SHAPES["triplet_terms"])
def bench_triplet_terms(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, hardest=True)
