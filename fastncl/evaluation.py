"""Retrieval evaluation (R@K, RSum; COCO 1K 5-fold and 5K), split diagnostics, and
``fastncl eval`` (``evaluate_run``: a run folder's checkpoint on its test or dev split).

Protocol (identical in NCR, BiCro, ESC, CREAM and SPS): image -> text ranks an image's best
ground-truth caption among all captions; text -> image ranks a caption's image among all
images; R@K in percent; RSum = the six recalls summed. Co-teaching inference averages the two
models' similarity matrices. Ties are broken by index (a stable sort), so a collapsed model that
scores everything equally gets no credit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastncl import FastnclError, distributed
from fastncl.data.noise import own_images
from fastncl.models import eval_mode
from fastncl.profiling import nvtx_range
from fastncl.records import RunResult, SplitQuality, SubsetCount
from fastncl.step import FULL_PRECISION, Precision

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def _ranks(scores: torch.Tensor, positive: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """For each row, the best (smallest) 0-based rank among its positive columns.

    scores: (N, M); positive: (N, P) column indices of each row's positives.
    """
    out = torch.empty(scores.shape[0], dtype=torch.long)
    for s in range(0, scores.shape[0], chunk):
        block = scores[s : s + chunk]
        order = torch.argsort(block, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(block.shape[1]).expand_as(order).contiguous())
        out[s : s + chunk] = rank.gather(1, positive[s : s + chunk]).min(dim=1).values
    return out


def retrieval_metrics(sim, captions_per_image: int) -> dict:
    """R@1/5/10 both ways and RSum (percent) for sim (n_images, n_captions).

    Caption k belongs to image k // captions_per_image.
    """
    sim = torch.as_tensor(np.asarray(sim) if not isinstance(sim, torch.Tensor) else sim).detach().cpu().float()
    n_img, n_cap = sim.shape
    k = captions_per_image
    if n_cap != n_img * k:
        raise ValueError(f"similarity matrix {tuple(sim.shape)} does not have {k} captions per image")
    gt_captions = torch.arange(n_img).view(-1, 1) * k + torch.arange(k).view(1, -1)  # (n_img, k)
    i2t = _ranks(sim, gt_captions)
    t2i = _ranks(sim.T, torch.from_numpy(own_images(n_cap, k)).view(-1, 1))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for r in (1, 5, 10):
            out[f"{name}_r{r}"] = 100.0 * int((ranks < r).sum()) / len(ranks)  # float64 (a float32 mean
            # was stored as 37.80000060796738)
    out["rsum"] = _rsum(out)
    return out


def _rsum(recalls: dict) -> float:
    """The six recalls summed, rounded to 10 decimals: equal sums compare equal (the best epoch is
    the first of a tie) whatever order the float additions took."""
    return round(sum(recalls[key] for key in KEYS), 10)


def fold5_metrics(sim, captions_per_image: int, fold_images: int = 1000) -> dict:
    """COCO 1K protocol: metrics averaged over 5 folds of 1000 images; RSum of the averages."""
    sim = torch.as_tensor(sim)
    k = captions_per_image
    folds = []
    for f in range(sim.shape[0] // fold_images):
        rows = slice(f * fold_images, (f + 1) * fold_images)
        cols = slice(f * fold_images * k, (f + 1) * fold_images * k)
        folds.append(retrieval_metrics(sim[rows, cols], k))
    if not folds:
        raise ValueError(f"fold5_metrics needs at least {fold_images} images, got {sim.shape[0]}")
    out = {key: float(np.mean([m[key] for m in folds])) for key in KEYS}
    out["rsum"] = _rsum(out)
    return out


def image_chunks(model, split, device, chunk: int = 1000) -> list:
    """A split's images encoded by ``model`` (as it is: the caller sets eval mode and no_grad), in
    chunks of ``chunk`` images, in order."""
    return [model.encode_images(split.image_batch(np.arange(s, min(s + chunk, split.num_images))).to(device))
            for s in range(0, split.num_images, chunk)]


def caption_chunks(model, split, device, chunk: int = 1000, rows: range | None = None):
    """Yields (index, encoding) for a split's captions (``rows`` of them; default: all), ``chunk``
    captions at a time: a pairwise backbone's word features never exist for more than one chunk."""
    rows = range(split.num_captions) if rows is None else rows
    for s in range(rows.start, rows.stop, chunk):
        index = np.arange(s, min(s + chunk, rows.stop))
        tokens, lengths = split.caption_batch(index)
        yield index, model.encode_captions(tokens.to(device), lengths.to(device))


@torch.no_grad()
def global_embeddings(model, split, device, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images' (n_images, E) and captions' (N, E) global embeddings under ``model``
    in eval mode, fp32 on the CPU."""
    with eval_mode(model):
        images = torch.cat([e.global_.float().cpu() for e in image_chunks(model, split, device, chunk)])
        captions = torch.cat([e.global_.float().cpu() for _, e in caption_chunks(model, split, device, chunk)])
    return images, captions


@torch.no_grad()
def similarity_matrix(models, split, device, chunk: int = 1000, precision: Precision = FULL_PRECISION) -> torch.Tensor:
    """(n_images, n_captions) similarities of a split, averaged over ``models``, on the CPU in fp32.

    Images and captions are encoded in chunks, under ``precision``'s autocast; the matrix is
    scored block by block, so a pairwise backbone never holds more than one chunk x chunk block
    of pairs. Under torchrun each rank encodes every image (cheap next to the captions' GRU and
    the pairwise scoring) and only its share of the captions, scores those columns, and the
    columns are all-gathered: every rank holds the matrix one process would compute.
    """
    cols = distributed.own(split.num_captions)
    total = torch.zeros(split.num_images, cols.stop - cols.start)
    with precision.autocast():
        for model in models:
            with eval_mode(model):
                images = image_chunks(model, split, device, chunk)
                for index, captions in caption_chunks(model, split, device, chunk, cols):
                    at = slice(index[0] - cols.start, index[-1] + 1 - cols.start)
                    for i, img in enumerate(images):
                        rows = slice(i * chunk, i * chunk + img.global_.shape[0])
                        total[rows, at] += model.similarity(img, captions).float().cpu()
    total /= len(models)
    if distributed.size() > 1:
        with nvtx_range("gather similarities"):
            total = distributed.gather(total.to(device), split.num_captions, dim=1).cpu()
    return total


def split_diagnostics(clean_prob: np.ndarray, noisy_cut: float, clean_mask: np.ndarray | None,
                      subsets: dict[str, np.ndarray] | None = None, detected: np.ndarray | None = None) -> SplitQuality:
    """How well a split found the noisy pairs, against the ground truth when it is known.

    precision/recall/F1 are those of the detected noisy set: the caption indices ``detected`` (a
    method's noisy subset, e.g. without ESC's forced-clean anchors), by default
    clean_prob <= noisy_cut; AUC is the ROC AUC of clean_prob as a score for "clean". ``subsets``
    adds each subset's size and its ground-truth clean count (the SPS paper's Figure 3).
    """
    if detected is None:
        detected = clean_prob <= noisy_cut
    else:
        mask = np.zeros(len(clean_prob), dtype=bool)
        mask[detected] = True
        detected = mask
    out = SplitQuality(float(noisy_cut), int(detected.sum()))
    out.subsets = {name: SubsetCount(int(len(idx))) for name, idx in (subsets or {}).items()}
    if clean_mask is None:
        return out
    from sklearn.metrics import roc_auc_score  # here: ~0.8 s to import, which `fastncl compare` (KEYS) skips

    noisy = ~clean_mask
    tp = int((detected & noisy).sum())
    out.precision = tp / max(int(detected.sum()), 1)
    out.recall = tp / max(int(noisy.sum()), 1)
    total = out.precision + out.recall
    out.f1 = 2 * out.precision * out.recall / total if total else 0.0
    out.auc = float(roc_auc_score(clean_mask, clean_prob)) if 0 < clean_mask.sum() < len(clean_mask) else None
    for name, idx in (subsets or {}).items():
        out.subsets[name].clean = int(clean_mask[idx].sum())
    return out


def format_results(result: RunResult) -> str:
    """The papers' R@K table for the test split, and the split quality."""
    t = result.test
    lines = [
        f"test ({result.method}, noise {result.noise:g}, best epoch {result.best_epoch + 1}):",
        "| Image->Text R@1 | R@5 | R@10 | Text->Image R@1 | R@5 | R@10 | RSum |",
        "|---|---|---|---|---|---|---|",
        "| " + " | ".join(f"{t[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"))
        + " |",
    ]
    s = result.split
    if s is not None and s.auc is not None:
        lines.append(f"noisy-pair detection (last epoch): AUC {s.auc:.3f}, precision {s.precision:.3f}, "
                     f"recall {s.recall:.3f}, F1 {s.f1:.3f}")
    return "\n".join(lines)


def evaluate_run(run_dirs, split: str = "test", checkpoint: str = "best") -> str:
    """``fastncl eval``: R@K of a run's two-model ensemble; with several run folders, of all their
    models together.

    Several runs are the SGRAF ensemble of the papers (a trained SGR run and a trained SAF run,
    their similarity matrices averaged); they must share the data, the split and its captions.
    """
    from fastncl import assemble
    from fastncl.checkpoint import Checkpoint
    from fastncl.config import from_dict
    from fastncl.data import load_dataset
    from fastncl.data.noise import measured_rate
    from fastncl.run import RunDir

    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    runs = [RunDir.open(r) for r in run_dirs]
    cfgs = [from_dict(run.config(), str(run.file("config.yaml"))) for run in runs]
    for run, cfg in zip(runs[1:], cfgs[1:]):
        if cfg.data != cfgs[0].data:
            raise FastnclError(f"{run.path}: its data settings differ from {runs[0].path}'s; an ensemble needs the "
                               "same data, splits and noise")
    saved = [Checkpoint.load(run.checkpoint(checkpoint)) for run in runs]
    cfg = cfgs[0]
    device = assemble.resolve_device(cfg.runtime.device)
    data = load_dataset(cfg.data)
    part = data.test if split == "test" else data.dev
    sims = []
    for run_cfg, state in zip(cfgs, saved):  # each run evaluated as it trained: its compile and precision
        rt = assemble.runtime(run_cfg, device)
        models = [assemble.backbone(run_cfg.model, data, device) for _ in state.models]
        state.load_weights(models)
        sims.append(similarity_matrix(assemble.views(models, rt)[1], part, device, run_cfg.runtime.eval_batch,
                                      rt.precision))
    sim = sum(sims) / len(sims)
    name = cfg.method if len(runs) == 1 else " + ".join(f"{c.method}/{c.model.backbone}" for c in cfgs)
    noise = cfg.data.noise
    if cfg.data.noise_file:  # a --noise-file run is labelled with its index's measured rate, as in training
        noise = measured_rate(np.load(runs[0].file("noise_index.npy")), data.train.captions_per_image)
    result = RunResult(method=name, noise=noise, best_epoch=saved[0].epoch,
                       test=retrieval_metrics(sim, part.captions_per_image))
    text = format_results(result).replace("test (", f"{split} ({checkpoint} checkpoint, ", 1)
    if len(runs) > 1:  # one epoch per run
        epochs = ", ".join(str(s.epoch + 1) for s in saved)
        which = "best epochs" if checkpoint == "best" else "epochs"
        text = text.replace(f"best epoch {saved[0].epoch + 1}", f"{which} {epochs}", 1)
    elif checkpoint == "last":  # the last checkpoint's epoch is no "best epoch"
        text = text.replace("best epoch", "epoch", 1)
    if split == "test" and cfg.data.test_protocol == "coco":
        m = fold5_metrics(sim, part.captions_per_image)
        text += f"\nCOCO 1K (5-fold): rsum {m['rsum']:.1f}"
    return text
