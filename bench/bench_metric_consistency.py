"""metric_consistency(sim_img, sim_txt, alpha) on two given (B, B) intramodal matrices (SPS Eq. 10).

Model (e = bytes per element): the forward reads both matrices once, 2 B^2 e bytes;
forward+backward also reads them again and writes both gradients: 6 B^2 e. Memory-bound.
"""
import torch

from conftest import Work, embeddings, measure, params, similarity
from targets import SHAPES

ALPHA = 0.0  # the SPS code's value (no hinge)


def make(B, D, dtype, grad, gen):
    img, txt = embeddings(B, 256, dtype, gen)
    sim_img, sim_txt = similarity(img, img, dtype, grad), similarity(txt, txt, dtype, grad)
    return Work(args=(sim_img, sim_txt, ALPHA), leaves=(sim_img, sim_txt),
                upstream=(torch.ones((), device=img.device),))


def cost(B, D, e, mode):
    return 0, (2 if mode == "fwd" else 6) * B * B * e


@params("metric_consistency", **SHAPES["metric_consistency"])
def bench_metric_consistency(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, cost=cost, alpha=ALPHA)
