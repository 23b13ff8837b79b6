"""Embedding-level loss ops from (B, D) features: eager reference vs torch.compile(reference) vs the
Triton kernels, forward and forward+backward, bf16 and fp32, B in {1024, 8192, 32768}, D in
{256, 1024}. Peak memory is recorded with the inputs' size, so that the loss-attributable peak
(peak - inputs) can be read off; an eager or compiled run that does not fit is skipped as "OOM".
GPU only."""
from __future__ import annotations

import pytest
import torch

import fastncl.kernels as K

from conftest import run_synchronized

OPS = {  # op -> a scalar of its outputs (the per-sample terms summed, as a training step would)
    "infonce_terms_embed": lambda img, txt, backend: sum(
        t.sum() for t in K.infonce_terms_embed(img, txt, 0.07, backend=backend)[:2]),
    "cross_consistency_embed": lambda img, txt, backend: K.cross_consistency_embed(img, txt, 0.0, backend=backend),
    "metric_consistency_embed": lambda img, txt, backend: K.metric_consistency_embed(img, txt, 0.0, backend=backend),
}
_compiled = {}


def _provider(op, provider):
    if provider == "triton":
        return lambda img, txt: OPS[op](img, txt, "triton")
    eager = lambda img, txt: OPS[op](img, txt, "torch")  # noqa: E731
    return eager if provider == "eager" else _compiled.setdefault(op, torch.compile(eager))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("D", [256, 1024])
@pytest.mark.parametrize("B", [1024, 8192, 32768])
@pytest.mark.parametrize("provider", ["eager", "compiled", "triton"])
@pytest.mark.parametrize("op", list(OPS))
def bench_embed_op(benchmark, cuda, op, provider, B, D, dtype, mode):
    fn = _provider(op, provider)
    gen = torch.Generator(device=cuda).manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(B, D, device=cuda, generator=gen), dim=1).to(dtype)
                .requires_grad_(mode == "fwd+bwd") for _ in range(2))

    def step():
        out = fn(img, txt)
        if mode == "fwd+bwd":
            img.grad = txt.grad = None
            out.backward()

    benchmark.group = f"{op}-B{B}-D{D}-{str(dtype).removeprefix('torch.')}-{mode}"
    benchmark.extra_info.update(op=op, provider=provider, B=B, D=D, dtype=str(dtype), mode=mode,
                                inputs_mb=2 * img.numel() * img.element_size() / 2**20)
    try:
        run_synchronized(benchmark, step, rounds=20 if B >= 32768 else 50)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} runs out of GPU memory at B = {B}, D = {D}")
