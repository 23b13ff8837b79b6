"""One call on a GPU machine: the GPU parity tests, the benchmarks, and the report against the targets.

On the H100 device machine (one command of at most 10 minutes; files come back from $OUT), the
device tool's call is

    run(kind="nvidia-h100-x1", timeout_s=600,
        command='PYTHONUNBUFFERED=1 python3 tools/gpu_report.py --out "$OUT" --commit <sha>')

with <sha> from ``git rev-parse HEAD`` on the developer's machine (the device gets a copy of the
working tree without .git; give "<sha>+dirty" if uncommitted changes travel with it). Run it with
the device tool's ``timeout_s=600``: the default budget (``--budget 520`` s, counted after the
install) leaves time for the install, a test that overruns the deadline and the report. The
device returns setup.log (if it installed), parity.log, bench.log, bench-raw.json and the two
result files (6 files; its limit is 8). Afterwards copy ``<gpu>-<date>.json`` and ``.md`` from
the returned files into bench/results/ and commit them.

What it does, each step in a subprocess so that a crash or an out-of-memory stays contained:
1. makes ``fastncl`` importable (``pip install --no-deps --no-build-isolation -e .`` if needed:
   the device has no network, and torch, Triton, pytest and pytest-benchmark are already there);
2. the parity tests: ``pytest tests/test_kernels_triton.py tests/test_cuda_graph_sps.py`` (on a GPU
   they include the large shapes, ``torch.compile(fullgraph=True)`` and the CUDA-graph capture and
   replay of the fused SPS objective), within ``--parity-budget`` seconds;
3. the benchmarks: ``pytest bench/ -m target`` (``--suite targets``, the default: the ~85
   benchmarks whose numbers enter a target) or all of them (``--suite full``: targets first, then
   the rest until the budget ends), ``-k`` selects further; ``--benchmark-json`` is kept as
   bench-raw.json;
4. writes bench/results/<gpu>-<date>.json (environment, test outcomes, one record per measured
   op/provider/B/D/dtype/mode) and <gpu>-<date>.md (the targets marked met/missed with the measured
   numbers, and every time and ratio), and copies both to ``--out`` with the logs.

Tests that would start after the budget are skipped with that reason (tools/pytest_budget.py),
and every outcome and benchmark record is written as it happens, so a run cut short still reports
what it measured. A CUDA error that poisons the process (an illegal address, a device-side
assert) fails every later test: those run again once in a fresh process. ``--render results.json``
only rewrites the Markdown from a results JSON (any machine). The report is a pure function of the
JSON (``render``), tested on CPU in tests/test_gpu_report.py. Not measured on a GPU yet: the time
each suite takes there is an estimate.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import targets  # noqa: E402  (bench/targets.py: the one definition of the targets)

PARITY_TESTS = ("tests/test_kernels_triton.py", "tests/test_cuda_graph_sps.py")
RESERVE_S = 25  # kept from the budget for writing the report
GRACE_S = 45  # a test that started before the deadline may run this much past it before it is killed
FATAL_CUDA = re.compile(r"illegal memory access|illegal address|device-side assert|unspecified launch failure|"
                        r"cudaErrorIllegal|CUDA error: misaligned address")
OP_ORDER = targets.FUSED_OPS + targets.MATRIX_OPS + targets.EMBED_OPS
MODE_ORDER = ("fwd", "fwd+bwd")
DTYPE_ORDER = ("bf16", "fp32")


# ---------------------------------------------------------------------------------------------
# pure part: naming, summaries, the Markdown table


def slug(text: str) -> str:
    """A file-name-safe lower-case form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_name(gpu: str, date: str) -> str:
    return f"{slug(gpu)}-{date}"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a killed run
                continue
    return out


def latest_outcomes(outcomes: list[dict]) -> list[dict]:
    """One outcome per test, its last (a re-run replaces the first run's; a teardown error a pass)."""
    return list({o["nodeid"]: o for o in outcomes}.values())


def summarize_outcomes(outcomes: list[dict]) -> dict:
    """Counts per outcome, the failures (nodeid, reason) and the skip reasons with their counts
    (one outcome per test: its last)."""
    outcomes = latest_outcomes(outcomes)
    counts = Counter(o["outcome"] for o in outcomes)
    failures = [{"nodeid": o["nodeid"], "reason": o.get("reason", "")} for o in outcomes
                if o["outcome"] in ("failed", "error")]
    skips = Counter(o.get("reason", "") for o in outcomes if o["outcome"] == "skipped")
    return {"counts": dict(counts), "failures": failures,
            "skip_reasons": [{"reason": r, "count": n} for r, n in skips.most_common()]}


def roofline_pct(rec: dict | None) -> str:
    """The op's roofline bound on the run's GPU (bench/roofline.py, recorded by the benchmark) over
    the measured median, in percent; "—" without a bound (a GPU with no spec there) or a time."""
    if rec is None or rec.get("oom") or not rec.get("roofline_ms") or not rec.get("median_ms"):
        return "—"
    return f"{100 * rec['roofline_ms'] / rec['median_ms']:.0f} %"


def rate(rec: dict) -> str:
    """The record's achieved hardware rate from its model: TFLOP/s if it has FLOPs, else GB/s."""
    ms = rec.get("median_ms")
    if not ms or rec.get("oom"):
        return "—"
    if rec.get("flops"):
        return f"{rec['flops'] / (ms * 1e-3) / 1e12:.1f} TFLOP/s"
    if rec.get("bytes"):
        return f"{rec['bytes'] / (ms * 1e-3) / 1e9:.0f} GB/s"
    return "—"


def _sort_key(key):
    op, B, D, dtype, mode = key
    return (OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER), op, B, D or 0,
            DTYPE_ORDER.index(dtype) if dtype in DTYPE_ORDER else 9,
            MODE_ORDER.index(mode) if mode in MODE_ORDER else 9)


def _cell_time(rec: dict | None, spread: bool = False) -> str:
    if rec is None:
        return "—"
    if rec.get("oom"):
        return "OOM"
    text = targets.fmt_ms(rec.get("median_ms"))
    if spread and rec.get("p20_ms") is not None and rec.get("p80_ms") is not None:
        text += f" ({targets.fmt_ms(rec['p20_ms'])}–{targets.fmt_ms(rec['p80_ms'])})"
    return text


def _ratio(base: dict | None, rec: dict | None) -> str:
    if base is None or rec is None or rec.get("oom"):
        return "—"
    if base.get("oom"):
        return "base OOM"
    if not rec.get("median_ms") or base.get("median_ms") is None:
        return "—"
    return f"{base['median_ms'] / rec['median_ms']:.2f}×"


def _triple(recs, field: str, fmt) -> str:
    cells = []
    for rec in recs:
        value = None if rec is None else rec.get(field)
        cells.append("—" if value is None else fmt(value))
    return " / ".join(cells)


def times_table(records: list[dict]) -> list[str]:
    by_key = targets.index(records)
    shapes = sorted({(r["op"], r["B"], r.get("D"), r["dtype"], r["mode"]) for r in records}, key=_sort_key)
    lines = ["| op | B | D | dtype | mode | triton (p20–p80) | eager | compiled | eager / triton | compiled / triton "
             "| triton rate | triton % of roofline | CUDA graph t / e / c | loss peak MB t / e / c "
             "| launches t / e / c |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for op, B, D, dtype, mode in shapes:
        t, e, c = (by_key.get((op, p, B, D, dtype, mode)) for p in targets.PROVIDERS)
        pct = roofline_pct(t)
        lines.append(" | ".join([
            f"| {op}", str(B), "—" if D is None else str(D), dtype, mode, _cell_time(t, spread=True), _cell_time(e),
            _cell_time(c), _ratio(e, t), _ratio(c, t), "—" if t is None else rate(t), pct,
            _triple((t, e, c), "graph_ms", targets.fmt_ms),
            _triple((t, e, c), "loss_peak_mb", lambda v: f"{v:.1f}"),
            _triple((t, e, c), "launches", str)]) + " |")
    return lines


def _outcome_line(name: str, summary: dict | None) -> str:
    if not summary:
        return f"- {name}: not run"
    c = summary["counts"]
    budget = sum(s["count"] for s in summary["skip_reasons"] if "time budget" in s["reason"])
    parts = [f"{c.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped")
             if c.get(k, 0) or k in ("passed", "failed")]
    text = f"- {name}: " + ", ".join(parts)
    if budget:
        text += f" ({budget} skipped for the time budget)"
    if summary.get("note"):
        text += f"; {summary['note']}"
    return text


def render(results: dict) -> str:
    """The Markdown report of a results JSON (what tools/gpu_report.py writes)."""
    meta = results.get("meta", {})
    records = results.get("records", [])
    rows = targets.evaluate(records)
    status = Counter(r["status"] for r in rows)
    out = [f"# fastncl GPU report: {meta.get('gpu', 'unknown GPU')}, {meta.get('date', '?')}", "",
           f"- GPU: {meta.get('gpu', '?')}; torch {meta.get('torch', '?')}; Triton {meta.get('triton', '?')}; "
           f"Python {meta.get('python', '?')}; commit {meta.get('commit', 'unknown')}",
           f"- run: suite `{meta.get('suite', '?')}`" + (f", `-k {meta['select']}`" if meta.get("select") else "")
           + f"; budget {meta.get('budget_s', '?')} s, used {meta.get('elapsed_s', '?')} s",
           _outcome_line("parity tests (" + ", ".join(meta.get("parity_tests", PARITY_TESTS)) + ")",
                         results.get("parity")),
           _outcome_line("benchmarks", results.get("bench")),
           f"- {len(records)} benchmark records ({sum(1 for r in records if r.get('oom'))} out of memory)", "",
           "## Targets", "",
           "H100, bf16, median of `triton.testing.do_bench`, forward+backward (proxy_argmax: forward), all providers "
           f"measured side by side in this run. {status.get('met', 0)} met, {status.get('missed', 0)} missed, "
           f"{status.get('not measured', 0)} not measured.", "",
           "| target | required | measured | status |", "|---|---|---|---|"]
    out += [f"| {r['target']} | {r['required']} | {r['measured']} | {r['status']} |" for r in rows]
    out += ["", "## Times", "",
            "Median of `triton.testing.do_bench` (CUDA events, L2 flushed between calls, gradients reset), Triton's "
            "p20–p80 in brackets; a ratio above 1 means Triton is faster. Rate: the op's minimal FLOPs (or bytes) "
            "over Triton's time; `% of roofline`: the op's bound on this GPU at its published peak rates over "
            "Triton's time (bench/roofline.py; docs/kernels.md, Roofline; — on a GPU without a spec there). "
            "CUDA graph: "
            "median of `do_bench_cudagraph` (B <= 1024). Loss peak: peak allocation minus inputs and their gradients. "
            "Launches: kernels per call (torch.profiler; fused objectives). OOM: out of memory; —: not measured.", ""]
    out += times_table(records) if records else ["No benchmark records."]
    for name in ("parity", "bench"):
        summary = results.get(name) or {}
        if summary.get("failures"):
            out += ["", f"## Failures ({name})", ""]
            for f in summary["failures"]:
                reason = " ".join(f["reason"].split())[:400]
                out.append(f"- `{f['nodeid']}`: {reason}")
        if summary.get("skip_reasons"):
            out += ["", f"## Skip reasons ({name})", ""]
            out += [f"- {s['count']} × {s['reason']}" for s in summary["skip_reasons"]]
    graph_errors = Counter(r["graph_error"] for r in records if r.get("graph_error"))
    if graph_errors:
        out += ["", "## CUDA-graph capture errors", ""]
        out += [f"- {n} × {e}" for e, n in graph_errors.most_common()]
    return "\n".join(out) + "\n"


def write_results(results: dict, dirs: list[Path], name: str) -> list[Path]:
    """Write <name>.json and <name>.md into each folder (atomically); returns the paths."""
    from fastncl.run import write_atomic

    text_json = json.dumps(results, indent=1, sort_keys=False) + "\n"
    text_md = render(results)
    paths = []
    for folder in dirs:
        for suffix, text in ((".json", text_json), (".md", text_md)):
            write_atomic(folder / f"{name}{suffix}", text)
            paths.append(folder / f"{name}{suffix}")
    return paths


# ---------------------------------------------------------------------------------------------
# the GPU run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_report.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="also copy the results and logs here (the device tool's $OUT)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results",
                   help="where <gpu>-<date>.json/.md go (default bench/results)")
    p.add_argument("--suite", choices=("targets", "full"), default="targets",
                   help="targets: only the benchmarks that enter a target (default); full: all, targets first")
    p.add_argument("-k", dest="select", help="pytest -k expression selecting benchmarks (e.g. 'infonce and B8192')")
    p.add_argument("--budget", type=float, default=520.0,
                   help="seconds for the parity tests, the benchmarks and the report (default 520)")
    p.add_argument("--parity-budget", type=float, default=180.0, help="seconds for the parity tests (default 180)")
    p.add_argument("--parity-tests", nargs="+", metavar="PATH", help="the parity test files or node ids "
                   f"(default: {' '.join(PARITY_TESTS)})")
    p.add_argument("--skip-parity", action="store_true", help="benchmarks only")
    p.add_argument("--skip-bench", action="store_true", help="parity tests only")
    p.add_argument("--commit", help="the commit being measured (default: git rev-parse HEAD, where .git exists)")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                   help="only write the Markdown report of an existing results JSON next to it")
    args = p.parse_args(argv)
    if args.budget <= RESERVE_S + 10:
        p.error(f"--budget must be above {RESERVE_S + 10} s, got {args.budget:g}")
    if args.parity_budget <= 0:
        p.error(f"--parity-budget must be positive, got {args.parity_budget:g}")
    if args.skip_parity and args.skip_bench:
        p.error("--skip-parity and --skip-bench together leave nothing to run")
    return args


def render_file(path: Path) -> Path:
    from fastncl import FastnclError
    from fastncl.run import write_atomic

    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise FastnclError(f"--render: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise FastnclError(f"--render: {path} is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(results, dict) or not isinstance(results.get("records"), list):
        raise FastnclError(f"--render: {path} is not a gpu_report results file (no 'records' list)")
    md = path.with_suffix(".md")
    write_atomic(md, render(results))
    return md


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def commit_of(explicit: str | None) -> str:
    if explicit:
        return explicit
    sha = _git("rev-parse", "HEAD")
    if sha is None:
        return "unknown (no .git here; pass --commit)"
    return sha + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def environment() -> dict:
    """GPU name and versions, read in a subprocess (the parent holds no CUDA context)."""
    from fastncl import FastnclError

    code = ("import json, platform, torch\n"
            "info = {'torch': torch.__version__, 'python': platform.python_version(), 'cuda': torch.version.cuda,\n"
            "        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}\n"
            "try:\n    import triton; info['triton'] = triton.__version__\n"
            "except ImportError:\n    info['triton'] = None\n"
            "print(json.dumps(info))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
        raise FastnclError(f"could not import torch: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ensure_installed(log_path: Path) -> bool:
    """Whether fastncl imports, after installing it from this checkout if it did not."""
    try:
        import fastncl.kernels  # noqa: F401  (imports torch, but starts no CUDA context)

        return True
    except ImportError:
        pass
    check = [sys.executable, "-c", "import fastncl.kernels"]
    print("installing fastncl (--no-deps --no-build-isolation -e .)", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        for cmd in ([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
                    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "."]):
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if subprocess.run(check, cwd=ROOT, capture_output=True).returncode == 0:
                return True
    return False


def fatal_cuda_victims(outcomes: list[dict]) -> list[str]:
    """The tests that failed after the first one that failed with a CUDA error that poisons the
    process (an illegal address, a device-side assert): in a fresh process they may well pass."""
    first = next((i for i, o in enumerate(outcomes) if o["outcome"] in ("failed", "error")
                  and FATAL_CUDA.search(o.get("reason", ""))), None)
    if first is None:
        return []
    victims = [os.path.join(o.get("rootdir", ""), o["nodeid"]) for o in outcomes[first + 1:]
               if o["outcome"] in ("failed", "error")]
    return list(dict.fromkeys(victims))  # node ids made absolute: pytest may run from another folder


def run_phase(paths: list[str], options: list[str], *, deadline: float, log_path: Path, outcomes: Path,
              env_extra: dict, restarts: int = 3) -> str | None:
    """pytest over ``paths``; if a CUDA error poisons the process, the tests that failed after it
    run again in a fresh process (at most ``restarts`` times, within the deadline)."""
    env_extra = {**env_extra, "FASTNCL_OUTCOMES": str(outcomes)}
    notes = [run_pytest([*paths, *options], deadline=deadline, log_path=log_path, env_extra=env_extra)]
    tried: set[str] = set()
    for _ in range(restarts):
        victims = [v for v in fatal_cuda_victims(latest_outcomes(read_jsonl(outcomes))) if v not in tried]
        if not victims or time.time() >= deadline:
            break
        tried.update(victims)
        notes.append(f"a CUDA error poisoned the process: {len(victims)} failed tests after it ran again")
        print(f"  {notes[-1]}", flush=True)
        rerun_options = [o for o in options if not o.startswith("--benchmark-json=")]  # keep the first run's
        notes.append(run_pytest([*victims, *rerun_options], deadline=deadline, log_path=log_path,
                                env_extra=env_extra, append=True))
    return "; ".join(n for n in notes if n) or None


def run_pytest(args: list[str], *, deadline: float, log_path: Path, env_extra: dict,
               append: bool = False) -> str | None:
    """pytest in a subprocess with the budget plugin; returns a note if it was killed or crashed."""
    env = {**os.environ, "FASTNCL_DEADLINE": str(deadline), "PYTHONUNBUFFERED": "1", **env_extra,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tools"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "pytest", "-p", "pytest_budget", "-q", "-rfEs", *args]
    with open(log_path, "a" if append else "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()) + GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the pytest process group we started (its compile workers too)
            proc.wait()
            return f"killed {GRACE_S} s after its deadline (a test ran long); outcomes up to then are kept"
    if rc in (0, 1, 5):  # passed, some failed, nothing collected
        return None
    return f"pytest exited with code {rc} (see the log)"


def _print_failures(summary: dict, most: int = 10) -> None:
    for f in summary["failures"][:most]:
        first = (f["reason"].splitlines() or [""])[0][:200]
        print(f"  FAILED {f['nodeid']}: {first}", flush=True)
    if len(summary["failures"]) > most:
        print(f"  ... and {len(summary['failures']) - most} more (see the report)", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    logs = args.out or ROOT / "runs" / "gpu-report"
    if not args.render and not ensure_installed(logs / "setup.log"):
        print(f"gpu_report: fastncl does not import and could not be installed (see {logs / 'setup.log'})",
              file=sys.stderr)
        return 2
    from fastncl import FastnclError

    try:
        if args.render:
            print(render_file(args.render))
            return 0
        return _run(args, logs)
    except FastnclError as e:
        print(f"gpu_report: {e}", file=sys.stderr)
        return 2


def _run(args, logs: Path) -> int:
    from fastncl import FastnclError

    start = time.time()
    end = start + args.budget - RESERVE_S
    work = Path(tempfile.mkdtemp(prefix="fastncl-gpu-report-"))
    logs.mkdir(parents=True, exist_ok=True)
    env = environment()
    if not env.get("gpu"):
        raise FastnclError("no CUDA GPU visible: this tool runs the GPU tests and benchmarks (CPU runs skip them)")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    meta = {**env, "date": date, "commit": commit_of(args.commit), "suite": args.suite, "select": args.select,
            "budget_s": args.budget, "parity_tests": list(args.parity_tests or PARITY_TESTS)}
    print(f"{env['gpu']}: torch {env['torch']}, Triton {env['triton']}, commit {meta['commit']}", flush=True)
    results = {"meta": meta, "parity": None, "bench": None, "records": []}

    if not args.skip_parity:
        deadline = min(end, time.time() + args.parity_budget)
        print(f"parity tests (until +{deadline - start:.0f} s) ...", flush=True)
        note = run_phase(meta["parity_tests"], [], deadline=deadline, log_path=logs / "parity.log",
                         outcomes=work / "parity.jsonl", env_extra={})
        results["parity"] = summarize_outcomes(read_jsonl(work / "parity.jsonl"))
        results["parity"]["note"] = note
        print(_outcome_line("parity", results["parity"]), flush=True)
        _print_failures(results["parity"])

    if not args.skip_bench:
        print(f"benchmarks, suite {args.suite} (until +{end - start:.0f} s) ...", flush=True)
        raw = logs / "bench-raw.json"
        select = ["--ignore=bench/bench_train_cpu.py", "--ignore=bench/bench_e2e.py", f"--benchmark-json={raw}",
                  "--benchmark-columns", "median,iqr,rounds", "--benchmark-sort", "name"]
        if args.suite == "targets":
            select += ["-m", "target"]
        if args.select:
            select += ["-k", args.select]
        note = run_phase(["bench/"], select, deadline=end, log_path=logs / "bench.log", outcomes=work / "bench.jsonl",
                         env_extra={"FASTNCL_BENCH_RECORDS": str(work / "records.jsonl")})
        results["bench"] = summarize_outcomes(read_jsonl(work / "bench.jsonl"))
        results["bench"]["note"] = note
        results["records"] = list(targets.index(read_jsonl(work / "records.jsonl")).values())
        print(_outcome_line("benchmarks", results["bench"]), flush=True)
        _print_failures(results["bench"])

    meta["elapsed_s"] = round(time.time() - start)
    name = result_name(env["gpu"], date)
    dirs = [args.results_dir] + ([args.out] if args.out and args.out.resolve() != args.results_dir.resolve() else [])
    paths = write_results(results, dirs, name)
    report = render(results)
    print(report[report.index("## Targets"):report.index("## Times")] if "## Times" in report else report)
    print("written: " + ", ".join(str(p) for p in paths))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
