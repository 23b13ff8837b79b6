"""metric_consistency_embed(img_feats, txt_feats, alpha): SPS Eq. 10 on the two intramodal Gram
matrices img_feats @ img_feats.T and txt_feats @ txt_feats.T, from the (B, D) features.

Inputs: two (B, D) L2-normalised feature sets and alpha, as for cross_consistency_embed (its
``make``). Model (e = bytes per element): using the Grams' symmetry (upper-triangle tiles), forward
2 B^2 D FLOPs and 2 B D e bytes; forward+backward 8 B^2 D FLOPs and 6 B D e bytes (performance.md
T8): the same numbers as cross_consistency_embed's (its ``cost``).
"""
from bench_cross_consistency_embed import ALPHA, cost, make
from conftest import measure, params
from targets import SHAPES

__all__ = ["cost", "make"]


@params("metric_consistency_embed", **SHAPES["metric_consistency_embed"])
def bench_metric_consistency_embed(benchmark, cuda, op, provider, B, D, dtype, mode):
    measure(benchmark, op=op, provider=provider, B=B, D=D, dtype=dtype, mode=mode, make=make, cost=cost, alpha=ALPHA)
