"""triplet_terms(sim, margin, hardest=True): VSE++ hardest-negative hinge in both directions with
per-pair (soft) margins (ESC Eq. 1, 13; NCR).

Model (e = bytes per element): the forward reads S once, B^2 e bytes (rows and columns in one
sweep); forward+backward also reads S and writes dS: 3 B^2 e. Memory-bound.
"""
from conftest import Work, embeddings, measure, params, similarity, soft_labels
from targets import SHAPES


def make(B, D, dtype, grad, gen):
    sim = similarity(*embeddings(B, 256, dtype, gen), dtype, grad)
    margin = 0.1 + 0.1 * soft_labels(B, gen)  # (B,) soft margins in [0.1, 0.2), as ESC's soft margin gives
    return Work(args=(sim, margin, True), leaves=(sim,), upstream=(soft_labels(B, gen),))


def cost(B, D, e, mode):
    return 0, (1 if mode == "fwd" else 3) * B * B * e


@params("triplet_terms", **SHAPES["triplet_terms"])
def bench_triplet_terms(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, cost=cost,
            hardest=True)
