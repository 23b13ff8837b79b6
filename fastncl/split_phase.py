"""The split phase that opens a co-training epoch of a method that splits the training set.

1. The split pass: each model's per-sample division losses (and anchor flags) over the whole
   training set, eval mode, no gradients. Under torchrun every rank computes the same losses
   (each encodes its share of every global batch) and rank 0's are sent to all.
2. What each model's mixture is fitted to (split.signal): this epoch's losses, or their min-max
   normalised values averaged over the split epochs so far; or no fit, the ground truth
   (split.signal=truth, a diagnostic of what a perfect split gives the method).
3. The mixture fits, on rank 0 (every rank then holds the same split, bit for bit), each combined
   with the training pairs' structure scores (split.structure), computed once per run.
4. The method's one split value per model (``Method.split`` -> ``methods.base.Division``: its
   subsets, cuts and notes), its diagnostics against the ground truth and what is degenerate.

Model k then trains on its peer's split (``EpochSplit.trains``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from fastncl import distributed
from fastncl.checkpoint import LoopState
from fastncl.evaluation import split_diagnostics
from fastncl.methods.mixture import clean_core, normalize_losses, truth_fit, with_structure
from fastncl.profiling import nvtx_range
from fastncl.records import EpochRecord, SplitFile, SplitQuality
from fastncl.step import mark_step


@dataclass
class EpochSplit:
    """One epoch's split of both models (index k: model A, B; model k's trains model 1 - k)."""

    losses: list[np.ndarray]  # (N,) raw division losses
    fits: list  # methods.mixture.MixtureFit: every pair's clean probability
    divisions: list  # methods.base.Division
    active: tuple[str, ...]  # the subsets trained on this epoch (the curriculum), primary first
    quality: SplitQuality  # the diagnostics of both models' split (metrics.jsonl, results.json)
    warnings: list[str]
    clean_mask: np.ndarray | None  # (N,) bool ground truth: True, a clean pair (injected noise only)
    time_split: float  # seconds: the split passes
    time_fit: float  # and the mixture fits

    def trains(self, k: int, device: torch.device) -> tuple[dict[str, np.ndarray], torch.Tensor]:
        """What model ``k`` trains on: its peer's active subsets, and its peer's (N,) clean probabilities."""
        peer = 1 - k
        subsets = self.divisions[peer].subsets
        return ({name: subsets[name] for name in self.active},
                torch.from_numpy(self.fits[peer].clean_prob).float().to(device))

    def record(self, record: EpochRecord) -> None:
        """Its part of the epoch record: quality, subsets trained, warnings (first), times."""
        record.split, record.active_subsets, record.warnings = self.quality, list(self.active), list(self.warnings)
        record.time_split, record.time_fit = self.time_split, self.time_fit

    def primary(self) -> list[tuple[str, int]]:
        """Each model's primary subset (clean, reliable): its name and size."""
        out = []
        for division in self.divisions:
            name = next(iter(division.subsets))
            out.append((name, len(division.subsets[name])))
        return out

    @cached_property
    def file(self) -> SplitFile:
        """The split file (``splits/epoch_NNN.npz``)."""
        return SplitFile.build(self.losses, self.fits, self.divisions, self.clean_mask)


def mean_signal(losses: list[np.ndarray], state: LoopState) -> list[np.ndarray]:
    """Each model's min-max normalised ``losses`` averaged over the epochs seen so far, this one
    included (split.signal=mean); ``state`` carries the sums and the count. No clipping here: the
    fit clips (split.clip_quantile) the average once."""
    normalized = [normalize_losses(x) for x in losses]
    state.signal_sum = normalized if state.signal_sum is None else [a + b for a, b in zip(state.signal_sum, normalized)]
    state.signal_epochs += 1
    return [x / state.signal_epochs for x in state.signal_sum]


class SplitPhase:
    def __init__(self, method, signal: str, clean_mask: np.ndarray | None, n: int, batches, bar, precision,
                 graphs: bool, clean_side: str = "posterior", structure=None):
        """``batches(index)``: the training pairs ``index`` in batches (data.batches.PairBatches);
        ``bar``: progress.Bars; ``signal``, ``clean_side``: split.signal, split.clean_side;
        ``structure``: the pairs' (N,) structure scores (split.structure) or None."""
        self.method, self.signal, self.clean_mask, self.n = method, signal, clean_mask, n
        self.clean_side, self.structure = clean_side, structure
        self.batches, self.bar, self.precision, self.graphs = batches, bar, precision, graphs

    def run(self, models, co_epoch: int, state: LoopState, diverged) -> EpochSplit:
        """Split the training set with ``models`` (what the steps call); ``state`` carries the mean
        signal's sums; ``diverged(what)`` stops the run."""
        t0 = time.perf_counter()
        with nvtx_range("split pass"):
            passes = distributed.broadcast_object([self.split_pass(m) for m in models])
        for k, (loss, _) in enumerate(passes):
            bad = int((~np.isfinite(loss)).sum())
            if bad:
                diverged(f"model {'AB'[k]}'s per-sample division losses are not finite ({bad} of {len(loss)} pairs)")
        t_split = time.perf_counter()
        signals = self._signal([loss for loss, _ in passes], state)
        with nvtx_range("mixture fit"):
            fits = distributed.on_main(lambda: [self._fit(x) for x in signals])
        time_fit = time.perf_counter() - t_split
        divisions = [self.method.split(fit, anchors, co_epoch) for fit, (_, anchors) in zip(fits, passes)]
        return EpochSplit([loss for loss, _ in passes], fits, divisions, tuple(self.method.active_subsets(co_epoch)),
                          self._diagnostics(fits, divisions), self._warnings(divisions), self.clean_mask,
                          t_split - t0, time_fit)

    @torch.no_grad()
    def split_pass(self, model) -> tuple[np.ndarray, np.ndarray]:
        """(N,) division losses and (N,) bool anchor flags of the whole training set, eval mode."""
        losses, anchors = np.zeros(self.n), np.zeros(self.n, dtype=bool)
        model.eval()
        loader = self.batches(np.arange(self.n))
        done = []  # kept on the device, copied once at the end: no host sync per batch
        for batch in self.bar(loader, len(loader), "split pass"):
            if self.graphs:
                mark_step()
            with self.precision.autocast():
                loss, anchor = self.method.split_losses(model, batch)
            # clone: a CUDA-graph output is overwritten by the next replay
            done.append((batch.index, loss.float().clone(), None if anchor is None else anchor.clone()))
        model.train()
        idx = torch.cat([i for i, _, _ in done]).cpu().numpy()
        losses[idx] = torch.cat([loss for _, loss, _ in done]).cpu().numpy()
        if done and done[0][2] is not None:
            anchors[idx[torch.cat([a for _, _, a in done]).cpu().numpy()]] = True
        return losses, anchors

    def _signal(self, losses: list[np.ndarray], state: LoopState) -> list[np.ndarray]:
        """What each model's mixture is fitted to (split.signal): this epoch's losses, or their
        min-max normalised values averaged over the split epochs so far (the fit then clips and
        normalises the average as it would a loss)."""
        return mean_signal(losses, state) if self.signal == "mean" else losses

    def _fit(self, signal: np.ndarray):
        """The fit the split uses: the method's mixture, as fitted or its clean component's core
        (split.clean_side), its probabilities handed out by the loss and the structure together
        (split.structure); under split.signal=truth the ground truth itself."""
        if self.signal == "truth":
            return truth_fit(signal, self.clean_mask, self.method.cfg.split.clip_quantile)
        fit = self.method.fit(signal)
        used = clean_core(fit, self.method.cfg.split.core_width) if self.clean_side == "core" else fit
        return used if self.structure is None else with_structure(used, self.structure, evidence=fit.clean_prob)

    def _diagnostics(self, fits, divisions) -> SplitQuality:
        """Each model's split quality (the detected noisy set: the method's noisy subset where it
        declares one), and at the top level that of both models' mean clean probability."""
        per_model = []
        for fit, division in zip(fits, divisions):
            detected = division.subsets.get(self.method.noisy_subset) if self.method.noisy_subset else None
            per_model.append(split_diagnostics(fit.clean_prob, division.noisy_cut, self.clean_mask, division.subsets,
                                               detected=detected))
            per_model[-1].cuts = dict(division.cuts)
        mean_prob = (fits[0].clean_prob + fits[1].clean_prob) / 2
        cut = (per_model[0].noisy_cut + per_model[1].noisy_cut) / 2
        split = split_diagnostics(mean_prob, cut, self.clean_mask)
        split.models = per_model
        return split

    def _warnings(self, divisions) -> list[str]:
        """What is degenerate in each model's split: a fallback the method took (SPS's reliable-set
        floor, the 1 % noisy fallback), an empty subset, or one subset holding every pair."""
        out = []
        for k, division in enumerate(divisions):
            where = f"split {'AB'[k]} (trains {'BA'[k]})"
            out += [f"{where}: {note}" for note in division.notes]
            for name, index in division.subsets.items():
                if len(index) == 0:
                    out.append(f"{where}: {name} subset empty")
                elif len(index) == self.n:
                    out.append(f"{where}: every pair in the {name} subset")
        return out
