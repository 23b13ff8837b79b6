"""ESC: Equivariant Similarity Consistency (Yang et al., CVPR 2024).

Division (Eq. 1-12): per pair, l_div = l_hard + beta * l_ESC, where l_ESC compares S(I_a, T_i)
with S(I_i, T_a) for the batch's anchor a = argmax_i S(I_i, T_i) (Eq. 6-8); a two-component
Beta mixture on the normalised l_div gives the clean probability; clean = p > delta, plus the
anchors (Eq. 12). Training (co-teaching; each model on its peer's split): soft correspondence
labels predicted by the peer as BiCro defines them, the soft-margin triplet loss L_soft (Eq. 13)
with the margin alpha * (m**y - 1) / (m - 1) applied per pair in both directions (``margins=
"broadcast"``: the code's, whose (B,) labels broadcast against the (B, B) scores as a row, so every
hinge takes its caption's margin), and on clean pairs L_ESC (Eq. 14-15) against each pair's
pseudo-negative p(i) = argmax_{j != i} S(I_j, T_i). Noisy pairs join from `noisy_start`.
Official-code variants are options (ESCConfig; preset esc-official).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastncl.config import NON_NEGATIVE, POSITIVE, PROBABILITY, option
from fastncl.models import forward_pairs, intramodal_features

from .base import Method, half_the_epochs, two_way_split
from .losses import bicro_consistency, hinge_confidence, noisy_keep, pseudo_negative, soft_triplet
from .mixture import fallback_note, fit_bmm, noisy_threshold
from .presets import paper_presets
from .registry import register


@dataclass
class ESCConfig:
    margin: float = 0.2  # alpha of the triplet loss (ESC Sec. 4.1)
    soft_margin_base: float = 10.0  # m of the soft margin (ESC Sec. 4.1)
    esc_weight: float = 0.5  # beta of Eq. 9
    division_margin: float = 0.0  # alpha_1 of Eq. 8
    train_margin: float = 0.0  # alpha_2 of Eq. 14
    clean_threshold: float = option(0.5, **PROBABILITY)  # delta of Eq. 12 (paper: in the supplement; code 0.5)
    min_noisy_fraction: float = option(0.0, **PROBABILITY)  # official 0.01: 1 % made noisy when every pair looks clean
    # "gmm" (BiCro's run.py default) or "bmm" (paper, Eq. 10): after the hinge warm-up the Beta mixture's
    # clean posterior is flat and its clean component takes 53-66 % of the pairs at 60 % noise (40 %
    # clean), so its clean set is half noisy and ESC degrades (docs/methods.md, "ESC's split")
    mixture: str = option("gmm", choices=("bmm", "gmm"))
    mixture_iters: int = option(10, **POSITIVE)
    # the Beta mixture's clean probability: "monotone" (ours: the component with the smaller mean,
    # made non-increasing in the loss outward from its mean) or "code" (ESC's code: the raw
    # posterior of component 0, the one started at Beta(1, 2))
    bmm_posterior: str = option("monotone", choices=("monotone", "code"))
    division_hardest: bool = True  # l_hard over the hardest negative (paper Eq. 1); official: mean
    esc_normalize: bool = False  # official: row-normalised l_ESC
    # L_ESC per-sample pseudo-negatives (Eq. 14) or one "anchor" (official)
    train_esc: str = option("pseudo_negative", choices=("pseudo_negative", "anchor"))
    anchors_clean: bool = True  # anchors always in the clean set (Eq. 12); official: by threshold only
    # clean pairs' label: "one" (paper, Sec. 3.3) or "bicro" (official: 0.5 + c/2)
    clean_labels: str = option("one", choices=("one", "bicro"))
    # BiCro soft labels: top B/10 + 1 pairs of a batch are anchors
    label_anchor_fraction: float = option(0.1, **PROBABILITY)
    # features the BiCro labels compare: "auto" = those the backbone's similarity uses (vse: "global";
    # sgr/saf: "pooled", the mean-pooled features of BiCro's code); fastncl <= 0.1.0 used "pooled" on vse
    label_features: str = option("auto", choices=("auto", "global", "pooled"))
    # BiCro's ratio of a pair's image and text cosines to its nearest anchor: "positive" (min / max,
    # 0 when either cosine is not positive) or "code" (ESC's and BiCro's: a / b if below 1, else b / a;
    # equal on positive cosines, |min| / |max| when both are negative, negative on mixed signs)
    label_ratio: str = option("positive", choices=("positive", "code"))
    # D_c's BiCro labels (esc.clean_labels=bicro): "none" (fastncl <= 0.1.0: 0.5 + consistency / 2 as it
    # comes) or "code" (ESC's and BiCro's predict: clamped to [0, 1] and, as the noisy labels, cut by
    # noisy_loss: "soft" (noise_soft) zeroes a label <= noise_label_cut, "hard" (noise_hard) leaves
    # that pair out of the clean loss; the anchors keep their 1)
    clean_label_cut: str = option("none", choices=("none", "code"))
    noise_label_cut: float = option(0.5, **PROBABILITY)  # BiCro noise_soft: soft labels <= this become 0
    # "hard" (BiCro's noise_hard): labels <= the cut are left out; "soft" (BiCro scripts, noise_soft): every
    # noisy pair trained, a label-0 pair with margin 0, which pulls the mismatched pairs together
    noisy_loss: str = option("hard", choices=("soft", "hard"))
    # co-training epoch of the first noisy step; None: epochs // 2 (paper: 20 of 40)
    noisy_start: int | None = option(None, **NON_NEGATIVE)
    # whether the noisy subset is trained at all (from noisy_start on). Default false, the clean
    # subset alone: chosen leave-one-data-set-out at 60 % noise (docs/results.md); the paper, the
    # code and the built-in sets' presets: true
    train_noisy: bool = False
    # negatives of the co-training triplet loss: "hardest" (the paper and the code, VSE++), "mean"
    # over the batch's negatives (the warm-up's loss) or "mixed", the two added. Default "mixed":
    # the hardest negative alone collapses onto hub images on glyphs and icons (every similarity
    # alike), the mean alone trains weak models; chosen as train_noisy (paper, code, presets: hardest)
    negatives: str = option("mixed", choices=("hardest", "mean", "mixed"))
    # "all": mean hinge on every pair; "select": smallest warmup_rate only (official)
    warmup: str = option("all", choices=("all", "select"))
    warmup_rate: float = option(0.3, **PROBABILITY)
    separate_steps: bool = False  # official: separate optimizer steps for noisy, clean and L_ESC
    # the soft margins of L_soft (clean and noisy batches): "per_pair" (the paper: pair i's margin in
    # both of its directions) or "broadcast" (ESC's and BiCro's code: the (B,) labels broadcast against
    # the (B, B) scores as a row, every entry (i, j) takes caption j's margin, so image i's hinge
    # against negative caption j uses caption j's label)
    margins: str = option("per_pair", choices=("per_pair", "broadcast"))


CODE_LOSS = {"negatives": "hardest", "train_noisy": True}  # the paper's and the code's co-training loss and noisy phase

OFFICIAL = {  # the ESC code on BiCro's (reference-implementations notes, B.3 and H)
    "esc": {**CODE_LOSS,
        "esc_normalize": True, "train_esc": "anchor", "division_hardest": False, "anchors_clean": False,
        "warmup": "select", "separate_steps": True, "noisy_start": 20, "clean_labels": "bicro",
        "min_noisy_fraction": 0.01, "mixture": "bmm", "noisy_loss": "soft", "label_features": "pooled",
        "label_ratio": "code", "margins": "broadcast", "clean_label_cut": "code", "bmm_posterior": "code",
    },
    "split": {"clip_quantile": 1.0, "clean_side": "posterior", "structure": "off"},
    # the code validates no warm-up epoch and has no collapse guard (fastncl's only says so)
    "optim": {"lr": 2e-4, "lr_step": 30, "warmup_epochs": 10, "epochs": 40, "fill_epoch": False,
              "warmup_best": "skip", "collapse": "warn"},
}


@register
class ESC(Method):
    name = "esc"
    config = ESCConfig
    warmup_epochs = 2  # mean-hinge warm-up: the hinge models split best after 2, before they memorise noise
    subset_names = ("clean", "noisy")
    # only the clean component's core trains (split.clean_side): chosen leave-one-data-set-out at 60 %
    # noise on glyphs, icons and the embedded data (docs/results.md); the codes' presets: posterior
    clean_side = "core"
    # the core ends half a standard deviation of the clean component above its mean (split.core_width):
    # chosen leave-one-data-set-out at 40 and 60 % noise on four sets, under both scores (docs/results.md)
    core_width = 0.5
    # no structure (split.structure, the base's "off"): leave-one-data-set-out on glyphs, icons and
    # emoji, the worst-set score kept the fit alone without emoji and without icons (by 0.011), while
    # the mean score chose the structure without each (docs/results.md)
    cut_label = "δ"

    @classmethod
    def presets(cls):
        # ESC paper: warm-up 10 epochs, 40 epochs; code (BiCro defaults): lr 2e-4, x0.1 at epoch 30, for all
        # data sets; the paper: "clean for 20 epochs, then all", the Beta mixture of Eq. 10
        def schedule(dataset):
            return {"lr": 2e-4, "lr_step": 30, "warmup_epochs": 10, "epochs": 40, "batch_size": 128}

        return paper_presets("esc", {"esc": {**CODE_LOSS, "noisy_start": 20, "mixture": "bmm"}}, OFFICIAL, schedule,
                             official_seed=96)  # BiCro's scripts

    @classmethod
    def fill_defaults(cls, cfg):
        half_the_epochs(cfg, cfg.esc)

    @property
    def separate_steps(self):
        return self.cfg.esc.separate_steps

    def split_losses(self, model, batch):
        c = self.cfg.esc
        sim = forward_pairs(model, batch.images, batch.tokens, batch.lengths).sim
        # Eq. 9: l_hard + beta l_ESC against the batch's anchor argmax_i S(I_i, T_i) (Eq. 6)
        n = sim.shape[0]
        # the code's mean l_hard divides by B (its zeroed diagonal counted), triplet_terms' by the
        # B - 1 negatives: the code's loss is (B - 1) / B x ours with beta x B / (B - 1)
        scale = 1.0 if c.division_hardest or n < 2 else (n - 1) / n
        loss, anchor = self.ops.esc_division_terms(sim, c.margin, c.esc_weight / scale, c.division_margin,
                                                  c.division_hardest, c.esc_normalize)
        return (loss * scale if scale != 1.0 else loss), torch.arange(n, device=sim.device) == anchor

    def fit(self, losses):
        c = self.cfg.esc
        if c.mixture == "bmm":
            return fit_bmm(losses, iters=c.mixture_iters, clip_quantile=self.cfg.split.clip_quantile,
                           posterior=c.bmm_posterior)
        return super().fit(losses)  # the GMM, as every method

    def noisy_cut(self, fit):
        return noisy_threshold(fit.clean_prob, self.cfg.esc.clean_threshold, self.cfg.esc.min_noisy_fraction)

    def split_notes(self, fit):
        return fallback_note(self.noisy_cut(fit), self.cfg.esc.clean_threshold)

    def subsets(self, fit, anchors, co_epoch):
        forced = anchors if self.cfg.esc.anchors_clean else None  # Eq. 12: D_c contains D_a
        clean, noisy = two_way_split(fit.clean_prob, self.noisy_cut(fit), forced)
        return {"clean": clean, "noisy": noisy}

    def active_subsets(self, co_epoch):
        c = self.cfg.esc
        return self.subset_names if c.train_noisy and co_epoch >= c.noisy_start else ("clean",)

    def warmup_loss(self, model, batch):
        c = self.cfg.esc
        sim = forward_pairs(model, batch.images, batch.tokens, batch.lengths).sim
        # The hinge over the mean of the negatives, as NCR's warm-up and the official code: hardest-
        # negative training from a random initialisation collapses onto hub images (measured on the
        # embedded data: text->image R@1 0.5 % after 3 epochs), so l_hard's max is not used here.
        losses = self.ops.triplet_terms(sim, c.margin, hardest=False)
        if c.warmup == "all":  # paper: every pair
            return {"loss": losses.sum()}
        # official (BiCro warmup_sele): the smallest warmup_rate of the losses, summed
        k = max(1, int(losses.shape[0] * c.warmup_rate))
        return {"loss": torch.topk(losses, k, largest=False).values.sum()}

    def _soft_triplet(self, sim, label, keep=None):
        c = self.cfg.esc
        # the code: the (B,) labels as a row of the (B, B) scores, every entry takes its caption's margin
        broadcast = "caption" if c.margins == "broadcast" else None
        return soft_triplet(sim, label, c.margin, c.soft_margin_base, keep, ops=self.ops, negatives=c.negatives,
                            broadcast=broadcast)

    def _esc_train(self, sim):
        """L_ESC (Eq. 14), summed over the batch."""
        c = self.cfg.esc
        anchor = pseudo_negative(sim) if c.train_esc == "pseudo_negative" else sim.detach().diagonal().argmax()
        return self.ops.esc_anchor_terms(sim, anchor, c.train_margin, c.esc_normalize).sum()

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
        confidence = hinge_confidence(out.sim, c.margin, ops=self.ops)
        k = int(confidence.shape[0] * c.label_anchor_fraction) + 1
        anchors = torch.zeros_like(confidence, dtype=torch.bool)
        anchors[torch.topk(confidence, k).indices] = True
        which = self._label_features(peer)
        img, txt = intramodal_features(out.images, which), intramodal_features(out.captions, which)
        consistency = bicro_consistency(img, txt, img, txt, anchors, ops=self.ops, ratio=c.label_ratio)
        if c.clean_labels == "one":  # paper (Sec. 3.3): every pair of D_c has label 1
            labels = {"clean": torch.ones_like(consistency)}
        else:  # official (BiCro): anchors 1, the others 0.5 + consistency / 2
            label = 0.5 + consistency / 2
            if c.clean_label_cut == "code":  # the code's: cut (noise_soft) and clamped, as the noisy labels
                label = self._cut(label)
            labels = {"clean": torch.where(anchors, torch.ones_like(consistency), label)}
        if with_noisy:
            n = batches["noisy"]
            out_n = forward_pairs(peer, n.images, n.tokens, n.lengths)
            label = bicro_consistency(intramodal_features(out_n.images, which),
                                      intramodal_features(out_n.captions, which), img, txt, anchors, ops=self.ops,
                                      ratio=c.label_ratio)
            labels["noisy"] = self._cut(label)
        return labels

    def _cut(self, label):
        """BiCro's soft labels as its code leaves them: with noise_soft (``esc.noisy_loss=soft``) a label
        <= the cut becomes 0; with noise_hard it stays (``noisy_keep`` leaves its pair out of the loss,
        and with ``esc.margins=broadcast`` it still sets the margins of the hinges its caption is a
        negative in); clamped to [0, 1] (the soft margin clamps it too)."""
        c = self.cfg.esc
        if c.noisy_loss == "soft":
            label = torch.where(label <= c.noise_label_cut, torch.zeros_like(label), label)
        return label.clamp(0, 1)

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
            # the code trains the clean batch in the noisy batch's mode: noise_hard leaves out its labels <= the cut
            keep = noisy_keep(labels["clean"], c) if c.clean_label_cut == "code" else None
            terms = {"soft_clean": self._soft_triplet(sim, labels["clean"], keep)}
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
