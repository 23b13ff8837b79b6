"""Vanilla training: bidirectional InfoNCE on every pair, no noise handling (the lower bound)."""
from __future__ import annotations

import numpy as np

from fastncl.models import encode_pairs

from .base import Method


class Vanilla(Method):
    name = "vanilla"
    subset_names = ("all",)
    uses_split = False

    def warmup_loss(self, model, batch) -> dict:
        loss, _ = self.infonce(model, *encode_pairs(model, batch.images, batch.tokens, batch.lengths), self.cfg.sps.tau)
        return {"loss": loss.mean()}

    def subsets(self, fit, anchors, co_epoch) -> dict[str, np.ndarray]:
        return {"all": np.arange(len(anchors))}

    def train_groups(self, model, peer, batches, peer_prob, co_epoch):
        return [lambda: self.warmup_loss(model, batches["all"])]
