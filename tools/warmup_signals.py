"""How well each warm-up epoch's per-pair loss would split: its ROC AUC against the injected noise.

    python tools/warmup_signals.py --method sps --data glyphs --noise 0.6 --epochs 7
    python tools/warmup_signals.py --method ncr --data icons --noise 0.6 --epochs 7 --out runs/ws-ncr-icons
    python tools/warmup_signals.py --method ncr --data glyphs --noise 0.6 --whole-run

Trains a run's warm-up alone (``optim.warmup=fixed``, ``optim.warmup_epochs=EPOCHS``, no
co-training) and after every epoch runs the split pass a co-training epoch would start with: each
model's per-pair division loss (the method's own: InfoNCE for SPS, the mean hinge for NCR and ESC)
and the method's mixture fitted to it. Per epoch and model it prints the ROC AUC of the loss as a
score for "clean" (higher is better; 0.5 is chance), that of the fit's clean probability, and the
weight of the mixture's clean component (the true clean fraction is 1 - noise). The epoch where the
AUC peaks is where a split taken from one epoch's losses is best; the dev RSum of the same epochs
is in the run folder's metrics.jsonl. It also prints the AUC of each model's min-max normalised
losses averaged over the epochs so far (what ``split.signal=mean`` would fit if it averaged the
warm-up's epochs too) and that of both models' average. With ``--out`` the per-epoch losses are
kept in ``OUT/warmup_losses.npz`` (``losses``: epochs x 2 x N; ``clean``: N, the ground truth) so
that other combinations can be scored offline. Extra arguments are config overrides (the
warm-up's length and schedule are the tool's).

With ``--whole-run`` the run trains as configured (its warm-up and its co-training epochs, on the
splits it takes itself) and the same scores follow every epoch. Each epoch then also prints what
the mixture's clean side (clean probability > 0.5) holds: its size and its purity (the share of
truly clean pairs), and the AUC of a full-set signal: each pair's margin over the whole training
set, the smaller of its two directions (its caption's cosine minus the best other image's; its
image's minus the best caption not paired with that image), and the AUC of each pair's structure
consistency (GSC, REPAIR): the correlation, over anchor pairs, of its image's cosines to the
anchors' images and its caption's cosines to the anchors' captions, with every pair as an anchor
and with the model's lowest-loss quarter only; once, the same score from the input features
(the mean region feature, centred, and the caption's tf-idf bag of words: nothing trained, so
nothing memorised). ``OUT/warmup_losses.npz`` then also keeps these margins (``margins``:
epochs x 2 x N), the structure consistencies (``structure``: epochs x 2 x 2 x N, all anchors then
the core) and the input features' (``raw_structure``: N).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile

import numpy as np
import torch

from fastncl.checkpoint import LoopState
from fastncl.config import parse_override, resolve
from fastncl.evaluation import global_embeddings, similarity_matrix
from fastncl.methods.registry import get, names as method_names
from fastncl.models import cosine_matrix
from fastncl.split_phase import mean_signal
from fastncl.train import Trainer


class WarmupProbe(Trainer):
    """A Trainer that, after each epoch, scores its models' split losses against the ground truth."""

    rows: list[dict]
    losses: list[list[np.ndarray]]  # per epoch, each model's (N,) split losses
    averaged: LoopState  # the running sums of the normalised losses (split.signal=mean's)
    margins: list[list[np.ndarray]] | None  # per epoch, each model's (N,) full-set margins (--whole-run)
    structure: list  # per epoch, each model's (N,) structure consistency over all pairs and over the core
    raw_structure: np.ndarray | None  # (N,) the input features' structure consistency

    def _epoch(self, epoch: int, total: int) -> None:
        from sklearn.metrics import roc_auc_score

        super()._epoch(epoch, total)
        row = {"epoch": epoch + 1, "auc_loss": [], "auc_prob": [], "clean_weight": [], "auc_mean": []}
        self.losses.append([])
        for model in self.fast:
            loss, _ = self.splitter.split_pass(model)
            self.losses[-1].append(loss)
            fit = self.method.fit(loss)
            row["auc_loss"].append(float(roc_auc_score(self.pairs.clean, -loss)))
            row["auc_prob"].append(float(roc_auc_score(self.pairs.clean, fit.clean_prob)))
            row["clean_weight"].append(float(fit.params["weights"][0]))
            if self.margins is not None:
                clean_side = fit.clean_prob > 0.5
                row.setdefault("clean_side", []).append(int(clean_side.sum()))
                row.setdefault("purity", []).append(float(self.pairs.clean[clean_side].mean()) if clean_side.any()
                                                    else float("nan"))
        means = mean_signal(self.losses[-1], self.averaged)
        row["auc_mean"] = [float(roc_auc_score(self.pairs.clean, -m)) for m in means]
        row["auc_mean_both"] = float(roc_auc_score(self.pairs.clean, -np.mean(means, axis=0)))
        self.rows.append(row)
        print(f"after epoch {row['epoch']}: split AUC of the loss A {row['auc_loss'][0]:.3f} B {row['auc_loss'][1]:.3f} "
              f"(mean {np.mean(row['auc_loss']):.3f}), of the fit's clean probability A {row['auc_prob'][0]:.3f} "
              f"B {row['auc_prob'][1]:.3f}, clean weight A {row['clean_weight'][0]:.2f} B {row['clean_weight'][1]:.2f}; "
              f"normalised loss averaged over epochs 1-{row['epoch']}: A {row['auc_mean'][0]:.3f} "
              f"B {row['auc_mean'][1]:.3f}, both models {row['auc_mean_both']:.3f}", flush=True)
        if self.margins is not None:
            image = self.pairs.caption_to_image
            # each model's training set encoded once: a dot-product backbone's similarity is the
            # product of the global embeddings the structure consistency below reads too
            encoded = [global_embeddings(m, self.data.train, self.device) for m in self.models]
            self.margins.append([fullset_margin(cosine_matrix(*e) if getattr(m, "dot_product", False)
                                                else similarity_matrix([m], self.data.train, self.device), image)
                                 for m, e in zip(self.models, encoded)])
            row["auc_margin"] = [float(roc_auc_score(self.pairs.clean, m)) for m in self.margins[-1]]
            print(f"  clean side of the fit A {row['clean_side'][0]} pairs, purity {row['purity'][0]:.2f}; "
                  f"B {row['clean_side'][1]}, {row['purity'][1]:.2f}; AUC of the full-set margin "
                  f"A {row['auc_margin'][0]:.3f} B {row['auc_margin'][1]:.3f}", flush=True)
            if self.raw_structure is None:  # the input features' structure: no training, no memorisation
                self.raw_structure = structure_consistency(*raw_features(self.data.train, image))
                print(f"  AUC of the input features' structure consistency: "
                      f"{roc_auc_score(self.pairs.clean, self.raw_structure):.3f}", flush=True)
            structure = []
            for (img, cap), loss in zip(encoded, self.losses[-1]):
                core = np.flatnonzero(loss <= np.quantile(loss, CORE_QUANTILE))
                structure.append([structure_consistency(img[image], cap), structure_consistency(img[image], cap, core)])
            self.structure.append(structure)
            for key, i in (("auc_structure", 0), ("auc_structure_core", 1)):
                row[key] = [float(roc_auc_score(self.pairs.clean, s[i])) for s in structure]
            print(f"  AUC of the structure consistency over all pairs A {row['auc_structure'][0]:.3f} "
                  f"B {row['auc_structure'][1]:.3f}, over the lowest-loss {CORE_QUANTILE:.0%} A "
                  f"{row['auc_structure_core'][0]:.3f} B {row['auc_structure_core'][1]:.3f}", flush=True)


CORE_QUANTILE = 0.25  # the anchors of the "core" structure consistency: this share of the pairs, lowest loss first


def raw_features(split, caption_to_image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's input features, before any training: its image's mean region feature, centred
    over the images and L2-normalised, and its caption's tf-idf bag of words, L2-normalised."""
    img = torch.from_numpy(np.asarray(split.images, dtype=np.float32).mean(axis=1)).double()
    img = torch.nn.functional.normalize(img - img.mean(dim=0), dim=1)[torch.as_tensor(caption_to_image)]
    tokens = torch.from_numpy(np.asarray(split.tokens))
    counts = torch.zeros(len(tokens), int(tokens.max()) + 1, dtype=torch.float64)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float64))
    counts[:, 0] = 0  # padding
    idf = torch.log(len(tokens) / (1 + (counts > 0).sum(dim=0)))
    return img, torch.nn.functional.normalize(counts * idf, dim=1)


def structure_consistency(img: torch.Tensor, cap: torch.Tensor, anchors: np.ndarray | None = None) -> np.ndarray:
    """(N,) per pair k (``img[k]``, ``cap[k]``: its image's and its caption's unit vectors): the
    Pearson correlation, over the anchor pairs a other than k, of cos(img[k], img[a]) and
    cos(cap[k], cap[a]). A matched pair's image and caption have the same neighbours (GSC, REPAIR).
    ``anchors``: pair indices (default: every pair)."""
    index = torch.arange(len(img)) if anchors is None else torch.as_tensor(anchors)
    a = img.double() @ img[index].double().T  # (N, A)
    b = cap.double() @ cap[index].double().T
    keep = torch.ones_like(a)
    keep[index, torch.arange(len(index))] = 0  # a pair is not its own anchor
    n = keep.sum(dim=1, keepdim=True)
    a = (a - (a * keep).sum(dim=1, keepdim=True) / n) * keep
    b = (b - (b * keep).sum(dim=1, keepdim=True) / n) * keep
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).numpy()


def fullset_margin(sim: torch.Tensor, caption_to_image: np.ndarray) -> np.ndarray:
    """(N,) each pair's margin over the whole set, the smaller of its two directions: caption k's
    cosine to its image minus its best other image's, and that image's cosine to caption k minus
    its best caption among those not paired with it. ``sim``: (n_images, N) similarities."""
    sim = sim.double()
    image = torch.as_tensor(caption_to_image, dtype=torch.long)
    pairs = (image, torch.arange(sim.shape[1]))
    own = sim[pairs]
    # every pair's own entry out: per column the other images, per row the captions not paired with it
    others = sim.index_put(pairs, torch.tensor(float("-inf"), dtype=sim.dtype))
    to_images = own - others.max(dim=0).values
    to_captions = own - others.max(dim=1).values[image]
    return torch.minimum(to_images, to_captions).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="sps")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--noise", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=7, help="warm-up epochs to train and score")
    p.add_argument("--out", help="the run folder (default: a temporary one, removed at the end)")
    p.add_argument("--whole-run", action="store_true",
                   help="train the run as configured (warm-up and co-training) and score every epoch; --epochs is unused")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = p.parse_args(argv)
    if args.noise <= 0:
        p.error("--noise: the AUC needs injected noise (a rate in (0, 1))")
    if args.epochs < 1:
        p.error("--epochs: at least 1")
    if args.method not in method_names() or not get(args.method).uses_split:
        p.error(f"--method: one that splits ({', '.join(m for m in method_names() if get(m).uses_split)}), "
                f"got {args.method!r}")
    out = args.out or tempfile.mkdtemp(prefix="fastncl-warmup-signals-")
    values = [f"data.source={args.data}", f"data.noise={args.noise}", f"seed={args.seed}", "runtime.progress=false",
              *args.overrides, f"out={out}"]
    if not args.whole_run:  # what makes the run a warm-up alone, over any override
        values += ["optim.warmup=fixed", f"optim.warmup_epochs={args.epochs}", "optim.epochs=0"]
    cfg = resolve(overrides=[parse_override(v) for v in values], method=args.method)
    if not args.out:
        shutil.rmtree(out)  # a fresh run folder: RunDir creates it
    probe = WarmupProbe(cfg)
    probe.rows, probe.losses, probe.averaged = [], [], LoopState()
    probe.margins = [] if args.whole_run else None
    probe.structure, probe.raw_structure = [], None
    try:
        probe.fit()
        if args.out:
            extra = {} if probe.margins is None else {"margins": np.asarray(probe.margins),
                                                      "structure": np.asarray(probe.structure),
                                                      "raw_structure": probe.raw_structure}
            np.savez_compressed(f"{out}/warmup_losses.npz", losses=np.asarray(probe.losses),
                                clean=np.asarray(probe.pairs.clean, dtype=bool), **extra)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    best = max(probe.rows, key=lambda r: np.mean(r["auc_loss"]))
    print(f"{args.method} on {args.data} at noise {args.noise:g}, seed {args.seed}: the loss splits best after epoch "
          f"{best['epoch']} (AUC {np.mean(best['auc_loss']):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
