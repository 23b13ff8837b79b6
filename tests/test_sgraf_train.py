"""Every method trains with the SGR backbone (and SAF) end to end on the CPU; AMP, compile, ensembles.

The tiny settings of test_end_to_end.py, with a 16-d embedding and 8-d similarity vectors.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import yaml

from fastncl.cli import main
from test_end_to_end import NOISE, RUNS, SEED, TINY

pytestmark = pytest.mark.slow

SGR = ["--backbone", "sgr", "model.sim_dim=8"]


def _args(name: str, out, *extra) -> list[str]:
    flags, overrides = RUNS[name]
    return ["train", *flags, "--noise", str(NOISE), "--seed", str(SEED), "--out", str(out), *TINY, *overrides,
            *SGR, *extra]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgr")
    done = {}

    def get(name, *extra, key=None):
        key = key or name
        if key not in done:
            out = root / key
            assert main(_args(name, out, *extra)) == 0
            done[key] = out
        return done[key]

    return get


@pytest.mark.parametrize("name", ["vanilla", "ncr", "sps", "esc"])
def test_each_method_trains_with_sgr(runs, name):
    run = runs(name)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["backbone"] == "sgr"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        for model in r["losses"].values():
            assert model and all(np.isfinite(v) for v in model.values())
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    weights = state["models"][0]
    assert "reasoning.2.query.weight" in weights and "gru.weight_hh_l0_reverse" in weights
    assert weights["sim_local.weight"].shape == (8, 16)
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["test"]["rsum"] <= 600
    if name != "vanilla":
        assert 0 <= res["split"]["auc"] <= 1


def test_sgraf_ensemble_of_an_sgr_and_a_saf_run(runs, capsys):
    sgr = runs("sps")
    saf = runs("sps", "--backbone", "saf", key="sps-saf")
    assert "filtration.running_var" in torch.load(saf / "checkpoints" / "best.pt", weights_only=True)["models"][0]
    capsys.readouterr()
    assert main(["eval", str(sgr), str(saf)]) == 0
    text = capsys.readouterr().out
    assert "sps/sgr + sps/saf" in text and "| RSum |" in text
    rsum = float(text.strip().splitlines()[3].split("|")[-2])
    assert 0 <= rsum <= 600


def test_ensemble_of_runs_on_different_data_is_refused(runs, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--method", "vanilla", "--noise", "0.2", "--out", str(other), *TINY, *SGR,
                 "optim.epochs=0"]) == 0
    capsys.readouterr()
    assert main(["eval", str(runs("vanilla")), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data settings differ" in err and str(other) in err


def test_amp_on_cpu_trains_in_bf16_autocast(runs):
    run = runs("vanilla", "--amp", "model.pair_block=64", key="vanilla-amp")  # a flag between overrides
    assert yaml.safe_load((run / "config.yaml").read_text())["runtime"]["amp"] == "auto"
    plain = json.loads((runs("vanilla") / "results.json").read_text())["test"]["rsum"]
    amp = json.loads((run / "results.json").read_text())["test"]["rsum"]
    assert np.isfinite(amp) and amp != plain  # bf16 autocast really ran


def test_fp16_amp_on_cpu_is_refused_before_any_output(tmp_path, capsys):
    out = tmp_path / "fp16"
    assert main(_args("vanilla", out, "runtime.amp=fp16")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runtime.amp=fp16" in err and "CUDA" in err
    assert not out.exists()


def test_compiled_training_traces_without_graph_breaks(tmp_path, monkeypatch):
    """The trainer's compiled path with Dynamo's "eager" backend: full graphs, then the same training."""
    import fastncl.step

    monkeypatch.setattr(fastncl.step.torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = tmp_path / "compiled"
    assert main(_args("sps", out, "--compile", "optim.epochs=1")) == 0
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3
    res = json.loads((out / "results.json").read_text())
    assert np.isfinite(res["test"]["rsum"])
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["sps", "esc"])
def test_report_and_compare_read_sgr_runs(runs, capsys, name):
    """fastncl report and compare are backbone-agnostic: the figures of an SGR run, and its backbone
    in the comparison table."""
    run = runs(name)
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    figures = sorted(p.name for p in (run / "report").glob("*.png"))
    assert {"dev_rsum.png", "split_quality.png"} <= set(figures) and any(f.startswith("losses_") for f in figures)
    assert all((run / "report" / f).stat().st_size > 5000 for f in figures)
    capsys.readouterr()
    assert main(["compare", str(run)]) == 0
    assert f"| {name} | 40% | 0 | sgr |" in capsys.readouterr().out
