"""GPU only: the compiled, CUDA-graphed, mixed-precision SGR step against the eager one.

Skipped without CUDA (the CPU suite checks the graph-break-free tracing with Dynamo's eager
backend, tests/test_sgraf_train.py). On a GPU this compiles with Inductor and
``mode="reduce-overhead"`` as ``fastncl train --compile`` does, and checks:
* the compiled fp32 step gives the eager step's loss and parameters (three steps, no dropout);
* after the first steps, repeated steps compile nothing new and skip no CUDA graph;
* the bf16 step stays close to the fp32 one (loss rtol 5e-2) and the similarities stay fp32;
* the blocked, compiled evaluation equals the eager one.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fastncl import kernels
from fastncl.models import forward_pairs
from fastncl.models.sgraf import SGRAF
from fastncl.step import CompiledBackbone, Precision, run_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU: the compiled/CUDA-graph/AMP checks need one")

B, REGIONS, IMAGE_DIM, VOCAB, LENGTH = 16, 6, 32, 50, 8


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(2, LENGTH + 1, (B,), generator=g)
        lengths[0] = LENGTH
        tokens = torch.randint(1, VOCAB, (B, LENGTH), generator=g) * (torch.arange(LENGTH) < lengths[:, None])
        out.append([t.cuda() for t in (torch.randn(B, REGIONS, IMAGE_DIM, generator=g), tokens, lengths)])
    return out


def _setup(head="sgr"):
    torch.manual_seed(0)
    model = SGRAF(IMAGE_DIM, VOCAB, REGIONS, head=head, embed_dim=32, word_dim=16, sim_dim=16, dropout=0.0).cuda()
    return model, _opt(model)


def _opt(model):  # SGD: Adam turns round-off in near-zero gradients into full-size steps of either sign
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _steps(view, opt, batches, precision=Precision(), graphs=False):
    losses = []
    for images, tokens, lengths in batches:
        def infonce():
            sim = forward_pairs(view, images, tokens, lengths).sim
            assert sim.dtype == torch.float32
            l_i2t, l_t2i, _, _ = kernels.infonce_terms(sim, 0.07)
            return {"loss": (l_i2t + l_t2i).mean()}

        losses.append(float(run_step(opt, [infonce], False, 2.0, precision, graphs)["loss"]))
    return losses


@pytest.mark.parametrize("head", ["sgr", "saf"])
def test_compiled_graphed_step_matches_eager(head):
    torch._dynamo.reset()
    model, opt = _setup(head)
    twin = copy.deepcopy(model)
    twin_opt = _opt(twin)
    batches = _batches()
    eager = _steps(model, opt, batches)
    compiled = _steps(CompiledBackbone(twin, "reduce-overhead"), twin_opt, batches, graphs=True)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_steady_state_compiles_nothing_and_skips_no_cuda_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, opt = _setup()
    view = CompiledBackbone(model, "reduce-overhead")
    batches = _batches()
    _steps(view, opt, batches * 3, graphs=True)  # compile, warm up, record
    graphs = counters["stats"]["unique_graphs"]
    _steps(view, opt, batches * 2, graphs=True)
    assert counters["stats"]["unique_graphs"] == graphs, "a steady-state step recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["inductor"].get("cudagraph_skips"), "a CUDA graph was skipped"


def test_bf16_step_is_close_to_fp32():
    torch._dynamo.reset()
    model, opt = _setup()
    twin = copy.deepcopy(model)
    twin_opt = _opt(twin)
    batches = _batches(n=1)
    full = _steps(model, opt, batches)
    low = _steps(CompiledBackbone(twin, "reduce-overhead"), twin_opt, batches,
                 Precision(torch.bfloat16, torch.device("cuda")), graphs=True)
    assert low[0] == pytest.approx(full[0], rel=5e-2)


def test_compiled_blocked_evaluation_matches_eager():
    torch._dynamo.reset()
    model, _ = _setup()
    model.pair_block = 8
    model.eval()
    images, tokens, lengths = _batches(n=1)[0]
    with torch.no_grad():
        img, cap = model.encode_images(images[:13]), model.encode_captions(tokens, lengths)
        eager = model.similarity(img, cap)
        view = CompiledBackbone(model)
        compiled = view.similarity(view.encode_images(images[:13]), view.encode_captions(tokens, lengths))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
