"""SPS: Seeking Proxy Point via Stable Feature Space (Xie et al., IJCAI 2025).

Per epoch, a GMM on the per-pair InfoNCE loss (Eq. 1-5) splits the training set into reliable
(p > eps1), quasi-clean (eps2 < p <= eps1) and noisy (p <= eps2) pairs (Eq. 6-8); each model
trains on the split computed by its peer. Per iteration:
* reliable batch: L^re (Eq. 17) + lambda1 L^cro (Eq. 9) + lambda2 L^met (Eq. 10);
* quasi-clean batch (from `quasi_clean_start`): L^qc (Eq. 14-16), soft label
  p_peer + (1 - p_peer) * y_hat with y_hat the model's own Eq. 15 prediction;
* noisy batch (from `noisy_start`): L^n (Eq. 11-13), every noisy image paired with the caption
  of its most similar reliable image in the current reliable batch (and, in the paper's "both"
  mode, every noisy caption with the image of its most similar reliable caption), weighted by
  the proxy label of Eq. 12 (or the official prediction x cosine, cut at 0.5).
Official-code departures are options (config.SPSConfig; preset sps-official).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastncl import FastnclError
from fastncl.config import NON_NEGATIVE, POSITIVE, PROBABILITY, option
from fastncl.models import cosine_matrix, encode_pairs, eval_mode, intramodal_features

from .base import Division, Method
from .mixture import fallback_note, noisy_threshold
from .presets import paper_presets
from .registry import register


@dataclass
class SPSConfig:
    tau: float = option(0.07, **POSITIVE)  # SPS Sec. 3.2
    reliable_threshold: float = option(0.99, **PROBABILITY)  # epsilon_1: paper Fig. 4; official code 0.6
    noisy_threshold: float = option(0.5, **PROBABILITY)  # epsilon_2
    # floor of the reliable set, as a fraction of the pairs with p > epsilon_2: below it, epsilon_1
    # falls back to the largest cut that keeps the floor (said in the epoch line; the papers have none)
    min_reliable_fraction: float = option(0.5, **PROBABILITY)
    min_noisy_fraction: float = option(0.0, **PROBABILITY)  # official 0.01: if every p > epsilon_2, 1 % is made noisy
    consistency_margin: float = 0.01  # alpha of Eq. 9-10 (paper: unstated; official: 0, no hinge)
    cross_weight: float = 5.0  # lambda_1 (paper: unstated; official 25 on the SGR sigmoid scale)
    metric_weight: float = 5.0  # lambda_2 (paper: unstated; official 25)
    # S(I_i, I_j) from "global" embeddings (paper) or "pooled" means (official)
    intramodal: str = option("global", choices=("global", "pooled"))
    # "paper": Eq. 12; "official": prediction x cosine, cut at proxy_cut
    proxy_label: str = option("paper", choices=("paper", "official"))
    proxy_gamma: float = 1.0  # gamma of Eq. 12 (paper: unstated)
    proxy_beta: float = 5.0  # beta of Eq. 12 (paper: unstated)
    proxy_cut: float = option(0.5, **PROBABILITY)  # official proxy label: zeroed below this
    # "both" (paper) or "i2t" (official: image -> proxy caption only)
    proxy_directions: str = option("both", choices=("both", "i2t"))
    quasi_clean_start: int = option(3, **NON_NEGATIVE)  # co-training epoch from which L^qc is used (official: 10 of 40)
    noisy_start: int = option(5, **NON_NEGATIVE)  # co-training epoch from which L^n is used (official: 15 of 40)
    separate_steps: bool = False  # official: one optimizer step each for (re+cro+met), qc and n
    # false: the quasi-clean subset is cycled like the noisy one to keep pace with the reliable
    # one (ours: every step of the curriculum trains all three); true (the code): one pass per
    # epoch, then the epoch's remaining steps train without L^qc
    quasi_clean_once: bool = False
    # where the quasi-clean and proxy labels and the proxy search come from: "train" (ours: the
    # iteration's training forward pass, detached; the reliable batch's keys from its own step's
    # pass) or "eval" (the code: a separate no-grad pass in eval mode with the weights as the
    # label's step begins, the reliable batch re-encoded for the proxy search)
    label_pass: str = option("train", choices=("train", "eval"))


OFFICIAL = {  # the SPS code (reference-implementations notes, B.3 and H)
    "sps": {
        "reliable_threshold": 0.6, "consistency_margin": 0.0, "cross_weight": 25.0, "metric_weight": 25.0,
        "intramodal": "pooled", "proxy_label": "official", "proxy_directions": "i2t", "separate_steps": True,
        "quasi_clean_start": 10, "noisy_start": 15, "min_noisy_fraction": 0.01, "min_reliable_fraction": 0.0,
        "quasi_clean_once": True, "label_pass": "eval",
    },
    "split": {"clip_quantile": 1.0, "structure": "off"},
    # the code reloads its best warm-up epoch and has no collapse guard (fastncl's only says so)
    "optim": {"lr": 2e-4, "lr_step": 10, "warmup_epochs": 5, "epochs": 40, "fill_epoch": False,
              "warmup_best": "reload", "collapse": "warn"},
}


@register
class SPS(Method):
    name = "sps"
    config = SPSConfig
    warmup_epochs = 4  # InfoNCE models need 4 epochs on the embedded data to give a useful first split
    data_presets = {"emoji": {"quasi_clean_start": 2, "noisy_start": 3}}  # the curriculum of 6 epochs
    subset_names = ("reliable", "quasi_clean", "noisy")
    # the pairs' model-free structure reorders the split (split.structure): chosen leave-one-data-set-out
    # on glyphs, icons and emoji at 40 and 60 % noise, under both scores (docs/results.md)
    structure = "knn"
    cut_label = "ε2"
    subset_colors = {"reliable": "tab:green", "quasi_clean": "tab:olive", "noisy": "tab:red"}

    @classmethod
    def presets(cls):
        # SPS code: 40 / 20 / 40 epochs on F30K / COCO / CC152K, lr x0.1 every 10; the paper states the
        # curriculum's order only: the code's starts
        def schedule(dataset):
            return {"lr": 2e-4, "lr_step": 10, "warmup_epochs": 5, "epochs": 20 if dataset == "coco" else 40,
                    "batch_size": 128}

        return paper_presets("sps", {"sps": {"quasi_clean_start": 10, "noisy_start": 15}}, OFFICIAL, schedule)

    @classmethod
    def check(cls, cfg):
        if cfg.sps.noisy_threshold > cfg.sps.reliable_threshold:
            raise FastnclError("sps.noisy_threshold (epsilon_2) must not exceed sps.reliable_threshold (epsilon_1)")

    @classmethod
    def report_cuts(cls, cfg, split, k):
        """epsilon_1 as the split used it: the nominal value, or the reliable-set floor's fallback
        (the split file's ``reliable`` cut; a folder from before it was stored: the nominal one)."""
        nominal = float(cfg.get("sps", {}).get("reliable_threshold", SPSConfig.reliable_threshold))
        used = split.cuts.get("reliable")
        if used is None or float(used[k]) == nominal:
            return [("ε1", nominal, "green")]
        return [("ε1 (floor's fallback)", float(used[k]), "green")]

    @property
    def separate_steps(self):
        return self.cfg.sps.separate_steps

    @property
    def once_subsets(self):
        return ("quasi_clean",) if self.cfg.sps.quasi_clean_once else ()

    def split_losses(self, model, batch):
        loss, _ = self.infonce(model, *encode_pairs(model, batch.images, batch.tokens, batch.lengths), self.cfg.sps.tau)
        return loss, None

    def noisy_cut(self, fit):
        c = self.cfg.sps
        # the fallback quantile may exceed epsilon_1; the three subsets must stay disjoint
        return min(noisy_threshold(fit.clean_prob, c.noisy_threshold, c.min_noisy_fraction), c.reliable_threshold)

    def reliable_cut(self, fit) -> float:
        """epsilon_1, or the fallback when fewer than ``min_reliable_fraction`` of the pairs the GMM
        calls clean (p > epsilon_2) pass it: the largest cut that keeps that many pairs reliable.
        A GMM whose noisy component is wider than its clean one may keep every clean probability
        below 0.99 (the emoji set at 0 and 40 % noise); the reliable set would then be empty and
        every co-training epoch would train nothing."""
        c, p = self.cfg.sps, fit.clean_prob
        floor = math.ceil(c.min_reliable_fraction * int((p > self.noisy_cut(fit)).sum()))
        if floor == 0 or int((p > c.reliable_threshold).sum()) >= floor:
            return c.reliable_threshold
        kth = np.sort(p)[::-1][floor - 1]  # above the noisy cut, so the subsets stay disjoint
        return float(np.nextafter(kth, -np.inf))  # p > cut keeps the floor-th largest (and its ties)

    def split(self, fit, anchors, co_epoch):
        """The three subsets, with both cuts computed once: the noisy cut (epsilon_2 or its fallback)
        and the reliable cut (epsilon_1 or the floor's fallback)."""
        c, p = self.cfg.sps, fit.clean_prob
        cut, reliable = self.noisy_cut(fit), self.reliable_cut(fit)
        notes = fallback_note(cut, min(c.noisy_threshold, c.reliable_threshold))
        if reliable != c.reliable_threshold:
            kept = int((p > c.reliable_threshold).sum())
            notes.append(f"reliable set below its floor ({kept} pairs with p > {c.reliable_threshold:g}): "
                         f"epsilon_1 fell back to {reliable:.4f}")
        subsets = {
            "reliable": (p > reliable).nonzero()[0],
            "quasi_clean": ((p > cut) & (p <= reliable)).nonzero()[0],
            "noisy": (p <= cut).nonzero()[0],
        }
        return Division(subsets, {"noisy": float(cut), "reliable": float(reliable)}, notes)

    def split_notes(self, fit):
        return self.split(fit, np.zeros(len(fit.clean_prob), dtype=bool), 0).notes

    def subsets(self, fit, anchors, co_epoch):
        return self.split(fit, anchors, co_epoch).subsets

    def active_subsets(self, co_epoch: int) -> tuple[str, ...]:
        c = self.cfg.sps
        names = ["reliable"]  # curriculum: reliable first, then quasi-clean, then noisy
        if co_epoch >= c.quasi_clean_start:
            names.append("quasi_clean")
        if co_epoch >= c.noisy_start:
            names.append("noisy")
        return tuple(names)

    def warmup_loss(self, model, batch):
        loss, _ = self.infonce(model, *encode_pairs(model, batch.images, batch.tokens, batch.lengths), self.cfg.sps.tau)
        return {"loss": loss.mean()}

    def _reliable_objective(self, model, img, cap, x_img, x_txt):
        """(total, l_re, l_cro, l_met): Eq. 17 with y = 1, plus lambda1 Eq. 9 and lambda2 Eq. 10;
        ``x_img``, ``x_txt``: the intramodal features of ``img`` and ``cap``."""
        c = self.cfg.sps
        if not self.from_embeddings(model, x_img.shape[0]):  # one fused op (Triton: one launch each way)
            return self.ops.sps_reliable_objective(model.similarity(img, cap), cosine_matrix(x_img, x_img),
                                                  cosine_matrix(x_txt, x_txt),
                                                  c.tau, c.consistency_margin, c.cross_weight, c.metric_weight)
        loss, _ = self.infonce(model, img, cap, c.tau)  # large batches: no (B, B) matrix anywhere
        l_re = loss.mean()
        l_cro = self.ops.cross_consistency_embed(img.global_, cap.global_, c.consistency_margin)
        l_met = self.ops.metric_consistency_embed(x_img, x_txt, c.consistency_margin)
        return l_re + c.cross_weight * l_cro + c.metric_weight * l_met, l_re, l_cro, l_met

    def _proxy_label(self, cosine: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        c = self.cfg.sps
        if c.proxy_label == "paper":  # Eq. 12
            return 1.0 / (c.proxy_gamma + torch.exp(-c.proxy_beta * cosine))
        label = prediction.detach() * cosine  # official code: P_hat x cos, zeroed below the cut
        return torch.where(label < c.proxy_cut, torch.zeros_like(label), label)

    def train_groups(self, model, peer, batches, peer_prob, co_epoch):
        c = self.cfg.sps
        cache = {}

        def reliable():
            b = batches["reliable"]
            img, cap = encode_pairs(model, b.images, b.tokens, b.lengths)
            x_img, x_txt = intramodal_features(img, c.intramodal), intramodal_features(cap, c.intramodal)
            total, l_re, l_cro, l_met = self._reliable_objective(model, img, cap, x_img, x_txt)
            cache["img"], cache["txt"] = x_img.detach(), x_txt.detach()  # the noisy step's proxy search
            return {"loss": total, "re": l_re, "cro": l_cro, "met": l_met}

        def quasi_clean():
            b = batches["quasi_clean"]

            def qc_pass():
                return self.infonce(model, *encode_pairs(model, b.images, b.tokens, b.lengths), c.tau)

            if c.label_pass == "eval":  # the code: the prediction of Eq. 15 from a no-grad eval-mode pass
                with torch.no_grad(), eval_mode(model):
                    _, prediction = qc_pass()
                loss, _ = qc_pass()
            else:
                loss, prediction = qc_pass()
            p = peer_prob[b.index].to(loss.dtype)
            label = p + (1 - p) * prediction.detach()  # Eq. 14 with y = 1
            l_qc = (label * loss).mean()  # Eq. 16
            return {"loss": l_qc, "qc": l_qc}

        def proxy_term(i2t: bool):
            """Eq. 11-13 in one direction: image -> proxy caption (the caption of the reliable batch's
            image nearest the noisy image) or caption -> proxy image."""
            b, re = batches["noisy"], batches["reliable"]

            def query():  # the noisy side
                return model.encode_images(b.images) if i2t else model.encode_captions(b.tokens, b.lengths)

            def proxy(index):  # the reliable pairs' other side
                return model.encode_captions(re.tokens[index], re.lengths[index]) if i2t else model.encode_images(
                    re.images[index])

            def pair(q, x):
                return (q, x) if i2t else (x, q)

            if c.label_pass == "eval":  # the code: search and label from a no-grad eval-mode pass
                with torch.no_grad(), eval_mode(model):
                    keys = model.encode_images(re.images) if i2t else model.encode_captions(re.tokens, re.lengths)
                    q = query()
                    index, cosine = self.ops.proxy_argmax(intramodal_features(q, c.intramodal),
                                                          intramodal_features(keys, c.intramodal))
                    _, prediction = self.infonce(model, *pair(q, proxy(index)), c.tau)
                loss, _ = self.infonce(model, *pair(query(), proxy(index)), c.tau)
            else:
                q = query()
                index, cosine = self.ops.proxy_argmax(intramodal_features(q, c.intramodal).detach(),
                                                      cache["img" if i2t else "txt"])
                loss, prediction = self.infonce(model, *pair(q, proxy(index)), c.tau)
            return (self._proxy_label(cosine, prediction) * loss).mean()

        def noisy():
            l_n = proxy_term(True)
            terms = {"n_i2t": l_n}
            if c.proxy_directions == "both":
                terms["n_t2i"] = proxy_term(False)
                l_n = (terms["n_i2t"] + terms["n_t2i"]) / 2  # averaged: Eq. 18 weighs L^n once
            return {"loss": l_n, "n": l_n, **terms}

        groups = {"reliable": reliable, "quasi_clean": quasi_clean, "noisy": noisy}
        return [groups[name] for name in self.active_subsets(co_epoch) if name in batches]
