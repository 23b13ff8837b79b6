"""proxy_argmax(query, keys, key_mask): for every noisy image the most similar reliable one
(SPS Eq. 11); no gradient, so forward only. About 70 % of the keys are valid.

Model (e = bytes per element): 2 B^2 D FLOPs (the score matrix, never stored); reads query and
keys once, 2 B D e bytes. Matmul-bound from B of a few hundred on.
"""
from conftest import Work, embeddings, measure, params, soft_labels
from targets import SHAPES


def make(B, D, dtype, grad, gen):
    query, keys = embeddings(B, D, dtype, gen)
    key_mask = soft_labels(B, gen) < 0.7  # (B,) bool: True = a reliable key
    return Work(args=(query, keys, key_mask))


def cost(B, D, e, mode):
    return 2 * B * B * D, 2 * B * D * e


@params("proxy_argmax", **SHAPES["proxy_argmax"])
def bench_proxy_argmax(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, cost=cost)
