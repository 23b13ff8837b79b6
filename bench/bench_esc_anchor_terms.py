"""esc_anchor_terms(sim, anchor, normalize=True): the official ESC code's row-normalised terms
against one anchor pair a = argmax_i S_ii (ESC Eq. 6-8).

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.
"""
from conftest import Work, embeddings, measure, params, similarity, soft_labels
from targets import SHAPES


def make(B, D, dtype, grad, gen):
    sim = similarity(*embeddings(B, 256, dtype, gen), dtype, grad)
    anchor = sim.detach().diagonal().float().argmax()  # a 0-d CUDA tensor: no host sync in the op
    return Work(args=(sim, anchor), kwargs={"alpha": 0.0, "normalize": True}, leaves=(sim,),
                upstream=(soft_labels(B, gen),))


@params("esc_anchor_terms", **SHAPES["esc_anchor_terms"])
def bench_esc_anchor_terms(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, normalize=True)
