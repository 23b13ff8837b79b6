"""TensorBoard logging behind ``--tensorboard`` (an optional dependency: the tensorboard package).

Every epoch, the numbers of its ``metrics.jsonl`` line become scalars named by their path in the
record (``dev/rsum``, ``dev_models/A/rsum``, ``split/auc``, ``losses/A/loss``, ``time_eval``...), at
step = epoch (1-based, as the log prints it); the per-sample division losses of both models go in
as histograms, split by the ground truth when the noise was injected. Files go to ``RUN/tb``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastncl import optional_import
from fastncl.records import EpochRecord, SplitFile

INSTALL_HINT = "pip install 'fastncl[tensorboard]' (tensorboard)"


def _writer_class():
    return optional_import("torch.utils.tensorboard",
                           f"--tensorboard needs the tensorboard package: {INSTALL_HINT}").SummaryWriter


def check_tensorboard() -> None:
    """Fail with one line, before anything is written, when tensorboard is missing."""
    _writer_class()


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics record, keyed by their path (lists are indexed)."""
    out = {}
    items = record.items() if isinstance(record, dict) else enumerate(record)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            if name not in ("epoch", "format"):
                out[name] = float(value)
        elif isinstance(value, (dict, list)):
            out.update(scalars(value, name + "/"))
    return out


class Board:
    def __init__(self, folder: Path):
        self.writer = _writer_class()(log_dir=str(folder))

    def log(self, record: EpochRecord, split: SplitFile | None = None) -> None:
        step = record.epoch + 1
        for name, value in scalars(record.to_json()).items():
            self.writer.add_scalar(name, value, step)
        if split is not None:
            clean = split.clean_mask
            for k, losses in enumerate(split.normalized):
                model = "AB"[k]
                self.writer.add_histogram(f"split_losses/{model}", losses, step)
                if clean is not None:
                    for name, mask in (("clean", clean), ("noisy", ~clean)):
                        if mask.any():
                            self.writer.add_histogram(f"split_losses/{model}_{name}", losses[mask], step)
                self.writer.add_histogram(f"clean_prob/{model}", np.asarray(split.clean_prob[k]), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
