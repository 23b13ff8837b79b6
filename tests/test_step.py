"""fastncl.step: the optimizer step's NVTX ranges, mixed-precision resolution, compiled views."""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastncl.step as step
from fastncl import FastnclError


def _model_and_groups():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)

    def reliable():
        return {"loss": model(x).pow(2).mean(), "re": torch.tensor(1.0)}

    def noisy():
        return {"loss": model(x).abs().mean(), "n": torch.tensor(2.0)}

    return model, [reliable, noisy]


@pytest.mark.parametrize("separate", [False, True])
def test_run_step_ranges_wrap_each_forward_backward_and_optimizer(monkeypatch, separate):
    names = []
    monkeypatch.setattr(step, "nvtx_range", lambda name: names.append(name) or contextlib.nullcontext())
    model, groups = _model_and_groups()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    terms = step.run_step(opt, groups, separate=separate, clip=1.0)
    once = ["backward", "optimizer"]
    expected = (["forward reliable", *once, "forward noisy", *once] if separate
                else ["forward reliable", "forward noisy", *once])
    assert names == expected
    assert set(terms) == {"loss", "re", "n"} and terms["loss"].dim() == 0


def test_precision_names_what_it_runs():
    assert step.Precision().name == "fp32"
    assert step.Precision(torch.bfloat16).name == "bf16 autocast"
    assert step.Precision(torch.float16).name == "fp16 autocast + grad scaler"


def test_resolve_amp_on_the_cpu():
    cpu = torch.device("cpu")
    assert step.resolve_amp("off", cpu) is None
    assert step.resolve_amp("auto", cpu) is torch.bfloat16
    assert step.resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(FastnclError, match="runtime.amp=fp16: .*CUDA"):
        step.resolve_amp("fp16", cpu)


def test_bf16_precision_autocasts_and_has_no_scaler():
    p = step.Precision(torch.bfloat16, torch.device("cpu"))
    assert p.scaler is None and p.state_dict() == {}
    with p.autocast():
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.bfloat16


def test_compiled_backbone_delegates_to_its_module():
    from fastncl.models.vse import VSE

    module = VSE(5, 10, embed_dim=4, word_dim=3)
    view = step.CompiledBackbone(module)
    view.eval()
    assert not module.training and view.training is False
    assert list(view.parameters()) == list(module.parameters())


def test_graphed_outputs_are_cloned_out_of_graph_memory():
    from fastncl.models.base import Encoding

    enc = Encoding(global_=torch.ones(2, 3), pooled=torch.zeros(2, 3), local=None, mask=None)
    out = step._cloned(lambda: enc)()
    assert isinstance(out, Encoding) and out.local is None
    assert torch.equal(out.global_, enc.global_) and out.global_.data_ptr() != enc.global_.data_ptr()
    t = torch.ones(3, requires_grad=True)
    (step._cloned(lambda: t * 2)()).sum().backward()  # clones stay in the autograd graph
    assert torch.equal(t.grad, torch.full((3,), 2.0))
