"""fastncl.methods.mixture: the two-component mixtures that give every pair its clean probability."""
from __future__ import annotations

import numpy as np
import pytest

import fastncl.methods.mixture as mixture
from fastncl.methods.mixture import fit_bmm, fit_gmm, noisy_threshold, normalize_losses


def beta_mixture(n=4000, clean_weight=0.6, clean=(2, 8), noisy=(8, 2), seed=0):
    """Losses from clean_weight * Beta(clean) + (1 - clean_weight) * Beta(noisy), and the clean labels."""
    rng = np.random.default_rng(seed)
    is_clean = rng.random(n) < clean_weight
    losses = np.where(is_clean, rng.beta(*clean, n), rng.beta(*noisy, n))
    return losses, is_clean


def beta_means(fit) -> np.ndarray:
    a, b = np.asarray(fit.params["alphas"]), np.asarray(fit.params["betas"])
    return a / (a + b)


def assert_valid_fit(fit, n):
    assert fit.clean_prob.shape == (n,) and fit.clean_prob.dtype == np.float64
    assert np.all(np.isfinite(fit.clean_prob))
    assert np.all((fit.clean_prob >= 0) & (fit.clean_prob <= 1))
    assert fit.normalized.shape == (n,) and np.all((fit.normalized >= 0) & (fit.normalized <= 1))
    for name, value in fit.params.items():
        value = np.asarray(value, dtype=np.float64)
        assert value.shape == (2,) and np.all(np.isfinite(value)), (name, value)
    assert np.isclose(sum(fit.params["weights"]), 1.0)


# ---------------------------------------------------------------------------------------------
# fit_bmm


def test_fit_bmm_recovers_a_known_beta_mixture():
    losses, is_clean = beta_mixture()
    fit = fit_bmm(losses, iters=100)  # run EM to convergence: this checks the E and M steps
    assert_valid_fit(fit, len(losses))
    assert fit.kind == "bmm"
    # fit_bmm fits the min-max normalised losses, so the true means move with the normalisation
    span = losses.max() - losses.min()
    true_means = (np.array([0.2, 0.8]) - losses.min()) / span
    np.testing.assert_allclose(beta_means(fit), true_means, atol=0.05)
    np.testing.assert_allclose(fit.params["weights"], [0.6, 0.4], atol=0.05)
    # the losses as fitted: normalised, then clipped to [eps, 1 - eps] (a Beta density is infinite at 0 and 1)
    np.testing.assert_allclose(fit.normalized, np.clip((losses - losses.min()) / span, 1e-4, 1 - 1e-4))


def test_fit_bmm_default_iterations_separate_clean_from_noisy():
    losses, is_clean = beta_mixture()
    fit = fit_bmm(losses)  # the official 10 EM iterations
    assert_valid_fit(fit, len(losses))
    means = beta_means(fit)
    assert means[0] < 0.3 < 0.6 < means[1]
    assert fit.clean_prob[losses < 0.2].mean() > 0.95
    assert fit.clean_prob[losses > 0.8].mean() < 0.05
    assert fit.clean_prob[is_clean].mean() > 0.85 and fit.clean_prob[~is_clean].mean() < 0.1
    accuracy = np.mean((fit.clean_prob > 0.5) == is_clean)
    assert accuracy > 0.95


@pytest.mark.parametrize(
    "losses",
    [
        pytest.param(np.r_[np.zeros(1000), np.ones(50), np.random.default_rng(1).random(500), np.full(300, 0.5)],
                     id="zeros-ones-halves"),
        pytest.param(np.r_[np.zeros(2000), np.random.default_rng(2).random(1000)], id="mostly-zeros"),
        pytest.param(np.r_[np.zeros(500), np.ones(100)], id="two-values"),
        pytest.param(np.full(100, 3.0), id="constant"),
        pytest.param(np.array([0.1, 0.9]), id="two-samples"),
        pytest.param(np.r_[np.full(300, 2.0), np.full(300, 7.5), np.linspace(2.0, 7.5, 101)], id="ties-at-min-and-max"),
    ],
)
def test_fit_bmm_finite_with_exact_extremes_and_ties(losses):
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow is harmless
        fit = fit_bmm(losses)
    assert_valid_fit(fit, len(losses))
    a, b = np.asarray(fit.params["alphas"]), np.asarray(fit.params["betas"])
    assert np.all(a > 0) and np.all(b > 0)
    # the posterior at the smallest loss is at least that at the largest one
    assert fit.clean_prob[np.argmin(losses)] >= fit.clean_prob[np.argmax(losses)]


def esc_code_bmm(losses: np.ndarray, iters: int = 10) -> np.ndarray:
    """ESC's (BiCro's) Beta mixture restated from its code's steps in plain float64 (no log-space),
    with the one departure fastncl keeps: the posterior is evaluated on the clipped losses (the code
    evaluates it on the unclipped ones, inf / inf at exactly 0 or 1 with a shape below 1):
    min-max normalise, clip to [1e-4, 1 - 1e-4], start at Beta(1, 2) and Beta(2, 1) with weights
    1/2, E-step weighted likelihoods floored at 1e-12 and normalised, M-step weighted
    method-of-moments with the mean responsibilities as weights; the clean probability is
    component 0's posterior (eps 1e-12 in the denominator)."""
    from scipy.stats import beta as beta_dist

    x = np.clip((losses - losses.min()) / (losses.max() - losses.min()), 1e-4, 1 - 1e-4)
    alphas, betas, weights = np.array([1.0, 2.0]), np.array([2.0, 1.0]), np.array([0.5, 0.5])

    def likelihoods():
        return np.stack([weights[k] * beta_dist.pdf(x, alphas[k], betas[k]) for k in range(2)])

    for _ in range(iters):
        r = np.maximum(likelihoods(), 1e-12)
        r = r / r.sum(axis=0)
        for k in range(2):
            mean = (r[k] * x).sum() / r[k].sum()
            var = (r[k] * (x - mean) ** 2).sum() / r[k].sum()
            alphas[k] = mean * (mean * (1 - mean) / var - 1)
            betas[k] = alphas[k] * (1 - mean) / mean
        weights = r.sum(axis=1) / r.sum()
    lik = likelihoods()
    return lik[0] / (lik.sum(axis=0) + 1e-12)


@pytest.mark.parametrize("losses, apart", [
    (beta_mixture(clean_weight=0.3, seed=5)[0], 0.005),
    (np.r_[np.zeros(2000), np.random.default_rng(2).random(1000)], 0.5),  # the raw posterior rises again at high losses
])
def test_fit_bmm_code_posterior_is_escs_codes(losses, apart):
    """esc.bmm_posterior=code (esc-official): component 0's raw posterior, as ESC's code computes it
    (on the clipped losses);
    the default (monotone, re-identified by its mean) differs from it on these losses by more than ``apart``."""
    code = fit_bmm(losses, posterior="code").clean_prob
    np.testing.assert_allclose(code, esc_code_bmm(losses), rtol=1e-6, atol=1e-9)
    assert np.abs(fit_bmm(losses).clean_prob - code).max() > apart


def test_fit_bmm_clean_component_is_the_low_mean_one_when_most_losses_are_high():
    losses, is_clean = beta_mixture(clean_weight=0.15, seed=4)
    fit = fit_bmm(losses)
    assert_valid_fit(fit, len(losses))
    means = beta_means(fit)
    assert means[0] < means[1]
    assert fit.params["weights"][0] < fit.params["weights"][1]  # the clean component is the small one here
    assert fit.clean_prob[is_clean].mean() > fit.clean_prob[~is_clean].mean() + 0.5
    assert fit.clean_prob[losses < 0.2].mean() > 0.5 > fit.clean_prob[losses > 0.8].mean()


def test_fit_bmm_clean_component_found_after_fitting_not_by_index(monkeypatch):
    """Swap the components in the first M-step so that EM ends with component 0 the *high*-mean
    one; fit_bmm must still report the low-mean component as clean."""
    losses, is_clean = beta_mixture(seed=5)
    moments = mixture._beta_moments
    calls = []

    def swapped_first_m_step(x, w):
        # two components: the other component's responsibilities are 1 - w
        shapes = moments(x, 1 - w) if len(calls) < 2 else moments(x, w)
        calls.append(shapes)
        return shapes

    monkeypatch.setattr(mixture, "_beta_moments", swapped_first_m_step)
    fit = fit_bmm(losses)
    (a0, b0), (a1, b1) = calls[-2], calls[-1]  # the last M-step's components 0 and 1
    assert a0 / (a0 + b0) > a1 / (a1 + b1), "precondition: EM ended with the components in swapped order"
    assert_valid_fit(fit, len(losses))
    assert beta_means(fit)[0] < beta_means(fit)[1]
    assert fit.clean_prob[is_clean].mean() > 0.7
    assert fit.clean_prob[~is_clean].mean() < 0.1


def test_fit_bmm_density_has_two_rows():
    losses, _ = beta_mixture(n=500)
    fit = fit_bmm(losses)
    grid = np.linspace(0, 1, 11)  # includes exactly 0 and 1
    dens = fit.density(grid)
    assert dens.shape == (2, 11) and np.all(np.isfinite(dens)) and np.all(dens >= 0)


# ---------------------------------------------------------------------------------------------
# fit_gmm


def test_fit_gmm_clean_probability_decreases_with_loss():
    losses, is_clean = beta_mixture()
    fit = fit_gmm(losses)
    assert_valid_fit(fit, len(losses))
    assert fit.kind == "gmm"
    assert fit.params["means"][0] < fit.params["means"][1]
    order = np.argsort(losses)
    lowest, highest = order[:400], order[-400:]
    assert fit.clean_prob[lowest].min() > 0.9
    assert fit.clean_prob[highest].max() < 0.1
    assert fit.clean_prob[is_clean].mean() > fit.clean_prob[~is_clean].mean() + 0.8
    # across the bulk of the data (between the two means) the posterior never increases with loss
    x = fit.normalized
    between = order[(x[order] > fit.params["means"][0]) & (x[order] < fit.params["means"][1])]
    assert np.all(np.diff(fit.clean_prob[between]) <= 1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_fit_gmm_clean_component_is_low_mean_for_every_initialisation(seed):
    # mostly high losses; scikit-learn's component order depends on the seed (on this data seed 3
    # puts the low-mean component first and seeds 0, 1, 2, 4 the high-mean one); fit_gmm's answer must not
    losses, is_clean = beta_mixture(clean_weight=0.1, seed=7)
    fit = fit_gmm(losses, seed=seed)
    assert_valid_fit(fit, len(losses))
    assert fit.params["means"][0] < fit.params["means"][1]
    assert fit.params["weights"][0] < 0.5
    assert fit.clean_prob[is_clean].mean() > 0.8 and fit.clean_prob[~is_clean].mean() < 0.2


def test_fit_gmm_finite_with_ties_and_extremes():
    rng = np.random.default_rng(8)
    losses = np.r_[np.zeros(1000), np.ones(50), rng.random(500), np.full(300, 0.5)]
    fit = fit_gmm(losses)
    assert_valid_fit(fit, len(losses))
    assert fit.clean_prob[losses == 0].min() > fit.clean_prob[losses == 1].max()


# ---------------------------------------------------------------------------------------------
# inputs, dtypes, thresholds


@pytest.mark.parametrize("fit", (fit_bmm, fit_gmm), ids=("bmm", "gmm"))
@pytest.mark.parametrize("dtype", (np.float32, np.float64, np.float16))
def test_fits_work_in_float64(fit, dtype):
    losses, _ = beta_mixture(n=1000)
    result = fit(losses.astype(dtype))
    assert result.clean_prob.dtype == np.float64
    assert result.normalized.dtype == np.float64
    assert_valid_fit(result, 1000)


def test_fits_accept_torch_tensors_and_lists():
    torch = pytest.importorskip("torch")
    losses, _ = beta_mixture(n=500)
    reference = fit_bmm(losses)
    for converted in (torch.tensor(losses, dtype=torch.float64), losses.tolist()):
        np.testing.assert_array_equal(fit_bmm(converted).clean_prob, reference.clean_prob)


@pytest.mark.parametrize("bad", (np.nan, np.inf, -np.inf))
def test_normalize_losses_rejects_non_finite(bad):
    losses = np.array([0.1, 0.5, bad, 0.3])
    with pytest.raises(ValueError, match="NaN or inf"):
        normalize_losses(losses)
    for fit in (fit_bmm, fit_gmm):
        with pytest.raises(ValueError, match="NaN or inf"):
            fit(losses)


def test_normalize_losses_min_max():
    np.testing.assert_allclose(normalize_losses([2.0, 4.0, 3.0, 2.5]), [0.0, 1.0, 0.5, 0.25])
    out = normalize_losses(np.full(5, 7.0))  # no spread: all zeros, not NaN
    assert out.dtype == np.float64 and np.array_equal(out, np.zeros(5))


def test_noisy_threshold_normal_case_returns_the_threshold():
    clean_prob = np.array([0.9, 0.2, 0.7, 0.95])  # one pair at or below the threshold
    assert noisy_threshold(clean_prob, 0.5, 0.1) == 0.5
    assert noisy_threshold(np.array([0.9, 0.5, 0.7]), 0.5, 0.1) == 0.5  # equality counts as noisy


def test_noisy_threshold_falls_back_to_the_quantile_when_every_pair_is_clean():
    clean_prob = np.linspace(0.6, 1.0, 101)  # every pair above 0.5
    cut = noisy_threshold(clean_prob, 0.5, 0.1)
    assert isinstance(cut, float)
    assert cut == pytest.approx(float(np.quantile(clean_prob, 0.1)))
    assert cut == pytest.approx(0.64)
    assert np.mean(clean_prob <= cut) == pytest.approx(0.1, abs=0.011)


def test_noisy_threshold_no_fallback_when_the_fraction_is_zero():
    clean_prob = np.linspace(0.6, 1.0, 11)
    assert noisy_threshold(clean_prob, 0.5, 0.0) == 0.5


def test_fit_bmm_largest_losses_are_not_clean_when_many_losses_are_zero():
    """Hinge losses are often exactly 0: a U-shaped clean component must not hand the largest
    losses a high clean probability."""
    rng = np.random.default_rng(0)
    losses = np.concatenate([np.zeros(2000), rng.beta(2, 8, 1000), rng.beta(8, 2, 1500)])
    fit = fit_bmm(losses)
    order = np.argsort(losses, kind="stable")
    assert fit.clean_prob[order[:2000]].min() > 0.9  # the zeros are clean
    assert fit.clean_prob[order[-500:]].max() < 0.5  # the largest losses are noisy
    assert np.all(np.diff(fit.clean_prob[order]) <= 1e-12)  # non-increasing in the loss


@pytest.mark.parametrize("seed", range(4))
def test_fit_bmm_clean_probability_never_increases_with_the_loss(seed):
    losses, _ = beta_mixture(n=2000, seed=seed)
    losses[:50] = losses.min()  # a spike at the smallest loss, where a shape < 1 density is infinite
    fit = fit_bmm(losses)
    order = np.argsort(losses, kind="stable")
    assert np.all(np.diff(fit.clean_prob[order]) <= 1e-12)


@pytest.mark.parametrize("fit", (fit_gmm, fit_bmm))
def test_clip_quantile_keeps_a_few_extreme_losses_from_deciding_the_split(fit):
    """Two overlapping loss modes (40 % clean) and 0.5 % extreme losses, as on the emoji set at 60 %
    noise: min-max normalisation squeezes the modes together and the fit calls most pairs clean;
    clipping at the 99th percentile first recovers a clean set of about the right size and purity."""
    rng = np.random.default_rng(0)
    n = 12000
    is_clean = rng.random(n) < 0.4
    losses = np.where(is_clean, rng.normal(0.20, 0.02, n), rng.normal(0.26, 0.025, n))
    extreme = rng.random(n) < 0.005
    losses[extreme] = rng.uniform(0.4, 0.8, extreme.sum())
    plain, clipped = fit(losses), fit(losses, clip_quantile=0.99)
    assert_valid_fit(clipped, n)
    chosen = plain.clean_prob > 0.5
    assert chosen.sum() > 1.7 * is_clean.sum() and is_clean[chosen].mean() < 0.6  # the failure
    chosen = clipped.clean_prob > 0.5
    assert 0.8 < chosen.sum() / is_clean.sum() < 1.4 and is_clean[chosen].mean() > 0.75
    assert np.all(np.diff(clipped.clean_prob[np.argsort(losses)][-100:]) <= 1e-12)  # the clipped tail: noisy alike


def test_normalize_losses_clips_above_the_quantile():
    x = np.arange(101, dtype=np.float64)  # quantile 0.9 = 90
    out = normalize_losses(x, clip_quantile=0.9)
    np.testing.assert_allclose(out[:91], x[:91] / 90)
    assert np.all(out[90:] == 1.0)
    np.testing.assert_array_equal(normalize_losses(x, 1.0), x / 100)


@pytest.mark.parametrize("fit", [fit_gmm, fit_bmm])
def test_the_clean_core_is_the_clean_side_up_to_the_clean_mean(fit):
    losses, _ = beta_mixture()
    full = fit(losses)
    core = mixture.clean_core(full)
    mean = mixture.clean_mean(full)
    if full.kind == "bmm":
        assert mean == pytest.approx(beta_means(full)[0])
    else:
        assert mean == full.params["means"][0]
    below = full.normalized <= mean
    assert 0 < below.sum() < (full.clean_prob > 0.5).sum()  # a strict part of the clean side
    assert np.array_equal(core.clean_prob[below], full.clean_prob[below]) and (core.clean_prob[~below] == 0).all()
    assert np.array_equal(core.normalized, full.normalized) and core.params == full.params


@pytest.mark.parametrize("fit", [fit_gmm, fit_bmm])
def test_a_wider_core_reaches_further_into_the_clean_side(fit):
    """split.core_width: the core ends at the clean mean plus that many of the clean component's
    standard deviations; the cores nest, and a wide enough one is the whole clean side."""
    losses, _ = beta_mixture()
    full = fit(losses)
    std = mixture.clean_std(full)
    if full.kind == "gmm":
        assert std == pytest.approx(np.sqrt(full.params["variances"][0]))
    else:  # a Beta(a, b)'s spread
        a, b = full.params["alphas"][0], full.params["betas"][0]
        assert std == pytest.approx(np.sqrt(a * b / (a + b) ** 2 / (a + b + 1)))
    mean = mixture.clean_mean(full)
    kept = [(mixture.clean_core(full, width).clean_prob > 0.5).sum() for width in (0.0, 0.5, 1.0)]
    assert kept[0] < kept[1] < kept[2] <= (full.clean_prob > 0.5).sum()
    half = mixture.clean_core(full, 0.5)
    inside = full.normalized <= mean + 0.5 * std
    assert np.array_equal(half.clean_prob[inside], full.clean_prob[inside]) and (half.clean_prob[~inside] == 0).all()
    np.testing.assert_array_equal(mixture.clean_core(full, 1e6).clean_prob, full.clean_prob)
    np.testing.assert_array_equal(mixture.clean_core(full, 0.0).clean_prob, mixture.clean_core(full).clean_prob)
