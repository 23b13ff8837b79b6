"""What a method is, as the trainer, the config and the report see it.

A method declares everything about itself as class attributes (read by fastncl.methods.registry):
``name``, ``config`` (the dataclass of its section, ``cfg.<name>``; fields carry their allowed
values with ``config.option``), ``warmup_epochs`` (its default), ``presets()``, ``data_presets``
(per built-in data set, values of its own section), ``subset_names``, ``all_subset`` and
``noisy_subset`` (the names the trainer uses), and for the report ``cut_label``, ``report_cuts``
and ``subset_colors``. ``fill_defaults`` and ``check`` resolve and validate what spans several
fields of the config.

A method turns model outputs into losses and the training set into subsets:
* ``warmup_loss(model, batch)``: the loss of a warm-up step on all pairs (``warmup_groups``
  makes it the step's one loss group);
* ``split_losses(model, batch)``: per-sample division losses (the trainer calls it under no_grad
  with the model in eval mode, over the whole training set, once per epoch);
* ``fit(losses)``: the mixture fit giving every pair's clean probability;
* ``split(fit, anchors, co_epoch)``: the division the trainer uses, one value (``Division``): caption
  indices per subset, the primary subset first (the trainer iterates over the primary subset and
  cycles the others), every cut the split actually used (``noisy``, and e.g. SPS's effective
  epsilon_1 as ``reliable``) and its notes (fallbacks taken). By default it is built from
  ``subsets``, ``noisy_cut`` and ``split_notes``; a method whose cuts depend on each other
  computes them once in its own ``split``;
* ``train_groups(model, peer, batches, peer_prob, co_epoch)``: a list of loss closures. The
  trainer either sums them into one optimizer step (the papers' single objective) or, when
  ``separate_steps`` is set, runs one optimizer step per closure in order (the official codes).

Per-batch code works on fixed-size batches with per-sample weights and masks: no boolean
indexing, no ``.item()``, no Python loop over samples, so that it can be compiled unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from fastncl import kernels
from fastncl.config import Config
from fastncl.models import Encoding, eval_mode  # noqa: F401 (eval_mode: re-exported for plug-in methods)

from .mixture import MixtureFit, fit_gmm

LossGroup = Callable[[], dict]  # returns named terms; "loss" is what is minimised


@dataclass
class Division:
    """One model's split of the training set, as the trainer uses it: the subsets (caption indices,
    primary first), the cuts on the clean probability that made them (``noisy``: at or below it a
    pair counts as detected noisy; a method may add its others, e.g. SPS's ``reliable``) and the
    fallbacks it took (``notes``: said in the epoch line and metrics.jsonl)."""

    subsets: dict[str, np.ndarray]
    cuts: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def noisy_cut(self) -> float:
        return self.cuts["noisy"]


class Method:
    name = "base"
    config: type | None = None  # the dataclass of its config section, cfg.<name>
    warmup_epochs = 2  # its default optim.warmup_epochs on the embedded data
    data_presets: dict[str, dict] = {}  # data source -> values of its own section
    subset_names: tuple[str, ...] = ()
    # the subset of every training pair: what a warm-up epoch trains on, and every epoch of a
    # method that does not split (``uses_split`` False; its ``train_groups`` get it by this name)
    all_subset = "all"
    # the subset of the pairs a split detects as noisy (the split diagnostics' precision and
    # recall; e.g. ESC's leaves out its forced-clean anchors); None, or a split without it: the
    # pairs whose clean probability is at or below the noisy cut
    noisy_subset: str | None = "noisy"
    cut_label = "cut"  # the report's name of the noisy cut (the paper's symbol)
    subset_colors: dict[str, str] = {}  # non-empty: the report draws each subset's ground-truth composition
    separate_steps = False
    # secondary subsets passed over once per epoch: when spent, their steps drop out for the rest
    # of the epoch (the others cycle to keep pace with the primary subset)
    once_subsets: tuple[str, ...] = ()
    uses_split = True
    clean_side = "posterior"  # split.clean_side when the config leaves it out
    core_width = 0.0  # split.core_width when the config leaves it out
    structure = "off"  # split.structure when the config leaves it out (NCR, SPS: "knn")

    @classmethod
    def presets(cls) -> dict[str, dict]:
        """Its named presets besides ``<name>`` (the defaults): preset -> config values."""
        return {}

    @classmethod
    def fill_defaults(cls, cfg: Config) -> None:
        """Resolve its section's values left None (they depend on other fields)."""

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Raise FastnclError for a rule across fields that field metadata cannot state."""

    @classmethod
    def report_cuts(cls, cfg: dict, split, k: int) -> list[tuple[str, float, str]]:
        """Thresholds drawn on model ``k``'s loss histogram besides the noisy cut: (label, p(clean),
        colour), from a run's config.yaml values (``cfg``) and its split file (``records.SplitFile``,
        whose ``cuts`` hold the cuts each model's split used)."""
        return []

    def __init__(self, cfg: Config, ops: kernels.Ops = kernels.AUTO):
        self.cfg = cfg
        self.ops = ops  # the loss ops bound to the run's backend (fastncl.assemble.method)

    # -- division ---------------------------------------------------------------------------
    def split_losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) division losses and an optional (B,) bool anchor flag."""
        raise NotImplementedError

    def fit(self, losses: np.ndarray) -> MixtureFit:
        return fit_gmm(losses, seed=self.cfg.seed, clip_quantile=self.cfg.split.clip_quantile)

    def noisy_cut(self, fit: MixtureFit) -> float:
        """Clean probability at or below which a pair counts as detected noisy."""
        raise NotImplementedError

    def subsets(self, fit: MixtureFit, anchors: np.ndarray, co_epoch: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def split(self, fit: MixtureFit, anchors: np.ndarray, co_epoch: int) -> Division:
        """The division of ``fit`` the trainer trains on (once per model per epoch)."""
        return Division(self.subsets(fit, anchors, co_epoch), {"noisy": float(self.noisy_cut(fit))},
                        self.split_notes(fit))

    def split_notes(self, fit: MixtureFit) -> list[str]:
        """Fallbacks the split of ``fit`` takes (each said in the epoch line and metrics.jsonl)."""
        return []

    def active_subsets(self, co_epoch: int) -> tuple[str, ...]:
        """The subsets trained on in this co-training epoch (the curriculum), primary first."""
        return self.subset_names

    # -- training ---------------------------------------------------------------------------
    def warmup_loss(self, model, batch) -> dict:
        raise NotImplementedError

    def warmup_groups(self, model, batches: dict) -> list[LossGroup]:
        """A warm-up step's loss group: ``warmup_loss`` on its batch of every pair (``all_subset``)."""
        def warmup(b=batches[self.all_subset]):
            return self.warmup_loss(model, b)
        return [warmup]

    def train_groups(self, model, peer, batches: dict, peer_prob: torch.Tensor, co_epoch: int) -> list[LossGroup]:
        raise NotImplementedError

    # -- shared pieces ----------------------------------------------------------------------
    def from_embeddings(self, model, n: int) -> bool:
        """Whether a batch of ``n`` pairs of ``model`` takes its InfoNCE and consistency terms straight
        from its embeddings (the ops' policy: ``kernels.Ops.from_embeddings``)."""
        return self.ops.from_embeddings(n, getattr(model, "dot_product", False))

    def infonce(self, model, img: Encoding, cap: Encoding, tau: float):
        """Per-pair bidirectional InfoNCE loss (SPS Eq. 1) and prediction (SPS Eq. 15), each (B,),
        of every image of a batch against every caption."""
        if self.from_embeddings(model, img.global_.shape[0]):
            terms = self.ops.infonce_terms_embed(img.global_, cap.global_, tau)
        else:
            terms = self.ops.infonce_terms(model.similarity(img, cap), tau)
        l_i2t, l_t2i, p_i2t, p_t2i = terms
        return l_i2t + l_t2i, (p_i2t + p_t2i) / 2


def half_the_epochs(cfg: Config, section) -> None:
    """NCR's and ESC's codes: the noisy subset joins after half the co-training epochs."""
    if section.noisy_start is None:
        section.noisy_start = cfg.optim.epochs // 2


def two_way_split(clean_prob: np.ndarray, cut: float, forced_clean: np.ndarray | None = None):
    """Caption indices (clean, noisy): clean = prob > cut, plus any forced-clean pairs."""
    clean = clean_prob > cut
    if forced_clean is not None:
        clean |= forced_clean
    return np.flatnonzero(clean), np.flatnonzero(~clean)
