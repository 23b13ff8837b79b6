"""Reproduce the README's results tables: methods x noise rates x seeds, averaged over the seeds.

By default every method at 20/40/60 % noise and vanilla on clean data, all with the defaults on the
embedded data and the same budget, with seed 0.

    python tools/noise_table.py --out runs/table --jobs 2
    python tools/noise_table.py --seeds 0,1,2 --methods vanilla,sps,esc --out runs/table3 --jobs 2
    python tools/noise_table.py --data emoji --clean-methods vanilla,ncr,sps,esc --out runs/emoji --jobs 2 \
        optim.warmup_epochs=2 optim.epochs=6 optim.lr_step=4 sps.quasi_clean_start=2 sps.noisy_start=3 esc.noisy_start=3

Each run is a normal `fastncl train --seed S` (the seed of the training and of the injected noise),
in OUT/{method}-noise{rate}-seed{S} (kept, with its log beside it in OUT/{folder}.log). Runs whose
results.json exists are not repeated; a folder without one (an unfinished run) is removed and run
again. A run that fails does not stop the others: its log is named once they have all finished,
the table of the finished runs is still written, and the exit status is 1.

The table (printed and written to OUT/table.md) has one row per noise rate and method: the mean ±
sample standard deviation (ddof=1) over the seeds of each recall, RSum, split AUC and F1, the
number of seeds n, and the mean time; with one seed, the values alone. Its seed groups and their
statistics are fastncl.compare's (seed_groups, aggregate_seeds), as in `fastncl compare`.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastncl.methods.registry import names as method_names
from fastncl.evaluation import KEYS
from fastncl.compare import aggregate_seeds, compare_rows, mean_std, seed_groups


def folder_of(out: Path, method: str, noise: float, seed: int) -> Path:
    return out / f"{method}-noise{noise:g}-seed{seed}"


def grid(methods: list[str], clean: list[str], rates: list[float], seeds: list[int]) -> list[tuple[str, float, int]]:
    """(method, noise, seed) of every run: the clean methods without noise (in the registry's order), then
    every method at every rate, each for every seed; a cell listed twice (noise rate 0) runs once."""
    cells = [(m, 0.0) for m in method_names() if m in clean] + [(m, r) for r in rates for m in methods]
    return list(dict.fromkeys((m, r, s) for m, r in cells for s in seeds))


def run(out: Path, method: str, noise: float, seed: int, threads: int, data: str,
        extra: list[str]) -> tuple[Path, str | None]:
    """The run's folder, and None, or the reason it failed (naming its log)."""
    folder = folder_of(out, method, noise, seed)
    if (folder / "results.json").exists():
        return folder, None
    if folder.exists():  # an unfinished run: start it again
        shutil.rmtree(folder)
    cmd = ["fastncl", "train", "--method", method, "--noise", str(noise), "--seed", str(seed), "--data", data,
           "--out", str(folder), "--no-progress", f"runtime.threads={threads}", *extra]
    log_path = out / f"{folder.name}.log"
    try:
        with open(log_path, "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    except OSError as e:
        return folder, f"could not start `fastncl train` ({e})"
    if code != 0:
        return folder, f"exit status {code}, log {log_path}"
    if not (folder / "results.json").exists():
        return folder, f"no results.json written, log {log_path}"
    return folder, None


def aggregate(rows: list[dict]) -> list[dict]:
    """One aggregate_seeds row per seed group of compare_rows, in the order of the groups' first runs."""
    return [aggregate_seeds(group) for group in seed_groups(rows)]


def split_cells(aggregates: list[dict]) -> list[tuple[str, float]]:
    """(method, noise) of the cells whose runs are in more than one seed group: their configs differ
    beyond the seed (e.g. folders left by an earlier call with other overrides, or an older fastncl)."""
    cells = [(a["method"], a["noise"]) for a in aggregates]
    return list(dict.fromkeys(c for c in cells if cells.count(c) > 1))


def table(rows: list[dict]) -> str:
    """The README's layout of compare_rows aggregated over seeds: one row per seed group."""
    lines = ["| noise | method | n | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSum | split AUC | F1 | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in aggregate(rows):
        recalls = " | ".join(mean_std(a, k, ".1f") for k in KEYS)
        lines.append(f"| {a['noise']:.0%} | {a['method']} | {a['n']} | {recalls} | **{mean_std(a, 'rsum', '.1f')}** | "
                     f"{mean_std(a, 'split_auc', '.3f')} | {mean_std(a, 'split_f1', '.3f')} | {a['time_s']:.0f} |")
    return "\n".join(lines)


def _list(p: argparse.ArgumentParser, option: str, text: str, kind, valid, what: str) -> list:
    """The comma-separated values of an option, each once; p.error names the first bad one."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{option}: expected comma-separated {what}, got {text!r}")
    bad = [v for v in values if not valid(v)]
    if bad:
        p.error(f"{option}: {bad[0]!r}: expected {what}")
    return list(dict.fromkeys(values))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/table")
    p.add_argument("--seeds", help="seeds of every run (comma-separated; each seeds the training and the noise); "
                   "default: 0")
    p.add_argument("--seed", type=int, help="one seed: the same as --seeds N")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with threads = 1 when jobs > 1)")
    p.add_argument("--data", default="synthetic", help="--data of every run (synthetic, emoji or a folder)")
    registered = method_names()
    p.add_argument("--methods", default=",".join(registered),
                   help=f"methods trained at every noise rate (comma-separated; default: all, {','.join(registered)})")
    p.add_argument("--clean-methods", default="vanilla",
                   help="methods also trained without noise (comma-separated; '' for none)")
    p.add_argument("--noise-rates", default="0.2,0.4,0.6", help="noise rates every method is trained at")
    p.add_argument("extra", nargs="*", help="config overrides passed to every run")
    args = p.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        p.error("--seed N is --seeds N: give one of them")
    seeds = _list(p, "--seed" if args.seed is not None else "--seeds",
                  str(args.seed) if args.seed is not None else args.seeds or "0", int, lambda s: s >= 0, "seeds >= 0")
    if not seeds:
        p.error("--seeds: no seed given")
    if args.jobs < 1:
        p.error(f"--jobs: at least 1, got {args.jobs}")
    known = f"methods ({', '.join(registered)})"
    methods = _list(p, "--methods", args.methods, str.strip, registered.__contains__, known)
    clean = _list(p, "--clean-methods", args.clean_methods, str.strip, registered.__contains__, known)
    rates = _list(p, "--noise-rates", args.noise_rates, float, lambda r: 0 <= r < 1, "noise rates in [0, 1)")
    runs = grid(methods, clean, rates, seeds)
    if not runs:
        p.error("nothing to run: no method, clean method or noise rate given")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.jobs > 1 else 0
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda mrs: run(out, *mrs, threads, args.data, args.extra), runs))
    failed = [(folder, why) for folder, why in done if why is not None]
    rows = compare_rows([str(folder) for folder, why in done if why is None])
    aggregates = aggregate(rows)
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    print(text)
    for method, noise in split_cells(aggregates):
        print(f"noise_table: warning: the {method} runs at noise {noise:g} differ in more than the seed (their "
              "config.yaml); they are in separate rows", file=sys.stderr)
    for folder, why in failed:
        print(f"noise_table: {folder.name} failed: {why}", file=sys.stderr)
    if failed:
        print(f"noise_table: {len(failed)} of {len(runs)} runs failed; the table holds the others", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
