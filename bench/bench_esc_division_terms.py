"""esc_division_terms(sim, margin, esc_weight, alpha, hardest, normalize): ESC's per-pair division
loss l_hard + beta l_ESC with its anchor, in one call (beta = 0.5, alpha = 0, hardest negatives,
row-normalised l_ESC: the official code's settings), with its kernel launches counted. The fused
Triton objective is specified for B <= 256; larger B is skipped if it refuses.

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.
"""
from conftest import Work, embeddings, measure, params, similarity, soft_labels
from targets import SHAPES

ESC_WEIGHT, ALPHA = 0.5, 0.0


def make(B, D, dtype, grad, gen):
    sim = similarity(*embeddings(B, 256, dtype, gen), dtype, grad)
    margin = 0.1 + 0.1 * soft_labels(B, gen)  # (B,) soft margins
    return Work(args=(sim, margin, ESC_WEIGHT, ALPHA, True, True), leaves=(sim,), upstream=(soft_labels(B, gen), None))


@params("esc_division_terms", **SHAPES["esc_division_terms"])
def bench_esc_division_terms(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, launches=True,
            esc_weight=ESC_WEIGHT, alpha=ALPHA, hardest=True, normalize=True)
