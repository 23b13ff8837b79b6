"""The one benchmark harness: CUDA-synchronised timing, side-by-side providers, extra_info.

Every loss-op benchmark compares three providers measured in the same run: "triton"
(``fastncl.kernels.<op>(..., backend="triton")``), "eager" (``fastncl.kernels.reference.<op>``)
and "compiled" (``torch.compile(reference.<op>, dynamic=False)``, one wrapper per op per session,
each shape compiled and warmed up before timing). Each bench_<op>.py file holds only its
parametrization (its shapes: ``targets.SHAPES``) and its inputs; ``measure`` does the rest:

1. builds the inputs outside the timed region (L2-normalised embeddings, similarities in [-1, 1],
   per-sample upstream gradients as the methods' soft labels give them);
2. runs one call (compilation, autotuning, module load), skipping with the reason when the op or
   its Triton kernel does not exist yet, or when the provider runs out of memory (recorded);
3. ``triton.testing.do_bench``: median, p20, p80 in ms (CUDA events, L2 flushed, grads reset);
4. ``triton.testing.do_bench_cudagraph`` for B <= 1024 (launch overhead removed; warmed up and
   autotuned before capture);
5. loss-attributable peak memory: peak allocation during one call minus what was allocated before
   it (the inputs) and minus the inputs' gradients;
6. kernel launches per call (torch.profiler) where asked (the fused objectives);
7. ``benchmark.pedantic`` with ``torch.cuda.synchronize()`` inside the target (pytest-benchmark's
   own statistics and JSON).

Everything lands in ``benchmark.extra_info`` (GPU name, torch/Triton versions, op, provider, B,
D, dtype, mode and the numbers) and, when ``FASTNCL_BENCH_RECORDS`` names a file, as one JSON line
per benchmark there (tools/gpu_report.py reads it; it survives a run that is cut short). With the
numbers goes the op's roofline (bench/roofline.py): its minimal bytes, FLOPs and SFU operations,
and on a GPU with a published spec there (H100 SXM, H200, A100 SXM) the bound and the measured
time as a fraction of it (``roofline_fraction`` = bound / median; ``roofline_note`` on another GPU).

Benchmarks that enter one of the issue's targets (bench/targets.py) carry the ``target`` mark and
run first: ``pytest bench/ -m target`` runs only them. Without a GPU everything here is skipped
with the reason; CPU benchmarks (whole training runs) say so in their file name.
"""
from __future__ import annotations

import gc
import json
import os
import platform
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import roofline
import targets

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("fwd", "fwd+bwd")
GRAPH_MAX_B = 1024  # do_bench_cudagraph up to this B
FUSED_MAX_B = 256  # the fused per-batch objectives are specified for B <= 256; Triton may refuse more
PEDANTIC_SECONDS = 0.25  # pytest-benchmark rounds: about this long per benchmark (5 to 50 rounds)
_compiled: dict[str, Callable] = {}


def pytest_addoption(parser):
    parser.addoption("--cpu-train", action="store_true", default=False,
                     help="also run bench_train_cpu.py: a full `fastncl train` per method on the CPU (minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "target: the benchmark's numbers enter one of the issue's targets")
    config.addinivalue_line("markers", "cpu_train: a full CPU training run, only with --cpu-train")
    config.addinivalue_line("markers", "variant: another configuration of an op (recorded as 'op (variant)'), "
                            "behind no target")


def pytest_collection_modifyitems(config, items):
    """Mark the benchmarks that enter a target and run them first: the fused objectives, the
    embedding-level InfoNCE (three targets of its own), the matrix ops, then the other
    embedding-level ops; stable otherwise, so that the providers of one shape stay side by side.
    The full CPU trainings (marker cpu_train) are skipped unless --cpu-train is given."""
    skip_train = pytest.mark.skip(reason="a full CPU training run per method: pytest bench/ --cpu-train runs it")
    for item in items:
        if item.get_closest_marker("cpu_train") is not None and not config.getoption("--cpu-train"):
            item.add_marker(skip_train)
        p = getattr(item, "callspec", None)
        if p is not None and {"op", "B", "D", "dtype", "mode"} <= p.params.keys() and \
                item.get_closest_marker("variant") is None and \
                targets.is_target(p.params["op"], p.params["B"], p.params["D"], p.params["dtype"], p.params["mode"]):
            item.add_marker(pytest.mark.target)
    families = (targets.FUSED_OPS, ("infonce_terms_embed",), targets.MATRIX_OPS, targets.EMBED_OPS)

    def rank(item):
        p = getattr(item, "callspec", None)
        op = p.params.get("op") if p is not None else None
        return next((i for i, ops in enumerate(families) if op in ops), len(families))

    items.sort(key=lambda item: (item.get_closest_marker("target") is None, rank(item)))


def gpu_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: GPU benchmarks need one (see bench/results/ for committed runs)")
    pytest.importorskip("triton", reason="the benchmarks time with triton.testing: pip install 'fastncl[triton]'")
    return torch.device("cuda")


def params(op: str, sizes, dims=(None,), dtypes=targets.BENCH_DTYPES, modes=MODES, extra=()):
    """The parametrization of a bench_<op> function: op x provider x B x D x dtype x mode, the three
    providers of one shape next to each other (one pytest-benchmark group). ``extra`` adds
    (B, D, dtype, mode) combinations outside the grid. The bench files pass ``targets.SHAPES``."""
    combos = [(B, D, dt, m) for B in sizes for D in dims for dt in dtypes for m in modes] + list(extra)
    return pytest.mark.parametrize("op,provider,B,D,dtype,mode", [
        pytest.param(op, p, B, D, dt, m, id=f"{op}-B{B}" + (f"-D{D}" if D else "") + f"-{dt}-{m}-{p}")
        for B, D, dt, m in combos for p in targets.PROVIDERS])


# ---------------------------------------------------------------------------------------------
# inputs: realistic values, built outside the timed region


def generator(seed: int = 0, device: str = "cuda") -> torch.Generator:
    """The inputs' generator; every input is drawn on its device."""
    return torch.Generator(device=device).manual_seed(seed)


def embeddings(B: int, D: int, dtype: torch.dtype, gen: torch.Generator, grad: bool = False):
    """(img, txt): (B, D) L2-normalised rows; matching pairs have cosine about 0.7, others about 0."""
    img = torch.nn.functional.normalize(torch.randn(B, D, device=gen.device, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(img + torch.randn(B, D, device=gen.device, generator=gen) / D**0.5, dim=1)
    return tuple(x.to(dtype).requires_grad_(grad) for x in (img, txt))


def similarity(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    """(B, B) cosine similarities a @ b.T (fp32 product, clamped to [-1, 1]) as a leaf of ``dtype``."""
    return (a.float() @ b.float().T).clamp(-1, 1).to(dtype).requires_grad_(grad)


def soft_labels(B: int, gen: torch.Generator) -> torch.Tensor:
    """(B,) fp32 per-sample weights in [0, 1), the upstream gradient of per-sample losses."""
    return torch.rand(B, device=gen.device, generator=gen)


@dataclass
class Work:
    """One benchmark's inputs: ``args`` for the op (leaves first), the differentiable ``leaves``,
    and ``upstream``, one entry per op output: its upstream gradient, or None (not differentiated)."""

    args: tuple
    leaves: tuple = ()
    upstream: tuple = ()
    kwargs: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# providers


def provider_fn(op: str, provider: str) -> Callable:
    """The callable of a provider, or a skip with the reason when it does not exist (yet)."""
    import fastncl.kernels as K
    from fastncl.kernels import reference

    if not hasattr(reference, op):
        pytest.skip(f"{op}: fastncl.kernels.reference has no {op} yet")
    if provider == "eager":
        return getattr(reference, op)
    if provider == "compiled":
        if op not in _compiled:
            _raise_compile_limits()
            _compiled[op] = torch.compile(getattr(reference, op), dynamic=False)
        return _compiled[op]
    if not hasattr(K, op):
        pytest.skip(f"{op}: fastncl.kernels has no {op} yet")
    if not K.triton_available():
        pytest.skip("the triton package does not import: pip install 'fastncl[triton]'")
    fn = getattr(K, op)
    return lambda *args, **kwargs: fn(*args, **kwargs, backend="triton")


def _raise_compile_limits():
    """One torch.compile wrapper per op sees every shape, dtype and mode of that op: let it
    recompile for each (dynamic=False) instead of falling back to eager at the default limit of 8."""
    import torch._dynamo

    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024), ("accumulated_recompile_limit", 8192),
                        ("accumulated_cache_size_limit", 8192)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)


# ---------------------------------------------------------------------------------------------
# measurement


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def make_step(fn: Callable, work: Work, mode: str) -> Callable[[], None]:
    """The timed call: the forward, and for fwd+bwd the backward of every differentiated output
    with its upstream gradient (the per-sample weights folded into the op's backward)."""
    if mode == "fwd":
        def step():
            fn(*work.args, **work.kwargs)
        return step

    def step():
        outs = _outputs(fn(*work.args, **work.kwargs))
        pairs = [(o, g) for o, g in zip(outs, work.upstream) if g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return step


def clear_grads(leaves) -> None:
    for x in leaves:
        x.grad = None


def count_launches(step: Callable[[], None], leaves) -> dict:
    """Kernels launched by one call (torch.profiler, CUDA activity): kernels, and memset/memcpy apart."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    clear_grads(leaves)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA]
    memops = [e.name for e in gpu if e.name.startswith(("Memset", "Memcpy"))]
    kernels = [e.name for e in gpu if not e.name.startswith(("Memset", "Memcpy"))]
    return {"launches": len(kernels), "memops": len(memops), "kernel_names": sorted(set(kernels))[:40]}


def peak_memory(step: Callable[[], None], leaves) -> dict:
    """Peak allocation of one call above what was allocated before it; ``loss_peak_mb`` also
    leaves out the inputs' gradients (the loss-attributable peak)."""
    clear_grads(leaves)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grads = sum(x.grad.numel() * x.grad.element_size() for x in leaves if x.grad is not None)
    clear_grads(leaves)
    return {"peak_mb": peak / 2**20, "loss_peak_mb": (peak - grads) / 2**20}


def record(benchmark, rec: dict) -> None:
    """Attach a record to the benchmark and append it to $FASTNCL_BENCH_RECORDS (one JSON line)."""
    benchmark.extra_info.update(rec)
    path = os.environ.get("FASTNCL_BENCH_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def run_synchronized(benchmark, fn, rounds: int = 50, warmup: int = 5):
    """Time an opaque ``fn`` (a whole training step, say) with a device synchronisation inside the
    timed target, after ``warmup`` calls; record the GPU, the versions and the peak memory. The loss
    ops go through ``measure`` instead."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    def target():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(target, rounds=rounds, iterations=1)
    benchmark.extra_info.update(gpu_info())
    benchmark.extra_info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def measure(benchmark, *, op: str, provider: str, B: int, D: int | None, dtype: str, mode: str,
            make: Callable[..., Work], launches: bool = False, quick: bool = False, variant: str | None = None,
            **info) -> None:
    """Benchmark one (op, provider, B, D, dtype, mode); see the module docstring for the steps.

    ``make(B, D, torch_dtype, grad, gen)`` builds the Work. The op's roofline (bench/roofline.py,
    with the parameters in ``info`` that change it: alpha, normalize, ...) gives the record its
    minimal ``flops``, ``bytes`` and ``exp`` (the report derives TFLOP/s and GB/s from them) and, on
    a known GPU, ``roofline_ms`` and after the timing ``roofline_fraction``. ``quick``: one timed
    call only (capacity runs); ``info`` goes into extra_info as is (tau, alpha, ...); ``variant``
    records the op as "op (variant)"."""
    label = op if variant is None else f"{op} ({variant})"
    benchmark.group = f"{label}-B{B}" + (f"-D{D}" if D else "") + f"-{dtype}-{mode}"
    rec = {**gpu_info(), "op": label, "provider": provider, "B": B, "D": D, "dtype": dtype, "mode": mode, **info}
    try:  # a model error must not cost a GPU run its timings: it is recorded instead
        rec.update(roofline.record_fields(op, B, D, dtype, mode, rec.get("gpu"),
                                          **{k: v for k, v in info.items() if k in roofline.PARAMS.get(op, {})}))
    except Exception as e:  # noqa: BLE001
        rec["roofline_note"] = f"bench/roofline.py failed: {type(e).__name__}: {e}"[:300]
    fn = provider_fn(op, provider)
    work = make(B, D, DTYPES[dtype], mode == "fwd+bwd", generator(0))
    step = make_step(fn, work, mode)
    skip = None
    try:
        try:
            step()  # compile, autotune, load: before anything is timed or captured
        except ImportError as e:  # no triton package
            if provider != "triton":
                raise
            skip = f"{op}: no Triton kernel yet ({type(e).__name__}: {e})"
        except ValueError as e:  # the fused objectives' Triton kernels refuse B > 256
            if not (provider == "triton" and op in targets.FUSED_OPS and B > FUSED_MAX_B):
                raise
            skip = f"{op}: Triton refuses B={B} ({e})"
        if skip is None:
            clear_grads(work.leaves)
            torch.cuda.synchronize()
            rec.update(_timings(step, work, B, quick, launches))
            rec.update(roofline.fractions(rec))
    except torch.cuda.OutOfMemoryError:
        skip = f"CUDA out of memory: {op} {provider} B={B} D={D} {dtype} {mode}"
        rec["oom"] = True
    if skip is not None:  # outside the except blocks: no traceback keeps the inputs alive
        work = step = None
        _free()
        if rec.get("oom"):
            record(benchmark, rec)
        pytest.skip(skip)
    rec["oom"] = False
    record(benchmark, rec)  # before pedantic: a failure there keeps the numbers
    rounds = 1 if quick else int(min(50, max(5, PEDANTIC_SECONDS * 1e3 / max(rec["median_ms"], 1e-3))))

    def target():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(target, setup=lambda: clear_grads(work.leaves), rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        rec["pedantic_median_ms"] = stats.median * 1e3
        rec["pedantic_rounds"] = rounds
        record(benchmark, rec)
    work = step = None  # the inputs go before the next benchmark allocates its own
    _free()


def _timings(step, work: Work, B: int, quick: bool, launches: bool) -> dict:
    from triton.testing import do_bench, do_bench_cudagraph

    # only differentiable inputs: do_bench_cudagraph switches requires_grad on for what it is given
    leaves = [x for x in work.leaves if x.requires_grad] or None
    out = {}
    if quick:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        clear_grads(work.leaves)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        out.update(median_ms=start.elapsed_time(end), p20_ms=None, p80_ms=None)
    else:
        med, p20, p80 = do_bench(step, warmup=25, rep=100, grad_to_none=leaves, quantiles=[0.5, 0.2, 0.8])
        out.update(median_ms=med, p20_ms=p20, p80_ms=p80)
        if B <= GRAPH_MAX_B:
            try:
                out["graph_ms"] = do_bench_cudagraph(step, rep=20, grad_to_none=leaves, return_mode="median")
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # a provider that cannot be captured: say so, keep the other numbers
                torch.cuda.synchronize()
                out["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    if launches:
        out.update(count_launches(step, work.leaves))
    out.update(peak_memory(step, work.leaves))
    return out
