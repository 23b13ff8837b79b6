"""proxy_argmax(query, keys, key_mask): for every noisy image the most similar reliable one
(SPS Eq. 11); no gradient, so forward only. About 70 % of the keys are valid.

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.
"""
from conftest import Work, embeddings, measure, params, soft_labels
from targets import SHAPES


def make(B, D, dtype, grad, gen):
    query, keys = embeddings(B, D, dtype, gen)
    key_mask = soft_labels(B, gen) < 0.7  # (B,) bool: True = a reliable key
    return Work(args=(query, keys, key_mask))


@params("proxy_argmax", **SHAPES["proxy_argmax"])
def bench_proxy_argmax(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make)
