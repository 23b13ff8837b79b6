"""The benchmarks' inputs and timed steps, run on CPU with the eager reference at a small B.

On a GPU machine every bench_<op>.py builds its inputs with ``make`` and times ``make_step``; a
wrong argument order, a missing upstream gradient or an input off the documented range would
only show there. Here each file's ``make`` runs on CPU tensors and its forward and
forward+backward steps run through ``fastncl.kernels.reference`` (ops not in the reference yet
are skipped), and the harness's input helpers are checked for realistic values.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bench_modules():
    """bench/conftest.py (the harness) and every bench_<op>.py but the CPU training one. They import
    the harness as ``conftest``, a name tests/conftest.py holds in this session: swap it meanwhile."""
    sys.path.insert(0, str(BENCH))
    saved = sys.modules.get("conftest")
    harness = _load(BENCH / "conftest.py", "bench_harness")
    sys.modules["conftest"] = harness
    try:
        modules = {p.stem: _load(p, f"bench_module_{p.stem}") for p in sorted(BENCH.glob("bench_*.py"))
                   if p.stem != "bench_train_cpu"}
    finally:
        if saved is not None:
            sys.modules["conftest"] = saved
        else:
            del sys.modules["conftest"]
        sys.path.remove(str(BENCH))
    return harness, modules


HARNESS, MODULES = _bench_modules()


def _op(module) -> str:
    (mark,) = [m for m in module.__dict__.values() if callable(m) and getattr(m, "__name__", "").startswith("bench_")]
    return mark.__name__.removeprefix("bench_")


def test_every_op_and_fused_objective_has_a_bench_file():
    import targets

    expected = targets.MATRIX_OPS + targets.EMBED_OPS + targets.FUSED_OPS
    assert sorted(_op(m) for m in MODULES.values()) == sorted(expected)


def test_inputs_are_normalised_embeddings_and_similarities_in_range():
    gen = HARNESS.generator(0, "cpu")
    img, txt = HARNESS.embeddings(64, 32, torch.float32, gen)
    assert torch.allclose(img.norm(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(64), atol=1e-5)
    sim = HARNESS.similarity(img, txt, torch.bfloat16, grad=True)
    assert sim.dtype == torch.bfloat16 and sim.is_leaf and sim.requires_grad
    assert sim.abs().max() <= 1
    # matching pairs are clearly more similar than the others, as in training
    assert sim.diagonal().float().mean() > 0.5 > sim.float().fill_diagonal_(0).abs().mean() + 0.3
    w = HARNESS.soft_labels(64, gen)
    assert w.dtype == torch.float32 and 0 <= w.min() and w.max() < 1


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_bench_inputs_run_through_the_reference(name, dtype, mode):
    from fastncl.kernels import reference

    module = MODULES[name]
    op = _op(module)
    if not hasattr(reference, op):
        pytest.skip(f"fastncl.kernels.reference has no {op} yet")
    if mode == "fwd+bwd" and op == "proxy_argmax":
        pytest.skip("proxy_argmax has no backward")
    B, D = 12, 16
    work = module.make(B, D, HARNESS.DTYPES[dtype], mode == "fwd+bwd", HARNESS.generator(0, "cpu"))
    outs = HARNESS._outputs(reference.__dict__[op](*work.args, **work.kwargs))
    assert all(torch.isfinite(o.float()).all() for o in outs if o.is_floating_point())
    HARNESS.make_step(reference.__dict__[op], work, mode)()
    if mode == "fwd+bwd":
        assert len(work.upstream) == len(outs), "one upstream entry per output"
        for o, g in zip(outs, work.upstream):
            assert g is None or g.shape == o.shape
        assert work.leaves and all(x.grad is not None and torch.isfinite(x.grad.float()).all() for x in work.leaves)
    flops, nbytes = module.cost(B, D, HARNESS.DTYPES[dtype].itemsize, mode)
    assert flops > 0 or nbytes > 0


@pytest.mark.parametrize("name", sorted(MODULES))
def test_triton_provider_runs_the_bench_step_like_the_reference(name):
    """The "triton" provider's wiring (backend argument, keyword arguments, partial upstream
    gradients) on the bench's own inputs, in Triton's interpreter on CPU (tests/conftest.py sets
    TRITON_INTERPRET=1 without a GPU): the gradients match the reference's."""
    import fastncl.kernels as K
    from fastncl.kernels import reference

    pytest.importorskip("triton", reason="needs the triton package")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the benchmarks themselves run the Triton provider")
    module = MODULES[name]
    op = _op(module)
    if not hasattr(K, op) or not hasattr(reference, op):
        pytest.skip(f"fastncl.kernels has no {op} yet")
    mode = "fwd" if op == "proxy_argmax" else "fwd+bwd"
    results = []
    for fn in (HARNESS.provider_fn(op, "triton"), reference.__dict__[op]):
        work = module.make(12, 16, torch.float32, mode == "fwd+bwd", HARNESS.generator(0, "cpu"))
        try:
            HARNESS.make_step(fn, work, mode)()
        except (ImportError, NotImplementedError) as e:  # the bench skips these too
            pytest.skip(f"no Triton kernel for {op} yet ({e})")
        results.append([x.grad for x in work.leaves] if mode == "fwd+bwd" else
                       list(HARNESS._outputs(fn(*work.args, **work.kwargs))))
    # a wiring mistake (a wrong upstream, a dropped argument) is an O(1) difference; the parity
    # tests hold the tight tolerances (fp32 resolves an InfoNCE gradient p - 1 only to ~eps / tau)
    for actual, expected in zip(*results):
        assert actual is not None and actual.shape == expected.shape
        scale = float(expected.abs().max()) if expected.is_floating_point() else 0.0
        assert torch.allclose(actual.double(), expected.double(), rtol=1e-3, atol=1e-3 * scale), op
