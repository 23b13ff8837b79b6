"""`fastncl compare`: one table across run folders, with mean ± std over runs that differ only by seed."""
from __future__ import annotations

import csv
import io
import json

import numpy as np

from fastncl import FastnclError
from fastncl.evaluation import KEYS
from fastncl.records import SplitQuality
from fastncl.run import RunDir

COMPARE_COLUMNS = ("run", "method", "noise", "seed", "backbone", "data", *KEYS, "rsum", "split_auc", "split_f1",
                   "best_epoch", "time_s")
# what aggregate_seeds averages over a seed group: the test recalls, the split quality and the time
AGGREGATED = (*KEYS, "rsum", "split_auc", "split_f1", "time_s")
# config.yaml keys that runs of one seed group may differ in: the seeds, the run folder, and runtime
# settings that change neither the data nor what is trained (progress bars, CPU threads, TensorBoard
# logs; tools/noise_table.py sets runtime.threads by its --jobs). Anything else splits the group.
SEED_FREE_KEYS = ("seed", "out", "data.noise_seed", "runtime.progress", "runtime.threads", "runtime.tensorboard")


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def seed_group_key(cfg: dict) -> str:
    """What runs of one seed group share: the run's config.yaml as written (no defaults filled in, so a
    run of an older fastncl whose config lacks a newer key is not grouped with newer runs) without
    SEED_FREE_KEYS, as canonical JSON."""
    flat = {k: v for k, v in _flat(cfg).items() if k not in SEED_FREE_KEYS}
    return json.dumps(flat, sort_keys=True, default=str)


def compare_rows(run_dirs: list[str]) -> list[dict]:
    """One row per finished run: COMPARE_COLUMNS, ``dev_rsum`` (the best epoch's, by which its checkpoint
    was chosen), ``group`` (seed_group_key of its config) and ``data_sha256`` (data_fingerprint)."""
    rows = []
    for run_dir in run_dirs:
        run = RunDir.open(run_dir)
        result = run.read_result()
        if result is None:
            raise FastnclError(f"{run.file('results.json')}: the run has not finished (no results.json)")
        cfg, split = run.config(), result.split or SplitQuality(0.0, 0)  # no split: no AUC, no F1
        row = {"run": run.path.name, "method": result.method, "noise": result.noise, "seed": result.seed,
               "backbone": cfg.get("model", {}).get("backbone", "?"), "data": result.data or "?",
               **{k: result.test[k] for k in (*KEYS, "rsum")},
               "split_auc": split.auc, "split_f1": split.f1, "best_epoch": result.best_epoch + 1,
               "dev_rsum": result.dev_rsum,
               "time_s": sum(r.time for r in run.read_metrics()), "group": seed_group_key(cfg),
               "data_sha256": data_fingerprint(run)}
        rows.append(row)
    return rows


def data_fingerprint(run: RunDir) -> str | None:
    """The ``data_sha256`` of a run's env.json: which build of its data it trained on (None for runs
    older than the fingerprint)."""
    env = run.file("env.json")
    return json.loads(env.read_text(encoding="utf-8")).get("data_sha256") if env.exists() else None


def seed_groups(rows: list[dict]) -> list[list[dict]]:
    """compare_rows grouped into runs that differ only by seed (same ``group`` key), in the order of
    each group's first run; a row without a ``group`` key is a group of its own."""
    groups: dict = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("group", ("row", i)), []).append(row)
    return list(groups.values())


def aggregate_seeds(rows: list[dict]) -> dict:
    """One row for a seed group (see seed_groups): its method, noise, backbone and data, ``seeds``
    and ``n`` (the number of runs), and for each of AGGREGATED the mean over the runs and, as
    ``KEY_std``, the sample standard deviation (ddof=1; None with one run). A metric that some run
    lacks (split AUC and F1 without injected noise) is None, and so is its std. ``run`` is the label
    of the row: "mean ± std (3 seeds)", or "(3 runs)" when seeds repeat; with one run, its name."""
    n = len(rows)
    seeds = [r["seed"] for r in rows]
    if n == 1:
        label = rows[0]["run"]
    else:
        label = f"mean ± std ({n} seeds)" if len(set(seeds)) == n else f"mean ± std ({n} runs)"
    agg = {"run": label, **{k: rows[0][k] for k in ("method", "noise", "backbone", "data")},
           "seed": ",".join(str(s) for s in seeds), "seeds": seeds, "n": n}
    for key in AGGREGATED:
        values = [r[key] for r in rows]
        if any(v is None for v in values):
            agg[key] = agg[f"{key}_std"] = None
        else:
            agg[key] = float(np.mean(values))
            agg[f"{key}_std"] = float(np.std(values, ddof=1)) if n > 1 else None
    return agg


def mean_std(row: dict, key: str, spec: str) -> str:
    """``row[key]`` formatted with ``spec``, "± std" after it when the row has ``KEY_std`` (an
    aggregate_seeds row of several runs), "-" when it is None."""
    value, std = row[key], row.get(f"{key}_std")
    if value is None:
        return "-"
    return f"{value:{spec}}" if std is None else f"{value:{spec}} ± {std:{spec}}"


def compare_table(rows: list[dict], fmt: str = "md") -> str:
    """Markdown (the papers' layout) or CSV of compare_rows.

    Markdown: the runs of a seed group (seed_groups: runs that differ only by seed) are listed
    together, in the order of the group's first run, followed by one aggregate row, "mean ± std
    (N seeds)" of every recall, RSum, split AUC and F1 (sample std, ddof=1) and the mean time.
    A run alone in its group gets no aggregate row. CSV: one row per run and no aggregate rows (the
    per-run values are all there; compute any other statistic from them), in the order given.
    """
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COMPARE_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else round(row[k], 4) if isinstance(row[k], float) else row[k]
                             for k in COMPARE_COLUMNS})
        return buf.getvalue()
    lines = ["| run | method | noise | seed | backbone | data | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSum | "
             "split AUC | F1 | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def line(r):
        recalls = " | ".join(mean_std(r, k, ".1f") for k in KEYS)
        return (f"| {r['run']} | {r['method']} | {r['noise']:.0%} | {r['seed']} | {r['backbone']} | {r['data']} | "
                f"{recalls} | **{mean_std(r, 'rsum', '.1f')}** | {mean_std(r, 'split_auc', '.3f')} | "
                f"{mean_std(r, 'split_f1', '.3f')} | {r['time_s']:.0f} |")

    for group in seed_groups(rows):
        lines += [line(r) for r in group]
        if len(group) > 1:
            lines.append(line(aggregate_seeds(group)))
    return "\n".join(lines) + "\n"
