"""infonce_terms_embed(img, txt, tau): bidirectional InfoNCE terms of img @ txt.T from the (B, D)
embeddings, without materialising B x B (the Triton kernel); the references form the matrix.

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.
B = 65536 (bf16, D = 1024, forward+backward, one timed call) is the capacity run: the eager
reference is expected to run out of memory there on an 80 GB GPU.
"""
from conftest import Work, embeddings, measure, params, soft_labels
from targets import CAPACITY_B, SHAPES

TAU = 0.07


def make(B, D, dtype, grad, gen):
    img, txt = embeddings(B, D, dtype, gen, grad)
    w = soft_labels(B, gen)
    return Work(args=(img, txt, TAU), leaves=(img, txt), upstream=(w, w, None, None))


@params("infonce_terms_embed", **SHAPES["infonce_terms_embed"])
def bench_infonce_terms_embed(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, tau=TAU,
            quick=B >= CAPACITY_B)
