"""fastncl.methods: subsets, labels, per-batch objectives and curricula, on hand-built tensors.

Expected values are written with the public ops of fastncl.kernels (the one definition of each
formula) or by hand; the ops themselves are tested in test_kernels_reference.py.
"""
from __future__ import annotations

import io
import math
import tokenize
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastncl import kernels
from fastncl.data.batches import Batch
from fastncl.methods import ESC, NCR, SPS, Vanilla, build_method
from fastncl.kernels import AUTO
from fastncl.methods.losses import bicro_consistency, hinge_confidence, pseudo_negative, soft_margin, soft_triplet
from fastncl.models import Encoding, forward_pairs
from fastncl.step import Precision
from fastncl.train import Trainer

from helpers import one_thread  # noqa: F401 (an autouse fixture)
from helpers import code_config as config  # the methods as their codes train (CODE_LOSS) unless a test says otherwise
from helpers import ROOT, close, fake_fit, tiny_batch, tiny_model


class FixedSim:
    """A stand-in backbone whose similarity matrix is given: hand-built sims through forward_pairs."""

    def __init__(self, sim: torch.Tensor):
        self.sim = sim

    def encode_images(self, images):
        return Encoding(images, images)

    def encode_captions(self, tokens, lengths):
        return Encoding(tokens, tokens)

    def similarity(self, images, captions):
        return self.sim


def fixed_batch(size: int) -> Batch:
    return Batch(torch.arange(size), torch.zeros(size, 1, 1), torch.ones(size, 1, dtype=torch.long),
                 torch.ones(size, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# SPS subsets and proxy labels


def test_sps_subsets_three_way_split():
    method = SPS(config())  # epsilon_1 = 0.99, epsilon_2 = 0.5
    p = [0.995, 0.999, 0.99, 0.7, 0.5, 0.3, 0.0, 1.0, 0.5000001]
    sub = method.subsets(fake_fit(p), np.zeros(len(p), bool), co_epoch=0)
    assert list(sub) == ["reliable", "quasi_clean", "noisy"]  # primary first
    assert sub["reliable"].tolist() == [0, 1, 7]  # p > eps1
    assert sub["quasi_clean"].tolist() == [2, 3, 8]  # eps2 < p <= eps1
    assert sub["noisy"].tolist() == [4, 5, 6]  # p <= eps2


def test_sps_subsets_follow_the_configured_thresholds():
    method = SPS(config(("sps.reliable_threshold", 0.6), ("sps.noisy_threshold", 0.2),
                        ("sps.min_reliable_fraction", 0.0)))
    p = [0.61, 0.6, 0.3, 0.2, 0.1]
    sub = method.subsets(fake_fit(p), np.zeros(5, bool), 0)
    assert (sub["reliable"].tolist(), sub["quasi_clean"].tolist(), sub["noisy"].tolist()) == ([0], [1, 2], [3, 4])


def test_sps_subsets_min_noisy_fraction_fallback_when_every_pair_is_above_eps2():
    method = SPS(config(("sps.min_noisy_fraction", 0.05), ("sps.min_reliable_fraction", 0.0)))
    p = np.linspace(0.6, 1.0, 101)  # every p > eps2 = 0.5
    sub = method.subsets(fake_fit(p), np.zeros(101, bool), 0)
    cut = np.quantile(p, 0.05)
    assert method.noisy_cut(fake_fit(p)) == pytest.approx(cut)
    assert sub["noisy"].tolist() == np.flatnonzero(p <= cut).tolist()
    assert 4 <= len(sub["noisy"]) <= 6  # about 5 % of the pairs
    assert sub["reliable"].tolist() == np.flatnonzero(p > 0.99).tolist()
    assert sub["quasi_clean"].tolist() == np.flatnonzero((p > cut) & (p <= 0.99)).tolist()
    # no fallback when switched off: nothing is noisy
    no_fallback = SPS(config(("sps.min_noisy_fraction", 0.0), ("sps.min_reliable_fraction", 0.0)))
    off = no_fallback.subsets(fake_fit(p), np.zeros(101, bool), 0)
    assert len(off["noisy"]) == 0


@pytest.mark.parametrize("p", [[0.9, 0.2, 0.995, 0.5, 0.51], list(np.linspace(0.55, 1, 40))])
def test_sps_subsets_partition_the_training_set(p):
    sub = SPS(config()).subsets(fake_fit(p), np.zeros(len(p), bool), 0)
    joined = np.concatenate(list(sub.values()))
    assert sorted(joined.tolist()) == list(range(len(p)))


def test_sps_proxy_label_paper_formula():
    method = SPS(config(("sps.proxy_gamma", 2.0), ("sps.proxy_beta", 3.0)))
    cosine = torch.tensor([-1.0, 0.0, 0.3, 1.0])
    prediction = torch.tensor([0.9, 0.1, 0.5, 0.0])
    label = method._proxy_label(cosine, prediction)
    close(label, [1 / (2 + math.exp(-3 * s)) for s in cosine.tolist()])
    # the paper's label does not depend on the prediction
    close(method._proxy_label(cosine, torch.rand(4)), label)


def test_sps_proxy_label_official_is_prediction_times_cosine_cut_below_half():
    method = SPS(config(("sps.proxy_label", "official")))
    cosine = torch.tensor([0.9, 0.5, 0.5, 0.9, 1.0])
    prediction = torch.tensor([0.9, 0.9, 1.0, 0.2, 0.55], requires_grad=True)
    label = method._proxy_label(cosine, prediction)
    close(label, [0.81, 0.0, 0.5, 0.0, 0.55])  # 0.45 and 0.18 are cut, exactly 0.5 is kept
    assert not label.requires_grad  # the prediction enters as a label, not a path for gradients
    cut = SPS(config(("sps.proxy_label", "official"), ("sps.proxy_cut", 0.85)))._proxy_label(cosine, prediction)
    close(cut, [0.0, 0.0, 0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# SPS objectives on a tiny real model


def sps_setup(*overrides):
    cfg = config(("sps.quasi_clean_start", 0), ("sps.noisy_start", 0), *overrides)
    method = SPS(cfg)
    model, peer = tiny_model(0), tiny_model(1)
    batches = {"reliable": tiny_batch(10, 6, 0), "quasi_clean": tiny_batch(11, 5, 6), "noisy": tiny_batch(12, 7, 11)}
    peer_prob = torch.linspace(0.05, 0.95, 18)
    groups = method.train_groups(model, peer, batches, peer_prob, co_epoch=0)
    return cfg, method, model, batches, peer_prob, groups


def infonce(sim, tau):
    l_i2t, l_t2i, p_i2t, p_t2i = kernels.infonce_terms(sim, tau)
    return l_i2t + l_t2i, (p_i2t + p_t2i) / 2


def test_sps_quasi_clean_soft_label_eq14():
    cfg, method, model, batches, peer_prob, groups = sps_setup()
    assert [g.__name__ for g in groups] == ["reliable", "quasi_clean", "noisy"]
    out = groups[1]()
    b = batches["quasi_clean"]
    img, cap = model.encode_images(b.images), model.encode_captions(b.tokens, b.lengths)
    loss, prediction = infonce(img.global_ @ cap.global_.T, cfg.sps.tau)
    p = peer_prob[b.index]
    assert p.tolist() == peer_prob[6:11].tolist()  # the peer's probabilities of *these* pairs
    label = p + (1 - p) * prediction.detach()  # Eq. 14 with y = 1
    expected = (label * loss).mean()  # Eq. 16
    close(out["loss"], expected)
    close(out["qc"], expected)
    assert out["loss"].dim() == 0

    # gradients: the soft label is a constant (detached); only the InfoNCE loss is differentiated
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(groups[1]()["loss"], params, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_sps_quasi_clean_label_is_one_for_a_certain_peer():
    cfg, method, model, batches, _, _ = sps_setup()
    groups = method.train_groups(model, tiny_model(1), batches, torch.ones(18), co_epoch=0)
    b = batches["quasi_clean"]
    loss, _ = infonce(forward_pairs(model, b.images, b.tokens, b.lengths).sim, cfg.sps.tau)
    close(groups[1]()["loss"], loss.mean())


@pytest.mark.parametrize("intramodal", ["global", "pooled"])
def test_sps_reliable_objective(intramodal):
    cfg, method, model, batches, _, groups = sps_setup(("sps.intramodal", intramodal),
                                                       ("sps.consistency_margin", 0.001))
    out = groups[0]()
    c = cfg.sps
    b = batches["reliable"]
    o = forward_pairs(model, b.images, b.tokens, b.lengths)
    loss, _ = infonce(o.sim, c.tau)
    l_re = loss.mean()
    l_cro = kernels.cross_consistency(o.sim, c.consistency_margin)

    def unit(enc):
        return enc.global_ if intramodal == "global" else torch.nn.functional.normalize(enc.pooled, dim=-1)

    l_met = kernels.metric_consistency(unit(o.images) @ unit(o.images).T, unit(o.captions) @ unit(o.captions).T,
                                       c.consistency_margin)
    close(out["re"], l_re)
    close(out["cro"], l_cro)
    close(out["met"], l_met)
    close(out["loss"], l_re + c.cross_weight * l_cro + c.metric_weight * l_met)


@pytest.mark.parametrize("directions, proxy_label", [("both", "paper"), ("i2t", "official"), ("i2t", "paper")])
def test_sps_noisy_objective_pairs_with_proxy_points(directions, proxy_label):
    cfg, method, model, batches, _, groups = sps_setup(("sps.proxy_directions", directions),
                                                       ("sps.proxy_label", proxy_label))
    groups[0]()  # the reliable pass caches the reliable batch's features
    out = groups[2]()
    c = cfg.sps
    n, re = batches["noisy"], batches["reliable"]
    with torch.no_grad():
        re_img = model.encode_images(re.images).global_
        re_txt = model.encode_captions(re.tokens, re.lengths).global_
    # image -> proxy caption: the caption of the reliable image most similar to the noisy image
    img = model.encode_images(n.images)
    cos = img.global_.detach() @ re_img.T  # (7, 6)
    index = cos.argmax(dim=1)
    cap = model.encode_captions(re.tokens[index], re.lengths[index])
    loss, prediction = infonce(img.global_ @ cap.global_.T, c.tau)
    i2t = (method._proxy_label(cos.max(dim=1).values, prediction) * loss).mean()
    close(out["n_i2t"], i2t, rtol=1e-5)
    if directions == "both":
        cap = model.encode_captions(n.tokens, n.lengths)
        cos = cap.global_.detach() @ re_txt.T
        index = cos.argmax(dim=1)
        img = model.encode_images(re.images[index])
        loss, prediction = infonce(img.global_ @ cap.global_.T, c.tau)
        t2i = (method._proxy_label(cos.max(dim=1).values, prediction) * loss).mean()
        close(out["n_t2i"], t2i, rtol=1e-5)
        close(out["loss"], (i2t + t2i) / 2, rtol=1e-5)
    else:
        assert "n_t2i" not in out
        close(out["loss"], i2t, rtol=1e-5)


def test_sps_label_pass_eval_takes_the_labels_from_a_no_grad_eval_pass():
    """sps.label_pass=eval (sps-official): the quasi-clean prediction, the proxy search and the proxy
    label come from a no-grad eval-mode pass, as SPS's code; the losses from the training pass."""
    cfg = config(("sps.quasi_clean_start", 0), ("sps.noisy_start", 0), ("sps.label_pass", "eval"),
                 ("sps.proxy_label", "official"), ("sps.proxy_directions", "i2t"), ("sps.intramodal", "pooled"),
                 ("sps.proxy_cut", 0.0))
    c, method = cfg.sps, SPS(cfg)
    model = tiny_model(0, dropout=0.5)  # word dropout: the training and the eval pass differ
    model.train()
    batches = {"reliable": tiny_batch(10, 6, 0), "quasi_clean": tiny_batch(11, 5, 6), "noisy": tiny_batch(12, 7, 11)}
    peer_prob = torch.linspace(0.05, 0.95, 18)
    groups = method.train_groups(model, tiny_model(1), batches, peer_prob, co_epoch=0)
    torch.manual_seed(3)
    groups[0]()
    qc, n = groups[1](), groups[2]()

    def pooled(enc):
        return torch.nn.functional.normalize(enc.pooled, dim=-1)

    torch.manual_seed(3)
    groups_train = SPS(config(*[(f"sps.{k}", v) for k, v in (("quasi_clean_start", 0), ("noisy_start", 0))],
                              ("sps.proxy_label", "official"), ("sps.proxy_directions", "i2t"),
                              ("sps.intramodal", "pooled"), ("sps.proxy_cut", 0.0))).train_groups(
        model, tiny_model(1), batches, peer_prob, co_epoch=0)
    groups_train[0]()
    assert (groups_train[1]()["qc"] - qc["qc"]).abs() > 1e-6  # the option changes what trains

    # by hand, replaying the same dropout draws: the eval passes draw none
    torch.manual_seed(3)
    b, re, nb = batches["quasi_clean"], batches["reliable"], batches["noisy"]
    o = forward_pairs(model, re.images, re.tokens, re.lengths)  # the reliable step's draws
    model.eval()
    with torch.no_grad():
        _, q_eval = infonce(forward_pairs(model, b.images, b.tokens, b.lengths).sim, c.tau)
    model.train()
    loss, _ = infonce(forward_pairs(model, b.images, b.tokens, b.lengths).sim, c.tau)
    p = peer_prob[b.index]
    close(qc["qc"], ((p + (1 - p) * q_eval) * loss).mean(), rtol=1e-5)
    model.eval()
    with torch.no_grad():
        keys = pooled(model.encode_images(re.images))
        query = model.encode_images(nb.images)
        cos = pooled(query) @ keys.T
        index = cos.argmax(dim=1)
        _, pred = infonce(query.global_ @ model.encode_captions(re.tokens[index], re.lengths[index]).global_.T, c.tau)
    model.train()
    img = model.encode_images(nb.images)
    cap = model.encode_captions(re.tokens[index], re.lengths[index])
    loss, _ = infonce(img.global_ @ cap.global_.T, c.tau)
    close(n["n"], (method._proxy_label(cos.max(dim=1).values, pred) * loss).mean(), rtol=1e-5)
    assert model.training and o.sim.requires_grad


# ---------------------------------------------------------------------------------------------
# NCR pieces


def test_soft_margin():
    y = torch.tensor([1.0, 0.0, 0.5, 0.25, 1.5, -0.5])
    m = soft_margin(y, 0.2, 10.0)
    expected = [0.2, 0.0, 0.2 * (10**0.5 - 1) / 9, 0.2 * (10**0.25 - 1) / 9, 0.2, 0.0]  # labels clamped to [0, 1]
    close(m, expected)
    grid = soft_margin(torch.linspace(0, 1, 11), 0.2, 10.0)
    assert torch.all(grid.diff() > 0)  # increasing in y
    close(soft_margin(torch.tensor([0.5]), 0.3, 4.0), [0.3 * (2 - 1) / 3])  # another base m


def test_hinge_confidence():
    sim = torch.tensor([[0.5, 0.4], [0.3, 0.6]])
    # pair 0: i2t hinge 0.2 + 0.4 - 0.5 = 0.1, t2i 0.2 + 0.3 - 0.5 = 0 -> mean hinge 0.05 -> (0.2 - 0.05) / 0.2
    # pair 1: i2t 0.2 + 0.3 - 0.6 < 0, t2i 0.2 + 0.4 - 0.6 = 0 -> 1
    close(hinge_confidence(sim, 0.2, ops=AUTO), [0.75, 1.0])
    separated = 2 * torch.eye(5) - 1
    close(hinge_confidence(separated, 0.2, ops=AUTO), torch.ones(5))
    constant = torch.full((5, 5), 0.3)  # every hinge = margin -> confidence 0
    close(hinge_confidence(constant, 0.2, ops=AUTO), torch.zeros(5))
    reversed_ = 1 - 2 * torch.eye(4)  # far worse than chance: clamped to 0
    close(hinge_confidence(reversed_, 0.2, ops=AUTO), torch.zeros(4))


def test_ncr_subsets_and_objectives_of_the_earlier_options():
    """fastncl <= 0.1.0's NCR, kept as options: the peer's probability as the clean target, the
    model's own train-mode confidence on noisy pairs, BiCro's hard noisy loss (NCR's code:
    test_method_fidelity.py)."""
    cfg = config(("ncr.clean_target", "peer"), ("ncr.noisy_target", "own"), ("ncr.noisy_loss", "hard"), method="ncr")
    method = NCR(cfg)
    sub = method.subsets(fake_fit([0.9, 0.5, 0.1, 0.51]), np.zeros(4, bool), 0)
    assert sub["clean"].tolist() == [0, 3] and sub["noisy"].tolist() == [1, 2]
    model, peer = tiny_model(0), tiny_model(1)
    batches = {"clean": tiny_batch(1, 5, 0), "noisy": tiny_batch(2, 5, 5)}
    peer_prob = torch.linspace(0, 1, 10)
    clean, noisy = method.train_groups(model, peer, batches, peer_prob, co_epoch=0)
    b = batches["clean"]
    sim = forward_pairs(model, b.images, b.tokens, b.lengths).sim
    expected = kernels.triplet_terms(sim, soft_margin(peer_prob[:5], 0.2, 10.0), hardest=True).sum()
    close(clean()["loss"], expected)
    b = batches["noisy"]
    sim = forward_pairs(model, b.images, b.tokens, b.lengths).sim
    label = hinge_confidence(sim.detach(), 0.2, ops=AUTO)  # the model's own rectified label
    terms = kernels.triplet_terms(sim, soft_margin(label, 0.2, 10.0), hardest=True)
    close(noisy()["loss"], (terms * (label > 0.5)).sum())  # default noisy_loss=hard: labels <= 0.5 left out
    soft = NCR(config(("ncr.clean_target", "peer"), ("ncr.noisy_target", "own"), method="ncr"))
    close(soft.train_groups(model, peer, batches, peer_prob, co_epoch=0)[1]()["loss"], terms.sum())


# ---------------------------------------------------------------------------------------------
# ESC pieces


def test_bicro_consistency_identical_features_is_one():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mask = torch.ones(6, dtype=torch.bool)
    close(bicro_consistency(img, txt, img, txt, mask, ops=AUTO), torch.ones(6))
    close(bicro_consistency(3 * img, 0.5 * txt, img, txt, mask, ops=AUTO), torch.ones(6))  # features are normalised


def test_bicro_consistency_respects_the_anchor_mask():
    q_img, q_txt = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    k_img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    k_txt = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    # both keys may be anchors: key 0 is identical to the query -> 1
    close(bicro_consistency(q_img, q_txt, k_img, k_txt, torch.tensor([True, True]), ops=AUTO), [1.0])
    # only key 1: image cosine 0.6, text cosine 0.8 -> ratio 0.75 both ways
    close(bicro_consistency(q_img, q_txt, k_img, k_txt, torch.tensor([False, True]), ops=AUTO), [0.75])


def test_bicro_consistency_negative_cosines_give_zero():
    q_img, q_txt = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    k_img, k_txt = torch.tensor([[-0.6, 0.8]]), torch.tensor([[0.8, 0.6]])  # image cos -0.6, text cos 0.8
    close(bicro_consistency(q_img, q_txt, k_img, k_txt, torch.tensor([True]), ops=AUTO), [0.0])
    k_img, k_txt = torch.tensor([[-1.0, 0.0]]), torch.tensor([[0.0, -1.0]])
    close(bicro_consistency(q_img, q_txt, k_img, k_txt, torch.tensor([True]), ops=AUTO), [0.0])


def test_bicro_consistency_is_in_unit_interval():
    g = torch.Generator().manual_seed(1)
    q = [torch.randn(9, 4, generator=g) for _ in range(2)]
    k = [torch.randn(5, 4, generator=g) for _ in range(2)]
    c = bicro_consistency(*q, *k, torch.tensor([True, False, True, True, False]), ops=AUTO)
    assert c.shape == (9,) and torch.all((c >= 0) & (c <= 1))


def test_pseudo_negative_is_the_column_argmax_off_the_diagonal():
    sim = torch.tensor([[0.9, 0.1, 0.8],
                        [0.5, 0.9, 0.2],
                        [0.3, 0.7, 0.9]], requires_grad=True)
    # argmax over j != i of sim[j, i] (images competing for caption i); the row-wise answer is [2, 0, 1]
    assert pseudo_negative(sim).tolist() == [1, 2, 0]
    assert not pseudo_negative(sim).requires_grad
    g = torch.Generator().manual_seed(3)
    s = torch.randn(7, 7, generator=g) + 10 * torch.eye(7)  # the diagonal is never chosen
    want = [max((j for j in range(7) if j != i), key=lambda j: float(s[j, i])) for i in range(7)]
    assert pseudo_negative(s).tolist() == want


@pytest.mark.parametrize("anchors_clean", [True, False])
def test_esc_subsets_force_anchors_clean_only_when_asked(anchors_clean):
    method = ESC(config(("esc.anchors_clean", anchors_clean), method="esc"))
    p = [0.9, 0.1, 0.2, 0.8, 0.5]
    anchors = np.array([False, True, False, False, False])
    sub = method.subsets(fake_fit(p), anchors, 0)
    assert list(sub) == ["clean", "noisy"]
    if anchors_clean:
        assert sub["clean"].tolist() == [0, 1, 3] and sub["noisy"].tolist() == [2, 4]
    else:
        assert sub["clean"].tolist() == [0, 3] and sub["noisy"].tolist() == [1, 2, 4]


def test_esc_official_preset_does_not_force_anchors():
    method = ESC(config(preset="esc-official"))
    sub = method.subsets(fake_fit([0.9, 0.1]), np.array([False, True]), 0)
    assert sub["noisy"].tolist() == [1]


SIM = torch.tensor([[0.30, 0.20, 0.10, 0.40],
                    [0.50, 0.80, 0.70, 0.00],
                    [0.10, 0.60, 0.50, 0.95],
                    [0.20, 0.10, 0.30, 0.10]])  # diagonal argmax = 1, while the largest entry is (2, 3)


@pytest.mark.parametrize("preset, overrides", [(None, [("esc.esc_weight", 0.7)]), ("esc-official", [])])
def test_esc_split_losses_l_hard_plus_beta_l_esc_against_the_diagonal_argmax(preset, overrides):
    cfg = config(*overrides, preset=preset, method="esc")
    c = cfg.esc
    loss, is_anchor = ESC(cfg).split_losses(FixedSim(SIM), fixed_batch(4))
    assert is_anchor.tolist() == [False, True, False, False]
    if c.division_hardest:
        l_hard = kernels.triplet_terms(SIM, c.margin, hardest=True)
    else:  # the code's mean (esc-official): over all B entries of a row / column, the zeroed diagonal counted
        d, eye = SIM.diagonal(), torch.eye(4, dtype=torch.bool)
        cost_s = (c.margin + SIM - d.view(-1, 1)).clamp_min(0).masked_fill(eye, 0)  # image i vs caption j
        cost_im = (c.margin + SIM - d.view(1, -1)).clamp_min(0).masked_fill(eye, 0)  # caption j vs image i
        l_hard = cost_s.sum(dim=1) / 4 + cost_im.sum(dim=0) / 4
    l_esc = kernels.esc_anchor_terms(SIM, 1, c.division_margin, c.esc_normalize)
    close(loss, l_hard + c.esc_weight * l_esc)
    if not c.esc_normalize:  # by hand: (S(I_a, T_i) - S(I_i, T_a))**2 with a = 1
        close(l_esc, [(SIM[1, i] - SIM[i, 1]) ** 2 for i in range(4)])


def test_esc_warmup_all_is_the_mean_hinge_on_every_pair():
    """Warm-up uses the hinge over the mean of the negatives (hardest-negative training from
    scratch collapses), summed over every pair of the batch."""
    cfg = config(method="esc")
    out = ESC(cfg).warmup_loss(FixedSim(SIM), fixed_batch(4))
    close(out["loss"], kernels.triplet_terms(SIM, 0.2, hardest=False).sum())


@pytest.mark.parametrize("size, rate, k", [(7, 0.3, 2), (10, 0.3, 3), (3, 0.3, 1), (8, 1.0, 8)])
def test_esc_warmup_select_sums_the_smallest_mean_hinge_losses(size, rate, k):
    cfg = config(("esc.warmup", "select"), ("esc.warmup_rate", rate), method="esc")
    sim = torch.randn(size, size, generator=torch.Generator().manual_seed(size))
    out = ESC(cfg).warmup_loss(FixedSim(sim), fixed_batch(size))
    losses = kernels.triplet_terms(sim, 0.2, hardest=False)
    close(out["loss"], losses.sort().values[:k].sum())  # k = max(1, floor(B * rate))


def test_soft_triplet_broadcasts_a_label_as_a_column_or_a_row():
    """soft_triplet's ``broadcast``: the (B,) label as the codes broadcast it against the (B, B) scores,
    NCR's (B, 1) ("image": entry (i, j) takes image i's margin) or ESC's and BiCro's row ("caption":
    caption j's), through triplet_terms' per-entry margin; None keeps pair i's margin in both of its
    directions; each form gives another loss."""
    sim = torch.rand(6, 6, generator=torch.Generator().manual_seed(2))
    label = torch.linspace(0, 1, 6)
    m = soft_margin(label, 0.2, 10.0)
    got = {how: soft_triplet(sim, label, 0.2, 10.0, ops=AUTO, broadcast=how) for how in (None, "image", "caption")}
    close(got[None], kernels.triplet_terms(sim, m, hardest=True).sum())
    close(got["image"], kernels.triplet_terms(sim, m.view(6, 1).expand(6, 6), hardest=True).sum())
    close(got["caption"], kernels.triplet_terms(sim, m.view(1, 6).expand(6, 6), hardest=True).sum())
    assert len({round(float(v), 6) for v in got.values()}) == 3, got
    with pytest.raises(ValueError, match="broadcast"):
        soft_triplet(sim, label, 0.2, 10.0, ops=AUTO, broadcast="rows")


def esc_setup(*overrides, preset=None):
    cfg = config(*overrides, preset=preset, method="esc")
    method = ESC(cfg)
    model, peer = tiny_model(0), tiny_model(1)
    batches = {"clean": tiny_batch(20, 10, 0), "noisy": tiny_batch(21, 6, 10)}
    return cfg, method, model, peer, batches


def test_esc_peer_labels():
    cfg, method, model, peer, batches = esc_setup()
    labels = method._peer_labels(peer, batches, with_noisy=True)
    clean, noisy = labels["clean"], labels["noisy"]
    assert clean.shape == (10,) and noisy.shape == (6,)
    assert int((clean == 1).sum()) >= int(10 * 0.1) + 1  # the top B/10 + 1 pairs are anchors
    assert torch.all((clean >= 0.5) & (clean <= 1))
    # esc.noisy_loss=hard (BiCro's noise_hard): not cut, its pairs <= the cut are left out of the loss instead
    assert torch.all((noisy >= 0) & (noisy <= 1))
    cut = cfg.esc.noise_label_cut
    soft = ESC(config(("esc.noisy_loss", "soft"), method="esc"))._peer_labels(peer, batches, with_noisy=True)
    assert torch.equal(soft["noisy"], torch.where(noisy <= cut, torch.zeros_like(noisy), noisy))  # noise_soft: cut to 0
    assert torch.all((soft["noisy"] == 0) | ((soft["noisy"] > cut) & (soft["noisy"] <= 1)))


@pytest.mark.parametrize("train_esc", ["pseudo_negative", "anchor"])
def test_esc_clean_objective_soft_triplet_plus_l_esc(train_esc):
    cfg, method, model, peer, batches = esc_setup(("esc.train_esc", train_esc), ("esc.train_margin", 0.001))
    groups = method.train_groups(model, peer, batches, None, co_epoch=100)
    assert [g.__name__ for g in groups] == ["noisy", "clean"]
    labels = method._peer_labels(peer, batches, with_noisy=True)
    b = batches["clean"]
    sim = forward_pairs(model, b.images, b.tokens, b.lengths).sim
    soft = kernels.triplet_terms(sim, soft_margin(labels["clean"], 0.2, 10.0), hardest=True).sum()
    anchor = pseudo_negative(sim) if train_esc == "pseudo_negative" else sim.detach().diagonal().argmax()
    esc = kernels.esc_anchor_terms(sim, anchor, 0.001, False).sum()
    out = groups[1]()
    close(out["soft_clean"], soft)
    close(out["esc"], esc)
    close(out["loss"], soft + esc)
    b = batches["noisy"]
    sim = forward_pairs(model, b.images, b.tokens, b.lengths).sim
    terms = kernels.triplet_terms(sim, soft_margin(labels["noisy"], 0.2, 10.0), hardest=True)
    close(groups[0]()["loss"], (terms * (labels["noisy"] > 0.5)).sum())  # esc.noisy_loss=hard: label-0 pairs out


def test_esc_separate_steps_moves_l_esc_to_its_own_group():
    cfg, method, model, peer, batches = esc_setup(("esc.separate_steps", True))
    groups = method.train_groups(model, peer, batches, None, co_epoch=100)
    assert [g.__name__ for g in groups] == ["noisy", "clean", "esc"]
    clean = groups[1]()
    assert "esc" not in clean
    close(clean["loss"], clean["soft_clean"])
    assert "esc" in groups[2]()


# ---------------------------------------------------------------------------------------------
# curricula


def test_sps_curriculum_by_co_training_epoch():
    method = SPS(config(("sps.quasi_clean_start", 2), ("sps.noisy_start", 4)))
    stages = [method.active_subsets(e) for e in range(6)]
    assert stages == [("reliable",)] * 2 + [("reliable", "quasi_clean")] * 2 + [("reliable", "quasi_clean", "noisy")] * 2


def test_sps_train_groups_follow_the_curriculum():
    method = SPS(config(("sps.quasi_clean_start", 1), ("sps.noisy_start", 2)))
    model = tiny_model(0)
    batches = {"reliable": tiny_batch(1), "quasi_clean": tiny_batch(2, 6, 6), "noisy": tiny_batch(3, 6, 12)}
    names = [[g.__name__ for g in method.train_groups(model, tiny_model(1), batches, torch.rand(18), e)]
             for e in range(3)]
    assert names == [["reliable"], ["reliable", "quasi_clean"], ["reliable", "quasi_clean", "noisy"]]


def test_esc_curriculum_by_co_training_epoch():
    method = ESC(config(("esc.noisy_start", 3), method="esc"))
    assert [method.active_subsets(e) for e in range(5)] == [("clean",)] * 3 + [("clean", "noisy")] * 2


def test_ncr_curriculum_and_vanilla_has_none():
    assert NCR(config(method="ncr")).active_subsets(0) == ("clean",)  # noisy from epochs // 2 (NCR code)
    assert NCR(config(("ncr.noisy_start", 0), method="ncr")).active_subsets(0) == ("clean", "noisy")
    assert Vanilla(config(method="vanilla")).active_subsets(0) == ("all",)
    assert not Vanilla(config(method="vanilla")).uses_split


# ---------------------------------------------------------------------------------------------
# every method's closures: finite scalar losses whose gradients reach the model


CASES = {
    "vanilla": dict(method="vanilla"),
    "ncr": dict(method="ncr"),
    "ncr-separate": dict(method="ncr", overrides=[("ncr.separate_steps", True)]),
    "ncr-official": dict(preset="ncr-official"),
    "sps": dict(method="sps", overrides=[("sps.separate_steps", False)]),
    "sps-separate": dict(method="sps", overrides=[("sps.separate_steps", True)]),
    "sps-official": dict(preset="sps-official"),
    "sps-official-one-step": dict(preset="sps-official", overrides=[("sps.separate_steps", False)]),
    "esc": dict(method="esc", overrides=[("esc.separate_steps", False)]),
    "esc-separate": dict(method="esc", overrides=[("esc.separate_steps", True)]),
    "esc-official": dict(preset="esc-official"),
    "esc-official-one-step": dict(preset="esc-official", overrides=[("esc.separate_steps", False)]),
}


def case_setup(name):
    spec = CASES[name]
    cfg = config(*spec.get("overrides", []), preset=spec.get("preset"), method=spec.get("method"))
    method = build_method(cfg)
    sizes = {"all": 8, "clean": 8, "noisy": 6, "reliable": 8, "quasi_clean": 5}
    batches, start = {}, 0
    for k, subset in enumerate(method.subset_names):
        batches[subset] = tiny_batch(30 + k, sizes[subset], start)
        start += sizes[subset]
    return cfg, method, tiny_model(0), tiny_model(1), batches, torch.rand(start, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(CASES))
def test_every_group_gives_a_finite_scalar_loss_with_gradients(name):
    cfg, method, model, peer, batches, peer_prob = case_setup(name)
    assert method.separate_steps == ("separate" in name or (name.endswith("official")))
    groups = method.train_groups(model, peer, batches, peer_prob, co_epoch=1000)
    expected = {"vanilla": 1, "ncr": 2, "sps": 3, "esc": 3 if method.separate_steps else 2}[cfg.method]
    assert len(groups) == expected
    total_grad = 0.0
    for group in groups:
        model.zero_grad(set_to_none=True)
        out = group()
        loss = out["loss"]
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0, (group.__name__, loss)
        assert torch.isfinite(loss), (group.__name__, loss)
        assert loss.requires_grad, f"{group.__name__}: the loss is not connected to the model"
        for term, value in out.items():
            assert torch.isfinite(torch.as_tensor(value)).all(), (group.__name__, term)
        loss.backward()
        for pname in ("region_proj.weight", "gru.weight_hh_l0", "word_embed.weight"):
            grad = dict(model.named_parameters())[pname].grad
            assert grad is not None, f"{group.__name__}: no gradient reaches {pname}"
            assert torch.isfinite(grad).all()
            total_grad += float(grad.abs().sum())
        if float(loss.detach()) > 0:
            assert float(model.region_proj.weight.grad.abs().sum()) > 0, group.__name__
        for p in peer.parameters():
            assert p.grad is None, "the peer must not receive gradients"
    assert total_grad > 0


@pytest.mark.parametrize("name", ["vanilla", "ncr", "ncr-separate", "sps", "sps-separate", "esc", "esc-separate"])
def test_trainer_step_runs_the_groups_and_updates_the_model(name):
    cfg, method, model, peer, batches, peer_prob = case_setup(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    groups = method.train_groups(model, peer, batches, peer_prob, co_epoch=1000)
    trainer = SimpleNamespace(cfg=cfg, method=method, precision=Precision(), graphs=False, optims=[opt], models=[model])
    terms = Trainer._step(trainer, 0, groups)
    assert torch.isfinite(terms["loss"]) and terms["loss"].dim() == 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    if method.separate_steps:
        assert int(opt.state[model.region_proj.weight]["step"]) == len(groups)  # one step per group
    else:
        assert int(opt.state[model.region_proj.weight]["step"]) == 1


# ---------------------------------------------------------------------------------------------
# no host syncs in per-batch code


def _item_calls(path: Path) -> list[str]:
    """Lines with a `.item(` call in the code (strings and comments are not code)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
              if t.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE)]
    hits = []
    for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
        if a.string == "." and b.string == "item" and c.string == "(":
            hits.append(f"{path.name}:{b.start[0]}: {b.line.strip()}")
    return hits


def test_no_item_calls_in_per_batch_code():
    files = sorted((ROOT / "fastncl" / "methods").glob("*.py")) + [ROOT / "kernels" / "reference.py"]
    assert len(files) >= 7
    hits = [h for f in files for h in _item_calls(f)]
    assert not hits, "per-batch code must not sync with the host:\n" + "\n".join(hits)


def test_item_call_scanner_finds_calls_but_not_prose(tmp_path):
    planted = tmp_path / "x.py"
    planted.write_text('"""no .item() here"""\nx = loss.item()  # .item( in a comment\ny = "a.item()"\n')
    assert _item_calls(planted) == ["x.py:2: x = loss.item()  # .item( in a comment"]
    assert _item_calls(ROOT / "fastncl" / "methods" / "base.py") == []  # its docstring mentions .item()
    assert ".item()" in (ROOT / "fastncl" / "methods" / "base.py").read_text()


def test_sps_subsets_stay_disjoint_when_the_fallback_cut_exceeds_eps1():
    """Every p above eps1: the 1 % fallback quantile lies above eps1 too; it is capped at eps1."""
    method = SPS(config(("sps.min_noisy_fraction", 0.01)))
    p = np.linspace(0.991, 0.9999, 1000)
    sub = method.subsets(fake_fit(p), np.zeros(1000, bool), 0)
    members = np.concatenate(list(sub.values()))
    assert len(members) == len(np.unique(members)) == 1000  # a partition
    assert method.noisy_cut(fake_fit(p)) <= 0.99


def test_official_presets_force_one_percent_noisy_and_the_papers_do_not():
    assert config(method="sps").sps.min_noisy_fraction == 0.0
    assert config(method="esc").esc.min_noisy_fraction == 0.0
    assert config(preset="sps-official").sps.min_noisy_fraction == 0.01
    assert config(preset="esc-official").esc.min_noisy_fraction == 0.01


@pytest.mark.parametrize("clean_labels", ["one", "bicro"])
def test_esc_clean_labels_one_by_default_and_bicro_as_the_official_option(clean_labels):
    cfg = config(("esc.clean_labels", clean_labels), method="esc")
    peer, batches = tiny_model(1), {"clean": tiny_batch(3, size=20)}
    labels = ESC(cfg)._peer_labels(peer, batches, with_noisy=False)["clean"]
    if clean_labels == "one":  # paper Sec. 3.3: every pair of D_c has label 1
        assert torch.equal(labels, torch.ones(20))
    else:  # BiCro: the top B/10 + 1 pairs by hinge confidence are anchors (1), the rest 0.5 + c / 2
        assert int((labels == 1).sum()) >= 3
        assert float(labels.min()) >= 0.5 and float(labels.max()) <= 1.0
        assert bool((labels < 1).any())
    assert config(preset="esc-official").esc.clean_labels == "bicro"


def test_detected_noisy_set_is_the_methods_noisy_subset():
    """ESC forces anchors into the clean set: they must not count as detected noisy."""
    from fastncl.evaluation import split_diagnostics

    p = np.array([0.9, 0.1, 0.2, 0.8])
    clean_mask = np.array([True, False, True, True])
    by_cut = split_diagnostics(p, 0.5, clean_mask)
    by_subset = split_diagnostics(p, 0.5, clean_mask, detected=np.array([1]))  # pair 2 forced clean
    assert (by_cut.detected_noisy, by_cut.precision) == (2, 0.5)
    assert (by_subset.detected_noisy, by_subset.precision, by_subset.recall) == (1, 1.0, 1.0)


@pytest.mark.parametrize("method", ["ncr", "esc"])
def test_noisy_loss_hard_leaves_out_pairs_labelled_at_or_below_the_cut(method):
    """BiCro's noise_train=noise_hard: noisy pairs whose label is <= the cut add no loss."""
    from fastncl.methods.losses import noisy_keep

    cfg = config((f"{method}.noisy_loss", "hard"), method=method)
    c = getattr(cfg, method)
    label = torch.tensor([0.0, 0.5, 0.51, 0.9])
    assert noisy_keep(label, c).tolist() == [0.0, 0.0, 1.0, 1.0]
    soft = getattr(config((f"{method}.noisy_loss", "soft"), method=method), method)
    assert noisy_keep(label, soft) is None  # "soft": every pair counts
    sim = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    m = build_method(cfg)
    kept = m._soft_triplet(sim, label, noisy_keep(label, c))
    margin = soft_margin(label, c.margin, c.soft_margin_base)
    close(kept, kernels.triplet_terms(sim, margin, hardest=True)[2:].sum())


def test_noisy_loss_defaults_ncr_soft_as_its_code_esc_hard():
    assert config(method="ncr").ncr.noisy_loss == "soft"
    assert config(method="esc").esc.noisy_loss == "hard"
    assert config(preset="esc-official").esc.noisy_loss == "soft"
