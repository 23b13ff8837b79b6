"""The fused SPS reliable-batch objective captured in a CUDA graph and replayed (GPU only).

The training step runs it under CUDA graphs: capture the forward and the backward once, then
copy each new batch into the static inputs and replay. Each replay must give the reference's
values and gradients on that batch (tolerances from tests/tolerances.py), i.e. the kernels were
captured, not their first batch's results, and nothing in them syncs with the host or allocates
outside the graph. Autotuning and compilation happen in the warm-up, before capture.
"""
from __future__ import annotations

import pytest
import torch

import fastncl.kernels as K
from fastncl.kernels import reference
from inputs import make_generator, random_sim
from tolerances import assert_close, rtol

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

TAU, ALPHA, CROSS_WEIGHT, METRIC_WEIGHT = 0.07, 0.0, 25.0, 25.0


def _objective(backend):
    if not hasattr(K, "sps_reliable_objective") or not hasattr(reference, "sps_reliable_objective"):
        pytest.skip("fastncl.kernels has no sps_reliable_objective yet")
    if backend == "torch":
        return lambda *sims: reference.sps_reliable_objective(*sims, TAU, ALPHA, CROSS_WEIGHT, METRIC_WEIGHT)
    return lambda *sims: K.sps_reliable_objective(*sims, TAU, ALPHA, CROSS_WEIGHT, METRIC_WEIGHT, backend=backend)


def _batch(n, gen, dtype):
    return tuple(random_sim(n, gen, dtype).cuda() for _ in range(3))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n", (128, 256))
def test_sps_objective_replays_in_a_cuda_graph(n, dtype):
    objective = _objective("triton")
    gen, seed = make_generator("cuda-graph-sps", n, dtype)
    static = tuple(x.requires_grad_(True) for x in _batch(n, gen, dtype))

    def step():
        total, *terms = objective(*static)
        grads = torch.autograd.grad(total, static)
        return (total, *terms), grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, autotune, allocate, before capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs, grads = step()

    for trial in range(3):
        batch = _batch(n, gen, dtype)
        with torch.no_grad():
            for dst, src in zip(static, batch):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        leaves = tuple(x.double().requires_grad_(True) for x in batch)
        expected = _objective("torch")(*leaves)
        expected_grads = torch.autograd.grad(expected[0], leaves)
        msg = f"replay {trial} B={n} {dtype} seed={seed}"
        for name, a, e in zip(("total", "l_re", "l_cro", "l_met"), outs, expected):
            assert_close(a, e, rtol(dtype), f"{msg} {name}")
        for name, a, e in zip(("d sim", "d sim_img", "d sim_txt"), grads, expected_grads):
            assert_close(a, e, rtol(dtype, "grads"), f"{msg} {name}")
