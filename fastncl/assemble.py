"""The composition root: what a run is made of, built from its config in one place.

The trainer, ``fastncl eval``/``report`` and the end-to-end benchmark all get their device,
precision, models, compiled views, loss-op backend and method from here, so that a run is
evaluated as it was trained; the trainer also gets its inputs (data, noisy pairs, method),
optimizers and schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastncl import FastnclError, distributed, kernels
from fastncl.board import check_tensorboard
from fastncl.config import Config, ModelConfig
from fastncl.data import Dataset, TrainingPairs, load_dataset, training_pairs
from fastncl.schedule import Schedule
from fastncl.step import CompiledBackbone, Precision, resolve_amp


def resolve_device(name: str) -> torch.device:
    """The device of ``runtime.device``; under torchrun, "auto" and "cuda" are this process's own
    GPU (LOCAL_RANK)."""
    _, world, local_rank = distributed.env_world()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world > 1:
        name = f"cuda:{local_rank}"
    elif name.startswith("cuda:") and world > 1:
        raise FastnclError(f"runtime.device={name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                           "give runtime.device=cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastnclError(f"runtime.device={name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FastnclError(f"runtime.device: not a device name: {name!r}") from None


@dataclass
class Runtime:
    device: torch.device
    precision: Precision
    compile: bool  # torch.compile the backbones
    graphs: bool  # and capture training steps and split passes in CUDA graphs


def runtime(cfg: Config, device: torch.device | None = None) -> Runtime:
    device = device or resolve_device(cfg.runtime.device)
    graphs = cfg.runtime.compile and cfg.runtime.cuda_graphs and device.type == "cuda"
    return Runtime(device, Precision(resolve_amp(cfg.runtime.amp, device), device), cfg.runtime.compile, graphs)


def backend(cfg: Config, device: torch.device) -> str:
    """The loss-op backend, resolved once: every op call gets "torch" or "triton"."""
    try:
        return kernels.check_backend(cfg.runtime.backend, device)
    except ValueError as e:
        raise FastnclError(f"runtime.backend={cfg.runtime.backend}: {e}") from None


def method(cfg: Config, device: torch.device):
    from fastncl.methods import build_method

    return build_method(cfg, kernels.Ops(backend(cfg, device)))


@dataclass
class Inputs:
    data: Dataset
    pairs: TrainingPairs  # the noisy training pairs and their ground truth
    method: object  # a fastncl.methods.base.Method


def inputs(cfg: Config, device: torch.device) -> Inputs:
    """A run's data, noisy training pairs and method: everything that can fail on bad input, built
    before the run folder is touched. Under torchrun every rank stops with the same error when any
    rank failed (distributed.agree)."""
    error = built = None
    try:
        distributed.check_batch(cfg.optim.batch_size)
        data = load_dataset(cfg.data)
        built = Inputs(data, training_pairs(data.train, cfg.data, cfg.seed), method(cfg, device))
        if cfg.runtime.tensorboard:
            check_tensorboard()
    except Exception as e:
        error = e
    distributed.agree(error)
    return built


def backbone(model: ModelConfig, data: Dataset, device: torch.device) -> torch.nn.Module:
    from fastncl.models import build_backbone

    module = build_backbone(model, data.image_dim, len(data.vocab), data.train.images.shape[1])
    return distributed.global_batch_norm(module).to(device)


def views(models: list, rt: Runtime) -> tuple[list, list]:
    """What the steps and split passes call, and what evaluation calls: the modules, or their
    compiled forms (with CUDA graphs for the steps on a GPU; evaluation without). Under torchrun
    the steps' views encode this rank's share of each global batch (distributed.ShardedBackbone);
    evaluation shards its captions itself (evaluation.similarity_matrix)."""
    if not rt.compile:
        steps, evals = list(models), list(models)
    else:
        steps = [CompiledBackbone(m, "reduce-overhead" if rt.graphs else None) for m in models]
        evals = [CompiledBackbone(m) for m in models]
    if distributed.size() > 1:
        steps = [distributed.ShardedBackbone(v) for v in steps]
    return steps, evals


def optimizers(models: list, cfg: Config, device: torch.device) -> list[torch.optim.Optimizer]:
    """One Adam per model (the schedule sets each epoch's learning rate): fused on GPUs (one
    kernel); the CPU keeps the default implementation."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return [torch.optim.Adam(m.parameters(), lr=cfg.optim.lr, **fused) for m in models]


def schedule(cfg: Config, optimizers: list) -> Schedule:
    return Schedule(cfg.optim, optimizers)
