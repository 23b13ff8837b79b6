"""Run the end-to-end SGR benchmark on a GPU and commit-ready results: JSON and a Markdown table.

    python tools/bench_e2e.py            # writes bench/results/<gpu>-<date>-e2e.{json,md}

Runs ``pytest bench/bench_e2e.py`` (pytest-benchmark, CUDA-synchronised) in one process, so that
the three variants (papers' loop in fp32, batched fp32, batched + compile + CUDA graphs + bf16)
are measured side by side, and tabulates the median training-step time, pairs per second and
dev-evaluation time against the issue's targets (fast at least 10x the loop). The kernel
benchmarks have their own script; this one only handles bench_e2e.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from gpu_report import commit_of, result_name  # noqa: E402  (one file-name and commit convention)

from fastncl.run import write_atomic  # noqa: E402
NAMES = {"loop": "(a) papers' loop, fp32", "batched": "(b) batched, fp32", "fast": "(c) batched + compile + graphs + bf16"}


def table(report: dict) -> str:
    rows = {(b["name"].split("[")[0], b["extra_info"].get("variant")): b for b in report["benchmarks"]}

    def cell(kind, variant, fmt):
        b = rows.get((kind, variant))
        return fmt(b) if b else "-"

    def ratio(kind):
        a, c = rows.get((kind, "loop")), rows.get((kind, "fast"))
        return f"{a['stats']['median'] / c['stats']['median']:.1f}x" if a and c else "-"

    info = next((b["extra_info"] for b in report["benchmarks"] if "gpu" in b["extra_info"]), {})
    lines = [f"# End-to-end SGR benchmark: {info.get('gpu', 'unknown GPU')}", "",
             f"commit {report['fastncl_commit']}, {report['datetime']}, torch {info.get('torch')}, "
             f"triton {info.get('triton')}; Flickr30K-shaped synthetic data, B = 128 (16,384 pairs per step), "
             "SGR E 1024 / S 256 / 3 steps. `python tools/bench_e2e.py`", "",
             "| | " + " | ".join(NAMES[v] for v in NAMES) + " | (a) / (c) | target |",
             "|---|---|---|---|---|---|"]
    lines.append("| train step, median ms | " + " | ".join(
        cell("bench_train_step", v, lambda b: f"{1e3 * b['stats']['median']:.1f}") for v in NAMES)
        + f" | {ratio('bench_train_step')} | >= 10x |")
    lines.append("| pairs / s | " + " | ".join(
        cell("bench_train_step", v, lambda b: f"{b['extra_info']['pairs_per_s']:,.0f}") for v in NAMES) + " | | |")
    lines.append("| dev eval 1000 x 5000, median s | " + " | ".join(
        cell("bench_dev_eval", v, lambda b: f"{b['stats']['median']:.2f}") for v in NAMES)
        + f" | {ratio('bench_dev_eval')} | >= 10x |")
    lines.append("| graphs compiled in the timed steps / graph breaks | " + " | ".join(
        cell("bench_train_step", v, lambda b: f"{b['extra_info']['graphs_compiled_in_timed_rounds']} / "
                                              f"{b['extra_info']['graph_breaks']}") for v in NAMES) + " | | 0 / 0 |")
    lines.append("| warm-up (compile) s | " + " | ".join(
        cell("bench_train_step", v, lambda b: f"{b['extra_info']['warmup_s']:.1f}") for v in NAMES) + " | | |")
    lines.append("| peak memory, train step (MiB) | " + " | ".join(
        cell("bench_train_step", v, lambda b: f"{b['extra_info']['peak_memory_mb']:,.0f}") for v in NAMES) + " | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and the table")
    p.add_argument("-k", help="pytest -k expression (e.g. 'fast or batched' to skip the slow loop)")
    p.add_argument("--commit", help="the commit measured, where the tree has no .git (default: git rev-parse HEAD)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("tools/bench_e2e.py: no CUDA GPU on this machine; the end-to-end benchmark needs one", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "bench_e2e.py"), "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={raw}"]
        if args.k:
            cmd += ["-k", args.k]
        done = subprocess.run(cmd, cwd=ROOT)
        if not raw.exists():
            print("tools/bench_e2e.py: the benchmark produced no results", file=sys.stderr)
            return done.returncode or 1
        report = json.loads(raw.read_text())
    report["fastncl_commit"] = commit_of(args.commit)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    base = Path(args.out) / (result_name(torch.cuda.get_device_name(), stamp) + "-e2e")
    write_atomic(base.with_suffix(".json"), json.dumps(report, indent=1))
    text = table(report)
    write_atomic(base.with_suffix(".md"), text)
    print(text)
    print(f"written: {base}.json, {base}.md")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
