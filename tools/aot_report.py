"""What every Triton kernel compiles to on the GPUs users have, measured without a GPU.

    python tools/aot_report.py                    # the whole sweep; writes its section of docs/kernels.md
    python tools/aot_report.py --ops infonce_terms --no-docs --json /tmp/infonce.json

1. Record. Every public op of ``fastncl.kernels.Ops("triton")`` runs forward and backward on CPU
   tensors under Triton's interpreter for the sweep's shapes (``SWEEP``: the (B, B) ops at B = 64,
   127, 128, 1000, 1024, 8192, the embedding ops and ``proxy_argmax`` at D = 256 and 1024 up to
   B = 65536, ragged sizes included; fp32, bf16, fp16; every constexpr variant), planned for each target GPU (``_launch.planned_for``:
   the launchers pick the tiles, warps, stages and dot precisions of a compiled launch on that GPU).
   Each launch is recorded as ``JITFunction.run`` would specialise it on a GPU, by Triton's own
   code: its binder (``create_function_from_signature`` with the CUDA backend's
   ``native_specialize_impl``: an integer equal to 1 becomes a constexpr, integers divisible by 16
   and 16-byte-aligned pointers get ``tt.divisibility = 16``) and ``JITFunction._pack_args``. The
   interpreted execution is skipped (only the signature is kept), so B = 65536 costs no more than
   B = 64: no launcher reads a kernel's outputs on the host, and no input's values change a launch.
2. Compile. Each distinct config (kernel, signature, constexprs, divisibility, options, target)
   goes through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))`` in a
   subprocess without the interpreter, as ``JITFunction._do_compile`` would; ptxas (shipped in the
   triton wheel) reports registers, spill stores and loads, and the kernel's metadata the shared
   memory a launch requests. Results are cached per Triton cache key (Triton's version and
   sources, the ptxas version, the kernel's source with its callees, the specialisation, the
   options) under ~/.cache/fastncl/aot.
3. Report. A table per kernel (registers, spill bytes, shared memory against the target's per-block
   limit: sm_80 163 KiB, sm_90 227 KiB) between the marker comments of docs/kernels.md (written to
   a temporary file, then renamed), naming the Triton and ptxas versions that produced it.

tests/test_kernels_compile.py loads this file (``helpers.load_tool``) and runs the same recorder
and compiler on the largest tiles of every kernel. Exit status: 0, or 1 when a config fails to
compile or asks for more shared memory than its target has, 2 on bad options.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

if __name__ == "__main__":  # before triton is imported: the recorder runs the launchers under the interpreter
    os.environ["TRITON_INTERPRET"] = "0" if "--compile-worker" in sys.argv else "1"

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "kernels.md"
CACHE = Path.home() / ".cache" / "fastncl" / "aot"
BEGIN, END = "<!-- aot-report:begin -->", "<!-- aot-report:end -->"
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}  # capability, shared memory per block
DTYPE_NAMES = ("fp32", "bf16", "fp16")
_CUDA_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "debug", "instrumentation_mode",
                     "fpsan_homomorphic_casts", "enable_fp_fusion", "launch_cooperative_grid", "launch_pdl")


class Sweep(NamedTuple):
    """The shapes the recorder drives: (B, B) ops at ``matrix_b``, the embedding ops and proxy_argmax
    at ``embed_b`` x ``dims``, each in every dtype of ``dtypes``."""

    matrix_b: tuple[int, ...]
    embed_b: tuple[int, ...]
    dims: tuple[int, ...]
    dtypes: tuple[str, ...]


# the trainer's and the benchmarks' shapes: the papers' B = 128 and its ragged last batch (127), a
# ragged batch at the largest tiles (1000: no size divisible by 16), the benchmarks' B = 1024 and 8192
# (bench/targets.py), the embedding ops from the smallest B up to the capacity target (65536), at the
# benchmarks' D
SWEEP = Sweep(matrix_b=(64, 127, 128, 1000, 1024, 8192),
              embed_b=(64, 127, 128, 512, 1000, 1024, 8192, 32768, 65536), dims=(256, 1024), dtypes=DTYPE_NAMES)


# ---------------------------------------------------------------------------------------------
# 1. record: every op forward and backward, each launch as a GPU launch specialises it


class Context(NamedTuple):
    """Where a launch came from: the op, its variant, shape, dtype and pass."""

    op: str
    variant: str
    B: int
    D: int | None
    dtype: str
    phase: str  # "fwd" or "bwd"


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _matrix_calls(ops, B: int, dtype) -> Iterable[tuple[str, str, Callable, Callable]]:
    """(op, variant, inputs, call) of every (B, B) op and constexpr variant: ``inputs()`` makes the
    leaves (uninitialised: no kernel runs), ``call(*leaves)`` the outputs to differentiate."""
    import torch

    def mat(grad=True):
        return torch.empty(B, B, dtype=dtype).requires_grad_(grad)

    def pair():
        return torch.empty(B).fill_(0.2).requires_grad_(True)

    yield "infonce_terms", "", lambda: (mat(),), lambda s: ops.infonce_terms(s, 0.07)
    yield "infonce_terms", "losses only", lambda: (mat(),), lambda s: ops.infonce_terms(s, 0.07)[:2]
    yield "cross_consistency", "", lambda: (mat(),), lambda s: ops.cross_consistency(s, 0.01)
    yield "metric_consistency", "", lambda: (mat(), mat()), lambda a, b: ops.metric_consistency(a, b, 0.01)
    for normalize in (False, True):
        yield "esc_anchor_terms", f"anchor=int normalize={normalize}", lambda: (mat(),), \
            lambda s, n=normalize: ops.esc_anchor_terms(s, 0, 0.01, n)
        yield "esc_anchor_terms", f"anchor=(B,) normalize={normalize}", lambda: (mat(),), \
            lambda s, n=normalize: ops.esc_anchor_terms(s, torch.zeros(B, dtype=torch.long), 0.01, n)
    for hardest in (True, False):
        yield "triplet_terms", f"margin=float hardest={hardest}", lambda: (mat(),), \
            lambda s, h=hardest: ops.triplet_terms(s, 0.2, h)
        yield "triplet_terms", f"margin=(B,) hardest={hardest}", lambda: (mat(), pair()), \
            lambda s, m, h=hardest: ops.triplet_terms(s, m, h)
        yield "triplet_terms", f"margin=(B,B) hardest={hardest}", lambda: (mat(), mat()), \
            lambda s, m, h=hardest: ops.triplet_terms(s, m, h)
        yield "triplet_terms", f"margin=(B,B) no grad hardest={hardest}", lambda: (mat(),), \
            lambda s, h=hardest: ops.triplet_terms(s, torch.empty(B, B, dtype=dtype), h)
    yield "sps_reliable_objective", "", lambda: (mat(), mat(), mat()), \
        lambda s, a, b: ops.sps_reliable_objective(s, a, b, 0.07, 0.01, 0.1, 0.1)
    for hardest in (True, False):
        for normalize in (False, True):
            flags = f"hardest={hardest} normalize={normalize}"
            yield "esc_division_terms", f"margin=float {flags}", lambda: (mat(),), \
                lambda s, h=hardest, n=normalize: ops.esc_division_terms(s, 0.2, 0.5, 0.01, h, n)[0]
            yield "esc_division_terms", f"margin=(B,) {flags}", lambda: (mat(), pair()), \
                lambda s, m, h=hardest, n=normalize: ops.esc_division_terms(s, m, 0.5, 0.01, h, n)[0]


def _embed_calls(ops, B: int, D: int, dtype) -> Iterable[tuple[str, str, Callable, Callable]]:
    """The embedding-level ops and proxy_argmax at (B, D), as ``_matrix_calls``. alpha > 0: the
    consistency ops' tile kernels (alpha <= 0 from B >= 8 D on takes torch matmuls, no kernel)."""
    import torch

    def emb(grad=True):
        return torch.empty(B, D, dtype=dtype).requires_grad_(grad)

    yield "infonce_terms_embed", "", lambda: (emb(), emb()), lambda a, b: ops.infonce_terms_embed(a, b, 0.07)
    yield "cross_consistency_embed", "", lambda: (emb(), emb()), lambda a, b: ops.cross_consistency_embed(a, b, 0.01)
    yield "metric_consistency_embed", "", lambda: (emb(), emb()), \
        lambda a, b: ops.metric_consistency_embed(a, b, 0.01)
    yield "proxy_argmax", "no mask", lambda: (emb(False), emb(False)), lambda q, k: ops.proxy_argmax(q, k)
    yield "proxy_argmax", "key mask", lambda: (emb(False), emb(False)), \
        lambda q, k: ops.proxy_argmax(q, k, torch.ones(B, dtype=torch.bool))


class Recorder:
    """Records each kernel launch (``InterpretedFunction.run``, patched) as a GPU launch would
    specialise it, and skips its interpreted execution."""

    def __init__(self, target: str):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend

        self.target = target
        self.backend = CUDABackend(GPUTarget("cuda", TARGETS[target][0], 32))
        self.context: Context | None = None
        self.launches: list[dict] = []
        self._jit: dict = {}

    def _binder(self, interpreted):
        """A JITFunction of the kernel's Python function (as ``triton.jit`` makes without the
        interpreter) and its argument binder for the CUDA backend (``JITFunction.create_binder``)."""
        from triton.runtime.jit import JITFunction, create_function_from_signature

        entry = self._jit.get(interpreted.fn)
        if entry is None:
            kwargs = {k: v for k, v in interpreted.kwargs.items()
                      if k in ("version", "do_not_specialize", "do_not_specialize_on_alignment", "debug", "noinline")}
            jit = JITFunction(interpreted.fn, **kwargs)
            entry = self._jit[interpreted.fn] = (jit, create_function_from_signature(jit.signature, jit.params,
                                                                                      self.backend))
        return entry

    def record(self, interpreted, args, kwargs) -> None:
        from triton import knobs

        jit, binder = self._binder(interpreted)
        kwargs = dict(kwargs)  # as JITFunction.run completes them
        kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        bound_args, specialization, options = binder(*args, **kwargs)
        with warnings.catch_warnings():  # parse_options' notice that fp fusion defaults to on
            warnings.simplefilter("ignore")
            _, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound_args, specialization,
                                                             options)
        names = jit.arg_names
        self.launches.append({
            "target": self.target, "module": interpreted.fn.__module__, "kernel": interpreted.fn.__name__,
            "signature": signature,
            "constexprs": {names[path[0]]: value for path, value in constexprs.items()},
            "attrs": {names[path[0]]: value for path, value in attrs.items()},
            "options": {k: v for k, v in kwargs.items() if k in _CUDA_OPTION_KEYS and v is not None},
            "context": self.context._asdict(),
        })

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.interpreter import InterpretedFunction

        from fastncl.kernels import _launch

        recorder = self
        original = InterpretedFunction.run

        def run(self, *args, grid, warmup, **kwargs):
            recorder.record(self, args, kwargs)  # recorded, not executed

        InterpretedFunction.run = run
        try:
            with _launch.planned_for(_launch.LaunchTarget(*TARGETS[self.target])):
                yield self
        finally:
            InterpretedFunction.run = original

    def drive(self, op: str, variant: str, B: int, D: int | None, dtype: str, inputs: Callable, call: Callable):
        """One op call forward, then backward with ones as every differentiable output's upstream."""
        import torch

        leaves = inputs()
        self.context = Context(op, variant, B, D, dtype, "fwd")
        outs = call(*leaves)
        outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,)) if o.requires_grad]
        self.context = self.context._replace(phase="bwd")
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        self.context = None


def record(sweep: Sweep = SWEEP, targets: Iterable[str] = tuple(TARGETS), ops: Iterable[str] | None = None
           ) -> list[dict]:
    """Every launch of every op of the sweep (``ops``: only these), for each target. Needs
    TRITON_INTERPRET=1 set before triton was imported (the launchers accept CPU tensors only then)."""
    import fastncl.kernels as K

    if not K.interpreting():
        raise RuntimeError("the recorder drives the launchers on CPU tensors: set TRITON_INTERPRET=1 before "
                           "importing triton")
    wanted = set(K.OPS if ops is None else ops)
    unknown = wanted - set(K.OPS)
    if unknown:
        raise ValueError(f"unknown ops: {sorted(unknown)}")
    triton_ops = K.Ops("triton")
    launches = []
    for target in targets:
        recorder = Recorder(target)
        with recorder.active():
            for name in sweep.dtypes:
                dtype = _torch_dtype(name)
                for B in sweep.matrix_b:
                    for op, variant, inputs, call in _matrix_calls(triton_ops, B, dtype):
                        if op in wanted:
                            recorder.drive(op, variant, B, None, name, inputs, call)
                for B in sweep.embed_b:
                    for D in sweep.dims:
                        for op, variant, inputs, call in _embed_calls(triton_ops, B, D, dtype):
                            if op in wanted:
                                recorder.drive(op, variant, B, D, name, inputs, call)
        launches += recorder.launches
    return launches


def config_key(launch: dict) -> str:
    """What a compile depends on: the target, the kernel, its specialisation and options."""
    return json.dumps([launch[k] for k in ("target", "module", "kernel", "signature", "constexprs", "attrs",
                                           "options")], sort_keys=True)


def configs(launches: Iterable[dict]) -> list[dict]:
    """The distinct configs of ``launches``, each with the contexts that launch it (in order)."""
    out: dict[str, dict] = {}
    for launch in launches:
        key = config_key(launch)
        config = out.get(key)
        if config is None:
            config = out[key] = {k: v for k, v in launch.items() if k != "context"} | {"key": key, "contexts": []}
        if launch["context"] not in config["contexts"]:
            config["contexts"].append(launch["context"])
    return list(out.values())


def tile(config: dict) -> tuple[int, ...]:
    """The config's tile sizes (its BLOCK_* constexprs but the reduction's BLOCK_R), in order."""
    return tuple(v for k, v in config["constexprs"].items() if k.startswith("BLOCK") and k != "BLOCK_R")


def tile_size(config: dict) -> int:
    """Elements per tile and warps: the product of the tile's sizes, per warp, for the largest pick."""
    size = 1
    for v in tile(config):
        size *= v
    return size


def trained(context: dict, embed_min_batch: int) -> bool:
    """Whether a launch is on the trained path: every (B, B) op at any B (the trainer takes any
    batch size, and a ragged last batch), the embedding ops from ``EMBED_MIN_BATCH`` pairs up
    (below it the trainer takes the (B, B) ops), proxy_argmax at any B (SPS, BiCro)."""
    return not context["op"].endswith("_embed") or context["B"] >= embed_min_batch


# ---------------------------------------------------------------------------------------------
# 2. compile: each config for its target, in a subprocess without the interpreter, cached


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_version(capability: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas_version

    text = get_ptxas_version(capability)
    match = re.search(r"release ([\d.]+), V([\d.]+)", text)
    return match.group(2) if match else text.strip().splitlines()[-1]


def _compile_one(job: dict, cache: str | None) -> dict:
    """Compile one config (in the worker: TRITON_INTERPRET=0), or read its cached result."""
    import importlib

    import triton
    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.cache import get_cache_key

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    target = GPUTarget("cuda", TARGETS[job["target"]][0], 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(job["options"]))  # as JITFunction._pack_args does
    attrs = {(fn.arg_names.index(name),): value for name, value in job["attrs"].items()}
    src = ASTSource(fn, job["signature"], constexprs=job["constexprs"], attrs=attrs)
    key = hashlib.sha256(get_cache_key(src, backend, options, get_cache_invalidating_env_vars()).encode()).hexdigest()
    path = Path(cache) / f"{key}.json" if cache else None
    if path is not None and path.exists():
        return json.loads(path.read_text()) | {"cached": True}
    start = time.perf_counter()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by make_cubin
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every failure is reported
        lines = str(e).strip().splitlines() or [""]
        return {"ok": False, "error": f"{type(e).__name__}: {lines[-1][:300]}", "cached": False}
    text = log.getvalue()
    spills = [tuple(map(int, m)) for m in _PTXAS.findall(text)]
    regs = [int(m) for m in _REGS.findall(text)]
    if not spills or not regs:
        return {"ok": False, "error": f"no ptxas report in the compile's output: {text[-300:]!r}", "cached": False}
    result = {"ok": True, "error": None, "regs": max(regs), "stack": max(s[0] for s in spills),
              "spill_stores": max(s[1] for s in spills), "spill_loads": max(s[2] for s in spills),
              "shared": kernel.metadata.shared, "seconds": round(time.perf_counter() - start, 2)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
    return result | {"cached": False}


def _worker(jobs_path: str, out_path: str, cache: str | None, workers: int) -> None:
    jobs = json.loads(Path(jobs_path).read_text())
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_compile_one, jobs, [cache] * len(jobs)))
    else:
        results = [_compile_one(job, cache) for job in jobs]
    versions = {t: _ptxas_version(TARGETS[t][0]) for t in sorted({job["target"] for job in jobs})}
    import triton

    Path(out_path).write_text(json.dumps({"results": results, "triton": triton.__version__, "ptxas": versions}))


def compile_configs(configs: list[dict], cache: Path | None = CACHE, workers: int = 1, timeout: float = 3600
                    ) -> dict:
    """Compile every config (a subprocess without the interpreter; Triton's own cache off, so that
    ptxas reports on every miss of ``cache``). Returns {"results": [per config], "triton": version,
    "ptxas": {target: version}}; each result has ok, error, regs, spill_stores, spill_loads, stack,
    shared (bytes) and cached."""
    jobs = [{k: c[k] for k in ("target", "module", "kernel", "signature", "constexprs", "attrs", "options")}
            for c in configs]
    with tempfile.TemporaryDirectory(prefix="aot_report_") as tmp:
        jobs_path, out_path = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        jobs_path.write_text(json.dumps(jobs))
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(Path(tmp) / "triton"),
               "TRITON_DEFAULT_FP_FUSION": "1"}  # a GPU launch's default, stated (no warning)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-worker", str(jobs_path), str(out_path),
               "--jobs", str(workers)] + (["--cache", str(cache)] if cache else ["--no-cache"])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"the compile worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out_path.read_text())


# ---------------------------------------------------------------------------------------------
# 3. report


def problems(configs: list[dict], results: list[dict]) -> list[str]:
    """Configs that fail to compile or need more shared memory than their target's block has."""
    out = []
    for config, result in zip(configs, results):
        where = f"{config['kernel']} on {config['target']} ({describe(config)})"
        if not result["ok"]:
            out.append(f"{where}: {result['error']}")
        elif result["shared"] > TARGETS[config["target"]][1]:
            out.append(f"{where}: {result['shared']} bytes of shared memory, over {TARGETS[config['target']][1]}")
    return out


def describe(config: dict) -> str:
    """A config in one line: its constexprs, options, and the first shape that launches it."""
    c = config["contexts"][0]
    shape = f"B={c['B']}" + (f" D={c['D']}" if c["D"] else "")
    flags = " ".join(f"{k}={v}" for k, v in config["constexprs"].items())
    opts = " ".join(f"{k}={v}" for k, v in config["options"].items() if k in ("num_warps", "num_stages"))
    return f"{c['dtype']} {shape} {c['op']} {c['variant']} {flags} {opts}".replace("  ", " ").strip()


def _kib(nbytes: int) -> str:
    return f"{nbytes / 1024:.1f}"


def _spill(result: dict) -> int:
    return result["spill_stores"] + result["spill_loads"]


def _join(values) -> str:
    return ", ".join(str(v) for v in sorted(set(values)))


def render(configs: list[dict], results: list[dict], versions: dict, sweep: Sweep = SWEEP) -> str:
    """The report's markdown: a summary per kernel, then a table per kernel and the spilling configs."""
    from fastncl.kernels import OPS

    targets = sorted({c["target"] for c in configs})
    order = {m: i for i, m in enumerate(dict.fromkeys(f"fastncl.kernels.{m}" for m in OPS.values()))}
    kernels: dict[tuple, list] = defaultdict(list)
    for config, result in zip(configs, results):
        kernels[(order.get(config["module"], len(order)), config["kernel"])].append((config, result))
    ptxas = ", ".join(f"{versions['ptxas'][t]} ({t})" for t in targets)
    counts = ", ".join(f"{sum(c['target'] == t for c in configs)} for {t}" for t in targets)
    lines = [
        f"Generated by `python tools/aot_report.py` with Triton {versions['triton']} and its bundled ptxas {ptxas}:",
        f"every launch of every op forward and backward, (B, B) ops at B = {_join(sweep.matrix_b)}, embedding ops "
        f"and `proxy_argmax` at B = {_join(sweep.embed_b)} and D = {_join(sweep.dims)}, in "
        f"{', '.join(sweep.dtypes)}, each constexpr variant, specialised as a GPU launch and compiled for each target.",
        f"{len(configs)} configs ({counts}); "
        "registers and spill bytes (stores + loads) per thread from `ptxas -v`, shared memory per block "
        "(KiB) as the launch requests it, against the limit. A row groups the configs of one dtype and tile "
        "(the flags, sizes and divisibility that share it); its numbers are their maxima.",
        "",
        "| kernel | configs | " + " | ".join(f"{t} regs | {t} spilling configs | {t} max spill B | "
                                            f"{t} max smem KiB (of {_kib(TARGETS[t][1])})" for t in targets) + " |",
        "|---|---:|" + "---:|---:|---:|---:|" * len(targets),
    ]
    for (_, name), items in sorted(kernels.items()):
        cells = []
        for t in targets:
            rs = [r for c, r in items if c["target"] == t and r["ok"]]
            cells += [str(max((r["regs"] for r in rs), default=0)), str(sum(_spill(r) > 0 for r in rs)),
                      str(max((_spill(r) for r in rs), default=0)), _kib(max((r["shared"] for r in rs), default=0))]
        n = len({json.dumps([c[k] for k in ("module", "kernel", "signature", "constexprs", "attrs", "options")])
                 for c, _ in items})
        lines.append(f"| `{name}` | {n} | " + " | ".join(cells) + " |")
    failed = problems(configs, results)
    if failed:
        lines += ["", "**Failures:**", ""] + [f"- {f}" for f in failed]
    lines += ["", "Per kernel, one row per dtype and tile (click to open):"]
    for (_, name), items in sorted(kernels.items()):
        tile_names = [k for k in items[0][0]["constexprs"] if k.startswith("BLOCK") and k != "BLOCK_R"]
        rows: dict[tuple, list] = defaultdict(list)
        for config, result in items:
            dtype = config["contexts"][0]["dtype"]
            opts = config["options"]
            rows[(DTYPE_NAMES.index(dtype), tile(config), opts.get("num_warps", 4), opts.get("num_stages", 3))].append(
                (config, result))
        embed = any(c["D"] for config, _ in items for c in config["contexts"])
        lines += ["", f"<details><summary><code>{name}</code> ({', '.join(tile_names)})</summary>", "",
                  f"| dtype | tile | warps, stages | B |{' D |' if embed else ''} configs | "
                  + " | ".join(f"{t} regs | {t} spill B | {t} smem KiB" for t in targets) + " |",
                  "|---|---|---|---|" + ("---|" if embed else "") + "---:|" + "---:|---:|---:|" * len(targets)]
        worst: dict[tuple, tuple] = {}
        for (d, tiles, warps, stages), group in sorted(rows.items()):
            contexts = [c for config, _ in group for c in config["contexts"]]
            cells = []
            for t in targets:
                ok = [r for c, r in group if c["target"] == t and r["ok"]]
                cells += [str(max((r["regs"] for r in ok), default="–")),
                          str(max((_spill(r) for r in ok), default="–")),
                          _kib(max((r["shared"] for r in ok), default=0))]
                for c, r in group:
                    if c["target"] == t and r["ok"] and _spill(r) and _spill(r) > worst.get((t, d), (0,))[0]:
                        worst[(t, d)] = (_spill(r), c)
            n = len({json.dumps([c[k] for k in ("signature", "constexprs", "attrs", "options")]) for c, _ in group})
            lines.append(f"| {DTYPE_NAMES[d]} | {'×'.join(map(str, tiles))} | {warps}, {stages} | "
                         f"{_join(c['B'] for c in contexts)} |"
                         + (f" {_join(c['D'] for c in contexts if c['D'])} |" if embed else "")
                         + f" {n} | " + " | ".join(cells) + " |")
        if worst:
            lines += ["", "The most spilling config per target and dtype (bytes of spill stores + loads per thread; "
                      "the first shape that launches it):", ""]
            lines += [f"- {t}: {b} B: {describe(c)}" for (t, _), (b, c) in sorted(worst.items())]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def write_docs(section: str, path: Path = DOCS) -> None:
    """Replace the text between the report's markers in ``path`` (a temporary file, then renamed)."""
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path}: no {BEGIN} ... {END} markers to write the report between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{section}{END}{tail}"
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        f.write(new)
    os.replace(f.name, path)


# ---------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(kind: str, allowed: Iterable[str] | None = None, conv=str):
    allowed = None if allowed is None else tuple(allowed)

    def parse(text: str):
        try:
            values = tuple(conv(v) for v in text.split(",") if v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from None
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected {kind} among {', '.join(allowed or ())}, got {text!r}")
        return values
    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compile-worker"]:  # the compile subprocess
        p = _Parser(prog="aot_report.py --compile-worker")
        p.add_argument("--compile-worker", nargs=2)
        p.add_argument("--jobs", type=_positive, default=1)
        p.add_argument("--cache")
        p.add_argument("--no-cache", action="store_true")
        args = p.parse_args(argv)
        _worker(*args.compile_worker, None if args.no_cache else args.cache, args.jobs)
        return 0
    from fastncl.kernels import OPS

    p = _Parser(prog="aot_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=_csv("targets", TARGETS), default=tuple(TARGETS),
                   help="comma-separated targets (default: sm_80,sm_90)")
    p.add_argument("--ops", type=_csv("ops", OPS), default=None, help="only these ops (comma-separated; implies "
                   "--no-docs)")
    p.add_argument("--dtypes", type=_csv("dtypes", DTYPE_NAMES), default=SWEEP.dtypes)
    p.add_argument("--matrix-b", type=_csv("positive integers", conv=int), default=SWEEP.matrix_b,
                   help="B of the (B, B) ops (implies --no-docs when not the default)")
    p.add_argument("--embed-b", type=_csv("positive integers", conv=int), default=SWEEP.embed_b)
    p.add_argument("--dims", type=_csv("positive integers", conv=int), default=SWEEP.dims)
    p.add_argument("--jobs", type=_positive, default=1, help="compile processes (default 1)")
    p.add_argument("--cache", type=Path, default=CACHE, help=f"compile cache (default {CACHE})")
    p.add_argument("--no-cache", action="store_true", help="compile every config again, store nothing")
    p.add_argument("--docs", type=Path, default=DOCS, help="the file whose marked section gets the report")
    p.add_argument("--no-docs", action="store_true", help="print the report, write no file")
    p.add_argument("--json", type=Path, help="also write every config and its result to this file")
    args = p.parse_args(argv)
    for option, values in (("--matrix-b", args.matrix_b), ("--embed-b", args.embed_b), ("--dims", args.dims)):
        if any(v < 1 for v in values):
            p.error(f"{option}: expected positive integers, got {','.join(map(str, values))}")
    if not args.no_docs and not args.docs.is_file():
        p.error(f"--docs: {args.docs}: no such file")
    if args.json is not None and not args.json.parent.is_dir():
        p.error(f"--json: {args.json.parent}: no such folder")
    sweep = Sweep(args.matrix_b, args.embed_b, args.dims, args.dtypes)
    partial = args.ops is not None or sweep != SWEEP or args.targets != tuple(TARGETS)
    start = time.perf_counter()
    launches = record(sweep, args.targets, args.ops)
    found = configs(launches)
    recorded = time.perf_counter() - start
    print(f"recorded {len(launches)} launches, {len(found)} distinct configs in {recorded:.1f} s", file=sys.stderr)
    compiled = compile_configs(found, None if args.no_cache else args.cache, args.jobs)
    results = compiled["results"]
    print(f"compiled {sum(not r['cached'] for r in results)} configs ({sum(r['cached'] for r in results)} cached) "
          f"in {time.perf_counter() - start - recorded:.1f} s", file=sys.stderr)
    section = render(found, results, compiled, sweep)
    if args.json is not None:
        args.json.write_text(json.dumps({"triton": compiled["triton"], "ptxas": compiled["ptxas"],
                                         "configs": [c | {"result": r} for c, r in zip(found, results)]}, indent=1))
    if args.no_docs or partial:
        print(section)
    else:
        write_docs(section, args.docs)
        print(f"wrote {args.docs}", file=sys.stderr)
    failed = problems(found, results)
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
