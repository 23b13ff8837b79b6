"""Loss pieces shared by the hinge-based methods (NCR, ESC): the soft margin,
NCR's hinge confidence and prediction, the soft-margin triplet loss, the noisy subset's weights,
and BiCro's correspondence labels with ESC's pseudo-negatives. One definition each; the methods
import them from here, never from a peer method. The loss ops come in as ``ops``, the method's ops
bound to the run's backend (a required keyword: no call falls back to per-call dispatch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastncl import kernels


def soft_margin(label: torch.Tensor, margin: float, base: float) -> torch.Tensor:
    """NCR/ESC soft margin: alpha * (m**y - 1) / (m - 1); y = 1 gives alpha, y = 0 gives 0."""
    return margin * (base ** label.clamp(0, 1) - 1) / (base - 1)


def hinge_confidence(sim: torch.Tensor, margin: float, *, ops: kernels.Ops) -> torch.Tensor:
    """(B,) NCR confidence in [0, 1]: (alpha - mean hinge per direction) / alpha, clamped."""
    mean_hinge = ops.triplet_terms(sim, margin, hardest=False) / 2
    return ((margin - mean_hinge) / margin).clamp(0, 1)


def ncr_prediction(sim: torch.Tensor, margin: float, anchor_fraction: float = 0.1, *,
                   ops: kernels.Ops) -> torch.Tensor:
    """(B,) NCR's prediction of each pair's correspondence (NCR's ``predict``): the confidence
    clamp(alpha - mean hinge per direction, 0, alpha), divided by the mean of the batch's top
    floor(B * anchor_fraction) + 1 confidences, clamped to [0, 1]."""
    n = sim.shape[0]
    # the code's means divide by B (the zeroed diagonal counted); triplet_terms' by the B - 1 negatives
    mean_hinge = ops.triplet_terms(sim, margin, hardest=False) * ((n - 1) / (2 * n))
    confidence = (margin - mean_hinge).clamp(0, margin)
    k = min(int(confidence.shape[0] * anchor_fraction) + 1, confidence.shape[0])
    top = torch.topk(confidence, k).values.mean()
    return (confidence / top.clamp_min(1e-12)).clamp(0, 1)


BROADCASTS = ("image", "caption")  # whose label an entry (i, j) of the scores takes: image i's or caption j's


def soft_triplet(sim: torch.Tensor, label: torch.Tensor, margin: float, base: float, keep=None, *,
                 ops: kernels.Ops, negatives: str = "hardest", broadcast: str | None = None) -> torch.Tensor:
    """Soft-margin triplet loss (NCR; ESC Eq. 13), summed over the batch: over each pair's hardest
    negative (``negatives="hardest"``, the papers and codes), the mean over its negatives ("mean"),
    or the two added ("mixed").

    ``label`` (B,) gives pair i's margin to both of its directions (``broadcast=None``: the papers'
    per-pair form). The codes broadcast their labels against the (B, B) scores instead, and every
    hinge takes the margin of the entry (i, j) it compares (``triplet_terms``' (B, B) form):
    ``broadcast="image"``, NCR's (B, 1) targets, image i's label (row i's); ``"caption"``, ESC's and
    BiCro's (B,) labels, caption j's (column j's), so image i's hinge against negative caption j
    takes caption j's margin. A (B, B) label (NCR's clean target) is per entry already; a row or a
    column is expanded, not copied. ``keep`` (B,) optionally weighs each pair's two hinges (0 leaves
    a pair out; its label still sets the margins of the hinges it is a negative in).
    """
    if broadcast is not None and broadcast not in BROADCASTS:
        raise ValueError(f"soft_triplet: broadcast must be None or one of {BROADCASTS}, got {broadcast!r}")
    m = soft_margin(label, margin, base)
    if broadcast is not None and m.dim() == 1:
        m = m.view(-1, 1) if broadcast == "image" else m.view(1, -1)
    if m.dim() == 2:
        m = m.expand(sim.shape)
    terms = (ops.triplet_terms(sim, m, hardest=negatives != "mean") if negatives != "mixed"
             else ops.triplet_terms(sim, m, hardest=True) + ops.triplet_terms(sim, m, hardest=False))
    return (terms if keep is None else terms * keep).sum()


def noisy_keep(label: torch.Tensor, c) -> torch.Tensor | None:
    """Per-pair weights of a soft-labelled subset's loss (the noisy subset's; ESC's clean one too
    with ``esc.clean_label_cut=code``): None ("soft": every pair, margin from its label) or, for
    "hard" (BiCro's noise_train=noise_hard), 0 for labels <= the cut."""
    return (label > c.noise_label_cut).to(label.dtype) if c.noisy_loss == "hard" else None


def _ratio(a: torch.Tensor, b: torch.Tensor, form: str = "positive") -> torch.Tensor:
    """BiCro's ratio of a pair's two cosines to its nearest anchor, elementwise.

    Args:
        a: (B,) the cosine in the modality that chose the anchor (its largest); b: (B,) the other
            modality's cosine to that anchor. fp32.
        form: "positive": min(a, b) / max(a, b) when both are positive, else 0, in [0, 1].
            "code": ESC's and BiCro's code (``SIM_SELE``): a / b where that is below 1, else b / a.
            The same on positive cosines; both negative: min(|a|, |b|) / max(|a|, |b|); mixed signs:
            a / b, negative and unbounded below. Exact zeros: 0 / 0 (NaN in the code, a NaN loss)
            gives 0; a / 0 with a < 0 (-inf in the code) gives -1e6, a zero margin as -inf gives.
            The reference notes write min(a / b, b / a), which differs from the code on mixed signs
            (docs/methods.md).
    Returns:
        (B,) the ratio; a query without an anchor (a = -inf) gets 0.
    """
    if form == "positive":
        return (torch.minimum(a, b).clamp_min(0) / torch.maximum(a, b).clamp_min(1e-6)).clamp(0, 1)
    r = a / b
    r = torch.nan_to_num(torch.where(r < 1, r, b / a), nan=0.0, neginf=-1e6)
    return torch.where(torch.isneginf(a), torch.zeros_like(r), r)


def bicro_consistency(q_img, q_txt, k_img, k_txt, key_mask, *, ops: kernels.Ops,
                      ratio: str = "positive") -> torch.Tensor:
    """BiCro's bidirectional similarity consistency of each query pair with its nearest anchor.

    img2text: the anchor whose image is closest to the query image, then the ratio of the image
    cosine and the text cosine to that anchor; text2img: the same with the anchor chosen by
    caption. Returns (img2text + text2img) / 2, shape (Bq,): in [0, 1] with ``ratio="positive"``,
    at most 1 with ``"code"`` (``_ratio``). Features are pooled per-modality features; only keys
    with ``key_mask`` True are anchors.
    """
    qi, qt, ki, kt = (F.normalize(x.float(), dim=-1) for x in (q_img, q_txt, k_img, k_txt))
    idx, a = ops.proxy_argmax(qi, ki, key_mask)
    img2text = _ratio(a, (qt * kt[idx.clamp_min(0)]).sum(-1), ratio)
    idx, a = ops.proxy_argmax(qt, kt, key_mask)
    text2img = _ratio(a, (qi * ki[idx.clamp_min(0)]).sum(-1), ratio)
    return (img2text + text2img) / 2


def pseudo_negative(sim: torch.Tensor) -> torch.Tensor:
    """(B,) index of each pair's pseudo-negative: argmax_{j != i} S(I_j, T_i) (ESC Sec. 3.3)."""
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    return sim.detach().masked_fill(eye, float("-inf")).argmax(dim=0)
