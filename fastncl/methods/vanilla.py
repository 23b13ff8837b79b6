"""Vanilla training: bidirectional InfoNCE on every pair, no noise handling (the lower bound)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastncl.config import POSITIVE, option
from fastncl.models import encode_pairs

from .base import Method
from .registry import register


@dataclass
class VanillaConfig:
    tau: float = option(0.07, **POSITIVE)  # InfoNCE temperature (SPS Sec. 3.2; fastncl <= 0.1.0 read sps.tau)


@register
class Vanilla(Method):
    name = "vanilla"
    config = VanillaConfig
    warmup_epochs = 4  # InfoNCE models need 4 epochs on the embedded data to give a useful first split
    subset_names = (Method.all_subset,)
    uses_split = False

    def warmup_loss(self, model, batch) -> dict:
        loss, _ = self.infonce(model, *encode_pairs(model, batch.images, batch.tokens, batch.lengths), self.cfg.vanilla.tau)
        return {"loss": loss.mean()}

    def subsets(self, fit, anchors, co_epoch) -> dict[str, np.ndarray]:
        return {self.all_subset: np.arange(len(anchors))}

    def train_groups(self, model, peer, batches, peer_prob, co_epoch):
        return [lambda: self.warmup_loss(model, batches[self.all_subset])]
