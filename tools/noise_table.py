"""Reproduce the README's results table: vanilla on clean data, and vanilla, NCR, SPS and ESC at
20/40/60 % noise, all with the defaults on the embedded data, the same seed and budget.

    python tools/noise_table.py --out runs/table --jobs 2

Each run is a normal `fastncl train` (its run folder is kept); the table is printed and written
to OUT/table.md. Runs whose results.json exists are not repeated.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNS = [("vanilla", 0.0)] + [(m, r) for r in (0.2, 0.4, 0.6) for m in ("vanilla", "ncr", "sps", "esc")]


def run(out: Path, method: str, noise: float, seed: int, threads: int, extra: list[str]) -> dict:
    folder = out / f"{method}-noise{noise:g}-seed{seed}"
    if not (folder / "results.json").exists():
        if folder.exists():  # an unfinished run: start it again
            shutil.rmtree(folder)
        cmd = ["fastncl", "train", "--method", method, "--noise", str(noise), "--seed", str(seed),
               "--out", str(folder), "--no-progress", f"runtime.threads={threads}", *extra]
        with open(out / f"{folder.name}.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    results = json.loads((folder / "results.json").read_text())
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    results["wall_time_s"] = sum(r["time"] for r in metrics)
    return results


def table(results: list[dict]) -> str:
    lines = ["| noise | method | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSum | split AUC | F1 | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, s = r["test"], r.get("split") or {}
        auc = f"{s['auc']:.3f}" if s.get("auc") is not None else "-"
        f1 = f"{s['f1']:.3f}" if s.get("f1") is not None else "-"
        recalls = " | ".join(f"{t[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))
        lines.append(f"| {r['noise']:.0%} | {r['method']} | {recalls} | **{t['rsum']:.1f}** | {auc} | {f1} | "
                     f"{r['wall_time_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with threads = 1 when jobs > 1)")
    p.add_argument("extra", nargs="*", help="config overrides passed to every run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.jobs > 1 else 0
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda mr: run(out, *mr, args.seed, threads, args.extra), RUNS))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
