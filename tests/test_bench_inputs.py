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
                   if p.stem not in ("bench_train_cpu", "bench_e2e")}  # whole-run benchmarks
    finally:
        if saved is not None:
            sys.modules["conftest"] = saved
        else:
            del sys.modules["conftest"]
        sys.path.remove(str(BENCH))
    return harness, modules


HARNESS, MODULES = _bench_modules()


def _op(module) -> str:
    """The op a bench file times: its one bench_<op> function (variants, marked ``variant``, aside)."""
    (mark,) = [m for m in module.__dict__.values() if callable(m) and getattr(m, "__name__", "").startswith("bench_")
               and not any(mk.name == "variant" for mk in getattr(m, "pytestmark", []))]
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
    rf = HARNESS.roofline.record_fields(op, B, D, dtype, mode, None)  # the op's roofline at the bench's shape
    assert (rf["flops"] > 0 or rf["bytes"] > 0) and "roofline_ms" not in rf and "roofline_note" in rf


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
        except ImportError as e:  # no triton package: the bench skips these too
            pytest.skip(f"no Triton for {op} ({e})")
        results.append([x.grad for x in work.leaves] if mode == "fwd+bwd" else
                       list(HARNESS._outputs(fn(*work.args, **work.kwargs))))
    # a wiring mistake (a wrong upstream, a dropped argument) is an O(1) difference; the parity
    # tests hold the tight tolerances (fp32 resolves an InfoNCE gradient p - 1 only to ~eps / tau)
    for actual, expected in zip(*results):
        assert actual is not None and actual.shape == expected.shape
        scale = float(expected.abs().max()) if expected.is_floating_point() else 0.0
        assert torch.allclose(actual.double(), expected.double(), rtol=1e-3, atol=1e-3 * scale), op


class _FakeBenchmark:
    """The parts of pytest-benchmark's fixture that the harness uses."""

    def __init__(self):
        self.extra_info, self.group, self.calls = {}, None, 0

    def pedantic(self, target, setup=None, rounds=1, iterations=1, warmup_rounds=0):
        assert iterations == 1 and rounds >= 1
        for _ in range(rounds):
            if setup is not None:
                setup()
            target()
            self.calls += 1
        self.stats = type("Meta", (), {"stats": type("Stats", (), {"median": 2e-3})()})()


@pytest.fixture
def cpu_cuda(monkeypatch):
    """The CUDA calls of the harness made harmless on CPU, with fixed readings, and do_bench /
    do_bench_cudagraph replaced by fakes that call the step (so its errors surface)."""
    import triton.testing

    calls = {"do_bench": 0, "cudagraph": 0}

    def do_bench(fn, warmup, rep, grad_to_none, quantiles):
        assert quantiles == [0.5, 0.2, 0.8]
        for _ in range(2):
            for x in grad_to_none or ():
                assert x.requires_grad
                x.grad = None
            fn()
        calls["do_bench"] += 1
        return [1.0, 0.9, 1.1]

    def do_bench_cudagraph(fn, rep, grad_to_none, return_mode):
        fn()
        calls["cudagraph"] += 1
        return 0.5

    class Event:
        def __init__(self, enable_timing):
            pass

        def record(self):
            pass

        def elapsed_time(self, other):
            return 3.0

    for name, value in (("synchronize", lambda: None), ("reset_peak_memory_stats", lambda: None),
                        ("memory_allocated", lambda: 2**20), ("max_memory_allocated", lambda: 5 * 2**20),
                        ("empty_cache", lambda: None), ("Event", Event)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench, raising=False)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", do_bench_cudagraph, raising=False)
    monkeypatch.setattr(HARNESS, "generator", lambda seed=0, device="cpu": torch.Generator().manual_seed(seed))
    monkeypatch.setattr(HARNESS, "count_launches", lambda step, leaves: (step(), {"launches": 7})[1])
    return calls


def _measure(benchmark, name, provider, B, mode, **kwargs):
    module = MODULES[name]
    op = _op(module)
    HARNESS.measure(benchmark, op=op, provider=provider, B=B, D=kwargs.pop("D", None), dtype="fp32", mode=mode,
                    make=module.make, **kwargs)


def test_measure_records_every_number_on_cpu_with_faked_cuda_calls(cpu_cuda, tmp_path, monkeypatch):
    """The harness's control flow (the GPU-only parts faked): one record per benchmark with the
    times, the CUDA-graph time up to B = 1024, the memory, launches where asked, pedantic's median."""
    pytest.importorskip("triton", reason="needs the triton package")
    records = tmp_path / "records.jsonl"
    monkeypatch.setenv("FASTNCL_BENCH_RECORDS", str(records))
    monkeypatch.setattr(HARNESS, "PEDANTIC_SECONDS", 0.012)
    bench = _FakeBenchmark()
    _measure(bench, "bench_infonce_terms", "eager", 16, "fwd+bwd", launches=True, tau=0.07)
    assert bench.group == "infonce_terms-B16-fp32-fwd+bwd" and bench.calls == 12  # 12 ms of 1 ms calls
    assert cpu_cuda == {"do_bench": 1, "cudagraph": 1}
    lines = HARNESS.json.loads(records.read_text().splitlines()[-1])
    assert lines == bench.extra_info
    sim_grad_mb = 16 * 16 * 4 / 2**20
    assert {k: lines[k] for k in ("op", "provider", "B", "D", "dtype", "mode", "median_ms", "p20_ms", "p80_ms",
                                   "graph_ms", "launches", "oom", "peak_mb", "pedantic_median_ms", "tau")} == {
        "op": "infonce_terms", "provider": "eager", "B": 16, "D": None, "dtype": "fp32", "mode": "fwd+bwd",
        "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "graph_ms": 0.5, "launches": 7, "oom": False,
        "peak_mb": 4.0, "pedantic_median_ms": 2.0, "tau": 0.07}
    assert lines["loss_peak_mb"] == pytest.approx(4.0 - sim_grad_mb)
    # the roofline's minimum: S read forward, S read and dS written backward; 4 fp32 (B,) outputs and
    # 4 upstream gradients; no GPU name on CPU, so no bound and no fraction
    assert lines["bytes"] == 3 * 16 * 16 * 4 + 2 * 4 * 4 * 16 and lines["flops"] == 0
    assert "roofline_note" in lines and "roofline_ms" not in lines and "roofline_fraction" not in lines

    # forward only, above the CUDA-graph size: no graph time, no gradients to reset
    bench = _FakeBenchmark()
    _measure(bench, "bench_infonce_terms", "eager", 1032, "fwd", tau=0.07)
    assert "graph_ms" not in bench.extra_info and bench.extra_info["loss_peak_mb"] == 4.0
    # the capacity run: one timed call, no do_bench
    if hasattr(__import__("fastncl.kernels.reference").kernels.reference, "infonce_terms_embed"):
        bench = _FakeBenchmark()
        _measure(bench, "bench_infonce_terms_embed", "eager", 32, "fwd+bwd", D=8, quick=True, tau=0.07)
        assert bench.calls == 1 and bench.extra_info["median_ms"] == 3.0 and bench.extra_info["p20_ms"] is None


@pytest.mark.parametrize("gpu, bound", [("NVIDIA H100 80GB HBM3", True), ("NVIDIA GeForce RTX 4090", False)])
def test_measure_records_the_roofline_bound_and_the_fraction_on_a_known_gpu(cpu_cuda, monkeypatch, gpu, bound):
    """On an H100 (by its CUDA name) a record carries the op's bound and the measured time as a
    fraction of it; on a GPU without a published spec in bench/roofline.py, a note instead."""
    pytest.importorskip("triton", reason="needs the triton package")
    roofline = HARNESS.roofline
    monkeypatch.setattr(HARNESS, "gpu_info", lambda: {"torch": torch.__version__, "gpu": gpu})
    monkeypatch.setattr(HARNESS, "PEDANTIC_SECONDS", 0.005)
    bench = _FakeBenchmark()
    _measure(bench, "bench_triplet_terms", "triton" if bound else "eager", 16, "fwd+bwd", hardest=True)
    rec = bench.extra_info
    if not bound:
        assert "roofline_ms" not in rec and "RTX 4090" in rec["roofline_note"] and "roofline_fraction" not in rec
        return
    expected = roofline.bound_of(roofline.minimum("triplet_terms", 16, None, "fp32"), "fwd+bwd", roofline.GPUS["H100"])
    assert rec["roofline_gpu"] == "H100 SXM5 80GB" and rec["roofline_ms"] == pytest.approx(expected.ms)
    assert rec["roofline_fraction"] == pytest.approx(expected.ms / 1.0)  # the fake do_bench's median: 1 ms
    assert rec["roofline_graph_fraction"] == pytest.approx(expected.ms / 0.5)
    assert rec["roofline_kernel_fraction"] == pytest.approx(rec["roofline_kernel_ms"] / 1.0)


def test_measure_skips_with_the_reason_and_records_out_of_memory(cpu_cuda, tmp_path, monkeypatch):
    records = tmp_path / "records.jsonl"
    monkeypatch.setenv("FASTNCL_BENCH_RECORDS", str(records))

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(HARNESS, "provider_fn", lambda op, provider: out_of_memory)
    bench = _FakeBenchmark()
    with pytest.raises(pytest.skip.Exception, match="CUDA out of memory: infonce_terms eager B=16"):
        _measure(bench, "bench_infonce_terms", "eager", 16, "fwd+bwd", tau=0.07)
    (line,) = [HARNESS.json.loads(x) for x in records.read_text().splitlines()]
    assert line["oom"] is True and "median_ms" not in line and bench.calls == 0

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'fastncl.kernels.consistency'")

    monkeypatch.setattr(HARNESS, "provider_fn", lambda op, provider: missing)
    with pytest.raises(pytest.skip.Exception, match="no Triton kernel yet"):
        _measure(_FakeBenchmark(), "bench_cross_consistency", "triton", 16, "fwd+bwd", alpha=0.0)
    with pytest.raises(ModuleNotFoundError):  # a baseline that does not import is a failure, not a skip
        _measure(_FakeBenchmark(), "bench_cross_consistency", "eager", 16, "fwd+bwd", alpha=0.0)
    assert len(records.read_text().splitlines()) == 1  # skips other than out-of-memory write no record


def test_run_synchronized_times_an_opaque_step(cpu_cuda):
    """The whole-step timer (end-to-end benchmarks): warm-up calls, then the timed rounds."""
    calls = []
    bench = _FakeBenchmark()
    HARNESS.run_synchronized(bench, lambda: calls.append(1), rounds=3, warmup=2)
    assert len(calls) == 5 and bench.calls == 3 and bench.extra_info["peak_memory_mb"] == 5.0


def test_cpu_trainings_run_only_with_the_option():
    """`pytest bench/` on a CPU used to run a full training per method without being asked."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "pytest", str(BENCH / "bench_train_cpu.py"), "-q", "-rs",
                          "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 skipped" in out.stdout and "pytest bench/ --cpu-train runs it" in out.stdout
