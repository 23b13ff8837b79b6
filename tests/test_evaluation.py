"""fastncl.evaluation: R@K both ways, RSum, the COCO 1K 5-fold protocol and split diagnostics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastncl.evaluation import fold5_metrics, retrieval_metrics, split_diagnostics

KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}


def perfect(n_images: int, cpi: int) -> torch.Tensor:
    """1 for an image's own captions, 0 elsewhere."""
    return (torch.arange(n_images).view(-1, 1) == torch.arange(n_images * cpi).view(1, -1) // cpi).float()


def naive_ranks(sim: np.ndarray, cpi: int):
    """0-based ranks by counting: a column ranks behind every larger score and every equal score
    at a smaller index (the stable tie-break); i2t takes an image's best ground-truth caption."""
    n_img, n_cap = sim.shape

    def rank(row, j):
        return int(np.sum(row > row[j]) + np.sum(row[:j] == row[j]))

    i2t = [min(rank(sim[i], j) for j in range(i * cpi, (i + 1) * cpi)) for i in range(n_img)]
    t2i = [rank(sim[:, k], k // cpi) for k in range(n_cap)]
    return np.array(i2t), np.array(t2i)


def expected_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict:
    out = {f"{name}_r{r}": 100.0 * np.mean(ranks < r) for name, ranks in (("i2t", i2t), ("t2i", t2i)) for r in (1, 5, 10)}
    out["rsum"] = sum(out.values())
    return out


def assert_metrics(actual: dict, expected: dict):
    assert set(actual) == set(expected) == KEYS
    for key in KEYS:
        # the recalls are fp32 means (retrieval_metrics), exact to ~1e-7 relative
        assert actual[key] == pytest.approx(expected[key], abs=1e-4), key


@pytest.mark.parametrize("cpi", (1, 5))
def test_perfect_matrix_gives_100_everywhere(cpi):
    out = retrieval_metrics(perfect(12, cpi), cpi)
    assert set(out) == KEYS
    for key in KEYS - {"rsum"}:
        assert out[key] == 100.0
    assert out["rsum"] == 600.0


def test_keys_and_types():
    out = retrieval_metrics(perfect(3, 5).numpy(), 5)  # numpy input too
    assert set(out) == KEYS
    assert all(isinstance(v, float) for v in out.values())


def test_recalls_are_exact_float64_values():
    """378 of 1000 is stored as 37.8, not the float32 mean's 37.80000060796738; the RSum of equal
    recalls in another order is the same number."""
    n = 1000
    sim = torch.zeros(n, n)
    hit = torch.arange(378)
    sim[hit, hit] = 1.0  # 378 images rank their caption first; the others tie with every column
    m = retrieval_metrics(sim, 1)
    assert m["i2t_r1"] == 37.8 and json.dumps(m["i2t_r1"]) == "37.8"
    assert m["rsum"] == round(sum(m[k] for k in KEYS - {"rsum"}), 10)


def test_ground_truth_at_rank_two():
    n = 12
    sim = 0.5 * torch.eye(n)
    sim[torch.arange(n), (torch.arange(n) + 1) % n] = 1.0  # one wrong caption above each image's own
    out = retrieval_metrics(sim, 1)
    assert out["i2t_r1"] == 0.0
    assert out["i2t_r5"] == 100.0 and out["i2t_r10"] == 100.0
    # by column, caption j's own image (0.5) is also behind image j - 1 (1.0): rank 2 as well
    assert out["t2i_r1"] == 0.0 and out["t2i_r5"] == 100.0
    assert out["rsum"] == 400.0


def test_ground_truth_rank_boundaries():
    # image i's caption sits at 0-based rank i: R@K counts ranks 0..K-1
    n = 12
    sim = torch.zeros(n, n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for r, j in enumerate(others[:i]):  # i wrong captions above the right one
            sim[i, j] = 10.0 - r
        sim[i, i] = 1.0
    out = retrieval_metrics(sim, 1)
    assert out["i2t_r1"] == pytest.approx(100 / 12)
    assert out["i2t_r5"] == pytest.approx(500 / 12)
    assert out["i2t_r10"] == pytest.approx(1000 / 12)


def test_best_of_five_captions():
    # each image ranks exactly one of its five captions (the third) first, the other four last
    n_img, cpi = 4, 5
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(n_img, n_img * cpi, generator=gen)  # in [0, 1)
    for i in range(n_img):
        sim[i, i * cpi : (i + 1) * cpi] = -10.0
        sim[i, i * cpi + 2] = 10.0
    out = retrieval_metrics(sim, cpi)
    assert out["i2t_r1"] == 100.0  # the best of the five counts
    # text -> image: the third captions find their image first; the other 16 captions rank it last of 4
    assert out["t2i_r1"] == pytest.approx(100 * 4 / 20)
    assert out["t2i_r5"] == 100.0
    assert_metrics(out, expected_metrics(*naive_ranks(sim.numpy(), cpi)))


def test_constant_matrix_gives_no_free_credit_cpi1():
    # all ties: the stable tie-break puts column j at rank j, so only small indices get credit
    n = 20
    out = retrieval_metrics(torch.full((n, n), 0.3), 1)
    # image i's caption i is at rank i: R@K = K / 20; caption i's image i likewise
    expected = {"i2t_r1": 5.0, "i2t_r5": 25.0, "i2t_r10": 50.0, "t2i_r1": 5.0, "t2i_r5": 25.0, "t2i_r10": 50.0}
    expected["rsum"] = 160.0
    assert_metrics(out, expected)


def test_constant_matrix_gives_no_free_credit_cpi5():
    n_img, cpi = 4, 5
    out = retrieval_metrics(torch.zeros(n_img, n_img * cpi), cpi)
    # i2t: image i's best caption 5i sits at rank 5i -> ranks 0, 5, 10, 15
    # t2i: caption k's image k // 5 sits at rank k // 5 -> ranks 0..3, five captions each
    expected = {"i2t_r1": 25.0, "i2t_r5": 25.0, "i2t_r10": 50.0, "t2i_r1": 25.0, "t2i_r5": 100.0, "t2i_r10": 100.0}
    expected["rsum"] = 325.0
    assert_metrics(out, expected)


@pytest.mark.parametrize("cpi", (1, 2, 5))
@pytest.mark.parametrize("seed", (0, 1))
def test_matches_counting_ranks_on_random_matrices_with_ties(cpi, seed):
    rng = np.random.default_rng(seed)
    n_img = 30
    sim = rng.integers(0, 4, size=(n_img, n_img * cpi)).astype(np.float32)  # many ties
    sim[np.arange(n_img).repeat(cpi), np.arange(n_img * cpi)] += rng.integers(0, 3, n_img * cpi)
    assert_metrics(retrieval_metrics(sim, cpi), expected_metrics(*naive_ranks(sim, cpi)))


def test_more_than_one_chunk_of_rows():
    # _ranks works in chunks of 256 rows; 300 images and 1500 captions cross a chunk boundary
    n_img, cpi = 300, 5
    gen = torch.Generator().manual_seed(3)
    sim = torch.rand(n_img, n_img * cpi, generator=gen) + 0.02 * perfect(n_img, cpi)
    assert_metrics(retrieval_metrics(sim, cpi), expected_metrics(*naive_ranks(sim.numpy(), cpi)))


@pytest.mark.parametrize("shape, cpi", (((3, 14), 5), ((3, 16), 5), ((4, 4), 5), ((5, 4), 1)))
def test_shape_mismatch_raises(shape, cpi):
    with pytest.raises(ValueError, match="captions per image"):
        retrieval_metrics(torch.zeros(shape), cpi)


# ---------------------------------------------------------------------------------------------
# fold5_metrics


def five_folds(n_images=20, fold_images=4, cpi=5, extra_images=0):
    """Folds 0 and 1 perfect, folds 2-4 constant; every entry outside the diagonal fold blocks is
    10 (it would rank first if the folds leaked into one another)."""
    total = n_images + extra_images
    sim = torch.full((total, total * cpi), 10.0)
    for f in range(n_images // fold_images):
        rows = slice(f * fold_images, (f + 1) * fold_images)
        cols = slice(f * fold_images * cpi, (f + 1) * fold_images * cpi)
        sim[rows, cols] = perfect(fold_images, cpi) if f < 2 else torch.zeros(fold_images, fold_images * cpi)
    return sim


def test_fold5_metrics_averages_the_folds():
    sim = five_folds()
    out = fold5_metrics(sim, 5, fold_images=4)
    # perfect folds: 100 everywhere; constant 4-image folds (see the cpi5 test above):
    # i2t 25 / 25 / 50, t2i 25 / 100 / 100
    expected = {
        "i2t_r1": (2 * 100 + 3 * 25) / 5,
        "i2t_r5": (2 * 100 + 3 * 25) / 5,
        "i2t_r10": (2 * 100 + 3 * 50) / 5,
        "t2i_r1": (2 * 100 + 3 * 25) / 5,
        "t2i_r5": 100.0,
        "t2i_r10": 100.0,
    }
    expected["rsum"] = sum(expected.values())
    assert expected["rsum"] == 435.0
    assert_metrics(out, expected)
    # the average of the per-fold metrics, fold by fold
    folds = [retrieval_metrics(sim[4 * f : 4 * f + 4, 20 * f : 20 * f + 20], 5) for f in range(5)]
    for key in KEYS:
        assert out[key] == pytest.approx(np.mean([m[key] for m in folds]))


def test_fold5_metrics_accepts_numpy_and_ignores_a_partial_fold():
    sim = five_folds(extra_images=3).numpy()  # 23 images: five whole folds of 4, 3 left over
    assert_metrics(fold5_metrics(sim, 5, fold_images=4), fold5_metrics(five_folds(), 5, fold_images=4))


def test_fold5_metrics_needs_one_whole_fold():
    with pytest.raises(ValueError, match="at least 4 images"):
        fold5_metrics(torch.zeros(3, 15), 5, fold_images=4)


# ---------------------------------------------------------------------------------------------
# split_diagnostics


def diagnostics(*args):
    """split_diagnostics as the run folder holds it (metrics.jsonl, results.json)."""
    return split_diagnostics(*args).to_json()


CLEAN_PROB = np.array([0.9, 0.8, 0.1, 0.2, 0.6, 0.05])
CLEAN_MASK = np.array([True, True, False, True, False, False])


def test_split_diagnostics_hand_computed():
    out = diagnostics(CLEAN_PROB, 0.5, CLEAN_MASK)
    # detected noisy (prob <= 0.5): pairs 2, 3, 5; truly noisy: 2, 4, 5 -> 2 true positives
    assert out["noisy_cut"] == 0.5 and isinstance(out["noisy_cut"], float)
    assert out["detected_noisy"] == 3
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    # AUC of clean_prob for "clean": clean {0.9, 0.8, 0.2} against noisy {0.1, 0.6, 0.05}:
    # 8 of the 9 (clean, noisy) pairs are ordered correctly (0.2 < 0.6 is not)
    assert out["auc"] == pytest.approx(8 / 9)


def test_split_diagnostics_cut_is_inclusive_and_f1_is_harmonic():
    out = diagnostics(CLEAN_PROB, 0.6, CLEAN_MASK)
    # detected: 2, 3, 4, 5 (0.6 <= 0.6) -> 3 of 4 truly noisy, all 3 noisy found
    assert out["detected_noisy"] == 4
    assert out["precision"] == pytest.approx(3 / 4)
    assert out["recall"] == pytest.approx(1.0)
    assert out["f1"] == pytest.approx(2 * 0.75 / 1.75)


def test_split_diagnostics_perfect_separation():
    out = diagnostics(CLEAN_PROB, 0.05, np.array([True, True, True, True, True, False]))
    assert (out["precision"], out["recall"], out["f1"], out["auc"]) == (1.0, 1.0, 1.0, 1.0)


def test_split_diagnostics_all_clean_has_no_auc():
    out = diagnostics(CLEAN_PROB, 0.5, np.ones(6, dtype=bool))
    assert out["auc"] is None
    assert out["detected_noisy"] == 3
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0


def test_split_diagnostics_all_noisy_has_no_auc():
    out = diagnostics(CLEAN_PROB, 0.5, np.zeros(6, dtype=bool))
    assert out["auc"] is None
    assert out["precision"] == 1.0 and out["recall"] == pytest.approx(0.5)


def test_split_diagnostics_nothing_detected():
    out = diagnostics(CLEAN_PROB, 0.01, CLEAN_MASK)
    assert out["detected_noisy"] == 0
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0


def test_split_diagnostics_without_ground_truth():
    out = diagnostics(CLEAN_PROB, 0.5, None)
    assert out == {"noisy_cut": 0.5, "detected_noisy": 3}
    subsets = {"reliable": np.array([0, 1]), "noisy": np.array([2, 3, 5])}
    out = diagnostics(CLEAN_PROB, 0.5, None, subsets)
    assert out["subsets"] == {"reliable": {"size": 2}, "noisy": {"size": 3}}


def test_split_diagnostics_subset_composition():
    subsets = {
        "reliable": np.array([0, 1]),
        "quasi_clean": np.array([3, 4]),
        "noisy": np.array([2, 5]),
        "empty": np.array([], dtype=np.int64),
    }
    out = diagnostics(CLEAN_PROB, 0.5, CLEAN_MASK, subsets)
    assert out["subsets"] == {
        "reliable": {"size": 2, "clean": 2},
        "quasi_clean": {"size": 2, "clean": 1},
        "noisy": {"size": 2, "clean": 0},
        "empty": {"size": 0, "clean": 0},
    }
    assert out["precision"] == pytest.approx(2 / 3)  # subsets do not change the detection metrics


def _tiny_split(n_images: int, cpi: int, seed: int = 0):
    from fastncl.data.split import Split
    from helpers import IMAGE_DIM, REGIONS, VOCAB

    g = np.random.default_rng(seed)
    n = n_images * cpi
    lengths = g.integers(2, 7, n)
    tokens = g.integers(1, VOCAB, (n, 6)) * (np.arange(6) < lengths[:, None])
    images = g.standard_normal((n_images, REGIONS, IMAGE_DIM)).astype(np.float32)
    return Split(images, tokens, lengths, cpi)


@pytest.mark.parametrize("chunk", (1, 4, 100))
def test_similarity_matrix_scores_the_global_embeddings_in_any_chunking(chunk):
    """The chunked encoders behind evaluation (image_chunks, caption_chunks) and global_embeddings
    (warmup_signals' structure consistency) see the same model: a vse model's matrix is the product
    of its global embeddings, whatever the chunk size, and the models are left in their mode."""
    from fastncl.evaluation import global_embeddings, similarity_matrix
    from helpers import tiny_model

    split = _tiny_split(7, 2)
    model = tiny_model(0, dropout=0.5)  # dropout: a model left in training mode would differ
    img, cap = global_embeddings(model, split, torch.device("cpu"), chunk)
    assert model.training and img.shape == (7, 16) and cap.shape == (14, 16)
    sim = similarity_matrix([model], split, torch.device("cpu"), chunk)
    assert model.training
    torch.testing.assert_close(sim, img @ cap.T, rtol=1e-6, atol=1e-6)
    other = tiny_model(1)
    two = similarity_matrix([model, other], split, torch.device("cpu"), chunk)
    torch.testing.assert_close(two, (sim + similarity_matrix([other], split, torch.device("cpu"), 3)) / 2,
                               rtol=1e-6, atol=1e-6)
