"""The Triton kernels against the reference: values, gradients, launch contract (house style B7).

Every case runs the op with ``backend="triton"`` on inputs of the test dtype and compares it with
the reference run on the same values upcast to float64, with the one tolerance table
(tests/tolerances.py); gradients use random upstream gradients (a quarter of them zero). Without
a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) at small shapes; on a GPU the same tests run at block boundaries and large
shapes, and again under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch

import fastncl.kernels as K
from inputs import as_tuple, make_generator, random_sim, uniform, upstream_grad
from tolerances import assert_close, rtol

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
SIZES = (1, 2, 7, 33, 130) + ((127, 128, 129, 1024, 8192) if GPU else ())
DTYPES = (torch.float32, torch.bfloat16)
TAUS = (0.02, 0.07, 1.0)
COMPILE = (False, True) if GPU else (False,)


class Case(NamedTuple):
    """One op call: ``make(n, gen, dtype)`` draws (differentiable inputs, other arguments);
    ``call(*inputs, *others, backend=...)`` runs the op; ``scales(inputs, others)`` gives each
    output's tolerance floor and ``grad_scale(upstreams)`` the gradients' (None: their own size)."""

    name: str
    make: Callable
    call: Callable
    scales: Callable = lambda inputs, others: None
    grad_scale: Callable = lambda upstreams: None


def _infonce_case(tau):
    return Case(
        f"infonce_terms tau={tau}",
        lambda n, gen, dtype: ((random_sim(n, gen, dtype),), ()),
        lambda sim, backend: K.infonce_terms(sim, tau, backend=backend),
        # losses are differences of log-sum-exps of logits of size |sim| / tau (tests/tolerances.py)
        lambda inputs, others: [float(inputs[0].detach().double().abs().max()) / tau] * 2 + [None, None],
        # gradients are softmaxes minus one-hots times |upstream| / tau; fp32 resolves 1 - p to eps
        lambda upstreams: max(float(u.abs().max()) for u in upstreams) / tau,
    )


CASES = [_infonce_case(tau) for tau in TAUS] + [
    Case(f"cross_consistency alpha={alpha}",
         lambda n, gen, dtype: ((random_sim(n, gen, dtype),), ()),
         lambda sim, backend, alpha=alpha: K.cross_consistency(sim, alpha, backend=backend))
    for alpha in (0.0, 0.05)
] + [
    Case(f"sps_reliable_objective tau={tau}",
         lambda n, gen, dtype: ((random_sim(n, gen, dtype), random_sim(n, gen, dtype), random_sim(n, gen, dtype)), ()),
         lambda s, a, b, backend, tau=tau: K.sps_reliable_objective(s, a, b, tau, 0.01, 5.0, 5.0, backend=backend),
         lambda inputs, others, tau=tau: [float(inputs[0].detach().double().abs().max()) / tau] * 2 + [None, None],
         lambda upstreams, tau=tau: max(float(u.abs().max()) for u in upstreams) * 5.0 / tau)
    for tau in (0.02, 0.07)
] + [
    Case(f"metric_consistency alpha={alpha}",
         lambda n, gen, dtype: ((random_sim(n, gen, dtype), random_sim(n, gen, dtype)), ()),
         lambda a, b, backend, alpha=alpha: K.metric_consistency(a, b, alpha, backend=backend))
    for alpha in (0.0, 0.05)
]


def _run(case: Case, inputs, others, backend, compiled=False, compile_backend="inductor"):
    fn = case.call
    if compiled:  # after an eager call: autotuning and module imports happen outside the trace
        fn(*inputs, *others, backend=backend)
        torch._dynamo.reset()
        fn = torch.compile(lambda *args: case.call(*args, backend=backend), fullgraph=True, backend=compile_backend)
        return as_tuple(fn(*inputs, *others))
    return as_tuple(fn(*inputs, *others, backend=backend))


def _on(device, xs):
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)


@pytest.mark.parametrize("compiled", COMPILE, ids=lambda c: "compiled" if c else "eager")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_values_and_gradients_match_reference(case, n, dtype, compiled):
    gen, seed = make_generator("triton", case.name, n, dtype)
    inputs, others = case.make(n, gen, dtype)
    msg = f"{case.name} B={n} {dtype} seed={seed}"
    # the reference on the same values, upcast to float64
    ref_inputs = tuple(x.double().to(DEVICE).requires_grad_(True) for x in inputs)
    expected = _run(case, ref_inputs, _on(DEVICE, others), "torch")
    leaves = tuple(x.to(DEVICE).requires_grad_(True) for x in inputs)
    actual = _run(case, leaves, _on(DEVICE, others), "triton", compiled)
    scales = case.scales(inputs, others) or [None] * len(expected)
    for k, (a, e, s) in enumerate(zip(actual, expected, scales, strict=True)):
        assert a.shape == e.shape and a.dtype == torch.float32, f"{msg}: output {k} {a.shape} {a.dtype}"
        assert_close(a, e, rtol(dtype), f"{msg}: output {k}", scale=s)
    # gradients for random upstream gradients
    differentiable = [k for k, e in enumerate(expected) if e.requires_grad]
    if not differentiable:
        return
    ups = [upstream_grad(expected[k].shape, gen).to(DEVICE) for k in differentiable]
    grads_e = torch.autograd.grad(sum((expected[k] * u).sum() for k, u in zip(differentiable, ups)), ref_inputs)
    grads_a = torch.autograd.grad(sum((actual[k].double() * u).sum() for k, u in zip(differentiable, ups)), leaves)
    for k, (a, e, x) in enumerate(zip(grads_a, grads_e, inputs)):
        assert a.dtype == x.dtype, f"{msg}: gradient {k} dtype {a.dtype}, input {x.dtype}"
        assert_close(a, e, rtol(dtype, "grads"), f"{msg}: gradient {k}", scale=case.grad_scale(ups))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_traced_without_graph_breaks(case):
    """torch.compile(fullgraph=True) traces every op (fake implementations, registered autograd)
    with no graph break; AOTAutograd's eager backend, so that it runs on CPU in the interpreter."""
    gen, seed = make_generator("triton-traced", case.name)
    inputs, others = case.make(7, gen, torch.float32)
    leaves = tuple(x.to(DEVICE).requires_grad_(True) for x in inputs)
    eager = _run(case, leaves, _on(DEVICE, others), "triton")
    traced = _run(case, leaves, _on(DEVICE, others), "triton", compiled=True, compile_backend="aot_eager")
    for a, e in zip(traced, eager, strict=True):
        assert torch.equal(a, e), f"{case.name} seed={seed}"
    diff = [k for k, e in enumerate(eager) if e.requires_grad]
    grads_e = torch.autograd.grad(sum(eager[k].sum() for k in diff), leaves)
    grads_t = torch.autograd.grad(sum(traced[k].sum() for k in diff), leaves)
    for a, e in zip(grads_t, grads_e):
        assert torch.equal(a, e), f"{case.name} gradient seed={seed}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradient_of_each_output_alone(case):
    """An output that receives no gradient (None upstream) contributes nothing to the backward."""
    gen, seed = make_generator("triton-alone", case.name)
    inputs, others = case.make(7, gen, torch.float32)
    ref_inputs = tuple(x.double().to(DEVICE).requires_grad_(True) for x in inputs)
    expected = _run(case, ref_inputs, _on(DEVICE, others), "torch")
    for k, e in enumerate(expected):
        if not e.requires_grad:
            continue
        leaves = tuple(x.to(DEVICE).requires_grad_(True) for x in inputs)
        actual = _run(case, leaves, _on(DEVICE, others), "triton")
        u = upstream_grad(e.shape, gen).to(DEVICE)
        grads_e = torch.autograd.grad((e * u).sum(), ref_inputs, retain_graph=True, allow_unused=True)
        grads_a = torch.autograd.grad((actual[k].double() * u).sum(), leaves, allow_unused=True)
        for a, g, x in zip(grads_a, grads_e, leaves):
            a, g = (torch.zeros_like(x) if v is None else v for v in (a, g))  # an input the output does not use
            assert_close(a, g, rtol(torch.float32, "grads"), f"{case.name} output {k} alone seed={seed}",
                         scale=case.grad_scale([u]))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_non_contiguous_inputs(case):
    gen, seed = make_generator("triton-strided", case.name)
    inputs, others = case.make(14, gen, torch.float32)
    for view in (lambda x: x.T, lambda x: x[::2, ::2] if x.dim() == 2 else x[::2]):
        strided = tuple(view(x) if x.dim() == 2 else x for x in inputs)
        if any(x.shape != strided[0].shape for x in strided if x.dim() == 2):
            continue
        actual = _run(case, _on(DEVICE, strided), _on(DEVICE, others), "triton")
        expected = _run(case, tuple(x.contiguous().double() for x in strided), others, "torch")
        for a, e in zip(actual, expected):
            assert_close(a, e, rtol(torch.float32), f"{case.name} seed={seed}", scale=1 / 0.02)


def test_infonce_unit_similarities_do_not_overflow():
    # all similarities +-1 at tau = 0.02: |sim| / tau = 50, where a raw exp overflows fp16
    gen, seed = make_generator("triton-overflow")
    sim = torch.where(torch.rand(33, 33, generator=gen) > 0.5, 1.0, -1.0).to(torch.float16).to(DEVICE)
    leaf = sim.clone().requires_grad_(True)
    outs = K.infonce_terms(leaf, 0.02, backend="triton")
    for a, e in zip(outs, K.infonce_terms(sim.double(), 0.02, backend="torch")):
        assert torch.isfinite(a).all(), f"seed={seed}"
        assert_close(a, e, rtol(torch.float16), f"seed={seed}", scale=50.0)
    (outs[0].sum() + outs[1].sum()).backward()
    assert torch.isfinite(leaf.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# the op contract: custom ops, dispatch, errors


def _opcheck_args(gen):
    sim = random_sim(7, gen).to(DEVICE)
    other = random_sim(7, gen).to(DEVICE)
    return [
        (torch.ops.fastncl.infonce_fwd.default, (sim.requires_grad_(True), 0.07)),
        (torch.ops.fastncl.cross_consistency_fwd.default, (sim, 0.05)),
        (torch.ops.fastncl.metric_consistency_fwd.default, (sim, other.requires_grad_(True), 0.0)),
    ]


def test_custom_ops_pass_opcheck():
    for name in ("infonce_terms", "cross_consistency"):  # imports the Triton modules, which register the ops
        K.triton_impl(name)

    gen, _ = make_generator("opcheck")
    for op, args in _opcheck_args(gen):
        torch.library.opcheck(op, args)


def test_auto_uses_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTNCL_BACKEND", raising=False)
    assert K.resolve_backend("auto", torch.zeros(2, 2)) == "torch"
    assert K.check_backend("auto", torch.device("cpu")) == "torch"


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        K.check_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        K.infonce_terms(torch.zeros(3, 3), 0.07, backend="triton")


def test_float64_is_a_clear_error():
    with pytest.raises(ValueError, match="float64"):
        K.infonce_terms(torch.zeros(3, 3, dtype=torch.float64, device=DEVICE), 0.07, backend="triton")
