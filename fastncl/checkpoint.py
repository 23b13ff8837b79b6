"""The checkpoint: what a run saves after every epoch (``checkpoints/last.pt``) and at its best
epoch (``checkpoints/best.pt``), and the one place that writes and reads it.

It holds the two models' weights, their optimizers' states, the random states (NumPy's
generator, torch's, CUDA's, Python's), the fp16 gradient scaler's state, the resolved config and
the loop's ``LoopState``: everything a resume needs to go on as the uninterrupted run would. On
disk it is a dict of tensors, plain containers and numbers (``Checkpoint.to_state``), so that
``torch.load(path, weights_only=True)`` reads it, with a format number (``FORMAT``); a checkpoint
without one was written before it had one (fastncl 0.1.0: the same keys, the later ones missing
in older runs). A file that is no such dict (random bytes, a cut-short file, another program's
pickle or model) is a one-line error that names it.
"""
from __future__ import annotations

import dataclasses
import io
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastncl import FastnclError
from fastncl.records import SplitQuality, check_format
from fastncl.run import write_atomic

FORMAT = 1
RNG_KEYS = ("numpy_rng", "torch_rng", "cuda_rng", "python_rng")
REQUIRED = ("epoch", "models", "optimizers", "best_rsum", "best_epoch")


@dataclass
class LoopState:
    """Where a run stands between two epochs, besides its weights and random states."""

    best_rsum: float = -1.0  # dev RSum of the best epoch so far (the one in best.pt)
    best_epoch: int = -1  # 0-based; -1: none yet
    # the first co-training epoch: optim.warmup_epochs, or (optim.warmup=plateau) None until dev
    # RSum stops rising
    warmup_end: int | None = None
    # the collapse guard (optim.collapse): the learning rate's factor after recoveries, how many
    # there were, and whether the run stopped early
    lr_scale: float = 1.0
    recoveries: int = 0
    stopped: bool = False
    # split.signal=mean: each model's min-max normalised division losses summed over the split
    # epochs so far, and how many there were
    signal_sum: list[np.ndarray] | None = None
    signal_epochs: int = 0
    last_split: SplitQuality | None = None  # the last split's diagnostics (results.json's "split")
    # optim.warmup_best=reload: the warm-up epoch kept so far (0-based) and its dev recalls
    warmup_kept: int = -1
    warmup_dev: dict | None = None


@dataclass
class Checkpoint:
    epoch: int  # the epoch it was saved after, 0-based
    models: list[dict]  # the two models' state dicts
    optimizers: list[dict]  # their optimizers' state dicts
    state: LoopState
    config: dict  # the run's resolved config (Config.to_dict)
    rngs: dict = field(default_factory=dict)  # RNG_KEYS: the random states after the epoch
    grad_scaler: dict = field(default_factory=dict)  # runtime.amp=fp16's scaler; empty otherwise

    @classmethod
    def capture(cls, epoch: int, models, optimizers, state: LoopState, config: dict, numpy_rng,
                precision) -> Checkpoint:
        """The run as it stands after ``epoch`` (the tensors are the live ones: save it before the
        next step)."""
        rngs = {"numpy_rng": numpy_rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python_rng": random.getstate()}
        return cls(epoch, [m.state_dict() for m in models], [o.state_dict() for o in optimizers],
                   dataclasses.replace(state), config, rngs, precision.state_dict())

    # -- restoring ---------------------------------------------------------------------------
    def load_weights(self, models, optimizers=()) -> None:
        """Its weights into ``models`` and, given, its optimizer states into ``optimizers``."""
        for model, state in zip(models, self.models):
            model.load_state_dict(state)
        for opt, state in zip(optimizers, self.optimizers):
            opt.load_state_dict(state)

    def resume(self, models, optimizers, numpy_rng, precision) -> LoopState:
        """Everything into the run that goes on from it (weights, optimizers, random states, the
        gradient scaler); returns its LoopState."""
        self.load_weights(models, optimizers)
        numpy_rng.bit_generator.state = self.rngs["numpy_rng"]
        torch.set_rng_state(self.rngs["torch_rng"])
        if self.rngs.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.rngs["cuda_rng"])
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in self.rngs["python_rng"]))
        precision.load_state_dict(self.grad_scaler)
        return dataclasses.replace(self.state)

    def check_trained_with(self, config: dict, model, where: str) -> None:
        """A FastnclError unless it was saved by a run of ``config``'s (a resolved config's) method
        and model, whose weights fit ``model``: one line naming what differs (a checkpoint copied
        from another run, an edited config.yaml)."""
        method = self.config.get("method", config["method"])
        diffs = [f"method {method} (config.yaml: {config['method']})"] if method != config["method"] else []
        diffs += [f"model.{k} {v!r} (config.yaml: {config['model'].get(k)!r})"
                  for k, v in self.config.get("model", {}).items() if config["model"].get(k) != v]
        own = model.state_dict()
        for name, tensor in self.models[0].items():
            if name not in own:
                diffs.append(f"tensor {name} (not in config.yaml's model)")
            elif tuple(tensor.shape) != tuple(own[name].shape):
                diffs.append(f"tensor {name} of shape {tuple(tensor.shape)} "
                             f"(config.yaml's model: {tuple(own[name].shape)})")
        if diffs:
            more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            raise FastnclError(f"{where}: " + "; ".join(diffs[:3]) + more)

    # -- on disk -----------------------------------------------------------------------------
    def to_state(self) -> dict:
        p = self.state
        return {"format": FORMAT, "epoch": self.epoch, "models": self.models, "optimizers": self.optimizers,
                "best_rsum": float(p.best_rsum), "best_epoch": int(p.best_epoch), **self.rngs,
                "grad_scaler": self.grad_scaler, "config": self.config,
                "last_split": None if p.last_split is None else p.last_split.to_json(),
                "lr_scale": float(p.lr_scale), "recoveries": int(p.recoveries), "stopped": bool(p.stopped),
                "signal_sum": None if p.signal_sum is None else [torch.from_numpy(x) for x in p.signal_sum],
                "signal_epochs": int(p.signal_epochs), "warmup_end": p.warmup_end,
                "warmup_kept": int(p.warmup_kept), "warmup_dev": p.warmup_dev}

    @classmethod
    def from_state(cls, d, where: str) -> Checkpoint:
        """A checkpoint from what ``to_state`` wrote (or from fastncl 0.1.0's dict, whose later keys
        may be missing: they take the values of before they existed)."""
        missing = [key for key in REQUIRED if key not in d] if isinstance(d, dict) else list(REQUIRED)
        if missing:
            raise FastnclError(f"{where}: not a fastncl checkpoint (no {', '.join(missing)})")
        check_format(d.get("format"), where, "checkpoint", FORMAT)
        config = d.get("config") or {}
        signal = d.get("signal_sum")
        state = LoopState(
            d["best_rsum"], d["best_epoch"],
            # a checkpoint from before optim.warmup=plateau: a fixed warm-up
            d.get("warmup_end", config.get("optim", {}).get("warmup_epochs")),
            d.get("lr_scale", 1.0), d.get("recoveries", 0), d.get("stopped", False),
            None if signal is None else [x.numpy().astype(np.float64) for x in signal], d.get("signal_epochs", 0),
            SplitQuality.from_json(d["last_split"]) if d.get("last_split") else None,
            d.get("warmup_kept", -1), d.get("warmup_dev"))
        return cls(d["epoch"], d["models"], d["optimizers"], state, config,
                   {key: d[key] for key in RNG_KEYS if key in d}, d.get("grad_scaler", {}))

    def save(self, path: Path) -> None:
        """Written atomically: a kill leaves the previous file whole."""
        buf = io.BytesIO()
        torch.save(self.to_state(), buf)
        write_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """The checkpoint at ``path``, on the CPU."""
        path = Path(path)
        if not path.exists():
            raise FastnclError(f"{path}: no such checkpoint")
        try:
            with warnings.catch_warnings():  # torch warns of a foreign pickle's protocol before failing
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception:  # torch's own message would suggest weights_only=False: never for a file we did not write
            raise FastnclError(f"{path}: not a fastncl checkpoint (damaged, cut short or written by another "
                               "program)") from None
        return cls.from_state(state, str(path))
