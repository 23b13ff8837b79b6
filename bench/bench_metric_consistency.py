"""metric_consistency(sim_img, sim_txt, alpha) on two given (B, B) intramodal matrices (SPS Eq. 10).

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.
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


@params("metric_consistency", **SHAPES["metric_consistency"])
def bench_metric_consistency(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, alpha=ALPHA)
