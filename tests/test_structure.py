"""split.structure=knn: the pairs' model-free structure scores (fastncl.data.structure) and how the
split combines them with the loss fit (methods.mixture.structure_evidence, with_structure)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fastncl.data.split import Split
from fastncl.data.structure import pair_structure
from fastncl.methods.mixture import structure_evidence, with_structure

from helpers import fake_fit, one_thread  # noqa: F401  (one_thread: an autouse fixture)


def _clustered(n_images=120, clusters=12, cpi=1, seed=0):
    """A split whose images and captions both follow hidden clusters: image features near their
    cluster's centre, captions made of their cluster's words plus common ones."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, clusters, n_images)
    centres = rng.normal(size=(clusters, 16))
    images = (centres[label][:, None, :] + 0.5 * rng.normal(size=(n_images, 3, 16))).astype(np.float32)
    n_caps = n_images * cpi
    tokens = np.zeros((n_caps, 6), dtype=np.int64)
    for j in range(n_caps):
        own = 10 + 8 * label[j // cpi] + rng.choice(8, 3, replace=False)  # the cluster's words
        tokens[j, :5] = np.concatenate([own, rng.integers(1, 10, 2)])  # plus two common ones
    lengths = np.full(n_caps, 5, dtype=np.int64)
    return Split(images, tokens, lengths, cpi)


def _shuffled(split, rate, seed=0):
    """caption -> image with ``rate`` of the captions moved to other images; the ground truth."""
    rng = np.random.default_rng(seed)
    own = np.arange(split.num_captions) // split.captions_per_image
    c2i = own.copy()
    moved = rng.choice(len(own), int(rate * len(own)), replace=False)
    c2i[moved] = own[np.roll(moved, 1)]
    return c2i, c2i == own


@pytest.mark.parametrize("cpi", [1, 3])
def test_matched_pairs_share_their_neighbours(cpi):
    split = _clustered(cpi=cpi)
    c2i, clean = _shuffled(split, 0.5)
    scores = pair_structure(split, c2i, k=10)
    assert scores.shape == (split.num_captions,) and scores.dtype == np.float64
    assert (scores >= 0).all() and (scores <= 1).all()
    assert roc_auc_score(clean, scores) > 0.85  # a caption moved within its cluster still fits
    # the same on a second call and from a reference subset of the pairs (large sets)
    assert np.array_equal(scores, pair_structure(split, c2i, k=10))
    sub = pair_structure(split, c2i, k=10, reference=60, seed=3)
    assert np.array_equal(sub, pair_structure(split, c2i, k=10, reference=60, seed=3))
    assert roc_auc_score(clean, sub) > 0.7  # k of 60 pairs, not of 120


def test_structure_without_information_scores_at_chance():
    split = _clustered()
    rng = np.random.default_rng(1)
    split.images[:] = rng.normal(size=split.images.shape)  # images that follow no cluster
    c2i, clean = _shuffled(split, 0.5)
    assert abs(roc_auc_score(clean, pair_structure(split, c2i, k=10)) - 0.5) < 0.12


def test_structure_refuses_a_mismatched_index():
    split = _clustered()
    with pytest.raises(ValueError, match="caption_to_image has 3 entries"):
        pair_structure(split, np.zeros(3, dtype=np.int64))


def test_the_evidence_is_calibrated_on_the_loss_fit():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=2000)
    # a score that says nothing: every bin holds about the overall mean
    flat = structure_evidence(np.zeros(2000), p)
    assert np.allclose(flat, p.mean())  # equal scores share one bin
    noise = structure_evidence(rng.uniform(size=2000), p)
    assert np.abs(noise - p.mean()).max() < 0.15
    # a score that follows the fit: the evidence rises with it, bin by bin
    follow = structure_evidence(p + 0.1 * rng.normal(size=2000), p)
    assert follow.min() < 0.2 and follow.max() > 0.8
    assert len(np.unique(follow)) == 10  # 2000 // 200 bins


def test_with_structure_keeps_the_counts_and_reorders_the_pairs():
    rng = np.random.default_rng(0)
    p = np.clip(rng.beta(0.5, 0.5, size=1000), 0, 1)
    fit = fake_fit(p)
    # an uninformative structure changes nothing
    same = with_structure(fit, np.zeros(1000))
    assert np.array_equal(same.clean_prob, fit.clean_prob)
    # an informative one: the same probabilities, handed to other pairs
    truth = rng.uniform(size=1000) < p  # the pairs p says are clean are mostly clean
    scores = truth + 0.3 * rng.normal(size=1000)
    out = with_structure(fit, scores)
    assert np.array_equal(np.sort(out.clean_prob), np.sort(p))  # every count above any cut is kept
    for cut in (0.5, 0.99):
        assert (out.clean_prob > cut).sum() == (p > cut).sum()
    assert not np.array_equal(out.clean_prob, p)
    assert roc_auc_score(truth, out.clean_prob) > roc_auc_score(truth, p)
    assert np.array_equal(out.normalized, fit.normalized)
    # the core's zeros stay zeros in number: evidence from before the core orders the pairs
    cored = fake_fit(np.where(p > 0.7, p, 0.0))
    out = with_structure(cored, scores, evidence=p)
    assert (out.clean_prob == 0).sum() == (cored.clean_prob == 0).sum()


def test_flat_images_and_a_k_beyond_the_pairs():
    split = _clustered(n_images=8, cpi=5)
    c2i, clean = _shuffled(split, 0.5)
    # k above half the 35 pairs of other images: capped there, and a pair's own image's pairs never count
    capped = pair_structure(split, c2i, k=100)
    assert (capped < 1).any() and np.array_equal(capped, pair_structure(split, c2i, k=17))
    flat = Split(split.images.mean(1), split.tokens, split.lengths, split.captions_per_image)  # (N, D) features
    assert np.array_equal(pair_structure(flat, c2i, k=5), pair_structure(split, c2i, k=5))
    with pytest.raises(ValueError, match="pairs of at least two images"):
        pair_structure(split, np.zeros(split.num_captions, dtype=np.int64))


def test_a_saturated_core_keeps_its_pairs_without_information():
    """The core's pairs, taken from a posterior that is exactly 1 for many of them, stay the core's
    when the structure says nothing: equal combined scores go by the loss."""
    rng = np.random.default_rng(0)
    loss = np.concatenate([rng.gamma(4, 0.02, 600), rng.normal(0.8, 0.05, 400)])
    posterior = np.where(loss < 0.3, 1.0, 0.0)  # saturated
    cored = np.where(loss <= np.median(loss[:600]), posterior, 0.0)  # the core: half the clean side
    fit = fake_fit(cored)
    fit.normalized[:] = loss
    out = with_structure(fit, np.zeros(1000), evidence=posterior)
    assert np.array_equal(out.clean_prob > 0.5, cored > 0.5)
