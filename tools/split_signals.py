"""Score candidate clean/noisy split signals offline, from runs' split files (no retraining).

    python tools/split_signals.py RUN_DIR [RUN_DIR ...] [--format md|csv]

Every co-training epoch of a run with injected noise leaves ``splits/epoch_NNN.npz``: both
models' per-pair division losses and clean probabilities, and the ground truth. For each run and
epoch this prints the ROC AUC ("clean" as the positive class) of signals a split could be fitted
to, each computed from what the run had seen *up to that epoch*:

* ``loss``: the model's own loss (what NCR, SPS and ESC fit today; the mean over models A and B);
* ``both``: the two models' losses, each turned into ranks, averaged (co-teaching agreement);
* ``mean``: each pair's rank-normalised loss averaged over the epochs so far;
* ``ema``: the same, exponentially weighted (``--ema`` weight of the newest epoch, 0.5);
* ``first``: the loss at the first co-training epoch only (before more memorisation);
* ``own_mean``: each model's min-max normalised loss (what its mixture is fitted to) averaged over
  the epochs so far, AUC averaged over the models (``split.signal=mean``);
* ``prob``: the clean probability the run used (the mixture's posterior; mean over the models).

A signal that stays high across data sets and noise rates is worth fitting the mixture to; see
docs/methods.md. AUC uses the ranks only, so a monotone transformation of a signal scores alike.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from fastncl.methods.mixture import normalize_losses
from fastncl.records import SplitFile
from fastncl.run import RunDir

SIGNALS = ("loss", "both", "mean", "ema", "first", "own_mean", "prob")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties averaged): comparable across epochs and models."""
    return (rankdata(x) - 1) / max(len(x) - 1, 1)


def run_signals(run_dir: str, ema: float = 0.5) -> list[dict]:
    run = RunDir.open(run_dir)
    files = sorted(run.file("splits").glob("epoch_*.npz"))
    rows, history, smooth, own = [], [], None, []
    for path in files:
        epoch = int(path.stem.split("_")[1])
        split = SplitFile.from_arrays(dict(np.load(path, allow_pickle=False)), str(path))
        if split.clean_mask is None:
            raise SystemExit(f"{path}: no ground truth (the run's noise was not injected)")
        clean = split.clean_mask
        ranked = np.stack([_ranks(loss) for loss in split.losses])  # (2, N), high = noisy-looking
        both = ranked.mean(axis=0)
        history.append(both)
        own.append(np.stack([normalize_losses(loss) for loss in split.losses]))  # what signal=mean averages
        smooth = both if smooth is None else ema * both + (1 - ema) * smooth
        scores = {
            "loss": np.mean([roc_auc_score(clean, -loss) for loss in split.losses]),
            "both": roc_auc_score(clean, -both),
            "mean": roc_auc_score(clean, -np.mean(history, axis=0)),
            "ema": roc_auc_score(clean, -smooth),
            "first": roc_auc_score(clean, -history[0]),
            "own_mean": np.mean([roc_auc_score(clean, -m) for m in np.mean(own, axis=0)]),
            "prob": np.mean([roc_auc_score(clean, p) for p in split.clean_prob]),
        }
        rows.append({"run": Path(run_dir).name, "epoch": epoch, **{k: float(v) for k, v in scores.items()}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--ema", type=float, default=0.5, help="weight of the newest epoch in `ema`")
    p.add_argument("--format", choices=("md", "csv"), default="md")
    a = p.parse_args()
    rows = [row for run in a.runs for row in run_signals(run, a.ema)]
    if not rows:
        sys.exit("no split files in the given runs")
    sep = "," if a.format == "csv" else " | "
    head = ["run", "epoch", *SIGNALS]
    lines = [sep.join(head)]
    if a.format == "md":
        lines = ["| " + lines[0] + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], str(r["epoch"])] + [f"{r[s]:.3f}" for s in SIGNALS]
        lines.append(sep.join(cells) if a.format == "csv" else "| " + sep.join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
