"""Reproduce the README's results tables: vanilla on clean data, and vanilla, NCR, SPS and ESC at
20/40/60 % noise, all with the defaults on the embedded data, the same seed and budget.

    python tools/noise_table.py --out runs/table --jobs 2
    python tools/noise_table.py --data emoji --clean-methods vanilla,ncr,sps,esc --out runs/emoji --jobs 2 \
        optim.warmup_epochs=2 optim.epochs=6 optim.lr_step=4 sps.quasi_clean_start=2 sps.noisy_start=3 esc.noisy_start=3

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

from fastncl.evaluation import KEYS
from fastncl.report import compare_rows

METHODS = ("vanilla", "ncr", "sps", "esc")


def run(out: Path, method: str, noise: float, seed: int, threads: int, data: str, extra: list[str]) -> Path:
    folder = out / f"{method}-noise{noise:g}-seed{seed}"
    if not (folder / "results.json").exists():
        if folder.exists():  # an unfinished run: start it again
            shutil.rmtree(folder)
        cmd = ["fastncl", "train", "--method", method, "--noise", str(noise), "--seed", str(seed), "--data", data,
               "--out", str(folder), "--no-progress", f"runtime.threads={threads}", *extra]
        with open(out / f"{folder.name}.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return folder


def table(rows: list[dict]) -> str:
    """The README's layout of `fastncl compare` rows."""
    lines = ["| noise | method | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSum | split AUC | F1 | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        auc = f"{r['split_auc']:.3f}" if r["split_auc"] is not None else "-"
        f1 = f"{r['split_f1']:.3f}" if r["split_f1"] is not None else "-"
        recalls = " | ".join(f"{r[k]:.1f}" for k in KEYS)
        lines.append(f"| {r['noise']:.0%} | {r['method']} | {recalls} | **{r['rsum']:.1f}** | {auc} | {f1} | "
                     f"{r['time_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with threads = 1 when jobs > 1)")
    p.add_argument("--data", default="synthetic", help="--data of every run (synthetic, emoji or a folder)")
    p.add_argument("--clean-methods", default="vanilla", help="methods also trained without noise (comma-separated)")
    p.add_argument("--noise-rates", default="0.2,0.4,0.6", help="noise rates every method is trained at")
    p.add_argument("extra", nargs="*", help="config overrides passed to every run")
    args = p.parse_args()
    clean = [m for m in args.clean_methods.split(",") if m]
    rates = [float(r) for r in args.noise_rates.split(",") if r]
    runs = [(m, 0.0) for m in METHODS if m in clean] + [(m, r) for r in rates for m in METHODS]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.jobs > 1 else 0
    with ThreadPoolExecutor(args.jobs) as pool:
        folders = list(pool.map(lambda mr: run(out, *mr, args.seed, threads, args.data, args.extra), runs))
    text = table(compare_rows([str(f) for f in folders]))
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
