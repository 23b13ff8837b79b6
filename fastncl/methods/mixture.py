"""Two-component mixtures fitted to per-sample losses: clean probability of every training pair.

Both fit the min-max normalised losses in float64 and return the posterior of the component with
the *smaller mean* (identified after fitting, never by index):
* ``fit_gmm``: scikit-learn's GaussianMixture with the NCR/CREAM/SPS settings
  (max_iter 10, tol 1e-2, reg_covar 5e-4), SPS Eq. 4-5;
* ``fit_bmm``: a Beta mixture fitted by EM with weighted method-of-moments M-steps (ESC
  Eq. 10-11, BiCro/ESC code), guarded: losses are clipped to [eps, 1 - eps] for the fit *and*
  the posterior (the official code evaluates the posterior at exactly 0 and 1, where a Beta
  density with a shape below 1 is infinite), log-densities combined with log-sum-exp, and the
  variance floored so that no shape parameter becomes NaN or infinite; finally the clean
  probability is made non-increasing in the loss, outward from the clean component's mean (a
  Beta component with a shape below 1 has an infinite density at 0 or 1, so the raw posterior
  can hand the smallest losses to the noisy component, or the largest to the clean one, as
  happens when many losses are exactly 0). ``posterior="code"`` skips both steps and returns
  component 0's posterior, as ESC's code does (esc.bmm_posterior; the clip stays: without it
  the code's posterior at a loss of exactly 0 or 1 can be inf / inf).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp
from scipy.stats import beta as beta_dist
from scipy.stats import rankdata
from sklearn.mixture import GaussianMixture


@dataclass
class MixtureFit:
    clean_prob: np.ndarray  # (N,) float64 posterior of the low-loss component
    normalized: np.ndarray  # (N,) float64 the losses as fitted, in [0, 1]
    kind: str  # "gmm", "bmm" or "truth" (truth_fit)
    params: dict  # per component, clean first: weights and the component parameters

    def density(self, x: np.ndarray) -> np.ndarray:
        """(2, len(x)) weighted component densities at x (for plots)."""
        if self.kind == "truth":  # the ground truth has no densities
            return np.zeros((2, len(x)))
        w = np.asarray(self.params["weights"])[:, None]
        if self.kind == "gmm":
            mu, var = (np.asarray(self.params[k])[:, None] for k in ("means", "variances"))
            return w * np.exp(-((x - mu) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)
        a, b = (np.asarray(self.params[k])[:, None] for k in ("alphas", "betas"))
        return w * beta_dist.pdf(np.clip(x, 1e-4, 1 - 1e-4), a, b)


def normalize_losses(losses, clip_quantile: float = 1.0) -> np.ndarray:
    """Min-max normalised float64 losses, those above the ``clip_quantile`` quantile clipped to it first."""
    x = np.asarray(losses, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("per-sample losses contain NaN or inf")
    if clip_quantile < 1.0 and x.size:
        x = np.minimum(x, np.quantile(x, clip_quantile))
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def fit_gmm(losses, seed: int = 0, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
            clip_quantile: float = 1.0) -> MixtureFit:
    x = normalize_losses(losses, clip_quantile)
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    gmm.fit(x.reshape(-1, 1))
    order = np.argsort(gmm.means_.ravel())  # clean = smaller mean loss
    prob = gmm.predict_proba(x.reshape(-1, 1))[:, order[0]]
    params = {
        "weights": gmm.weights_[order].tolist(),
        "means": gmm.means_.ravel()[order].tolist(),
        "variances": gmm.covariances_.reshape(-1)[order].tolist(),
    }
    return MixtureFit(prob, x, "gmm", params)


def _beta_moments(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted method-of-moments Beta shapes, guarded against degenerate variance."""
    w_sum = max(w.sum(), 1e-12)
    mean = np.clip((w * x).sum() / w_sum, 1e-4, 1 - 1e-4)
    var = max((w * (x - mean) ** 2).sum() / w_sum, 1e-8)
    var = min(var, mean * (1 - mean) * (1 - 1e-6))  # a Beta's variance is below mean(1 - mean)
    common = mean * (1 - mean) / var - 1
    return mean * common, (1 - mean) * common


def fit_bmm(losses, iters: int = 10, eps: float = 1e-4, clip_quantile: float = 1.0,
            posterior: str = "monotone") -> MixtureFit:
    """The two-component Beta mixture of ESC's code (method-of-moments EM from Beta(1, 2) and
    Beta(2, 1)). ``posterior``: "monotone" takes the clean component by its mean and makes its
    posterior non-increasing in the loss, outward from that mean; "code" is ESC's code's clean
    probability, the raw posterior of component 0 (the one started at Beta(1, 2)), never re-identified."""
    x = np.clip(normalize_losses(losses, clip_quantile), eps, 1 - eps)
    alphas, betas, weights = np.array([1.0, 2.0]), np.array([2.0, 1.0]), np.array([0.5, 0.5])

    def log_joint():  # (2, N) log(weight_k * pdf_k(x))
        return np.log(weights)[:, None] + beta_dist.logpdf(x[None, :], alphas[:, None], betas[:, None])

    for _ in range(iters):
        lj = log_joint()
        resp = np.exp(lj - logsumexp(lj, axis=0, keepdims=True))  # E-step
        for k in range(2):  # M-step
            alphas[k], betas[k] = _beta_moments(x, resp[k])
        weights = np.clip(resp.sum(axis=1) / resp.sum(), 1e-6, None)
        weights /= weights.sum()
    lj = log_joint()
    post = np.exp(lj - logsumexp(lj, axis=0, keepdims=True))
    means = alphas / (alphas + betas)
    if posterior == "code":
        params = {"weights": weights.tolist(), "alphas": alphas.tolist(), "betas": betas.tolist()}
        return MixtureFit(post[0], x, "bmm", params)
    order = np.argsort(means)  # clean = smaller mean loss
    params = {"weights": weights[order].tolist(), "alphas": alphas[order].tolist(), "betas": betas[order].tolist()}
    clean = post[order[0]]
    # non-increasing in the loss: below the clean mean each value is raised to the largest clean
    # probability between it and the mean, above it lowered to the smallest one
    by_loss = np.argsort(x, kind="stable")
    v = clean[by_loss]
    split = int(np.searchsorted(x[by_loss], means[order[0]]))
    v[:split] = np.maximum.accumulate(v[: split + 1][::-1])[::-1][:split]  # suffix max, the mean's value included
    v[split:] = np.minimum.accumulate(v[split:])
    clean[by_loss] = v
    return MixtureFit(clean, x, "bmm", params)


def truth_fit(losses, clean_mask: np.ndarray, clip_quantile: float = 1.0) -> MixtureFit:
    """The ground truth as a fit (split.signal=truth, a diagnostic): clean probability 1 for the
    pairs the injected noise left matched, 0 for the rest; ``normalized``, the losses as a fit would
    see them; the "components" are the two true groups (their weights and mean normalised losses)."""
    x = normalize_losses(losses, clip_quantile)
    clean = np.asarray(clean_mask, dtype=bool)
    if len(clean) != len(x):
        raise ValueError(f"the ground truth has {len(clean)} pairs, the losses {len(x)}")
    groups = (clean, ~clean)
    params = {"weights": [float(g.mean()) for g in groups],
              "means": [float(x[g].mean()) if g.any() else float("nan") for g in groups]}
    return MixtureFit(clean.astype(np.float64), x, "truth", params)


def structure_evidence(scores: np.ndarray, clean_prob: np.ndarray) -> np.ndarray:
    """(N,) float64: each pair's clean probability given its structure score alone, calibrated on
    the loss fit itself: the pairs are cut into bins of about equal count by the rank of their
    score (N // 200 of them, 2 to 20; equal scores share a bin) and each bin gets its pairs' mean
    ``clean_prob``. A score that tells nothing about the loss fit's labels gives every bin about
    the overall mean, so the evidence is flat; the noisier the loss labels, the flatter (a
    conservative estimate, never a fitted guess)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n != len(clean_prob):
        raise ValueError(f"the structure holds {n} pairs, the fit {len(clean_prob)}")
    bins = int(np.clip(n // 200, 2, 20))
    where = (rankdata(scores, method="min").astype(np.int64) - 1) * bins // n  # equal scores share a bin
    mean = np.bincount(where, weights=clean_prob, minlength=bins) / np.maximum(np.bincount(where, minlength=bins), 1)
    return mean[where]


def with_structure(fit: MixtureFit, scores: np.ndarray, evidence: np.ndarray | None = None,
                   floor: float = 1e-6) -> MixtureFit:
    """``fit`` with its clean probabilities handed out again by the combined evidence
    (split.structure): the loss fit says *how many* pairs are clean, the loss and the pairs'
    structure scores (data.structure.pair_structure) together say *which*.

    ``evidence``: the loss fit's posterior before any core was taken (default ``fit.clean_prob``).
    Each pair's combined score is logit p_loss + logit p_structure, as two independent pieces of
    evidence, p_structure from ``structure_evidence`` (both clipped to [floor, 1 - floor]).
    ``fit``'s clean probabilities, sorted, then go to the pairs in the order of that score (equal
    scores, as within a bin of saturated posteriors, by the posterior and then the lower loss): the
    highest probability to the highest score. Every count above a cut (the clean subset at 0.5,
    SPS's reliable set at 0.99) stays the loss fit's, so the structure can reorder pairs but never
    empty or flood a subset (ESC then adds its anchors to the clean subset, as without it)."""
    def logit(p):
        p = np.clip(np.asarray(p, dtype=np.float64), floor, 1 - floor)
        return np.log(p) - np.log1p(-p)

    p_loss = fit.clean_prob if evidence is None else np.asarray(evidence, dtype=np.float64)
    score = logit(p_loss) + logit(structure_evidence(scores, p_loss))
    order = np.lexsort((fit.normalized, -p_loss, -score))  # best first
    prob = np.empty_like(fit.clean_prob)
    prob[order] = np.sort(fit.clean_prob)[::-1]
    return dataclasses.replace(fit, clean_prob=prob)


def clean_mean(fit: MixtureFit) -> float:
    """The clean component's mean, on the fit's normalised scale."""
    if fit.kind in ("gmm", "truth"):
        return float(fit.params["means"][0])
    a, b = fit.params["alphas"][0], fit.params["betas"][0]
    return float(a / (a + b))


def clean_std(fit: MixtureFit) -> float:
    """The clean component's standard deviation, on the fit's normalised scale (gmm and bmm)."""
    if fit.kind == "gmm":
        return float(np.sqrt(fit.params["variances"][0]))
    if fit.kind != "bmm":
        raise ValueError(f"a {fit.kind!r} fit has no clean component to take a spread from")
    a, b = fit.params["alphas"][0], fit.params["betas"][0]
    return float(np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1))))


def clean_core(fit: MixtureFit, width: float = 0.0) -> MixtureFit:
    """``fit`` with its clean probability set to 0 above the clean component's mean plus ``width``
    of its standard deviations (split.clean_side=core, split.core_width): only the core of the
    clean component stays clean; width 0 cuts at the mean."""
    cut = clean_mean(fit) + width * clean_std(fit)
    prob = np.where(fit.normalized <= cut, fit.clean_prob, 0.0)
    return dataclasses.replace(fit, clean_prob=prob)


def noisy_threshold(clean_prob: np.ndarray, threshold: float, min_noisy_fraction: float) -> float:
    """The clean-probability cut below or at which pairs are noisy.

    Official fallback (NCR/CREAM/SPS/BiCro): when every pair would be clean, the cut becomes the
    ``min_noisy_fraction`` quantile, so that about that fraction is treated as noisy.
    """
    if min_noisy_fraction > 0 and np.all(clean_prob > threshold):
        return float(np.quantile(clean_prob, min_noisy_fraction))
    return threshold


def fallback_note(cut: float, threshold: float) -> list[str]:
    """The note for a split whose noisy cut fell back from ``threshold`` (noisy_threshold)."""
    if cut == threshold:
        return []
    return [f"every pair looked clean (p > {threshold:g}): the noisy cut fell back to the quantile {cut:.4f}"]
