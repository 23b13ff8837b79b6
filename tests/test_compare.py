"""`fastncl compare` and tools/noise_table.py on fabricated run folders (no training): seed groups,
their mean ± std rows, and the noise table's grid, resume and failure handling.

The real runs' side of compare is in test_end_to_end.py (test_compare_markdown_and_csv).
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fastncl.cli import main
from fastncl.config import dump_yaml, parse_override, resolve
from fastncl.methods.registry import names as method_names
from fastncl.evaluation import KEYS
from fastncl.compare import aggregate_seeds, compare_rows, compare_table, seed_groups

from helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.synthetic.train_images=8", "data.synthetic.dev_images=4", "data.synthetic.test_images=4",
        "runtime.progress=false", "runtime.threads=1"]
METRICS = (*KEYS, "rsum", "split_auc", "split_f1", "time_s")


noise_table = load_tool("noise_table")


def fabricate(folder: Path, method: str = "sps", noise: float = 0.4, seed: int = 0, overrides=(),
              values: dict | None = None) -> dict:
    """A finished run folder as `fastncl train` leaves it (config.yaml, results.json, metrics.jsonl),
    its numbers drawn from the folder's name and seed unless given; returns them (compare_rows' keys)."""
    cfg = resolve(overrides=[parse_override(o) for o in (*TINY, f"data.noise={noise}", f"seed={seed}",
                                                          f"out={folder}", *overrides)], method=method)
    if values is None:
        rng = np.random.default_rng([seed, sum(folder.name.encode())])
        values = {k: float(rng.uniform(5, 95)) for k in KEYS}
        values["rsum"] = sum(values[k] for k in KEYS)
        if noise > 0:
            values |= {"split_auc": float(rng.uniform(0.5, 1)), "split_f1": float(rng.uniform(0.3, 1))}
        values["time_s"] = float(rng.uniform(10, 30))
    values = {"split_auc": None, "split_f1": None, **values}
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    split = None if values["split_auc"] is None else {"noisy_cut": 0.5, "detected_noisy": 10, "precision": 0.5,
                                                      "recall": 0.5, "auc": values["split_auc"], "f1": values["split_f1"]}
    results = {"method": method, "preset": None, "noise": noise, "noise_file": None, "seed": seed,
               "data": cfg.data.source, "best_epoch": 2,
               "dev_rsum": values.get("dev_rsum", 123.0),
               "test": {k: values[k] for k in (*KEYS, "rsum")}, "split": split}
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    times = [values["time_s"] / 4, values["time_s"] * 3 / 4]  # two epochs
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "phase": "train", "lr": 1e-3, "time": t}) + "\n"
                                                  for e, t in enumerate(times)))
    return values


def expected(values: list[dict]) -> dict:
    """numpy's mean and sample std (ddof=1) of each metric the runs have."""
    return {k: (np.mean([v[k] for v in values]), np.std([v[k] for v in values], ddof=1)) for k in METRICS
            if values[0][k] is not None}


def md_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()[2:]]


# ---------------------------------------------------------------------------------------------
# fastncl compare


def test_compare_aggregates_runs_that_differ_only_by_seed(tmp_path, capsys):
    sps = [fabricate(tmp_path / f"sps-s{s}", seed=s) for s in (0, 1, 2)]
    fabricate(tmp_path / "vanilla-s0", method="vanilla", noise=0.0)
    folders = [tmp_path / n for n in ("sps-s0", "vanilla-s0", "sps-s1", "sps-s2")]
    rows = compare_rows([str(f) for f in folders])

    agg = aggregate_seeds(seed_groups(rows)[0])
    assert agg["n"] == 3 and agg["seeds"] == [0, 1, 2] and agg["method"] == "sps" and agg["data"] == "synthetic"
    for key, (mean, std) in expected(sps).items():
        assert agg[key] == pytest.approx(mean, rel=1e-9), key
        assert agg[f"{key}_std"] == pytest.approx(std, rel=1e-9), key

    table = md_rows(compare_table(rows))
    header = compare_table(rows).splitlines()[0]
    assert header.startswith("| run | method | noise | seed | backbone | data | i2t R@1 |")
    # the group's runs together, in the order of its first run, then its aggregate row; vanilla alone
    assert [r[0] for r in table] == ["sps-s0", "sps-s1", "sps-s2", "mean ± std (3 seeds)", "vanilla-s0"]
    mean_row = table[3]
    assert mean_row[1:6] == ["sps", "40%", "0,1,2", "vse", "synthetic"]
    mean, std = expected(sps)["rsum"]
    assert mean_row[6 + len(KEYS)] == f"**{mean:.1f} ± {std:.1f}**"
    for i, k in enumerate(KEYS):
        assert mean_row[6 + i] == f"{expected(sps)[k][0]:.1f} ± {expected(sps)[k][1]:.1f}"
    assert mean_row[-3] == f"{expected(sps)['split_auc'][0]:.3f} ± {expected(sps)['split_auc'][1]:.3f}"
    assert mean_row[-1] == f"{expected(sps)['time_s'][0]:.0f}"
    assert table[-1][6 + len(KEYS) + 1:] == ["-", "-", table[-1][-1]]  # no split without noise

    # the CLI prints the same table
    capsys.readouterr()
    assert main(["compare", *map(str, folders)]) == 0
    assert capsys.readouterr().out == compare_table(rows)


def test_compare_csv_has_the_data_and_one_row_per_run(tmp_path, capsys):
    values = [fabricate(tmp_path / f"s{s}", seed=s) for s in (0, 1)]
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "s0"), str(tmp_path / "s1"), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run"] for r in rows] == ["s0", "s1"] and {r["data"] for r in rows} == {"synthetic"}
    assert "group" not in rows[0]
    assert float(rows[1]["rsum"]) == pytest.approx(values[1]["rsum"], abs=1e-3)


@pytest.mark.parametrize("difference", ["optim.lr=0.001", "method", "noise", "model.backbone=sgr",
                                        "data.source=emoji", "data.synthetic.seed=5", "--preset"])
def test_runs_differing_beyond_the_seed_are_not_grouped(tmp_path, difference):
    fabricate(tmp_path / "a", seed=0)
    if difference == "method":
        fabricate(tmp_path / "b", method="esc", seed=1)
    elif difference == "noise":
        fabricate(tmp_path / "b", noise=0.2, seed=1)
    elif difference == "--preset":
        fabricate(tmp_path / "b", seed=1, overrides=["preset=sps"])
    else:
        fabricate(tmp_path / "b", seed=1, overrides=[difference])
    rows = compare_rows([str(tmp_path / "a"), str(tmp_path / "b")])
    assert [len(g) for g in seed_groups(rows)] == [1, 1]
    assert [r[0] for r in md_rows(compare_table(rows))] == ["a", "b"]  # and no aggregate row


@pytest.mark.parametrize("difference", ["data.noise_seed=7", "runtime.threads=0", "runtime.progress=true"])
def test_the_noise_seed_and_runtime_threads_do_not_split_a_group(tmp_path, difference):
    a = fabricate(tmp_path / "a", seed=0)
    b = fabricate(tmp_path / "b", seed=1, overrides=[difference])
    rows = compare_rows([str(tmp_path / "a"), str(tmp_path / "b")])
    assert [len(g) for g in seed_groups(rows)] == [2]
    last = md_rows(compare_table(rows))[-1]
    assert last[0] == "mean ± std (2 seeds)"
    assert last[6] == f"{np.mean([a[KEYS[0]], b[KEYS[0]]]):.1f} ± {np.std([a[KEYS[0]], b[KEYS[0]]], ddof=1):.1f}"


def test_a_single_seed_gets_no_aggregate_row(tmp_path):
    values = fabricate(tmp_path / "only", seed=4)
    rows = compare_rows([str(tmp_path / "only")])
    table = md_rows(compare_table(rows))
    assert [r[0] for r in table] == ["only"] and "±" not in compare_table(rows)
    agg = aggregate_seeds(rows)  # one run: its values, no std
    assert agg["n"] == 1 and agg["rsum"] == pytest.approx(values["rsum"]) and agg["rsum_std"] is None


def test_repeated_seeds_are_counted_as_runs(tmp_path):
    fabricate(tmp_path / "a", seed=3)
    fabricate(tmp_path / "b", seed=3)
    rows = compare_rows([str(tmp_path / "a"), str(tmp_path / "b")])
    assert md_rows(compare_table(rows))[-1][0] == "mean ± std (2 runs)"


# ---------------------------------------------------------------------------------------------
# tools/noise_table.py


def no_training(*args, **kwargs):
    raise AssertionError(f"noise_table started a run: {args}")


def test_noise_table_default_methods_are_the_cli_s():
    assert noise_table.grid(list(method_names()), ["vanilla"], [0.2], [0, 1])[:2] == [("vanilla", 0.0, 0), ("vanilla", 0.0, 1)]
    assert [m for m, r, s in noise_table.grid(list(method_names()), [], [0.2], [0])] == list(method_names())
    # a noise rate of 0 is the clean run, once
    assert noise_table.grid(["vanilla"], ["vanilla"], [0.0], [0]) == [("vanilla", 0.0, 0)]


def test_noise_table_aggregates_fabricated_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(noise_table.subprocess, "run", no_training)
    out = tmp_path / "table"
    seeds = (0, 1, 2)
    values = {}
    for method, noise in (("vanilla", 0.0), ("sps", 0.4), ("esc", 0.4)):
        values[method, noise] = [fabricate(noise_table.folder_of(out, method, noise, s), method, noise, s)
                                 for s in seeds]
    fabricate(noise_table.folder_of(out, "ncr", 0.4, 0), "ncr", 0.4, 0)  # not in this grid: left out
    args = ["--out", str(out), "--seeds", "0,1,2", "--methods", "sps,esc", "--noise-rates", "0.4"]
    assert noise_table.main(args) == 0
    text = (out / "table.md").read_text()
    assert capsys.readouterr().out == text
    lines = text.splitlines()
    assert lines[0] == ("| noise | method | n | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSum | split AUC | F1 | "
                        "time (s) |")
    table = md_rows(text)
    assert [r[:3] for r in table] == [["0%", "vanilla", "3"], ["40%", "sps", "3"], ["40%", "esc", "3"]]
    for row, cell in zip(table, values):
        stats = expected(values[cell])
        assert row[3:3 + len(KEYS)] == [f"{stats[k][0]:.1f} ± {stats[k][1]:.1f}" for k in KEYS]
        assert row[3 + len(KEYS)] == f"**{stats['rsum'][0]:.1f} ± {stats['rsum'][1]:.1f}**"
        assert row[-1] == f"{stats['time_s'][0]:.0f}"
    assert table[0][-3:-1] == ["-", "-"]
    assert table[1][-3] == f"{expected(values['sps', 0.4])['split_auc'][0]:.3f} ± " \
                           f"{expected(values['sps', 0.4])['split_auc'][1]:.3f}"

    # one seed (--seed, the old option): the values alone
    assert noise_table.main(["--out", str(out), "--seed", "1", "--methods", "sps", "--clean-methods", "",
                             "--noise-rates", "0.4"]) == 0
    (row,) = md_rows((out / "table.md").read_text())
    assert row[:3] == ["40%", "sps", "1"] and row[3] == f"{values['sps', 0.4][1][KEYS[0]]:.1f}" and "±" not in row[4]


def test_noise_table_warns_about_a_cell_whose_configs_differ(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(noise_table.subprocess, "run", no_training)
    out = tmp_path / "table"
    fabricate(noise_table.folder_of(out, "sps", 0.4, 0), "sps", 0.4, 0)
    fabricate(noise_table.folder_of(out, "sps", 0.4, 1), "sps", 0.4, 1, overrides=["optim.lr=0.001"])
    assert noise_table.main(["--out", str(out), "--seeds", "0,1", "--methods", "sps", "--clean-methods", "",
                             "--noise-rates", "0.4"]) == 0
    captured = capsys.readouterr()
    assert [r[:3] for r in md_rows(captured.out)] == [["40%", "sps", "1"], ["40%", "sps", "1"]]
    assert "the sps runs at noise 0.4 differ in more than the seed" in captured.err


def test_noise_table_reruns_unfinished_runs_and_reports_failures(tmp_path, monkeypatch, capsys):
    out = tmp_path / "table"
    fabricate(noise_table.folder_of(out, "sps", 0.4, 0), "sps", 0.4, 0)
    unfinished = noise_table.folder_of(out, "sps", 0.4, 1)
    unfinished.mkdir(parents=True)
    (unfinished / "stale.txt").write_text("from a killed run")
    started = []

    def fake_train(cmd, stdout, stderr):
        flags = dict(zip(cmd[2::2], cmd[3::2]))
        folder, seed = Path(flags["--out"]), int(flags["--seed"])
        started.append(folder.name)
        assert cmd[:2] == ["fastncl", "train"] and flags["--method"] == "sps" and "runtime.threads=1" in cmd
        assert not folder.exists(), "the unfinished run was not removed"
        stdout.write("training...\n")
        if seed == 2:
            return subprocess.CompletedProcess(cmd, 3)
        fabricate(folder, "sps", float(flags["--noise"]), seed)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(noise_table.subprocess, "run", fake_train)
    code = noise_table.main(["--out", str(out), "--seeds", "0,1,2", "--methods", "sps", "--clean-methods", "",
                             "--noise-rates", "0.4", "--jobs", "2"])
    assert code == 1
    assert sorted(started) == ["sps-noise0.4-seed1", "sps-noise0.4-seed2"]
    err = capsys.readouterr().err
    log = out / "sps-noise0.4-seed2.log"
    assert f"sps-noise0.4-seed2 failed: exit status 3, log {log}" in err and log.read_text() == "training...\n"
    assert "1 of 3 runs failed" in err
    # the finished runs' table is still written, with the seeds it has
    assert [r[:3] for r in md_rows((out / "table.md").read_text())] == [["40%", "sps", "2"]]


# ---------------------------------------------------------------------------------------------
# tools/loo_table.py

loo_table = load_tool("loo_table")


def test_loo_table_chooses_each_held_out_set_s_setting_on_the_others_dev(tmp_path, capsys):
    """SPS's dev RSum over vanilla's: candidate x wins on set c by far, y on a and b: held out a or
    b, x is chosen (c's margin); held out c, y (a's and b's). The test numbers never choose."""
    dev = {("a", "x"): 110, ("a", "y"): 130, ("b", "x"): 110, ("b", "y"): 120, ("c", "x"): 200, ("c", "y"): 100}
    test = {("a", "x"): 150, ("a", "y"): 900, ("b", "x"): 160, ("b", "y"): 900, ("c", "x"): 900, ("c", "y"): 250}

    def values(rsum, dev_rsum, auc=None):
        return {**{k: 1.0 for k in KEYS}, "rsum": float(rsum), "dev_rsum": float(dev_rsum), "time_s": 10.0,
                "split_auc": auc, "split_f1": None if auc is None else 0.5}

    specs = []
    for data in "abc":
        for cand, extra in (("x", ()), ("y", ("optim.warmup=plateau",))):
            folder = tmp_path / f"{data}-{cand}"
            for seed in (0, 1):
                fabricate(folder / f"sps-{seed}", "sps", 0.6, seed, extra, values(test[data, cand], dev[data, cand], 0.8))
                if cand == "x":
                    fabricate(folder / f"vanilla-{seed}", "vanilla", 0.6, seed, values=values(200, 100))
                    fabricate(folder / f"clean-{seed}", "vanilla", 0.0, seed, values=values(300, 150))
            specs += ["--runs", f"{data}:{cand}={folder}"]
    cells = loo_table.read_cells(loo_table.parse_runs(None, specs[1::2]))
    assert loo_table.scores(cells, "sps", "c", "x") == pytest.approx({"x": 1.1, "y": 1.25})
    assert loo_table.scores(cells, "sps", "a", "x") == pytest.approx({"x": 1.55, "y": 1.1})
    # the worst other set instead: held out a, x scores b's 1.1 and y c's 1.0
    assert loo_table.scores(cells, "sps", "a", "x", "worst") == pytest.approx({"x": 1.1, "y": 1.0})
    assert loo_table.scores(cells, "sps", "b", "x", "worst") == pytest.approx({"x": 1.1, "y": 1.0})
    assert loo_table.main([*specs, "--out", str(tmp_path / "loo.md")]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "loo.md").read_text() == text
    rows = {}
    for block in text.split("### ")[1:4]:
        name = block.split(",")[0]
        rows[name] = [r for r in md_rows("\n".join(block.splitlines()[2:])) if r[1] == "sps"][0]
    assert rows["a"][2] == "**x** 1.550, y 1.100" and rows["a"][4] == "**150.0 ± 0.0**" and rows["a"][5] == "-50.0"
    assert rows["b"][2].startswith("**x**") and rows["b"][4] == "**160.0 ± 0.0**"
    assert rows["c"][2] == "x 1.100, **y** 1.250" and rows["c"][4] == "**250.0 ± 0.0**"
    assert rows["c"][5] == "+50.0" and rows["c"][6] == "50%" and rows["c"][8] == "0, 0"
    assert "(clean vanilla 300.0 ± 0.0)" in text


def test_loo_table_warns_when_one_sets_runs_trained_on_different_builds_of_it(tmp_path, capsys):
    """env.json's data_sha256: candidates of one set compared on different features are said;
    records without it (older runs) are not guessed at."""
    specs = []
    for data, cand, fingerprint in (("a", "x", "1" * 64), ("a", "y", "2" * 64), ("b", "x", "3" * 64),
                                    ("b", "y", "3" * 64), ("c", "x", None), ("c", "y", "4" * 64)):
        folder = tmp_path / f"{data}-{cand}"
        for method in ("sps", "vanilla"):
            run = folder / method
            fabricate(run, method, 0.6, 0)
            if fingerprint:
                (run / "env.json").write_text(json.dumps({"data_sha256": fingerprint}))
        specs.append((data, cand, folder))
    loo_table.read_cells(specs)
    err = capsys.readouterr().err
    assert "the runs on a trained on 2 different builds of its data" in err and str(tmp_path / "a-x") in err
    assert "runs on b" not in err and "runs on c" not in err


def test_loo_table_bad_runs_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        loo_table.main(["--runs", "glyphs=runs/x"])
    assert e.value.code == 2 and "expected SET:CANDIDATE=DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        loo_table.main(["--runs", f"glyphs:fixed={tmp_path / 'missing'}"])
    assert e.value.code == 2 and "missing: not a folder" in capsys.readouterr().err
