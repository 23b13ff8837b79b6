"""The methods compute what their sources compute: NCR's targets, margins and optimizer steps
against a float64 re-statement of NCR's code, ESC's BiCro labels from the features the similarity
is built on and with the code's ratio, the noisy-subset start, SPS's reliable-set floor, the hinge
baseline, the data-set presets, and the warnings a degenerate split gets.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastncl.config import data_preset
from fastncl.data.batches import Batch
from fastncl.methods import ESC, NCR, SPS, Hinge
from fastncl.kernels import AUTO, Ops
from fastncl.methods.losses import _ratio, bicro_consistency, ncr_prediction
from fastncl.models import VSE, Encoding

from helpers import close as _close
from helpers import one_thread  # noqa: F401 (an autouse fixture)
from helpers import code_config as config  # the methods as their codes train (CODE_LOSS) unless a test says otherwise
from helpers import fake_fit, tiny_batch, tiny_model


def close(actual, expected):
    """fp32 against the float64 restatements."""
    _close(actual, expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# NCR, restated from NCR's code in float64 (loops and plain tensor ops, none of fastncl's ops)


def ncr_costs(sim: torch.Tensor, margin) -> tuple[torch.Tensor, torch.Tensor]:
    """cost_s[i, j] = [m_i + S_ij - S_ii]_+ (image i vs caption j), cost_im[i, j] = [m_j + S_ij - S_jj]_+
    (caption j vs image i), diagonals zeroed; m a scalar or one margin per pair."""
    s = sim.double()
    b = s.shape[0]
    m = torch.as_tensor(margin, dtype=torch.float64).expand(b)
    d = s.diagonal()
    cost_s = (m.view(-1, 1) + s - d.view(-1, 1)).clamp_min(0)
    cost_im = (m.view(1, -1) + s - d.view(1, -1)).clamp_min(0)
    eye = torch.eye(b, dtype=torch.bool)
    return cost_s.masked_fill(eye, 0), cost_im.masked_fill(eye, 0)


def ncr_predict(sim: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    cost_s, cost_im = ncr_costs(sim, margin)
    b = sim.shape[0]
    c = (margin - (cost_s.mean(dim=1) + cost_im.mean(dim=0)) / 2).clamp(0, margin)
    top = torch.sort(c, descending=True).values[: b // 10 + 1].mean()
    return (c / top).clamp(0, 1)


def ncr_train_loss(sim: torch.Tensor, target: torch.Tensor, margin: float = 0.2, base: float = 10.0,
                   negatives: str = "hardest"):
    m = margin * (base ** target.double() - 1) / (base - 1)
    cost_s, cost_im = ncr_costs(sim, m)
    b = sim.shape[0]
    hardest = cost_s.max(dim=1).values.sum() + cost_im.max(dim=0).values.sum()
    mean = (cost_s.sum(dim=1).sum() + cost_im.sum(dim=0).sum()) / (b - 1)  # over the B - 1 negatives
    return {"hardest": hardest, "mean": mean, "mixed": hardest + mean}[negatives]


def ncr_code_loss(sim: torch.Tensor, target: torch.Tensor, margin: float = 0.2, base: float = 10.0):
    """NCR's ContrastiveLoss in "train" mode (exponential soft margin, hardest negative) with the
    targets in the shapes NCR's co_train.py gives them, broadcast against the (B, B) scores as torch
    broadcasts them: a clean target (B, B) (its (B, 1) probabilities and labels against its (B,)
    prediction), a noisy one (B, 1) (``view(-1, 1)``). Both hinges add the margin of the entry
    compared: cost_s[i, j] = [M_ij + S_ij - S_ii]_+, max over j; cost_im[i, j] = [M_ij + S_ij - S_jj]_+,
    max over i."""
    s = sim.double()
    b = s.shape[0]
    m = margin * (base ** target.double() - 1) / (base - 1)
    d = s.diagonal().view(b, 1)
    eye = torch.eye(b, dtype=torch.bool)
    cost_s = (m + s - d.expand(b, b)).clamp_min(0).masked_fill(eye, 0)
    cost_im = (m + s - d.T.expand(b, b)).clamp_min(0).masked_fill(eye, 0)
    return cost_s.max(dim=1).values.sum() + cost_im.max(dim=0).values.sum()


def ncr_code_targets(model, peer, batches, peer_prob, broadcast: bool):
    """NCR's label refinement (eval mode, float64): the clean target p * 1 + (1 - p) q and the noisy
    (q_model + q_peer) / 2, as (B, B) and (B, 1) (the code's shapes) with ``broadcast``, else (B,)."""
    with torch.no_grad():
        model.eval()
        p = peer_prob[batches["clean"].index].double()
        labels = torch.ones_like(p)
        if broadcast:  # the code's collate stacks (1,) tensors: p and the labels are (B, 1)
            p, labels = p.view(-1, 1), labels.view(-1, 1)
        target_clean = p * labels + (1 - p) * ncr_predict(sim_of(model, batches["clean"]))
        target_noisy = (ncr_predict(sim_of(model, batches["noisy"])) + ncr_predict(sim_of(peer, batches["noisy"]))) / 2
        model.train()
    return target_clean, target_noisy.view(-1, 1) if broadcast else target_noisy


def sim_of(model, b: Batch) -> torch.Tensor:
    img, cap = model.encode_images(b.images), model.encode_captions(b.tokens, b.lengths)
    return model.similarity(img, cap)


def test_ncr_prediction_matches_the_code():
    g = torch.Generator().manual_seed(3)
    for b in (1, 7, 33):
        sim = torch.rand(b, b, generator=g)
        close(ncr_prediction(sim, 0.2, ops=AUTO), ncr_predict(sim))
    reversed_ = 1 - 2 * torch.eye(6)  # every confidence 0: the prediction is 0, not NaN
    assert torch.equal(ncr_prediction(reversed_, 0.2, ops=AUTO), torch.zeros(6))


@pytest.mark.parametrize("noisy_loss", ["soft", "hard"])
def test_ncr_targets_are_the_codes(noisy_loss):
    """Clean: p + (1 - p) q_own(eval); noisy: (q_own(eval) + q_peer(eval)) / 2; both soft-margin
    hardest-negative hinges summed over the batch; with dropout, so that eval and train differ."""
    method = NCR(config(("ncr.noisy_loss", noisy_loss), method="ncr"))
    model, peer = tiny_model(0, dropout=0.5), tiny_model(1, dropout=0.5)
    peer.eval()
    batches = {"clean": tiny_batch(1, 12, 0), "noisy": tiny_batch(2, 12, 12)}
    peer_prob = torch.linspace(0.05, 0.95, 24)
    clean, noisy = method.train_groups(model, peer, batches, peer_prob, co_epoch=100)

    with torch.no_grad():
        model.eval()
        q_clean, q_noisy = ncr_predict(sim_of(model, batches["clean"])), ncr_predict(sim_of(model, batches["noisy"]))
        q_peer = ncr_predict(sim_of(peer, batches["noisy"]))
        model.train()
    p = peer_prob[:12].double()
    torch.manual_seed(7)
    got = clean()["loss"]
    assert model.training  # the eval-mode prediction puts the model back
    torch.manual_seed(7)  # the same dropout draw: the eval-mode forward draws nothing
    close(got, ncr_train_loss(sim_of(model, batches["clean"]), p + (1 - p) * q_clean))

    target = (q_noisy + q_peer) / 2
    torch.manual_seed(8)
    got = noisy()["loss"]
    torch.manual_seed(8)
    sim = sim_of(model, batches["noisy"])
    if noisy_loss == "soft":
        expected = ncr_train_loss(sim, target)
    else:  # each pair's two directions, left out when its target is <= 0.5
        m = 0.2 * (10 ** target - 1) / 9
        cost_s, cost_im = ncr_costs(sim, m)
        keep = (target > 0.5).double()
        expected = ((cost_s.max(dim=1).values + cost_im.max(dim=0).values) * keep).sum()
    close(got, expected)


def test_ncr_departures_stay_options():
    method = NCR(config(("ncr.clean_target", "peer"), ("ncr.noisy_target", "own"), method="ncr"))
    model, peer = tiny_model(0), tiny_model(1)
    batches = {"clean": tiny_batch(1, 10, 0), "noisy": tiny_batch(2, 10, 10)}
    peer_prob = torch.linspace(0.05, 0.95, 20)
    clean, noisy = method.train_groups(model, peer, batches, peer_prob, co_epoch=100)
    close(clean()["loss"], ncr_train_loss(sim_of(model, batches["clean"]), peer_prob[:10]))
    sim = sim_of(model, batches["noisy"])
    cost_s, cost_im = ncr_costs(sim, 0.2)
    mean_hinge = (cost_s.sum(dim=1) + cost_im.sum(dim=0)) / (2 * 9)  # over the B - 1 negatives
    own = ((0.2 - mean_hinge) / 0.2).clamp(0, 1)
    close(noisy()["loss"], ncr_train_loss(sim, own))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ncr_broadcast_margins_are_the_codes(backend):
    """ncr.margins=broadcast: NCR's clean and noisy losses and their gradients equal the float64
    restatement of NCR's code (``ncr_code_loss`` on the code's (B, B) clean and (B, 1) noisy targets),
    with the reference ops and with the Triton kernels (on CPU in the interpreter); the per-pair
    default's differ (the paper's form: pair i's margin in both directions). Dropout 0.5, so that
    eval-mode targets and train-mode losses differ; the same draws in both."""
    if backend == "triton":
        pytest.importorskip("triton", reason="the Triton kernels need the triton package")
        if torch.cuda.is_available():
            pytest.skip("CPU tensors reach the Triton kernels only in the interpreter (tests/conftest.py: no GPU)")
    model, peer = tiny_model(0, dropout=0.5), tiny_model(1, dropout=0.5)
    peer.eval()
    batches = {"clean": tiny_batch(1, 12, 0), "noisy": tiny_batch(2, 12, 12)}
    peer_prob = torch.linspace(0.05, 0.95, 24)
    targets = dict(zip(("clean", "noisy"), ncr_code_targets(model, peer, batches, peer_prob, broadcast=True)))
    assert targets["clean"].shape == (12, 12) and targets["noisy"].shape == (12, 1)
    params = list(model.parameters())
    got = {}
    for margins in ("broadcast", "per_pair"):
        method = NCR(config(("ncr.margins", margins), method="ncr"), ops=Ops(backend))
        for seed, group in zip((7, 8), method.train_groups(model, peer, batches, peer_prob, co_epoch=100)):
            torch.manual_seed(seed)
            loss = group()["loss"]
            got[margins, group.__name__] = float(loss.detach())
            if margins == "per_pair":
                continue
            torch.manual_seed(seed)  # the same dropout draw: the eval-mode forwards draw nothing
            expected = ncr_code_loss(sim_of(model, batches[group.__name__]), targets[group.__name__])
            close(loss, expected)
            for g, e in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
                _close(g, e, rtol=1e-5)
    for name in ("clean", "noisy"):
        assert abs(got["broadcast", name] - got["per_pair", name]) > 1e-3 * got["per_pair", name], got


def test_ncr_official_broadcasts_the_margins():
    assert config(preset="ncr-official").ncr.margins == "broadcast"
    assert config(method="ncr").ncr.margins == "per_pair"


@pytest.mark.parametrize("negatives", ["mean", "mixed"])
def test_the_triplet_losss_negatives_are_an_option(negatives):
    """ncr.negatives / esc.negatives: the co-training hinge over the mean of the negatives, or the
    hardest and the mean added, both on NCR's soft margins (NCR's clean loss; ESC's soft triplet)."""
    method = NCR(config(("ncr.clean_target", "peer"), ("ncr.negatives", negatives), method="ncr"))
    model, peer = tiny_model(0), tiny_model(1)
    batches = {"clean": tiny_batch(1, 10, 0)}
    peer_prob = torch.linspace(0.05, 0.95, 10)
    (clean,) = method.train_groups(model, peer, batches, peer_prob, co_epoch=0)
    sim = sim_of(model, batches["clean"])
    close(clean()["loss"], ncr_train_loss(sim, peer_prob, negatives=negatives))
    assert not torch.allclose(ncr_train_loss(sim, peer_prob, negatives=negatives), ncr_train_loss(sim, peer_prob))
    esc = ESC(config(("esc.negatives", negatives), method="esc"))
    labels = torch.linspace(0, 1, 10)
    close(esc._soft_triplet(sim.detach(), labels), ncr_train_loss(sim.detach(), labels, negatives=negatives))


def code_adam_step(model, opt, loss, clip: float) -> float:
    """One call of NCR's ``SGRAF.train``: zero the gradients, backward, clip the total norm, Adam.
    Returns the gradient's norm before the clip."""
    opt.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
    opt.step()
    return float(norm)


def ncr_code_iteration(model, peer, batches, peer_prob, two_steps: bool, lr: float, clip: float,
                       broadcast: bool = False):
    """One iteration of NCR's co_train.py ``train`` on ``model`` (changed in place): the label
    refinement (both targets, eval mode, before any step), then ``SGRAF.train`` on the clean batch
    and on the noisy batch (``two_steps``), or one step on their sum; the margins broadcast as the
    code's (``broadcast``: ``ncr_code_loss``) or per pair (``ncr_train_loss``). Returns the targets
    and the gradient norms before the clip."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    target_clean, target_noisy = ncr_code_targets(model, peer, batches, peer_prob, broadcast)
    train_loss = ncr_code_loss if broadcast else ncr_train_loss
    loss_clean = train_loss(sim_of(model, batches["clean"]), target_clean)
    if two_steps:  # the clean step, then the noisy one on the updated weights
        norms = [code_adam_step(model, opt, loss_clean, clip)]
        norms.append(code_adam_step(model, opt, train_loss(sim_of(model, batches["noisy"]), target_noisy), clip))
    else:
        loss = loss_clean + train_loss(sim_of(model, batches["noisy"]), target_noisy)
        norms = [code_adam_step(model, opt, loss, clip)]
    return (target_clean, target_noisy), norms


@pytest.mark.parametrize("separate, margins", [(True, "per_pair"), (False, "per_pair"), (True, "broadcast")])
def test_ncr_optimizer_steps_are_the_codes(separate, margins):
    """ncr.separate_steps=true: after one iteration (run_step, clip 2.0, Adam) the model's parameters
    equal NCR's code restated (``ncr_code_iteration``: two clipped Adam steps, clean then noisy);
    false (the default): one clipped step on the summed loss; with ncr.margins=broadcast as well
    (ncr-official), the code itself: its broadcast margins in both steps. All: the targets the losses
    got are the ones of the weights before the iteration (with two steps the noisy one is not
    recomputed after the clean step), every step's gradient norm exceeds the clip, and the two ways
    end at different parameters. Dropout 0.5, the same draws in both."""
    import copy

    from fastncl.step import run_step

    clip, lr = 2.0, 1e-2
    broadcast = margins == "broadcast"
    method = NCR(config(("ncr.separate_steps", separate), ("ncr.margins", margins), method="ncr"))
    assert method.separate_steps is separate
    model, peer = tiny_model(0, dropout=0.5), tiny_model(1, dropout=0.5)
    peer.eval()
    batches = {"clean": tiny_batch(1, 12, 0), "noisy": tiny_batch(2, 12, 12)}
    peer_prob = torch.linspace(0.05, 0.95, 24)
    expected, other = copy.deepcopy(model), copy.deepcopy(model)

    seen = []  # the targets the soft-margin losses get
    soft_triplet = method._soft_triplet

    def recording(sim, label, keep=None):
        seen.append(label)
        return soft_triplet(sim, label, keep)

    method._soft_triplet = recording
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(5)  # the eval-mode forwards draw nothing: the train-mode ones draw alike below
    groups = method.train_groups(model, peer, batches, peer_prob, co_epoch=100)
    assert [g.__name__ for g in groups] == ["clean", "noisy"]
    run_step(opt, groups, method.separate_steps, clip)
    assert int(opt.state[model.region_proj.weight]["step"]) == (2 if separate else 1)

    torch.manual_seed(5)
    targets, norms = ncr_code_iteration(expected, peer, batches, peer_prob, separate, lr, clip, broadcast)
    torch.manual_seed(5)
    ncr_code_iteration(other, peer, batches, peer_prob, not separate, lr, clip, broadcast)
    for got, want in zip(model.parameters(), expected.parameters()):
        _close(got.detach(), want.detach(), rtol=1e-5)
    close(seen[0], targets[0])  # broadcast: the (B, B) target
    close(seen[1], targets[1].view(-1))  # the method keeps the noisy target (B,) and broadcasts its (B, 1) view
    with torch.no_grad():
        model.eval()
        after = (ncr_predict(sim_of(model, batches["noisy"])) + ncr_predict(sim_of(peer, batches["noisy"]))) / 2
    assert (after - targets[1].view(-1)).abs().max() > 1e-3  # the updated weights would give another target
    assert min(norms) > clip
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(expected.parameters(), other.parameters()))


@pytest.mark.parametrize("method, epochs, noisy_start", [("ncr", 12, 6), ("ncr", 40, 20), ("esc", 12, 6),
                                                          ("esc", 7, 3)])
def test_noisy_subset_joins_after_half_the_epochs(method, epochs, noisy_start):
    cfg = config(("optim.epochs", epochs), (f"{method}.train_noisy", True), method=method)
    assert getattr(cfg, method).noisy_start == noisy_start
    m = NCR(cfg) if method == "ncr" else ESC(cfg)
    assert m.active_subsets(noisy_start - 1) == ("clean",)
    assert m.active_subsets(noisy_start) == ("clean", "noisy")
    assert getattr(config((f"{method}.noisy_start", 0), method=method), method).noisy_start == 0  # explicit wins


@pytest.mark.parametrize("method", ["ncr", "esc"])
def test_train_noisy_off_trains_the_clean_subset_alone(method):
    cfg = config(("optim.epochs", 12), (f"{method}.train_noisy", False), method=method)
    m = NCR(cfg) if method == "ncr" else ESC(cfg)
    assert [m.active_subsets(e) for e in (0, 6, 11, 100)] == [("clean",)] * 4
    assert "noisy" in m.subset_names  # the split still names the noisy pairs (diagnostics, guard)


def test_ncr_trains_only_the_clean_subset_before_noisy_start():
    method = NCR(config(method="ncr"))
    batches = {"clean": tiny_batch(1, 8, 0)}
    groups = method.train_groups(tiny_model(0), tiny_model(1), batches, torch.ones(8), co_epoch=0)
    assert [g.__name__ for g in groups] == ["clean"]


# ---------------------------------------------------------------------------------------------
# ESC's labels come from the features the similarity uses


class TwoFeatures:
    """A dot-product backbone whose pooled features disagree with its global ones: each batch's
    images tensor is looked up in ``encodings``."""

    label_features = "global"
    dot_product = True
    training = False

    def __init__(self, encodings: dict):
        self.encodings = encodings

    def encode_images(self, images):
        return self.encodings[id(images)][0]

    def encode_captions(self, tokens, lengths):
        return self.encodings[id(tokens)][1]

    def similarity(self, images, captions):
        return images.global_ @ captions.global_.T


def test_esc_labels_use_the_similaritys_features():
    """Global features: every pair's image and caption agree with the anchors (label 1). Pooled
    features: captions one-hot and distinct, so no caption resembles an anchor's (label 0)."""
    g = torch.Generator().manual_seed(0)
    b = 10
    batches = {"clean": tiny_batch(0, b, 0), "noisy": tiny_batch(1, b, b)}
    encodings = {}
    for k, batch in enumerate(batches.values()):
        g_img = torch.nn.functional.normalize(torch.rand(b, 6, generator=g) + 0.1, dim=-1)  # positive cosines
        p_img = torch.rand(b, 2 * b, generator=g) + 0.1
        p_txt = torch.eye(2 * b)[k * b:(k + 1) * b]
        encodings[id(batch.images)] = (Encoding(g_img, p_img), None)
        encodings[id(batch.tokens)] = (None, Encoding(g_img.clone(), p_txt))
    peer = TwoFeatures(encodings)
    method = ESC(config(("esc.clean_labels", "bicro"), method="esc"))
    labels = method._peer_labels(peer, batches, with_noisy=True)
    close(labels["clean"], torch.ones(b))
    close(labels["noisy"], torch.ones(b))
    pooled = ESC(config(("esc.clean_labels", "bicro"), ("esc.label_features", "pooled"), method="esc"))
    labels = pooled._peer_labels(peer, batches, with_noisy=True)
    assert torch.all(labels["noisy"] == 0)  # fastncl <= 0.1.0's reading on vse: no signal


def bicro_code_consistency(q_img, q_txt, k_img, k_txt) -> torch.Tensor:
    """(Bq,) BiCro's and ESC's consistency of each query with the anchors (the keys), restated in
    float64 from their code (``SIM_PAIR``, ``SIM_SELE``): per direction, the anchor with the largest
    cosine a in one modality, b the other modality's cosine to it, then a / b if that is below 1,
    else b / a; the mean of the two directions."""
    def cos(x, y):
        x, y = x.double(), y.double()
        return (x @ y.T) / (x.norm(dim=1).view(-1, 1) * y.norm(dim=1).view(1, -1))

    c_img, c_txt = cos(q_img, k_img), cos(q_txt, k_txt)
    directions = []
    for chosen_by, other in ((c_img, c_txt), (c_txt, c_img)):
        ratios = []
        for i in range(chosen_by.shape[0]):
            k = int(chosen_by[i].argmax())
            a, b = float(chosen_by[i, k]), float(other[i, k])
            ratios.append(a / b if a / b < 1 else b / a)
        directions.append(torch.tensor(ratios, dtype=torch.float64))
    return (directions[0] + directions[1]) / 2


def test_bicro_ratio_as_the_code_computes_it_on_signed_cosines():
    """esc.label_ratio=code: BiCro's consistency equals the float64 restatement of the code on
    features with cosines of both signs; the default ("positive") is min / max on positive cosines
    and 0 otherwise. By hand: both positive, both forms 0.5; both negative (-0.2, -0.5): 0.4 and 0;
    mixed (0.3, -0.5): the code's a / b = -0.6 (not min(a / b, b / a) = -5 / 3) and 0."""
    g = torch.Generator().manual_seed(11)
    q_img, q_txt = torch.randn(33, 4, generator=g), torch.randn(33, 4, generator=g)
    k_img, k_txt = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    every = torch.ones(7, dtype=torch.bool)
    expected = bicro_code_consistency(q_img, q_txt, k_img, k_txt)
    assert (expected < 0).any() and (expected > 0).any()
    got = bicro_consistency(q_img, q_txt, k_img, k_txt, every, ops=AUTO, ratio="code")
    _close(got, expected, rtol=1e-4)  # a / b near b = 0 amplifies fp32 rounding
    mask = torch.tensor([True, False, True, True, False, False, True])  # only some keys are anchors
    got = bicro_consistency(q_img, q_txt, k_img, k_txt, mask, ops=AUTO, ratio="code")
    _close(got, bicro_code_consistency(q_img, q_txt, k_img[mask], k_txt[mask]), rtol=1e-4)

    positive = bicro_consistency(q_img, q_txt, k_img, k_txt, every, ops=AUTO)
    assert positive.min() >= 0 and positive.max() <= 1 and not torch.allclose(positive, got)
    a = torch.tensor([0.4, 0.8, -0.2, -0.5, 0.3, -0.5])
    b = torch.tensor([0.8, 0.4, -0.5, -0.2, -0.5, 0.3])
    close(_ratio(a, b, "code"), [0.5, 0.5, 0.4, 0.4, -0.6, -5 / 3])
    close(_ratio(a, b, "positive"), [0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    zeros = torch.tensor([0.0, -0.3, 0.3, float("-inf")]), torch.tensor([0.0, 0.0, 0.0, 0.5])
    out = _ratio(*zeros, "code")  # 0 / 0, -0.3 / 0, 0.3 / 0 and no anchor: finite
    assert torch.isfinite(out).all() and out[0] == 0 and out[1] < -1e5 and out[2] == 0 and out[3] == 0


def test_esc_official_labels_use_the_codes_ratio():
    """esc-official sets esc.label_ratio=code, and ESC's BiCro labels (clean: 1 for the anchors, the
    batch's top 2 hinge confidences, else 0.5 + consistency / 2; noisy: the consistency with the
    clean anchors, 0 at or below 0.5) are built from it: equal to the float64 restatement."""
    assert config(preset="esc-official").esc.label_ratio == "code"
    assert config(method="esc").esc.label_ratio == "positive"
    b = 10
    g = torch.Generator().manual_seed(4)
    batches = {"clean": tiny_batch(0, b, 0), "noisy": tiny_batch(1, b, b)}
    features, encodings = {}, {}
    for name, batch in batches.items():
        features[name] = (torch.nn.functional.normalize(torch.randn(b, 5, generator=g), dim=-1),
                          torch.nn.functional.normalize(torch.randn(b, 5, generator=g), dim=-1))
        img, txt = features[name]
        encodings[id(batch.images)] = (Encoding(img, img), None)
        encodings[id(batch.tokens)] = (None, Encoding(txt, txt))

    class FixedPeer(TwoFeatures):
        def similarity(self, images, captions):  # hinge confidences rising with the index
            return torch.diag(torch.linspace(0.01, 0.19, b))

    method = ESC(config(("esc.clean_labels", "bicro"), ("esc.label_ratio", "code"), ("esc.noisy_loss", "soft"),
                        method="esc"))  # esc-official's noise_soft: the noisy labels are cut
    labels = method._peer_labels(FixedPeer(encodings), batches, with_noisy=True)
    anchors = torch.arange(b) >= b - 2  # int(b * 0.1) + 1 = 2 anchors: the two largest confidences
    img, txt = features["clean"]
    clean = bicro_code_consistency(img, txt, img[anchors], txt[anchors])
    close(labels["clean"], torch.where(anchors, torch.ones(b, dtype=torch.float64), 0.5 + clean / 2))
    noisy = bicro_code_consistency(*features["noisy"], img[anchors], txt[anchors])
    assert (noisy > 0.5).any() and (noisy <= 0.5).any()
    close(labels["noisy"], torch.where(noisy <= 0.5, torch.zeros(b, dtype=torch.float64), noisy))


# ---------------------------------------------------------------------------------------------
# ESC's soft triplets as ESC's code computes them (esc-official: esc.margins=broadcast,
# esc.clean_label_cut=code), restated in float64 from ESC's model.py (BiCro's, which ESC copies)


def esc_code_loss(sim: torch.Tensor, labels: torch.Tensor, mode: str, margin: float = 0.2,
                  noise_tem: float = 0.5) -> torch.Tensor:
    """``ContrastiveLoss`` with labels, as ``SGRAF.train`` calls it on a clean or a noisy batch
    (exponential soft margin, hardest negatives): m = margin (10**y - 1) / 9 of the (B,) labels, which
    torch broadcasts against the (B, B) scores as a row, so entry (i, j) takes caption j's margin in
    both costs: cost_im[i, j] = [m_j + S_ij - S_jj]_+ (caption j against image i), cost_s[i, j] =
    [m_j + S_ij - S_ii]_+ (image i against caption j: the code transposes the margin first, which
    does nothing to a 1-D tensor); diagonals zeroed; max of cost_s over j, of cost_im over i. Mode
    "noise_soft" (as "train"): every pair's two hinges summed; "noise_hard": only the pairs labelled
    above noise_tem."""
    s = sim.double()
    b = s.shape[0]
    m = (margin * (10 ** labels.double() - 1) / 9).view(1, b)
    d = s.diagonal()
    eye = torch.eye(b, dtype=torch.bool)
    cost_s = (m + s - d.view(b, 1)).clamp_min(0).masked_fill(eye, 0)
    cost_im = (m + s - d.view(1, b)).clamp_min(0).masked_fill(eye, 0)
    per_pair = cost_s.max(dim=1).values + cost_im.max(dim=0).values
    if mode == "noise_hard":
        per_pair = per_pair * (labels.double() > noise_tem)
    return per_pair.sum()


def esc_code_predict(peer, batches, mode: str, margin: float = 0.2, noise_tem: float = 0.5) -> dict:
    """``SGRAF.predict`` by the peer (eval mode), restated in float64: the anchors are the
    B // 10 + 1 pairs with the largest p = clamp(margin - (mean_j cost_s[i, j] + mean_j cost_im[j, i])
    / 2, 0, margin) (a scalar margin, means over B); a clean label is 1 at an anchor, else 0.5 + c / 2,
    c the consistency of the pair with the anchors on the mean-pooled features
    (``bicro_code_consistency``); a noisy label is the consistency of the noisy pair with the clean
    batch's anchors; under noise_soft a label <= noise_tem becomes 0, under noise_hard it stays; every
    label is clamped to [0, 1]. The code writes the non-anchors' clean labels with
    ``scatter_(0, noise_index, values)``, whose t-th value goes to the t-th non-anchor in rising p:
    the value of batch position t, not that pair's own (docs/methods.md); this restatement gives
    every pair its own, as fastncl does."""
    with torch.no_grad():
        feats = {}
        for name, b in batches.items():
            feats[name] = (peer.encode_images(b.images).pooled, peer.encode_captions(b.tokens, b.lengths).pooled)
        cost_s, cost_im = ncr_costs(sim_of(peer, batches["clean"]), margin)
    p = (margin - (cost_s.mean(dim=1) + cost_im.mean(dim=0)) / 2).clamp(0, margin)
    n = p.shape[0]
    k = n // 10 + 1
    order = torch.sort(p, descending=True).values
    assert order[k - 1] > order[k]  # no tie at the anchors' edge: the code's argsort and topk agree
    anchors = p >= order[k - 1]
    img, txt = feats["clean"]

    def cut(y):
        return (torch.where(y <= noise_tem, torch.zeros_like(y), y) if mode == "noise_soft" else y).clamp(0, 1)

    clean = bicro_code_consistency(img, txt, img[anchors], txt[anchors])
    labels = {"clean": torch.where(anchors, torch.ones(n, dtype=torch.float64), cut(0.5 + clean / 2))}
    labels["noisy"] = cut(bicro_code_consistency(*feats["noisy"], img[anchors], txt[anchors]))
    return labels


def esc_official_groups(backend: str, noisy_loss: str, *overrides):
    """The peer's labels and the noisy and clean groups' losses and gradients of esc-official (with
    esc.noisy_loss and ``overrides``) on tiny models, the noisy step first as the code; dropout 0.5 in
    the trained model, the same draws as the restatement's (``code``); the peer in eval mode."""
    model, peer = tiny_model(2, dropout=0.5), tiny_model(3, dropout=0.5)
    peer.eval()
    batches = {"clean": tiny_batch(7, 12, 0), "noisy": tiny_batch(4, 12, 12)}
    method = ESC(config(("esc.noisy_loss", noisy_loss), *overrides, preset="esc-official"), ops=Ops(backend))
    groups = method.train_groups(model, peer, batches, None, co_epoch=100)
    assert [g.__name__ for g in groups] == ["noisy", "clean", "esc"]  # separate steps: L_ESC has its own
    params = list(model.parameters())
    out = {"labels": method._peer_labels(peer, batches, with_noisy=True)}
    for seed, group in zip((7, 8), groups[:2]):
        torch.manual_seed(seed)
        loss = group()["loss"]
        out[group.__name__] = (loss, torch.autograd.grad(loss, params))

    def code(name, labels):
        torch.manual_seed({"noisy": 7, "clean": 8}[name])
        loss = esc_code_loss(sim_of(model, batches[name]), labels[name], f"noise_{noisy_loss}")
        return loss, torch.autograd.grad(loss, params)

    return out, esc_code_predict(peer, batches, f"noise_{noisy_loss}"), code


def skip_without_triton(backend):
    if backend == "triton":
        pytest.importorskip("triton", reason="the Triton kernels need the triton package")
        if torch.cuda.is_available():
            pytest.skip("CPU tensors reach the Triton kernels only in the interpreter (tests/conftest.py: no GPU)")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("noisy_loss", ["soft", "hard"])
def test_esc_broadcast_margins_are_the_codes(noisy_loss, backend):
    """esc.margins=broadcast (esc-official): both soft triplets of ESC's code, the clean batch's with
    BiCro's labels and the noisy batch's with the labels the peer predicts, and the gradient each of
    their optimizer steps applies, equal the float64 restatement of the code (``esc_code_loss`` on
    ``esc_code_predict``'s labels: image i's hinge against negative caption j takes caption j's
    margin), with the reference ops and the Triton kernels (on CPU in the interpreter), under
    noise_soft and noise_hard; the per-pair default's losses differ on both batches."""
    skip_without_triton(backend)
    got, labels, code = esc_official_groups(backend, noisy_loss)
    for name in ("noisy", "clean"):
        close(got["labels"][name], labels[name])
        loss, grads = got[name]
        expected, expected_grads = code(name, labels)
        close(loss, expected)
        for g, e in zip(grads, expected_grads):
            _close(g, e, rtol=1e-5)
    per_pair, _, _ = esc_official_groups(backend, noisy_loss, ("esc.margins", "per_pair"))
    for name in ("noisy", "clean"):
        a, b = float(got[name][0].detach()), float(per_pair[name][0].detach())
        assert abs(a - b) > 1e-3 * b, (name, a, b)


@pytest.mark.parametrize("noisy_loss", ["soft", "hard"])
def test_esc_clean_label_cut_is_the_codes(noisy_loss):
    """esc.clean_label_cut=code (esc-official): D_c's BiCro labels are the code's, clamped to [0, 1],
    a label <= 0.5 zeroed under noise_soft and its pair left out of the clean loss under noise_hard
    (the code trains the clean batch in the noisy batch's mode), the anchors kept at 1; the clean
    loss and its gradient equal the restatement's. The inputs hold labels the cut and the clamp
    change (0.5 + c / 2 in (0, 0.5] and below 0); without the cut (fastncl <= 0.1.0) they stay and
    the clean loss differs."""
    got, labels, code = esc_official_groups("torch", noisy_loss)
    loss, grads = got["clean"]
    expected, expected_grads = code("clean", labels)
    close(got["labels"]["clean"], labels["clean"])
    close(loss, expected)
    for g, e in zip(grads, expected_grads):
        _close(g, e, rtol=1e-5)
    uncut, _, _ = esc_official_groups("torch", noisy_loss, ("esc.clean_label_cut", "none"))
    raw = uncut["labels"]["clean"]
    assert ((raw > 0) & (raw <= 0.5)).any() and (raw < 0).any() and (raw > 0.5).any()
    anchors = raw == 1
    assert int(anchors.sum()) == 2 and torch.equal(got["labels"]["clean"][anchors], raw[anchors])
    if noisy_loss == "soft":
        close(got["labels"]["clean"], torch.where(raw <= 0.5, torch.zeros_like(raw), raw))
    else:
        close(got["labels"]["clean"], raw.clamp(0, 1))
    # under noise_soft only the margins of the labels in (0.5, ...] cut to 0 change (at most 0.048 each)
    assert abs(float(loss.detach()) - float(uncut["clean"][0].detach())) > 1e-3 * float(loss.detach())


def test_backbones_declare_their_label_features():
    from fastncl.models import SGRAF

    assert VSE.label_features == "global" and SGRAF.label_features == "pooled"


# ---------------------------------------------------------------------------------------------
# SPS's reliable-set floor


def test_sps_reliable_floor_when_no_pair_reaches_epsilon_1():
    method = SPS(config(method="sps"))  # epsilon_1 0.99, epsilon_2 0.5, floor 0.5
    p = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])  # never above 0.99
    fit = fake_fit(p)
    sub = method.subsets(fit, np.zeros(10, bool), 0)
    # 6 pairs above epsilon_2: the floor keeps the 3 largest reliable
    assert sub["reliable"].tolist() == [0, 1, 2]
    assert sub["quasi_clean"].tolist() == [3, 4, 5]
    assert sub["noisy"].tolist() == [6, 7, 8, 9]
    notes = method.split_notes(fit)
    assert len(notes) == 1 and "reliable set below its floor" in notes[0] and "0.85" in notes[0]


def test_sps_floor_keeps_ties_and_leaves_a_healthy_split_alone():
    method = SPS(config(method="sps"))
    p = np.array([0.9, 0.9, 0.9, 0.9, 0.3])
    assert method.subsets(fake_fit(p), np.zeros(5, bool), 0)["reliable"].tolist() == [0, 1, 2, 3]  # ties kept
    healthy = np.array([0.999, 0.995, 0.991, 0.7, 0.2])  # 3 of 4 pass epsilon_1: above the floor
    assert method.subsets(fake_fit(healthy), np.zeros(5, bool), 0)["reliable"].tolist() == [0, 1, 2]
    assert method.split_notes(fake_fit(healthy)) == []
    off = SPS(config(("sps.min_reliable_fraction", 0.0), method="sps"))  # no floor: the paper's rule
    assert off.subsets(fake_fit(p), np.zeros(5, bool), 0)["reliable"].tolist() == []
    assert config(preset="sps-official").sps.min_reliable_fraction == 0.0


# ---------------------------------------------------------------------------------------------
# The hinge baseline, the data-set presets


def test_hinge_baseline_losses():
    method = Hinge(config(method="hinge"))
    assert not method.uses_split
    model = tiny_model(0)
    b = tiny_batch(3, 9)
    sim = sim_of(model, b)
    cost_s, cost_im = ncr_costs(sim, 0.2)
    # warm-up: the mean over the B - 1 negatives (the NCR/ESC warm-up's, fastncl's triplet_terms)
    close(method.warmup_loss(model, b)["loss"], (cost_s.sum(dim=1) + cost_im.sum(dim=0)).sum() / 8)
    (group,) = method.train_groups(model, None, {"all": b}, None, co_epoch=0)
    close(group()["loss"], cost_s.max(dim=1).values.sum() + cost_im.max(dim=0).values.sum())


def test_emoji_data_preset_and_what_beats_it():
    cfg = config(("data.source", "emoji"), method="esc")
    assert cfg.model.embed_dim == 128 and cfg.optim.warmup_epochs == 2 and cfg.optim.epochs == 6
    assert cfg.esc.noisy_start == 3 and cfg.sps.noisy_start == 3  # half of 6; SPS: its own data preset
    assert cfg.ncr.noisy_start is None  # a section other than the run's method keeps its None
    assert config(("data.source", "emoji"), method="ncr").ncr.noisy_start == 3
    over = config(("data.source", "emoji"), ("optim.epochs", 10), ("model.embed_dim", 64), method="esc")
    assert over.optim.epochs == 10 and over.model.embed_dim == 64 and over.esc.noisy_start == 5
    official = config(("data.source", "emoji"), preset="sps-official")  # a method preset beats the data preset
    assert official.optim.epochs == 40 and official.model.embed_dim == 128
    plain = config(method="esc")
    assert plain.model.embed_dim == 256 and data_preset("synthetic") is None


def test_the_report_draws_the_reliable_cut_the_split_used():
    from fastncl.records import SplitFile

    p = np.array([[0.999, 0.97, 0.95, 0.4], [0.999, 0.995, 0.3, 0.2]], dtype=np.float32)
    subset = np.array([[0, 0, 1, 2], [0, 0, 2, 2]], dtype=np.int8)  # model A: epsilon_1 fell to just below 0.97
    cuts = {"noisy": np.array([0.5, 0.5]), "reliable": np.array([np.nextafter(0.97, 0), 0.99])}
    split = SplitFile(p, p, p, cuts["noisy"], subset, ["reliable", "quasi_clean", "noisy"], "gmm", [{}, {}], None, cuts)
    cfg = {"sps": {"reliable_threshold": 0.99}}
    label, cut, _ = SPS.report_cuts(cfg, split, 0)[0]
    assert label == "ε1 (floor's fallback)" and cut == cuts["reliable"][0]
    assert SPS.report_cuts(cfg, split, 1)[0][:2] == ("ε1", 0.99)
    old = SplitFile(p, p, p, cuts["noisy"], subset, split.subset_names, "gmm", [{}, {}])  # a folder from before
    assert SPS.report_cuts(cfg, old, 0)[0][:2] == ("ε1", 0.99)


def test_the_split_is_one_value_with_the_cuts_it_used():
    """SPS's division holds the effective epsilon_1 its subsets were cut at, and its notes say it."""
    method = SPS(config(("sps.min_reliable_fraction", 0.5)))
    p = np.array([0.999, 0.98, 0.97, 0.96, 0.2, 0.1])  # one pair above 0.99: below the floor of 2
    division = method.split(fake_fit(p), np.zeros(len(p), bool), 0)
    reliable = division.cuts["reliable"]
    assert reliable < 0.99 and division.subsets["reliable"].tolist() == np.flatnonzero(p > reliable).tolist()
    assert division.subsets["quasi_clean"].tolist() == np.flatnonzero((p > division.noisy_cut) & (p <= reliable)).tolist()
    assert any(f"fell back to {reliable:.4f}" in note for note in division.notes)
    healthy = method.split(fake_fit(np.array([0.999, 0.995, 0.2])), np.zeros(3, bool), 0)
    assert healthy.cuts["reliable"] == 0.99 and healthy.notes == []
