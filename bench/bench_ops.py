"""Loss-op microbenchmarks: eager reference vs torch.compile(reference), forward and
forward+backward, bf16 and fp32, B in {128, 1024, 8192}. (The Triton provider joins with the
kernels issue.) GPU only."""
from __future__ import annotations

import pytest
import torch

from fastncl.kernels import reference

from conftest import run_synchronized

OPS = {
    "infonce_terms": lambda sim: sum(t.sum() for t in reference.infonce_terms(sim, 0.07)[:2]),
    "cross_consistency": lambda sim: reference.cross_consistency(sim, 0.0),
    "metric_consistency": lambda sim: reference.metric_consistency(sim, sim.T, 0.0),
    "esc_anchor_terms": lambda sim: reference.esc_anchor_terms(sim, 0, normalize=True).sum(),
    "triplet_terms": lambda sim: reference.triplet_terms(sim, 0.2, hardest=True).sum(),
}
_compiled = {}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B", [128, 1024, 8192])
@pytest.mark.parametrize("provider", ["eager", "compiled"])
@pytest.mark.parametrize("op", list(OPS))
def bench_op(benchmark, cuda, op, provider, B, dtype, mode):
    fn = OPS[op] if provider == "eager" else _compiled.setdefault(op, torch.compile(OPS[op]))
    sim = torch.rand(B, B, device=cuda, dtype=dtype, requires_grad=mode == "fwd+bwd")

    def step():
        out = fn(sim)
        if mode == "fwd+bwd":
            out.backward()

    benchmark.group = f"{op}-B{B}-{str(dtype).removeprefix('torch.')}-{mode}"
    benchmark.extra_info.update(op=op, provider=provider, B=B, dtype=str(dtype), mode=mode)
    run_synchronized(benchmark, step)
