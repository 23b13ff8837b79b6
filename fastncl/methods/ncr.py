"""NCR (Huang et al., NeurIPS 2021), the field's baseline: GMM split + soft-margin triplet loss.

Division: per-pair mean hinge loss over in-batch negatives, two-component GMM, clean
probability of the low-loss component. Training (co-teaching): the clean subset of the peer's
split with the peer's clean probability as soft label, the noisy subset with the model's own
rectified label (its hinge confidence); both with the soft margin
``alpha * (m**y - 1) / (m - 1)`` and the hardest negative (VSE++), summed over the batch.
"""
from __future__ import annotations

import torch

from fastncl import kernels
from fastncl.models import forward_pairs

from .base import Method, two_way_split
from .mixture import noisy_threshold


def soft_margin(label: torch.Tensor, margin: float, base: float) -> torch.Tensor:
    """NCR/ESC soft margin: alpha * (m**y - 1) / (m - 1); y = 1 gives alpha, y = 0 gives 0."""
    return margin * (base ** label.clamp(0, 1) - 1) / (base - 1)


def hinge_confidence(sim: torch.Tensor, margin: float, backend: str = "auto") -> torch.Tensor:
    """(B,) NCR confidence in [0, 1]: (alpha - mean hinge per direction) / alpha, clamped."""
    mean_hinge = kernels.triplet_terms(sim, margin, hardest=False, backend=backend) / 2
    return ((margin - mean_hinge) / margin).clamp(0, 1)


def soft_triplet(sim: torch.Tensor, label: torch.Tensor, margin: float, base: float, keep=None,
                 backend: str = "auto") -> torch.Tensor:
    """Soft-margin triplet loss over the hardest negatives (NCR; ESC Eq. 13), summed over the batch.

    ``keep`` (B,) optionally weighs each pair's term (0 leaves a pair out).
    """
    terms = kernels.triplet_terms(sim, soft_margin(label, margin, base), hardest=True, backend=backend)
    return (terms if keep is None else terms * keep).sum()


def noisy_keep(label: torch.Tensor, c) -> torch.Tensor | None:
    """Per-pair weights of the noisy subset's loss: None ("soft": every pair, margin from its
    label) or, for "hard" (BiCro's noise_train=noise_hard), 0 for labels <= the cut."""
    return (label > c.noise_label_cut).to(label.dtype) if c.noisy_loss == "hard" else None


class NCR(Method):
    name = "ncr"
    subset_names = ("clean", "noisy")

    def split_losses(self, model, batch):
        sim = forward_pairs(model, batch.images, batch.tokens, batch.lengths).sim
        return kernels.triplet_terms(sim, self.cfg.ncr.margin, hardest=False, backend=self.backend), None

    def noisy_cut(self, fit):
        return noisy_threshold(fit.clean_prob, self.cfg.ncr.clean_threshold, self.cfg.ncr.min_noisy_fraction)

    def subsets(self, fit, anchors, co_epoch):
        clean, noisy = two_way_split(fit.clean_prob, self.noisy_cut(fit))
        return {"clean": clean, "noisy": noisy}

    def warmup_loss(self, model, batch):
        sim = forward_pairs(model, batch.images, batch.tokens, batch.lengths).sim
        return {"loss": kernels.triplet_terms(sim, self.cfg.ncr.margin, hardest=False, backend=self.backend).sum()}

    def _soft_triplet(self, sim, label, keep=None):
        c = self.cfg.ncr
        return soft_triplet(sim, label, c.margin, c.soft_margin_base, keep, self.backend)

    def train_groups(self, model, peer, batches, peer_prob, co_epoch):
        def clean():
            b = batches["clean"]
            sim = forward_pairs(model, b.images, b.tokens, b.lengths).sim
            return {"loss": self._soft_triplet(sim, peer_prob[b.index])}

        def noisy():
            b = batches["noisy"]
            sim = forward_pairs(model, b.images, b.tokens, b.lengths).sim
            label = hinge_confidence(sim.detach(), self.cfg.ncr.margin, self.backend)  # rectified label
            return {"loss": self._soft_triplet(sim, label, noisy_keep(label, self.cfg.ncr))}

        return [clean, noisy] if "noisy" in batches else [clean]
