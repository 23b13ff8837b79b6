"""The end-to-end SGR setups that bench_e2e.py times and tools/profile_nsys.py profiles (GPU).

Three ways to run the same SGR model (the papers' sizes: E 1024, words 300, S 256, 3 steps) on
Flickr30K-shaped synthetic data (fastncl/data/fullshape.py), B = 128:

* ``loop``: the papers' computation: eager fp32, the per-caption loop (sgraf_loop.py);
* ``batched``: fastncl's batched head, eager fp32;
* ``fast``: the batched head compiled, with CUDA graphs and bf16 autocast (``--compile --amp``).

A training step is one optimizer step on the bidirectional InfoNCE loss of one batch (the
warm-up step of SPS and vanilla; every method's steps are this plus small loss terms), with
gradient clipping and fused Adam, through fastncl.step.run_step as the trainer runs it. The dev
evaluation is the 1000 x 5000 similarity matrix of one model (fastncl.evaluation).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fastncl import assemble, kernels
from fastncl.config import ModelConfig, resolve
from fastncl.methods.presets import SGR_MODEL
from fastncl.data.batches import PairBatches
from fastncl.data.fullshape import make_f30k_shaped
from fastncl.data.noise import own_images
from fastncl.evaluation import similarity_matrix
from fastncl.models import forward_pairs
from fastncl.step import Precision, run_step
from sgraf_loop import loop_similarity

VARIANTS = ("loop", "batched", "fast")
BATCH = 128
TAU = 0.07


class LoopBackbone:
    """A model whose similarity is the official per-caption loop (baseline ``loop``)."""

    def __init__(self, module):
        self.module = module

    def similarity(self, images, captions):
        return loop_similarity(self.module, images, captions)

    def __getattr__(self, name):
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)


@dataclass
class Setup:
    variant: str
    model: torch.nn.Module  # the module (parameters, train/eval)
    view: object  # what the step and the evaluation call: the module, LoopBackbone or CompiledBackbone
    eval_view: object
    opt: torch.optim.Optimizer
    precision: Precision
    graphs: bool
    batches: list
    data: object
    device: torch.device
    step_count: int = 0

    def step(self) -> dict:
        """One training step on the next prepared batch (no synchronisation)."""
        batch = self.batches[self.step_count % len(self.batches)]
        self.step_count += 1

        def infonce():
            sim = forward_pairs(self.view, batch.images, batch.tokens, batch.lengths).sim
            l_i2t, l_t2i, _, _ = kernels.infonce_terms(sim, TAU)
            return {"loss": (l_i2t + l_t2i).mean()}

        return run_step(self.opt, [infonce], separate=False, clip=2.0, precision=self.precision, graphs=self.graphs)

    def evaluate(self, chunk: int = 1000) -> torch.Tensor:
        """The dev similarity matrix (1000 x 5000) of one model."""
        return similarity_matrix([self.eval_view], self.data.dev, self.device, chunk, self.precision)


_DATA = {}


def f30k_data():
    if "f30k" not in _DATA:
        _DATA["f30k"] = make_f30k_shaped(seed=0)
    return _DATA["f30k"]


def make_setup(variant: str, device="cuda", n_batches: int = 8, seed: int = 0, batch: int = BATCH,
               model_overrides: dict | None = None) -> Setup:
    """``model_overrides`` (e.g. smaller dimensions) and ``batch`` are for the CPU smoke test only."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    device = torch.device(device)
    data = f30k_data()
    fast = variant == "fast"  # compiled, CUDA graphs on a GPU, bf16 autocast: as `fastncl train --compile --amp`
    rt = assemble.runtime(resolve(overrides=[("runtime.compile", fast), ("runtime.amp", "bf16" if fast else "off")]),
                          device)
    torch.manual_seed(seed)
    model = assemble.backbone(ModelConfig(**{**SGR_MODEL, **(model_overrides or {})}), data, device).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, **fused)
    train = data.train
    loader = PairBatches(train, own_images(train.num_captions, train.captions_per_image),
                         np.arange(train.num_captions), batch, np.random.default_rng(seed), device, length_multiple=8)
    batches = [loader.batch(index) for index in loader.epoch_indices()[:n_batches]]
    if variant == "loop":
        view = eval_view = LoopBackbone(model)
    else:
        (view,), (eval_view,) = assemble.views([model], rt)
    return Setup(variant, model, view, eval_view, opt, rt.precision, rt.graphs, batches, data, device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def warm_up(setup: Setup) -> float:
    """Run every prepared batch once (compiles each caption-length bucket); seconds taken."""
    t0 = time.perf_counter()
    for _ in range(len(setup.batches)):
        setup.step()
    synchronize(setup.device)
    return time.perf_counter() - t0
