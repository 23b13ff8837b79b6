"""The reference ops of fastncl.kernels against naive float64 oracles, gradcheck and the contract.

The reference is the contract the Triton kernels must match, so it is checked here against
math written differently (tests/oracles.py), with the one tolerance table (tests/tolerances.py).
Every random test draws from a torch.Generator seeded from its own parameters; the seed is in
every failure message.
"""
from __future__ import annotations

import pytest
import torch

import fastncl.kernels as K
import oracles
from inputs import (as_tuple, kink_free_sim, make_generator, off_diagonal, random_sim, reference_grads, uniform,
                    upstream_grad)
from tolerances import assert_argmax_close, assert_close, rtol

SIZES = (1, 2, 7, 33)
TAUS = (0.02, 0.07, 1.0)
LOW_PRECISION = (torch.float16, torch.bfloat16)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------
# values against the float64 oracle


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("n", SIZES)
def test_infonce_terms_matches_oracle(n, tau, dtype):
    gen, seed = make_generator("infonce", n, tau, dtype)
    sim = random_sim(n, gen, dtype)
    actual = K.infonce_terms(sim, tau)
    expected = oracles.infonce_terms(sim.double(), tau)  # the same (rounded) values, upcast
    # the losses are differences of log-sum-exps of logits of size |sim| / tau: their floor is
    # that scale (a saturated softmax has losses ~1e-12 that fp32 resolves only to eps * |logit|);
    # the probabilities are exp(-loss), so a relative error equal to that absolute one
    logit_scale = float(sim.double().abs().max()) / tau
    names = ("loss_i2t", "loss_t2i", "prob_i2t", "prob_t2i")
    for k, (name, a, e) in enumerate(zip(names, actual, expected)):
        assert a.shape == (n,)
        assert_close(a, e, rtol(dtype), f"infonce_terms {name} seed={seed}", scale=logit_scale if k < 2 else None)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("alpha", (0.0, 0.05, 0.3))
@pytest.mark.parametrize("n", SIZES)
def test_cross_consistency_matches_oracle(n, alpha, dtype):
    gen, seed = make_generator("cross", n, alpha, dtype)
    sim = random_sim(n, gen, dtype)
    actual = K.cross_consistency(sim, alpha)
    assert actual.shape == ()
    assert_close(actual, oracles.cross_consistency(sim.double(), alpha), rtol(dtype), f"seed={seed}")


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("alpha", (0.0, 0.05, 0.3))
@pytest.mark.parametrize("n", SIZES)
def test_metric_consistency_matches_oracle(n, alpha, dtype):
    gen, seed = make_generator("metric", n, alpha, dtype)
    sim_img, sim_txt = random_sim(n, gen, dtype), random_sim(n, gen, dtype)
    actual = K.metric_consistency(sim_img, sim_txt, alpha)
    assert actual.shape == ()
    expected = oracles.metric_consistency(sim_img.double(), sim_txt.double(), alpha)
    assert_close(actual, expected, rtol(dtype), f"seed={seed}")


def _anchor(kind: str, n: int, gen: torch.Generator):
    if kind == "int":
        return int(torch.randint(n, (), generator=gen))
    if kind == "tensor0d":
        return torch.randint(n, (), generator=gen)
    a = torch.randint(n, (n,), generator=gen)  # per-sample anchors (ESC Eq. 14)
    a[0] = 0  # pair 0 is its own anchor
    return a


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("alpha", (0.0, 0.05))
@pytest.mark.parametrize("anchor_kind", ("int", "tensor0d", "per_sample"))
@pytest.mark.parametrize("n", SIZES)
def test_esc_anchor_terms_matches_oracle(n, anchor_kind, alpha, normalize, dtype):
    gen, seed = make_generator("esc", n, anchor_kind, alpha, normalize, dtype)
    sim = random_sim(n, gen, dtype)
    anchor = _anchor(anchor_kind, n, gen)
    actual = K.esc_anchor_terms(sim, anchor, alpha, normalize)
    assert actual.shape == (n,)
    expected = oracles.esc_anchor_terms(sim.double(), anchor, alpha, normalize)
    assert_close(actual, expected, rtol(dtype), f"seed={seed} anchor={anchor}")
    # a pair that is its own anchor gets exactly 0
    anchors = anchor.expand(n) if isinstance(anchor, torch.Tensor) else torch.full((n,), anchor)
    own = anchors == torch.arange(n)
    assert own.any() or anchor_kind != "per_sample"
    assert torch.all(actual[own] == 0)


def test_esc_anchor_terms_normalize_ignores_alpha():
    gen, seed = make_generator("esc-normalize-alpha")
    sim = random_sim(9, gen)
    a = K.esc_anchor_terms(sim, 3, 0.0, True)
    b = K.esc_anchor_terms(sim, 3, 10.0, True)
    assert torch.equal(a, b), f"seed={seed}"


def test_esc_anchor_terms_int_and_tensor_anchor_agree():
    gen, _ = make_generator("esc-anchor-forms")
    sim = random_sim(7, gen)
    by_int = K.esc_anchor_terms(sim, 4, 0.01)
    assert torch.equal(by_int, K.esc_anchor_terms(sim, torch.tensor(4), 0.01))
    assert torch.equal(by_int, K.esc_anchor_terms(sim, torch.full((7,), 4), 0.01))


# a triplet margin: one for all, pair i's (both directions), or one per entry of sim (NCR's code)
MARGIN_SHAPES = {"float": lambda n: None, "per_pair": lambda n: (n,), "per_entry": lambda n: (n, n)}


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("hardest", (True, False))
@pytest.mark.parametrize("margin_kind", MARGIN_SHAPES)
@pytest.mark.parametrize("n", SIZES)
def test_triplet_terms_matches_oracle(n, margin_kind, hardest, dtype):
    gen, seed = make_generator("triplet", n, margin_kind, hardest, dtype)
    sim = random_sim(n, gen, dtype)
    shape = MARGIN_SHAPES[margin_kind](n)
    margin = 0.2 if shape is None else uniform(shape, gen, 0.0, 0.5, torch.float32)
    actual = K.triplet_terms(sim, margin, hardest)
    assert actual.shape == (n,)
    expected = oracles.triplet_terms(sim.double(), margin, hardest)
    assert_close(actual, expected, rtol(dtype), f"seed={seed}")


@pytest.mark.parametrize("hardest", (True, False))
@pytest.mark.parametrize("margin", (0.2, "tensor"))
def test_triplet_terms_single_pair_is_zero(margin, hardest):
    sim = torch.tensor([[0.3]])
    m = torch.tensor([0.5]) if margin == "tensor" else margin
    out = K.triplet_terms(sim, m, hardest)
    assert out.shape == (1,)
    assert torch.equal(out, torch.zeros(1))


def test_triplet_terms_hand_computed():
    # pair 0: i2t negative 0.2 + 0.5 - 0.9 < 0 -> 0; t2i negative 0.2 + 0.8 - 0.9 = 0.1
    # pair 1: i2t negative 0.2 + 0.8 - 0.1 = 0.9; t2i negative 0.2 + 0.5 - 0.1 = 0.6
    sim = torch.tensor([[0.9, 0.5], [0.8, 0.1]], dtype=torch.float64)
    expected = torch.tensor([0.1, 1.5], dtype=torch.float64)
    assert_close(K.triplet_terms(sim, 0.2, True), expected, 1e-12)
    assert_close(K.triplet_terms(sim, 0.2, False), expected, 1e-12)  # one negative: mean = max


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("masked", (False, True))
@pytest.mark.parametrize("shape", ((1, 1, 1), (2, 7, 3), (7, 33, 64), (33, 2, 16)))
def test_proxy_argmax_matches_oracle(shape, masked, dtype):
    n_query, n_keys, dim = shape
    gen, seed = make_generator("proxy", shape, masked, dtype)
    query = uniform((n_query, dim), gen, dtype=dtype)
    keys = uniform((n_keys, dim), gen, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(n_keys, generator=gen) > 0.4
        mask[0] = True  # at least one valid key (the all-masked case has its own test)
    index, value = K.proxy_argmax(query, keys, mask)
    assert index.dtype == torch.int64 and index.shape == (n_query,)
    exp_index, exp_value = oracles.proxy_argmax(query.double(), keys.double(), mask)
    assert_close(value, exp_value, rtol(dtype), f"seed={seed}")
    # the index must be exact where the best key wins clearly; elsewhere the chosen key's score
    # must equal the best score (style B7)
    assert_argmax_close(index, exp_index, exp_value, query.double(), keys.double(), mask, f"seed={seed}", gap=1e-5)


def test_proxy_argmax_ties_go_to_the_lowest_index():
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]])
    query = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # row 1 ties with every key (all scores 0)
    index, value = K.proxy_argmax(query, keys)
    assert index.tolist() == [1, 0]
    assert value.tolist() == [1.0, 0.0]
    mask = torch.tensor([True, False, True, True, True])  # the first maximal key is masked out
    index, value = K.proxy_argmax(query, keys, mask)
    assert index.tolist() == [3, 0]
    assert value.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_proxy_argmax_all_masked_gives_minus_one_and_neg_inf(dtype):
    gen, _ = make_generator("proxy-all-masked", dtype)
    query, keys = uniform((4, 3), gen, dtype=dtype), uniform((5, 3), gen, dtype=dtype)
    index, value = K.proxy_argmax(query, keys, torch.zeros(5, dtype=torch.bool))
    assert index.dtype == torch.int64
    assert index.tolist() == [-1] * 4
    assert torch.all(torch.isneginf(value))
    exp_index, exp_value = oracles.proxy_argmax(query.double(), keys.double(), torch.zeros(5, dtype=torch.bool))
    assert torch.equal(index, exp_index)
    assert_close(value, exp_value, 1e-5)


def test_proxy_argmax_no_keys_gives_minus_one_and_neg_inf():
    index, value = K.proxy_argmax(torch.ones(3, 4), torch.ones(0, 4))
    assert index.tolist() == [-1, -1, -1] and index.dtype == torch.int64
    assert torch.all(torch.isneginf(value)) and value.dtype == torch.float32


def test_proxy_argmax_is_not_differentiable():
    query = torch.randn(3, 4, requires_grad=True)
    keys = torch.randn(5, 4, requires_grad=True)
    index, value = K.proxy_argmax(query, keys)
    assert not value.requires_grad and not index.requires_grad


# ---------------------------------------------------------------------------------------------
# gradients: gradcheck in float64, then fp32 / bf16 / fp16 gradients against float64 ones


def _gradcheck(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("n", (1, 2, 5))
def test_infonce_terms_gradcheck(n, tau):
    gen, _ = make_generator("infonce-gradcheck", n, tau)
    _gradcheck(lambda s: K.infonce_terms(s, tau), random_sim(n, gen, torch.float64))


def _away_from(values: torch.Tensor, kink: float, gap: float = 1e-3) -> bool:
    return bool(((values - kink).abs() > gap).all())


@pytest.mark.parametrize("alpha", (0.0, 0.05))
@pytest.mark.parametrize("n", (2, 5))
def test_cross_consistency_gradcheck(n, alpha):
    gen, _ = make_generator("cross-gradcheck", n, alpha)
    # the diagonal's (s - s.T)**2 is identically 0, so only the off-diagonal must avoid alpha
    sim = kink_free_sim(n, gen, lambda s: _away_from(off_diagonal((s - s.T) ** 2), alpha))
    _gradcheck(lambda s: K.cross_consistency(s, alpha), sim)


@pytest.mark.parametrize("alpha", (0.0, 0.05))
@pytest.mark.parametrize("n", (1, 2, 5))
def test_metric_consistency_gradcheck(n, alpha):
    gen, _ = make_generator("metric-gradcheck", n, alpha)
    sim_img = random_sim(n, gen, torch.float64)
    sim_txt = kink_free_sim(n, gen, lambda s: _away_from((sim_img - s) ** 2, alpha))
    _gradcheck(lambda a, b: K.metric_consistency(a, b, alpha), sim_img, sim_txt)


@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("alpha", (0.0, 0.05))
@pytest.mark.parametrize("anchor_kind", ("int", "tensor0d", "per_sample"))
@pytest.mark.parametrize("n", (2, 5))
def test_esc_anchor_terms_gradcheck(n, anchor_kind, alpha, normalize):
    gen, _ = make_generator("esc-gradcheck", n, anchor_kind, alpha, normalize)
    anchor = _anchor(anchor_kind, n, gen)
    anchors = torch.as_tensor(anchor).expand(n)
    rows = torch.arange(n)

    def ok(s):
        d = (s[anchors, rows] - s[rows, anchors]) ** 2
        own = anchors == rows  # identically 0 for a pair that is its own anchor
        return normalize or _away_from(d[~own], alpha)

    sim = kink_free_sim(n, gen, ok)
    _gradcheck(lambda s: K.esc_anchor_terms(s, anchor, alpha, normalize), sim)


@pytest.mark.parametrize("hardest", (True, False))
@pytest.mark.parametrize("margin_kind", MARGIN_SHAPES)
@pytest.mark.parametrize("n", (2, 5))
def test_triplet_terms_gradcheck(n, margin_kind, hardest):
    gen, _ = make_generator("triplet-gradcheck", n, margin_kind, hardest)
    shape = MARGIN_SHAPES[margin_kind](n)
    margin = 0.2 if shape is None else uniform(shape, gen, 0.05, 0.4, torch.float64)
    m = torch.as_tensor(margin, dtype=torch.float64)
    m_i2t, m_t2i = (m, m.T) if m.dim() == 2 else (m.expand(n).view(n, 1),) * 2

    def ok(s):
        diag = s.diagonal().view(n, 1)
        cost_i2t, cost_t2i = off_diagonal(m_i2t + s - diag), off_diagonal(m_t2i + s.T - diag)
        if not (_away_from(cost_i2t, 0.0) and _away_from(cost_t2i, 0.0)):
            return False
        if hardest and n > 2:  # the largest cost of each row must be unique
            for c in ((m_i2t + s - diag), (m_t2i + s.T - diag)):
                c = torch.where(torch.eye(n, dtype=torch.bool), -1.0, c.clamp_min(0))
                top2 = c.topk(2, dim=1).values
                if ((top2[:, 0] - top2[:, 1] < 1e-3) & (top2[:, 0] > 0)).any():
                    return False
        return True

    sim = kink_free_sim(n, gen, ok)
    if margin_kind != "float":  # the margin tensor is differentiable too
        _gradcheck(lambda s, mm: K.triplet_terms(s, mm, hardest), sim, margin)
    else:
        _gradcheck(lambda s: K.triplet_terms(s, margin, hardest), sim)


def test_hinges_pass_no_gradient_at_the_kink():
    # torch.relu's convention (gradient 0 at exactly 0), which the Triton kernels mirror with '>'
    sim = torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    K.cross_consistency(sim, 0.25).backward()  # (0.5 - 0)**2 - 0.25 == 0 exactly
    assert torch.equal(sim.grad, torch.zeros_like(sim))
    sim = torch.tensor([[0.5, 0.25], [0.25, 0.5]], dtype=torch.float64, requires_grad=True)
    K.triplet_terms(sim, 0.25, False).sum().backward()  # 0.25 + 0.25 - 0.5 == 0 exactly
    assert torch.equal(sim.grad, torch.zeros_like(sim))


def _grad_cases(n, gen, dtype):
    """(name, fn, inputs, output shapes, tau) for every differentiable op, inputs in ``dtype``.

    tau is set for InfoNCE, whose gradients have the natural scale |upstream| / tau (each is a
    softmax minus a one-hot, over tau); a saturated softmax makes them far smaller than that,
    and fp32 resolves 1 - p only to eps.
    """
    sim = random_sim(n, gen, dtype)
    other = random_sim(n, gen, dtype)
    anchors = torch.randint(n, (n,), generator=gen)
    margins = uniform((n,), gen, 0.0, 0.5, torch.float32)
    return [
        ("infonce_terms", lambda s: K.infonce_terms(s, 0.07), (sim,), [(n,)] * 4, 0.07),
        ("infonce_terms tau=0.02", lambda s: K.infonce_terms(s, 0.02), (sim,), [(n,)] * 4, 0.02),
        ("infonce_terms tau=1", lambda s: K.infonce_terms(s, 1.0), (sim,), [(n,)] * 4, 1.0),
        ("cross_consistency", lambda s: K.cross_consistency(s, 0.05), (sim,), [()], None),
        ("metric_consistency", lambda a, b: K.metric_consistency(a, b, 0.05), (sim, other), [()], None),
        ("esc_anchor_terms", lambda s: K.esc_anchor_terms(s, anchors, 0.01), (sim,), [(n,)], None),
        ("esc_anchor_terms normalize", lambda s: K.esc_anchor_terms(s, 1, 0.0, True), (sim,), [(n,)], None),
        ("triplet_terms hardest", lambda s: K.triplet_terms(s, margins, True), (sim,), [(n,)], None),
        ("triplet_terms mean", lambda s: K.triplet_terms(s, 0.2, False), (sim,), [(n,)], None),
    ]


@pytest.mark.parametrize("dtype", (torch.float32,) + LOW_PRECISION, ids=str)
@pytest.mark.parametrize("n", (2, 7, 33))
def test_gradients_match_float64(n, dtype):
    gen, seed = make_generator("grads", n, dtype)
    for name, fn, inputs, shapes, tau in _grad_cases(n, gen, dtype):
        upstreams = [upstream_grad(shape, gen) for shape in shapes]
        actual = reference_grads(fn, inputs, upstreams)
        expected = reference_grads(fn, [x.double() for x in inputs], upstreams)  # same values, upcast
        scale = None if tau is None else max(float(u.abs().max()) for u in upstreams) / tau
        for k, (a, e) in enumerate(zip(actual, expected)):
            assert a.dtype == dtype, f"{name}: gradient {k} is {a.dtype}, expected the input dtype {dtype}"
            assert_close(a, e, rtol(dtype, "grads"), f"{name} gradient {k} seed={seed}", scale=scale)


# ---------------------------------------------------------------------------------------------
# dtypes, overflow, in-place safety, non-contiguous inputs


def _op_calls(n, gen, dtype):
    """(name, fn(*inputs, backend=...), inputs) covering every op, inputs in ``dtype``."""
    sim, other = random_sim(n, gen, dtype), random_sim(n, gen, dtype)
    anchors = torch.randint(n, (n,), generator=gen)
    margins = uniform((n,), gen, 0.0, 0.5, torch.float32)
    mask = torch.arange(n) % 3 != 1
    return [
        ("infonce_terms", lambda s, **kw: K.infonce_terms(s, 0.07, **kw), (sim,)),
        ("cross_consistency", lambda s, **kw: K.cross_consistency(s, 0.05, **kw), (sim,)),
        ("metric_consistency", lambda a, b, **kw: K.metric_consistency(a, b, 0.05, **kw), (sim, other)),
        ("esc_anchor_terms", lambda s, **kw: K.esc_anchor_terms(s, anchors, 0.01, **kw), (sim,)),
        ("esc_anchor_terms normalize", lambda s, **kw: K.esc_anchor_terms(s, 2, 0.0, True, **kw), (sim,)),
        ("triplet_terms", lambda s, **kw: K.triplet_terms(s, margins, True, **kw), (sim,)),
        ("triplet_terms mean", lambda s, **kw: K.triplet_terms(s, 0.2, False, **kw), (sim,)),
        ("proxy_argmax", lambda q, k, **kw: K.proxy_argmax(q, k, mask, **kw), (sim, other)),
        # the embedding-level variants, on the same values read as (B, D) embeddings
        ("infonce_terms_embed", lambda a, b, **kw: K.infonce_terms_embed(a, b, 0.07, **kw), (sim, other)),
        ("cross_consistency_embed", lambda a, b, **kw: K.cross_consistency_embed(a, b, 0.05, **kw), (sim, other)),
        ("metric_consistency_embed", lambda a, b, **kw: K.metric_consistency_embed(a, b[:, :3], 0.05, **kw),
         (sim, other)),
    ]


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_output_dtypes(dtype):
    gen, _ = make_generator("dtypes", dtype)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    for name, fn, inputs in _op_calls(5, gen, dtype):
        outs = as_tuple(fn(*inputs))
        if name == "proxy_argmax":
            index, value = outs
            assert index.dtype == torch.int64, name
            outs = (value,)
        for out in outs:
            assert out.dtype == expected, f"{name}: {dtype} inputs gave {out.dtype}, expected {expected}"
            assert torch.isfinite(out).all(), name


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_no_overflow_with_unit_similarities(dtype, tau):
    # all similarities +-1: |sim| / tau = 50 at tau = 0.02, where a raw exp overflows fp16
    gen, seed = make_generator("overflow", dtype, tau)
    n = 33
    sim = torch.where(torch.rand(n, n, generator=gen) > 0.5, 1.0, -1.0).to(dtype)
    sim.fill_diagonal_(1.0)
    outs = K.infonce_terms(sim, tau)
    for k, (a, e) in enumerate(zip(outs, oracles.infonce_terms(sim.double(), tau))):
        assert torch.isfinite(a).all(), f"seed={seed}"
        assert_close(a, e, rtol(dtype), f"seed={seed}", scale=1.0 / tau if k < 2 else None)
    leaf = sim.clone().requires_grad_(True)
    l_i2t, l_t2i, _, _ = K.infonce_terms(leaf, tau)
    (l_i2t.sum() + l_t2i.sum()).backward()
    assert torch.isfinite(leaf.grad.float()).all()
    for name, fn, inputs in _op_calls(n, gen, dtype):
        inputs = (sim,) + tuple(torch.where(x > 0, 1.0, -1.0).to(dtype) for x in inputs[1:])
        for out in as_tuple(fn(*inputs)):
            assert torch.isfinite(out.float()).all(), f"{name} seed={seed}"


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_inputs_not_modified_in_place(dtype):
    gen, _ = make_generator("in-place", dtype)
    for name, fn, inputs in _op_calls(7, gen, dtype):
        before = [x.clone() for x in inputs]
        fn(*inputs)
        leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
        outs = [o for o in as_tuple(fn(*leaves)) if o.requires_grad]
        if outs:
            sum(o.float().sum() for o in outs).backward()
        for x, b in zip(inputs, before):
            assert torch.equal(x, b), f"{name} modified its input"
        for x, b in zip(leaves, before):
            assert torch.equal(x.detach(), b), f"{name} modified its input during backward"


def test_non_contiguous_inputs():
    gen, seed = make_generator("non-contiguous")
    big = random_sim(14, gen)
    for sim in (big[::2, ::2], big[:7, :7].T, big[1::2, :7]):
        assert not sim.is_contiguous()
        dense = sim.contiguous()
        for k, (a, e) in enumerate(zip(K.infonce_terms(sim, 0.07), oracles.infonce_terms(dense, 0.07))):
            assert_close(a, e, rtol(torch.float32), f"seed={seed}", scale=1 / 0.07 if k < 2 else None)
        assert_close(K.cross_consistency(sim, 0.05), oracles.cross_consistency(dense, 0.05), 1e-5)
        assert_close(K.metric_consistency(sim, dense.T, 0.0), oracles.metric_consistency(dense, dense.T, 0.0), 1e-5)
        assert_close(K.esc_anchor_terms(sim, 3, 0.0, True), oracles.esc_anchor_terms(dense, 3, 0.0, True), 1e-5)
        assert_close(K.triplet_terms(sim, 0.2, True), oracles.triplet_terms(dense, 0.2, True), 1e-5)
        index, value = K.proxy_argmax(sim, sim.T)
        exp_index, exp_value = oracles.proxy_argmax(dense, dense.T)
        assert torch.equal(index, exp_index)
        assert_close(value, exp_value, 1e-5)


# ---------------------------------------------------------------------------------------------
# backend dispatch and input checks


def _assert_same(a, b, name):
    for x, y in zip(as_tuple(a), as_tuple(b), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{name}: backends disagree"


def test_torch_and_auto_backends_are_identical(monkeypatch):
    monkeypatch.delenv("FASTNCL_BACKEND", raising=False)
    gen, _ = make_generator("backends")
    for name, fn, inputs in _op_calls(7, gen, torch.float32):
        _assert_same(fn(*inputs, backend="torch"), fn(*inputs, backend="auto"), name)
        _assert_same(fn(*inputs, backend="torch"), fn(*inputs), name)


@pytest.mark.parametrize("backend", ("cuda", "Torch", "", None))
def test_unknown_backend_raises(backend, monkeypatch):
    monkeypatch.delenv("FASTNCL_BACKEND", raising=False)
    gen, _ = make_generator("unknown-backend")
    for name, fn, inputs in _op_calls(3, gen, torch.float32):
        with pytest.raises(ValueError, match="backend must be one of"):
            fn(*inputs, backend=backend)


def test_backend_environment_variable(monkeypatch):
    gen, _ = make_generator("env-backend")
    calls = _op_calls(3, gen, torch.float32)
    monkeypatch.setenv("FASTNCL_BACKEND", "triton")
    assert K.resolve_backend("torch") == "torch"  # an explicit backend wins over the variable
    assert K.resolve_backend("auto") == K.resolve_backend() == "triton"  # "auto" follows it
    monkeypatch.setenv("FASTNCL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTNCL_BACKEND must be one of .* got 'bogus'"):
        K.resolve_backend()
    for name, fn, inputs in calls:
        with pytest.raises(ValueError):
            fn(*inputs)
    for value in ("torch", "auto", ""):
        monkeypatch.setenv("FASTNCL_BACKEND", value)
        assert K.resolve_backend(tensor=torch.zeros(2, 2)) == "torch"  # CPU tensors: the reference
        for name, fn, inputs in calls:
            _assert_same(fn(*inputs), fn(*inputs, backend="torch"), name)


@pytest.mark.parametrize("shape", ((3, 4), (4, 3), (5,), (2, 2, 2), (1, 0)))
def test_non_square_similarity_raises(shape):
    bad = torch.zeros(shape)
    ok = torch.zeros(2, 2)
    for call in (
        lambda: K.infonce_terms(bad, 0.07),
        lambda: K.cross_consistency(bad, 0.0),
        lambda: K.metric_consistency(bad, bad, 0.0),
        lambda: K.esc_anchor_terms(bad, 0),
        lambda: K.triplet_terms(bad, 0.2, True),
    ):
        with pytest.raises(ValueError, match="square"):
            call()
    with pytest.raises(ValueError, match="differ in shape"):
        K.metric_consistency(ok, torch.zeros(3, 3), 0.0)


@pytest.mark.parametrize("shape", ((3,), (2, 1), (1, 2), (2, 3), (2, 2, 2)), ids=str)
def test_triplet_margin_of_another_shape_raises(shape):
    with pytest.raises(ValueError, match=r"triplet_terms: margin must be a float, a 0-d, a \(2,\) or a \(2, 2\)"):
        K.triplet_terms(torch.zeros(2, 2), torch.zeros(shape), True)


def test_proxy_argmax_shape_mismatch_raises():
    with pytest.raises(ValueError, match="proxy_argmax"):
        K.proxy_argmax(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="proxy_argmax"):
        K.proxy_argmax(torch.zeros(4), torch.zeros(5, 4))


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_embedding_variants_are_the_matrix_ops_of_the_products(dtype):
    gen, seed = make_generator("embed-reference", dtype)
    img, txt, feats = (uniform(shape, gen, dtype=dtype) for shape in ((6, 5), (6, 5), (6, 2)))
    f, t, g = img.double(), txt.double(), feats.double()
    pairs = [
        (K.infonce_terms_embed(img, txt, 0.07), oracles.infonce_terms(f @ t.T, 0.07)),
        (K.cross_consistency_embed(img, txt, 0.05), oracles.cross_consistency(f @ t.T, 0.05)),
        (K.metric_consistency_embed(img, feats, 0.05), oracles.metric_consistency(f @ f.T, g @ g.T, 0.05)),
    ]
    for actual, expected in pairs:
        for a, e in zip(as_tuple(actual), as_tuple(expected), strict=True):
            assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert_close(a, e, rtol(dtype), f"seed={seed}", scale=float((f @ t.T).abs().max()) / 0.07)


@pytest.mark.parametrize("shapes", (((3, 4), (3, 5)), ((3, 4), (2, 4)), ((3,), (3,)), ((2, 2, 2), (2, 2, 2))))
def test_embedding_shape_mismatch_raises(shapes):
    a, b = (torch.zeros(s) for s in shapes)
    for call in (lambda: K.infonce_terms_embed(a, b, 0.07), lambda: K.cross_consistency_embed(a, b, 0.0)):
        with pytest.raises(ValueError, match=r"_embed: expected embeddings \(B, D\) and \(B, D\)"):
            call()
    if shapes[0][:1] != shapes[1][:1] or len(shapes[0]) != 2:  # metric takes (B, D1) and (B, D2)
        with pytest.raises(ValueError, match=r"metric_consistency_embed: expected embeddings \(B, D1\)"):
            K.metric_consistency_embed(a, b, 0.0)
    else:
        K.metric_consistency_embed(a, b, 0.0)


def test_public_ops_carry_the_reference_docstrings():
    for name in K.reference.__all__:
        assert getattr(K, name).__doc__ == getattr(K.reference, name).__doc__
