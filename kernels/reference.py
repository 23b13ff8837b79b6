"""The loss ops of fastncl in plain PyTorch: the contract, and the CPU backend.

Every op takes similarity matrices whose rows are images and columns captions,
``sim[i, j] = S(I_i, T_j)``. Inputs may be fp16, bf16, fp32 or float64; everything is
accumulated and returned in fp32 (float64 inputs stay float64, so that
``torch.autograd.gradcheck`` can check the gradients). Softmaxes are log-sum-exp, never a
raw ``exp(sim / tau)`` (the official SPS code's form, which overflows fp16 at tau = 0.07).

The Triton kernels of the kernels issue must match these definitions; tests compare them.
"""
from __future__ import annotations

import torch

__all__ = [
    "infonce_terms",
    "cross_consistency",
    "metric_consistency",
    "esc_anchor_terms",
    "triplet_terms",
    "proxy_argmax",
    "sps_reliable_objective",
    "esc_division_terms",
    "infonce_terms_embed",
    "cross_consistency_embed",
    "metric_consistency_embed",
]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp32, or float64 when the input already is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_square(name: str, sim: torch.Tensor) -> None:
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"{name}: expected a square (B, B) similarity matrix, got shape {tuple(sim.shape)}")


def _check_features(name: str, a: torch.Tensor, b: torch.Tensor, same_dim: bool = True) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0] or (same_dim and a.shape[1] != b.shape[1]):
        want = "(B, D) and (B, D)" if same_dim else "(B, D1) and (B, D2)"
        raise ValueError(f"{name}: expected embeddings {want}, got shapes {tuple(a.shape)} and {tuple(b.shape)}")


def infonce_terms(sim: torch.Tensor, tau: float):
    """Per-pair bidirectional InfoNCE terms (SPS Eq. 1, 2 and 15).

    Args:
        sim: (B, B) similarities, rows = images, columns = captions.
        tau: temperature.
    Returns:
        ``(loss_i2t, loss_t2i, prob_i2t, prob_t2i)``, each (B,):
        ``loss_i2t[i] = logsumexp_j(sim[i, j] / tau) - sim[i, i] / tau`` (softmax over row i),
        ``loss_t2i[i] = logsumexp_j(sim[j, i] / tau) - sim[i, i] / tau`` (softmax over column i),
        ``prob = exp(-loss)``, the diagonal softmax probabilities.
    """
    _check_square("infonce_terms", sim)
    logits = _acc(sim) / tau  # (B, B)
    diag = logits.diagonal()
    loss_i2t = torch.logsumexp(logits, dim=1) - diag
    loss_t2i = torch.logsumexp(logits, dim=0) - diag
    return loss_i2t, loss_t2i, torch.exp(-loss_i2t), torch.exp(-loss_t2i)


def cross_consistency(sim: torch.Tensor, alpha: float) -> torch.Tensor:
    """SPS Eq. 9: mean over all (i, j) of ``max((sim[i, j] - sim[j, i])**2 - alpha, 0)``."""
    _check_square("cross_consistency", sim)
    s = _acc(sim)
    return torch.relu((s - s.T) ** 2 - alpha).mean()


def metric_consistency(sim_img: torch.Tensor, sim_txt: torch.Tensor, alpha: float) -> torch.Tensor:
    """SPS Eq. 10: mean over all (i, j) of ``max((sim_img[i, j] - sim_txt[i, j])**2 - alpha, 0)``.

    ``sim_img`` and ``sim_txt`` are the two intramodal (B, B) similarity matrices.
    """
    _check_square("metric_consistency", sim_img)
    if sim_txt.shape != sim_img.shape:
        raise ValueError(
            f"metric_consistency: sim_img {tuple(sim_img.shape)} and sim_txt {tuple(sim_txt.shape)} differ in shape"
        )
    return torch.relu((_acc(sim_img) - _acc(sim_txt)) ** 2 - alpha).mean()


def esc_anchor_terms(sim: torch.Tensor, anchor, alpha: float = 0.0, normalize: bool = False) -> torch.Tensor:
    """ESC terms of each pair against an anchor pair (ESC Eq. 7, 8 and 14).

    With ``d_i = (sim[a, i] - sim[i, a])**2`` (S(I_a, T_i) against S(I_i, T_a)):
    ``normalize=False`` gives ``max(d_i - alpha, 0)`` (ESC Eq. 8 and 14);
    ``normalize=True`` gives ``d_i / sum_c (sim[a, c] - sim[i, a])**2``, the official code's
    row-normalised variant (alpha is not used there).

    Args:
        sim: (B, B) similarities.
        anchor: the anchor's index: an int, a 0-d integer tensor (one anchor for the batch, ESC
            Eq. 6), or a (B,) integer tensor giving each pair its own anchor (the per-sample
            pseudo-negatives of ESC Eq. 14).
    Returns:
        (B,) terms. A pair that is its own anchor gets 0.
    """
    _check_square("esc_anchor_terms", sim)
    s = _acc(sim)
    n = s.shape[0]
    a = torch.as_tensor(anchor, device=s.device, dtype=torch.long).expand(n)  # (B,)
    rows = s.index_select(0, a)  # (B, B): rows[i, c] = S(I_{a_i}, T_c)
    col = s.gather(1, a.view(n, 1)).squeeze(1)  # (B,): S(I_i, T_{a_i})
    diff = rows.gather(1, torch.arange(n, device=s.device).view(n, 1)).squeeze(1) - col
    d = diff**2
    if not normalize:
        return torch.relu(d - alpha)
    denom = ((rows - col.unsqueeze(1)) ** 2).sum(dim=1)
    # official code: F.normalize clamps the row norm at 1e-12, so the squared norm at 1e-24
    return d / denom.clamp_min(1e-24)


def triplet_terms(sim: torch.Tensor, margin, hardest: bool) -> torch.Tensor:
    """Per-pair bidirectional hinge triplet loss (VSE++ / NCR / ESC Eq. 1 and 13).

    For pair i with diagonal d_i = sim[i, i], against each negative j:
    image i against caption j: ``max(m^r_ij + sim[i, j] - d_i, 0)``;
    caption i against image j: ``max(m^c_ij + sim[j, i] - d_i, 0)``.
    ``hardest=True`` takes the largest violation of each direction (VSE++), ``hardest=False``
    the mean over the B - 1 negatives; the two directions are summed.

    Args:
        sim: (B, B) similarities.
        margin: a float (m^r = m^c = m); a (B,) tensor of per-pair margins, pair i's for both of its
            directions (m^r_ij = m^c_ij = m_i: the papers' form); or a (B, B) tensor indexed like
            ``sim``, the margin of the entry a hinge compares (m^r_ij = margin[i, j], m^c_ij =
            margin[j, i]): NCR's code, which broadcasts its targets against the (B, B) scores
            (``ncr.margins=broadcast``; docs/methods.md). The ESC/BiCro code's (B,) broadcast,
            column j's margin in both directions, is the (B, B) form ``m.view(1, B).expand(B, B)``.
    Returns:
        (B,) per-pair losses. With B = 1 there are no negatives and the loss is 0.
    """
    _check_square("triplet_terms", sim)
    s = _acc(sim)
    n = s.shape[0]
    m = torch.as_tensor(margin, device=s.device, dtype=s.dtype)
    if m.dim() > 0 and m.shape not in ((n,), (n, n)):
        raise ValueError(f"triplet_terms: margin must be a float, a 0-d, a ({n},) or a ({n}, {n}) tensor, "
                         f"got shape {tuple(m.shape)}")
    if m.dim() == 2:  # per entry: caption i against image j compares the entry sim[j, i]
        m_i2t, m_t2i = m, m.T
    else:  # pair i's margin (a (B, 1) column) or one for all
        m_i2t = m_t2i = m.view(n, 1) if m.dim() == 1 else m
    diag = s.diagonal().view(n, 1)
    negative = ~torch.eye(n, dtype=torch.bool, device=s.device)
    cost_i2t = torch.relu(m_i2t + s - diag) * negative  # (B, B): row i = image i as query
    cost_t2i = torch.relu(m_t2i + s.T - diag) * negative  # (B, B): row i = caption i as query
    if hardest:
        return cost_i2t.amax(dim=1) + cost_t2i.amax(dim=1)
    return (cost_i2t.sum(dim=1) + cost_t2i.sum(dim=1)) / max(n - 1, 1)


@torch.no_grad()
def proxy_argmax(query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None):
    """For every query row, the key row with the largest dot product (SPS Eq. 11).

    Args:
        query: (Bq, D); keys: (Bk, D); key_mask: optional (Bk,) bool, True = key may be chosen.
    Returns:
        ``(index, value)``, each (Bq,): index int64, value fp32. Ties go to the lowest index;
        a query with no valid key gets index -1 and value -inf. Not differentiable.
    """
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"proxy_argmax: expected query (Bq, D) and keys (Bk, D), got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    scores = _acc(query) @ _acc(keys).T  # (Bq, Bk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.view(1, -1), float("-inf"))
    if scores.shape[1] == 0:
        index = torch.full((query.shape[0],), -1, dtype=torch.long, device=query.device)
        return index, torch.full((query.shape[0],), float("-inf"), dtype=scores.dtype, device=query.device)
    value, index = scores.max(dim=1)  # torch.max returns the first maximal index
    index = torch.where(torch.isneginf(value), torch.full_like(index, -1), index)
    return index, value


def sps_reliable_objective(sim: torch.Tensor, sim_img: torch.Tensor, sim_txt: torch.Tensor, tau: float,
                           alpha: float, cross_weight: float, metric_weight: float):
    """The SPS reliable-batch objective (SPS Eq. 17 with y = 1, plus lambda1 Eq. 9 and lambda2 Eq. 10).

    ``l_re = mean_i (loss_i2t[i] + loss_t2i[i])`` (``infonce_terms``), ``l_cro =
    cross_consistency(sim, alpha)``, ``l_met = metric_consistency(sim_img, sim_txt, alpha)``.

    Returns:
        ``(total, l_re, l_cro, l_met)``, 0-d, with ``total = l_re + cross_weight * l_cro +
        metric_weight * l_met``.
    """
    l_i2t, l_t2i, _, _ = infonce_terms(sim, tau)
    l_re = (l_i2t + l_t2i).mean()
    l_cro = cross_consistency(sim, alpha)
    l_met = metric_consistency(sim_img, sim_txt, alpha)
    return l_re + cross_weight * l_cro + metric_weight * l_met, l_re, l_cro, l_met


def esc_division_terms(sim: torch.Tensor, margin, esc_weight: float, alpha: float = 0.0, hardest: bool = True,
                       normalize: bool = False):
    """ESC's per-pair division loss (ESC Eq. 9): ``l_hard + esc_weight * l_ESC`` with the batch's anchor.

    The anchor is the most similar pair of the batch, ``a = argmax_i sim[i, i]`` (ESC Eq. 6; ties to
    the lowest index); ``l_hard = triplet_terms(sim, margin, hardest)`` (Eq. 1) and ``l_ESC =
    esc_anchor_terms(sim, a, alpha, normalize)`` (Eq. 7-8).

    Returns:
        ``(loss, anchor)``: (B,) losses and the anchor's index (0-d int64).
    """
    _check_square("esc_division_terms", sim)
    anchor = sim.detach().diagonal().argmax()
    loss = triplet_terms(sim, margin, hardest) + esc_weight * esc_anchor_terms(sim, anchor, alpha, normalize)
    return loss, anchor
# ---------------------------------------------------------------------------------------------
# embedding-level variants: the matrix ops of a dot-product backbone's similarity matrix, which
# the Triton kernels compute from the (B, D) embeddings without materialising B x B


def infonce_terms_embed(img: torch.Tensor, txt: torch.Tensor, tau: float):
    """``infonce_terms(img @ txt.T, tau)`` from the embeddings of a dot-product backbone.

    The Triton twin never materialises the (B, B) matrix (online log-sum-exp, recomputation in
    the backward): memory linear in B. It does not assume normalised rows.

    Args:
        img, txt: (B, D) image and caption embeddings of one floating dtype (rows = pairs).
        tau: temperature.
    Returns:
        ``(loss_i2t, loss_t2i, prob_i2t, prob_t2i)``, each (B,) fp32 (float64 for float64 inputs),
        as ``infonce_terms``.
    Raises:
        ValueError: the inputs are not two (B, D) matrices of one shape.
    """
    _check_features("infonce_terms_embed", img, txt)
    return infonce_terms(_acc(img) @ _acc(txt).T, tau)


def cross_consistency_embed(img: torch.Tensor, txt: torch.Tensor, alpha: float) -> torch.Tensor:
    """``cross_consistency(img @ txt.T, alpha)`` (SPS Eq. 9) from the embeddings.

    Args:
        img, txt: (B, D) image and caption embeddings of one floating dtype.
        alpha: hinge threshold on the squared asymmetry.
    Returns:
        0-d fp32 tensor (float64 for float64 inputs): the mean over all B^2 pairs.
    Raises:
        ValueError: the inputs are not two (B, D) matrices of one shape.
    """
    _check_features("cross_consistency_embed", img, txt)
    return cross_consistency(_acc(img) @ _acc(txt).T, alpha)


def metric_consistency_embed(img_feats: torch.Tensor, txt_feats: torch.Tensor, alpha: float) -> torch.Tensor:
    """``metric_consistency(img_feats @ img_feats.T, txt_feats @ txt_feats.T, alpha)`` (SPS Eq. 10)
    from the features of the two intramodal similarity matrices.

    Args:
        img_feats: (B, D1) image features; txt_feats: (B, D2) caption features (D1 may differ from D2).
        alpha: hinge threshold on the squared difference.
    Returns:
        0-d fp32 tensor (float64 for float64 inputs): the mean over all B^2 pairs.
    Raises:
        ValueError: the inputs are not two matrices with the same number of rows.
    """
    _check_features("metric_consistency_embed", img_feats, txt_feats, same_dim=False)
    f, g = _acc(img_feats), _acc(txt_feats)
    return metric_consistency(f @ f.T, g @ g.T, alpha)
