"""metric_consistency_embed(img_feats, txt_feats, alpha): SPS Eq. 10 on the two intramodal Gram
matrices img_feats @ img_feats.T and txt_feats @ txt_feats.T, from the (B, D) features.

Inputs: two (B, D) L2-normalised feature sets and alpha, as for cross_consistency_embed (its
``make``). Roofline (minimal bytes, FLOPs, SFU operations; bound on H100 and A100): bench/roofline.py.
"""
from bench_cross_consistency_embed import ALPHA, make
from conftest import measure, params
from targets import SHAPES

__all__ = ["make"]


@params("metric_consistency_embed", **SHAPES["metric_consistency_embed"])
def bench_metric_consistency_embed(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, alpha=ALPHA)
