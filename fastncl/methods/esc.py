"""ESC: Equivariant Similarity Consistency (Yang et al., CVPR 2024).

Division (Eq. 1-12): per pair, l_div = l_hard + beta * l_ESC, where l_ESC compares S(I_a, T_i)
with S(I_i, T_a) for the batch's anchor a = argmax_i S(I_i, T_i) (Eq. 6-8); a two-component
Beta mixture on the normalised l_div gives the clean probability; clean = p > delta, plus the
anchors (Eq. 12). Training (co-teaching; each model on its peer's split): soft correspondence
labels predicted by the peer as BiCro defines them, the soft-margin triplet loss L_soft (Eq. 13)
with the margin alpha * (m**y - 1) / (m - 1) applied per pair in both directions, and on clean
pairs L_ESC (Eq. 14-15) against each pair's pseudo-negative
p(i) = argmax_{j != i} S(I_j, T_i). Noisy pairs join from `noisy_start`.
Official-code variants are options (config.ESCConfig; preset esc-official).
"""
from __future__ import annotations

import torch

from fastncl import kernels
from fastncl.models import forward_pairs, intramodal_features

from .base import Method, two_way_split
from .losses import bicro_consistency, hinge_confidence, noisy_keep, pseudo_negative, soft_triplet
from .mixture import fallback_note, fit_bmm, fit_gmm, noisy_threshold


class ESC(Method):
    name = "esc"
    subset_names = ("clean", "noisy")

    @property
    def separate_steps(self):
        return self.cfg.esc.separate_steps

    def split_losses(self, model, batch):
        c = self.cfg.esc
        sim = forward_pairs(model, batch.images, batch.tokens, batch.lengths).sim
        # Eq. 9: l_hard + beta l_ESC against the batch's anchor argmax_i S(I_i, T_i) (Eq. 6)
        loss, anchor = kernels.esc_division_terms(sim, c.margin, c.esc_weight, c.division_margin,
                                                  c.division_hardest, c.esc_normalize, backend=self.backend)
        return loss, torch.arange(sim.shape[0], device=sim.device) == anchor

    def fit(self, losses):
        c = self.cfg.esc
        clip = self.cfg.split.clip_quantile
        if c.mixture == "bmm":
            return fit_bmm(losses, iters=c.mixture_iters, clip_quantile=clip)
        return fit_gmm(losses, seed=self.cfg.seed, clip_quantile=clip)

    def noisy_cut(self, fit):
        return noisy_threshold(fit.clean_prob, self.cfg.esc.clean_threshold, self.cfg.esc.min_noisy_fraction)

    def split_notes(self, fit):
        return fallback_note(self.noisy_cut(fit), self.cfg.esc.clean_threshold)

    def subsets(self, fit, anchors, co_epoch):
        forced = anchors if self.cfg.esc.anchors_clean else None  # Eq. 12: D_c contains D_a
        clean, noisy = two_way_split(fit.clean_prob, self.noisy_cut(fit), forced)
        return {"clean": clean, "noisy": noisy}

    def active_subsets(self, co_epoch):
        return self.subset_names if co_epoch >= self.cfg.esc.noisy_start else ("clean",)

    def warmup_loss(self, model, batch):
        c = self.cfg.esc
        sim = forward_pairs(model, batch.images, batch.tokens, batch.lengths).sim
        # The hinge over the mean of the negatives, as NCR's warm-up and the official code: hardest-
        # negative training from a random initialisation collapses onto hub images (measured on the
        # embedded data: text->image R@1 0.5 % after 3 epochs), so l_hard's max is not used here.
        losses = kernels.triplet_terms(sim, c.margin, hardest=False, backend=self.backend)
        if c.warmup == "all":  # paper: every pair
            return {"loss": losses.sum()}
        # official (BiCro warmup_sele): the smallest warmup_rate of the losses, summed
        k = max(1, int(losses.shape[0] * c.warmup_rate))
        return {"loss": torch.topk(losses, k, largest=False).values.sum()}

    def _soft_triplet(self, sim, label, keep=None):
        c = self.cfg.esc
        return soft_triplet(sim, label, c.margin, c.soft_margin_base, keep, self.backend)

    def _esc_train(self, sim):
        """L_ESC (Eq. 14), summed over the batch."""
        c = self.cfg.esc
        anchor = pseudo_negative(sim) if c.train_esc == "pseudo_negative" else sim.detach().diagonal().argmax()
        return kernels.esc_anchor_terms(sim, anchor, c.train_margin, c.esc_normalize, backend=self.backend).sum()

    def _label_features(self, model) -> str:
        """The features BiCro's labels compare: those the backbone's similarity is built on ("global"
        for a dot-product backbone such as vse) or, for a pairwise head (SGR/SAF), the mean-pooled
        local features BiCro's code uses ("pooled"); esc.label_features overrides."""
        which = self.cfg.esc.label_features
        return which if which != "auto" else getattr(model, "label_features", "pooled")

    @torch.no_grad()
    def _peer_labels(self, peer, batches, with_noisy: bool):
        """BiCro soft correspondence labels, predicted by the peer for the clean (and noisy) batch."""
        c = self.cfg.esc
        b = batches["clean"]
        out = forward_pairs(peer, b.images, b.tokens, b.lengths)
        confidence = hinge_confidence(out.sim, c.margin, self.backend)
        k = int(confidence.shape[0] * c.label_anchor_fraction) + 1
        anchors = torch.zeros_like(confidence, dtype=torch.bool)
        anchors[torch.topk(confidence, k).indices] = True
        which = self._label_features(peer)
        img, txt = intramodal_features(out.images, which), intramodal_features(out.captions, which)
        consistency = bicro_consistency(img, txt, img, txt, anchors, self.backend)
        if c.clean_labels == "one":  # paper (Sec. 3.3): every pair of D_c has label 1
            labels = {"clean": torch.ones_like(consistency)}
        else:  # official (BiCro): anchors 1, the others 0.5 + consistency / 2
            labels = {"clean": torch.where(anchors, torch.ones_like(consistency), 0.5 + consistency / 2)}
        if with_noisy:
            n = batches["noisy"]
            out_n = forward_pairs(peer, n.images, n.tokens, n.lengths)
            label = bicro_consistency(intramodal_features(out_n.images, which),
                                      intramodal_features(out_n.captions, which), img, txt, anchors, self.backend)
            labels["noisy"] = torch.where(label <= c.noise_label_cut, torch.zeros_like(label), label)
        return labels

    def train_groups(self, model, peer, batches, peer_prob, co_epoch):
        c = self.cfg.esc
        with_noisy = "noisy" in batches
        labels = self._peer_labels(peer, batches, with_noisy)

        def forward(name):
            b = batches[name]
            return forward_pairs(model, b.images, b.tokens, b.lengths).sim

        def noisy():
            l_soft = self._soft_triplet(forward("noisy"), labels["noisy"], noisy_keep(labels["noisy"], c))
            return {"loss": l_soft, "soft_noisy": l_soft}

        def clean():
            sim = forward("clean")
            terms = {"soft_clean": self._soft_triplet(sim, labels["clean"])}
            if not self.separate_steps:  # Eq. 15: L = L_soft + L_ESC on the same forward pass
                terms["esc"] = self._esc_train(sim)
            return {"loss": sum(terms.values()), **terms}

        def esc():  # official: its own forward pass and optimizer step
            l_esc = self._esc_train(forward("clean"))
            return {"loss": l_esc, "esc": l_esc}

        groups = [noisy] if with_noisy else []
        groups.append(clean)
        if self.separate_steps:
            groups.append(esc)
        return groups
