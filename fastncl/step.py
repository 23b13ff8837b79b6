"""How per-batch work runs: compiled backbones, CUDA graphs, mixed precision, and the optimizer step.

* ``CompiledBackbone``: a backbone whose encoders and pairwise scorer are ``torch.compile``d
  (``dynamic=False``; ``fullgraph=True`` for sgr/saf, whose graphs have no break), sharing the
  module's parameters. ``mode="reduce-overhead"`` adds CUDA graphs (the training step and the
  split pass: fixed batch shapes); evaluation uses its own wrapper without CUDA graphs (its
  encodings stay alive across many scored blocks). Everything else (the loss ops of
  fastncl.kernels, the mixture fit, the optimizer) runs outside the compiled regions, and so do
  the NVTX ranges (profiling.py): they are recorded at capture, never at replay, inside graphs.
* ``Precision``: autocast (bf16 by default where the device supports it; fp16 with a gradient
  scaler as an option) around the forward passes only; the similarities leave the backbone in
  fp32, so every loss statistic is computed in fp32 (the kernels accumulate in fp32).
* ``run_step``: one training iteration: the method's loss groups, summed into one optimizer
  step or one step each (``separate``), with NVTX ranges per group's forward, backward and the
  optimizer.
"""
from __future__ import annotations

import contextlib

import torch

from fastncl import FastnclError, distributed
from fastncl.profiling import nvtx_range

AMP_MODES = ("off", "auto", "bf16", "fp16")


def _raise_recompile_limits(per_function: int = 256, total: int = 1024) -> None:
    """Dynamo's caches: each compiled function sees two models x train/eval x grad/no-grad x
    caption-length buckets (x a short batch), more than the default 8 entries; past the limit it
    would silently fall back to eager."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), per_function))
            break
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, total)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):  # Encoding (a NamedTuple) and plain tuples
        items = [_clone(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _cloned(fn):
    def call(*args, **kwargs):
        return _clone(fn(*args, **kwargs))

    return call


class CompiledBackbone:
    """``module``'s encode_images / encode_captions / pairwise scorer under torch.compile.

    Attribute access falls through to the module (``train()``, ``eval()``, ``training``,
    ``parameters()``), so a method or the evaluation uses it as it would use the module.
    """

    def __init__(self, module: torch.nn.Module, mode: str | None = None):
        self.module = module
        pairwise = hasattr(module, "score_block")
        # vse's packed GRU breaks the graph; so does a batch norm's all-gather under torchrun
        options = dict(dynamic=False, fullgraph=pairwise and distributed.size() == 1, mode=mode)
        _raise_recompile_limits()
        # CUDA graphs overwrite their outputs at the next replay of a new iteration, and a method may
        # keep an encoding across its loss groups (SPS's proxy search after a separate reliable
        # step): under graphs every output is cloned out of the graph's memory (cheap: O(B) rows)
        wrap = _cloned if mode == "reduce-overhead" else (lambda fn: fn)
        self.encode_images = wrap(torch.compile(module.encode_images, **options))
        self.encode_captions = wrap(torch.compile(module.encode_captions, **options))
        self._score = wrap(torch.compile(module.score_block if pairwise else module.similarity, **options))
        self._pairwise = pairwise

    def similarity(self, images, captions) -> torch.Tensor:
        if self._pairwise:  # the module's eager loop over blocks, each block compiled
            return self.module.similarity(images, captions, score_block=self._score)
        return self._score(images, captions)

    def __getattr__(self, name):
        if name == "module":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``runtime.amp`` on ``device`` (None: full precision)."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16":
            return torch.float16
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if mode == "bf16":
            raise FastnclError("runtime.amp=bf16: this GPU does not support bf16; use runtime.amp=fp16")
        return torch.float16  # "auto" on a GPU without bf16
    if device.type == "cpu":
        if mode == "fp16":
            raise FastnclError("runtime.amp=fp16: fp16 with a gradient scaler needs a CUDA device; "
                               "on the CPU use runtime.amp=bf16 (or --amp)")
        return torch.bfloat16
    raise FastnclError(f"runtime.amp={mode}: mixed precision is not supported on device {device}")


class Precision:
    """Autocast for the forward passes and, for fp16, the gradient scaler."""

    def __init__(self, dtype: torch.dtype | None = None, device: torch.device = torch.device("cpu")):
        self.dtype, self.device = dtype, device
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    @property
    def name(self) -> str:
        """What the forward passes run in: "fp32", or "bf16 autocast" / "fp16 autocast + grad scaler"."""
        if self.dtype is None:
            return "fp32"
        return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


FULL_PRECISION = Precision()


def mark_step() -> None:
    """Tell CUDA-graph trees a new iteration begins (outputs of the last one may be overwritten)."""
    if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()


def run_step(opt: torch.optim.Optimizer, groups, separate: bool, clip: float, precision: Precision = FULL_PRECISION,
             graphs: bool = False, modules=()) -> dict:
    """One iteration: all loss groups in one optimizer step, or one step per group (``separate``).
    Under torchrun every rank computes the same loss of the global batch and backward runs on it
    divided by the number of ranks; the gradients of ``modules`` are then summed over the ranks
    before clipping (fastncl.distributed), so every rank takes the single-process step.

    Returns the groups' named terms and the summed "loss", as tensors (no host sync).
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    ranks = distributed.size() if modules else 1
    scaler = precision.scaler
    terms = {}
    for chunk in ([g] for g in groups) if separate else [groups]:
        opt.zero_grad(set_to_none=True)
        if graphs:
            mark_step()
        loss = 0.0
        for group in chunk:
            with nvtx_range(f"forward {getattr(group, '__name__', 'loss')}"), precision.autocast():
                out = group()
            loss = loss + out.pop("loss")
            terms.update(out)
        with nvtx_range("backward"):
            # a power of two for 2, 4, 8 ranks: exact; a gathered encoding's gradient, summed over the
            # ranks, then has its single-process size (the fp16 scaler sees the same magnitudes)
            scaled = scaler.scale(loss) if scaler is not None else loss
            (scaled / ranks if ranks > 1 else scaled).backward()
        if ranks > 1:
            distributed.reduce_gradients(modules)
        with nvtx_range("optimizer"):
            if scaler is not None:
                scaler.unscale_(opt)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            if scaler is not None:
                scaler.step(opt)  # skips the step on inf/NaN gradients (a host sync)
                scaler.update()
            else:
                opt.step()
        terms["loss"] = terms.get("loss", 0.0) + loss.detach()
    return terms
