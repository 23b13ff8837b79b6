"""The papers' hinge baseline: VSE++ hardest-negative triplet loss on every pair, no noise handling.

This is the loss of the SGR/SGRAF rows both papers compare against (SGRAF trains with VSE++'s
max-violation hinge), the loss NCR, BiCro and ESC build on. It collapses under heavy noise
(ESC paper, Table 3: RSum 24.5 at 60 % on Flickr30K; SPS paper, Table 1: 35.2 for SGRAF).
The warm-up epochs train the hinge over the mean of the negatives, as NCR's and ESC's warm-up:
hardest-negative training from a random initialisation collapses onto a few hub images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastncl.models import forward_pairs

from .base import Method
from .registry import register


@dataclass
class HingeConfig:
    margin: float = 0.2  # alpha of the VSE++ hinge (SGRAF, NCR)


@register
class Hinge(Method):
    name = "hinge"
    config = HingeConfig
    warmup_epochs = 2  # mean-hinge warm-up, then the hardest negative
    subset_names = (Method.all_subset,)
    uses_split = False

    def _loss(self, model, batch, hardest: bool) -> dict:
        sim = forward_pairs(model, batch.images, batch.tokens, batch.lengths).sim
        return {"loss": self.ops.triplet_terms(sim, self.cfg.hinge.margin, hardest=hardest).sum()}

    def warmup_loss(self, model, batch) -> dict:
        return self._loss(model, batch, hardest=False)

    def subsets(self, fit, anchors, co_epoch) -> dict[str, np.ndarray]:
        return {self.all_subset: np.arange(len(anchors))}

    def train_groups(self, model, peer, batches, peer_prob, co_epoch):
        return [lambda: self._loss(model, batches[self.all_subset], hardest=True)]
