"""Leave-one-data-set-out: the setting each method gets for a set it was not chosen on, and that set's table.

    python tools/loo_table.py --out runs/loo.md \
        --runs glyphs:fixed=runs/g60_fixed --runs glyphs:plateau=runs/g60_plateau \
        --runs icons:fixed=runs/i60_fixed --runs icons:plateau=runs/i60_plateau \
        --runs synthetic:fixed=runs/s60_fixed --runs synthetic:plateau=runs/s60_plateau

Each ``--runs SET:CANDIDATE=DIR`` names a folder of `tools/noise_table.py` runs (its sub-folders
holding a results.json) on data set SET with the candidate setting CANDIDATE (the overrides the
folder's runs were given). Vanilla is a method like the others (the candidates may change its
schedule); its runs without noise, read from any folder of their set, are the clean reference.

For each method and each held-out set S, the candidate chosen without S is the one with the
highest score on the other sets: the mean, over every other set T and noise rate, of the method's
dev RSum (the best epoch's, by which the checkpoint is chosen; mean over seeds) divided by
vanilla's on T at that rate under the reference candidate (--reference: the first one named).
With ``--score worst`` a candidate's score is instead its lowest such ratio (the set where it does
worst against vanilla): the choice that guards the issue's target, at least vanilla on every set,
rather than the one a set with large ratios pulls up. Only candidates run on every other set
compete, and test numbers never enter a choice. The
held-out set's row is then the chosen candidate's runs on S: test RSum (mean ± sample std over
seeds), its gain over vanilla's row (vanilla with its own choice), the fraction of what the noise
costs vanilla that it wins back (clean vanilla minus noisy vanilla), the split AUC of the last
epoch, and how often the collapse guard fired (epochs, in how many runs). Runs of one set that
trained on different builds of its data (their env.json's ``data_sha256`` differ) are said on
stderr: their candidates were not compared on equal data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fastncl.compare import aggregate_seeds, compare_rows, mean_std, seed_groups
from fastncl.run import RunDir

BASELINE = "vanilla"


def parse_runs(p: argparse.ArgumentParser, specs: list[str]) -> list[tuple[str, str, Path]]:
    """(set, candidate, folder) of each --runs SET:CANDIDATE=DIR."""
    out = []
    for spec in specs:
        key, eq, folder = spec.partition("=")
        data, colon, candidate = key.partition(":")
        if not (eq and colon and data and candidate and folder):
            p.error(f"--runs: expected SET:CANDIDATE=DIR, got {spec!r}")
        if not Path(folder).is_dir():
            p.error(f"--runs: {folder}: not a folder")
        out.append((data, candidate, Path(folder)))
    return out


def guard_fired(run_dir: str) -> int:
    """Co-training epochs of a run in which the collapse guard found a collapse."""
    return sum(1 for record in RunDir.open(run_dir).read_metrics() if record.collapse)


def read_cells(runs: list[tuple[str, str, Path]]) -> dict:
    """{(set, candidate, method, noise): aggregate_seeds row, with ``dev_rsum`` (mean over the seeds),
    ``guard`` (epochs the collapse guard fired in) and ``guard_runs``}."""
    cells, builds = {}, {}
    for data, candidate, folder in runs:
        dirs = sorted(str(d) for d in folder.iterdir() if (d / "results.json").exists())
        rows = [r | {"dir": d} for r, d in zip(compare_rows(dirs), dirs)]
        for r in rows:
            if r["data_sha256"]:  # records older than the fingerprint do not say which build they ran on
                builds.setdefault(data, {}).setdefault(r["data_sha256"], []).append(r["dir"])
        for group in seed_groups(rows):
            key = (data, candidate, group[0]["method"], group[0]["noise"])
            if key in cells:
                raise SystemExit(f"loo_table: {key[2]} at noise {key[3]:g} on {data} under {candidate}: more than one "
                                 "config in its folders (runs that differ beyond the seed)")
            fired = [guard_fired(r["dir"]) for r in group]
            cells[key] = aggregate_seeds(group) | {"dev_rsum": float(np.mean([r["dev_rsum"] for r in group])),
                                                   "guard": sum(fired), "guard_runs": sum(1 for f in fired if f)}
    for data, found in builds.items():
        if len(found) > 1:
            first, second = list(found.values())[:2]
            print(f"loo_table: warning: the runs on {data} trained on {len(found)} different builds of its data "
                  f"(env.json data_sha256), e.g. {first[0]} and {second[0]}: "
                  "their candidates are not compared on equal data", file=sys.stderr)
    return cells


def clean_reference(cells: dict, data: str) -> dict | None:
    """Vanilla without noise on ``data`` (from whichever candidate's folder holds it)."""
    return next((row for (d, _, m, n), row in cells.items() if (d, m, n) == (data, BASELINE, 0.0)), None)


def scores(cells: dict, method: str, held_out: str, reference: str, how: str = "mean") -> dict[str, float]:
    """Each candidate's score for ``method`` on the sets other than ``held_out`` (see the module's doc):
    the ``mean`` or the ``worst`` of its dev ratios; only candidates with runs on every other set that
    has noisy runs of the method."""
    noisy = {k: v for k, v in cells.items() if k[3] > 0}
    others = sorted({d for d, c, m, _ in noisy if m == method and d != held_out})
    out = {}
    for cand in sorted({c for d, c, m, _ in noisy if m == method}):
        ratios, complete = [], True
        for data in others:
            rates = [n for d, c, m, n in noisy if (d, c, m) == (data, cand, method)]
            if not rates:
                complete = False
                break
            for noise in rates:
                base = cells.get((data, reference, BASELINE, noise))
                if base is None:
                    raise SystemExit(f"loo_table: no {BASELINE} runs on {data} at noise {noise:g} under {reference} "
                                     f"to score {method}")
                ratios.append(cells[(data, cand, method, noise)]["dev_rsum"] / base["dev_rsum"])
        if complete and ratios:
            out[cand] = float(np.mean(ratios) if how == "mean" else np.min(ratios))
    return out


def held_out_table(cells: dict, held_out: str, reference: str, how: str = "mean") -> str:
    methods = list(dict.fromkeys(m for d, c, m, n in cells if d == held_out and n > 0))
    methods = sorted(methods, key=lambda m: m != BASELINE)  # vanilla first: the others are measured against it
    rates = sorted({n for d, _, m, n in cells if d == held_out and n > 0})
    clean = clean_reference(cells, held_out)
    lines = [f"### {held_out}, with the settings chosen on the other sets' dev"
             + (f" (clean vanilla {mean_std(clean, 'rsum', '.1f')})" if clean else ""), "",
             "| noise | method | chosen without it (dev score of each candidate) | n | test RSum | vs vanilla | "
             "won back | split AUC | guard fired (epochs, runs) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for noise in rates:
        base = None
        for method in methods:
            score = scores(cells, method, held_out, reference, how)
            if not score:
                continue
            chosen = max(score, key=score.get)
            row = cells.get((held_out, chosen, method, noise))
            said = ", ".join(f"{'**' + c + '**' if c == chosen else c} {s:.3f}" for c, s in score.items())
            if row is None:
                lines.append(f"| {noise:.0%} | {method} | {said} | 0 | not run | - | - | - | - |")
                continue
            if method == BASELINE:
                base = row
            gain = won = "-"
            if base is not None and method != BASELINE:
                gain = f"{row['rsum'] - base['rsum']:+.1f}"
                if clean is not None and clean["rsum"] > base["rsum"]:
                    won = f"{(row['rsum'] - base['rsum']) / (clean['rsum'] - base['rsum']):.0%}"
            lines.append(f"| {noise:.0%} | {method} | {said} | {row['n']} | **{mean_std(row, 'rsum', '.1f')}** | {gain} | "
                         f"{won} | {mean_std(row, 'split_auc', '.3f')} | {row['guard']}, {row['guard_runs']} |")
    return "\n".join(lines)


def every_cell(cells: dict) -> str:
    """Every candidate on every set: dev and test RSum (what the choices read, and what they did not)."""
    lines = ["### Every cell", "",
             "| set | noise | method | candidate | n | dev RSum | test RSum | split AUC | guard (epochs, runs) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (data, cand, method, noise), row in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][2],
                                                                                  kv[0][1])):
        lines.append(f"| {data} | {noise:.0%} | {method} | {cand} | {row['n']} | {row['dev_rsum']:.1f} | "
                     f"{mean_std(row, 'rsum', '.1f')} | {mean_std(row, 'split_auc', '.3f')} | "
                     f"{row['guard']}, {row['guard_runs']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", action="append", required=True, help="SET:CANDIDATE=DIR (repeated)")
    p.add_argument("--reference", help="the candidate whose vanilla runs scale each set's dev RSum (default: the "
                                       "first one named)")
    p.add_argument("--score", choices=("mean", "worst"), default="mean",
                   help="a candidate's score on the other sets: the mean of its dev ratios to vanilla, or the worst")
    p.add_argument("--out", help="also write the tables to this Markdown file")
    args = p.parse_args(argv)
    runs = parse_runs(p, args.runs)
    reference = args.reference or runs[0][1]
    if reference not in {c for _, c, _ in runs}:
        p.error(f"--reference: {reference!r} is not a candidate of --runs")
    cells = read_cells(runs)
    sets = list(dict.fromkeys(d for d, _, _, _ in cells))
    if len(sets) < 2:
        p.error("--runs: leave-one-out needs runs of at least two data sets")
    text = "\n\n".join([held_out_table(cells, s, reference, args.score) for s in sets] + [every_cell(cells)])
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
