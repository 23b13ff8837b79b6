"""Naive float64 re-derivations of the six ops of fastncl.kernels, for the parity tests.

Written differently from kernels/reference.py on purpose: explicit Python loops over i and j,
the math module and plain (fsum) sums, straight from the docstrings. Only for tiny B. Every
function reads its inputs as float64 Python floats and returns float64 tensors (int64 for
indices); none is differentiable (gradients are checked with gradcheck on the reference).
"""
from __future__ import annotations

import math

import torch


def _matrix(x) -> list[list[float]]:
    return torch.as_tensor(x).detach().cpu().double().tolist()


def _per_pair(value, n: int) -> list:
    """A scalar (Python number or 0-d tensor) repeated n times, or a (n,) tensor as a list."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        assert value.shape[0] == n
        return value.detach().cpu().tolist()
    return [value.item() if isinstance(value, torch.Tensor) else value] * n


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(math.fsum(math.exp(x - top) for x in xs))


def _out(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def infonce_terms(sim, tau: float):
    """(loss_i2t, loss_t2i, prob_i2t, prob_t2i): softmax over row i / column i at the diagonal."""
    s = _matrix(sim)
    n = len(s)
    loss_i2t, loss_t2i = [], []
    for i in range(n):
        row = [s[i][j] / tau for j in range(n)]  # image i against every caption
        col = [s[j][i] / tau for j in range(n)]  # caption i against every image
        loss_i2t.append(_logsumexp(row) - s[i][i] / tau)
        loss_t2i.append(_logsumexp(col) - s[i][i] / tau)
    return (
        _out(loss_i2t),
        _out(loss_t2i),
        _out([math.exp(-v) for v in loss_i2t]),
        _out([math.exp(-v) for v in loss_t2i]),
    )


def cross_consistency(sim, alpha: float) -> torch.Tensor:
    """Mean over (i, j) of max((sim[i][j] - sim[j][i])**2 - alpha, 0)."""
    s = _matrix(sim)
    n = len(s)
    terms = [max((s[i][j] - s[j][i]) ** 2 - alpha, 0.0) for i in range(n) for j in range(n)]
    return torch.tensor(math.fsum(terms) / (n * n), dtype=torch.float64)


def metric_consistency(sim_img, sim_txt, alpha: float) -> torch.Tensor:
    """Mean over (i, j) of max((sim_img[i][j] - sim_txt[i][j])**2 - alpha, 0)."""
    a, b = _matrix(sim_img), _matrix(sim_txt)
    n = len(a)
    terms = [max((a[i][j] - b[i][j]) ** 2 - alpha, 0.0) for i in range(n) for j in range(n)]
    return torch.tensor(math.fsum(terms) / (n * n), dtype=torch.float64)


def esc_anchor_terms(sim, anchor, alpha: float = 0.0, normalize: bool = False) -> torch.Tensor:
    """d_i = (sim[a][i] - sim[i][a])**2 with a = pair i's anchor.

    normalize=False: max(d_i - alpha, 0); normalize=True: d_i / sum_c (sim[a][c] - sim[i][a])**2.
    d_i is the c = i term of that sum, so a zero sum means d_i = 0 and the term is 0.
    """
    s = _matrix(sim)
    n = len(s)
    anchors = [int(a) for a in _per_pair(anchor, n)]
    out = []
    for i in range(n):
        a = anchors[i]
        d = (s[a][i] - s[i][a]) ** 2
        if not normalize:
            out.append(max(d - alpha, 0.0))
            continue
        denom = math.fsum((s[a][c] - s[i][a]) ** 2 for c in range(n))
        out.append(d / denom if denom > 0 else 0.0)
    return _out(out)


def triplet_terms(sim, margin, hardest: bool) -> torch.Tensor:
    """Per pair: image i against captions j != i plus caption i against images j != i.

    Each negative costs max(m + sim - sim[i][i], 0) with m = pair i's margin (a scalar or a (n,)
    margin) or, for a (n, n) margin, the margin of the entry compared: margin[i][j] for image i
    against caption j, margin[j][i] for caption i against image j. hardest takes each direction's
    largest cost, otherwise each direction's mean over the B - 1 negatives. B = 1 gives 0.
    """
    s = _matrix(sim)
    n = len(s)
    if isinstance(margin, torch.Tensor) and margin.dim() == 2:
        m_i2t = _matrix(margin)  # m_i2t[i][j] = margin[i][j]
        m_t2i = [list(column) for column in zip(*m_i2t)]  # m_t2i[i][j] = margin[j][i]
    else:
        m_i2t = m_t2i = [[float(m)] * n for m in _per_pair(margin, n)]  # row i: pair i's margin
    out = []
    for i in range(n):
        d = s[i][i]
        i2t = [max(m_i2t[i][j] + s[i][j] - d, 0.0) for j in range(n) if j != i]
        t2i = [max(m_t2i[i][j] + s[j][i] - d, 0.0) for j in range(n) if j != i]
        if not i2t:  # B = 1: no negatives
            out.append(0.0)
        elif hardest:
            out.append(max(i2t) + max(t2i))
        else:
            out.append(math.fsum(i2t) / (n - 1) + math.fsum(t2i) / (n - 1))
    return _out(out)


def proxy_scores(query, keys) -> list[list[float]]:
    """scores[q][k] = sum_d query[q][d] * keys[k][d], as plain float64 sums."""
    qs, ks = _matrix(query), _matrix(keys)
    return [[math.fsum(x * y for x, y in zip(q, k)) for k in ks] for q in qs]


def proxy_argmax(query, keys, key_mask=None):
    """(index int64, value float64): the first key (lowest index) with the largest score among
    the allowed keys; -1 and -inf when no key is allowed."""
    scores = proxy_scores(query, keys)
    n_keys = len(_matrix(keys))
    allowed = [True] * n_keys if key_mask is None else [bool(m) for m in key_mask.tolist()]
    index, value = [], []
    for row in scores:
        best, best_k = -math.inf, -1
        for k in range(n_keys):
            if allowed[k] and row[k] > best:  # strict: a tie keeps the earlier key
                best, best_k = row[k], k
        index.append(best_k)
        value.append(best)
    return torch.tensor(index, dtype=torch.int64), _out(value)
