"""The end-to-end benchmark's setups (bench/e2e.py) on the CPU, tiny: the three variants agree.

The GPU benchmark itself (bench/bench_e2e.py) skips without CUDA; this checks that its baseline
(the per-caption loop) and the batched head compute the same training step on the same batch,
and that the compiled variant runs (Dynamo's eager backend: no Inductor build on CI).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import e2e  # noqa: E402

pytestmark = pytest.mark.slow
TINY = {"embed_dim": 16, "word_dim": 8, "sim_dim": 8}


def _first_step(variant):
    setup = e2e.make_setup(variant, "cpu", n_batches=1, batch=6, model_overrides=TINY)
    setup.model.eval()  # no dropout: the variants must agree
    setup.opt = torch.optim.SGD(setup.model.parameters(), lr=1.0)  # parameters move by the clipped gradient
    terms = setup.step()
    return setup, float(terms["loss"]), [p.detach().clone() for p in setup.model.parameters()]


def test_loop_and_batched_steps_agree():
    _, loss_loop, params_loop = _first_step("loop")
    _, loss_batched, params_batched = _first_step("batched")
    assert loss_loop == pytest.approx(loss_batched, rel=1e-5)
    for a, b in zip(params_loop, params_batched):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fast_variant_runs_compiled_in_bf16(monkeypatch):
    import fastncl.step

    monkeypatch.setattr(fastncl.step.torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    setup, loss, _ = _first_step("fast")
    _, loss_batched, _ = _first_step("batched")
    assert setup.precision.dtype == torch.bfloat16
    assert loss == pytest.approx(loss_batched, rel=5e-2)
    torch._dynamo.reset()
