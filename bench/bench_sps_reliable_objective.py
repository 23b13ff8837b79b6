"""sps_reliable_objective(sim, sim_img, sim_txt, tau, alpha, cross_weight, metric_weight): the SPS
reliable-batch objective L^re + 25 L^cro + 25 L^met (the SPS code's weights, alpha = 0) in one call,
with its kernel launches counted (target at B = 128: <= 4 launches, <= 25 us, <= 10 us in a CUDA
graph). The fused Triton objective is specified for B <= 256; larger B is skipped if it refuses.

Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py. At
B = 128 the floor is launch latency, not bytes.
"""
import torch

from conftest import Work, embeddings, measure, params, similarity
from targets import SHAPES

TAU, ALPHA, CROSS_WEIGHT, METRIC_WEIGHT = 0.07, 0.0, 25.0, 25.0


def make(B, D, dtype, grad, gen):
    img, txt = embeddings(B, 256, torch.float32, gen)
    sims = similarity(img, txt, dtype, grad), similarity(img, img, dtype, grad), similarity(txt, txt, dtype, grad)
    return Work(args=(*sims, TAU, ALPHA, CROSS_WEIGHT, METRIC_WEIGHT), leaves=sims,
                upstream=(torch.ones((), device=img.device), None, None, None))


@params("sps_reliable_objective", **SHAPES["sps_reliable_objective"])
def bench_sps_reliable_objective(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, launches=True,
            tau=TAU, alpha=ALPHA, cross_weight=CROSS_WEIGHT, metric_weight=METRIC_WEIGHT)
