"""Tiny end-to-end runs of every method through `fastncl train`, in-process, on the CPU.

Data: 40 training images x 5 captions at 40 % noise; 1 warm-up + 2 co-training epochs, with the
curricula moved forward (SPS quasi-clean from co-training epoch 0, noisy sets from epoch 1), so
that every stage of every method runs. One thread: the models are tiny, and OpenMP threads only
wait on each other on a busy machine.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml

from fastncl.cli import main
from fastncl.data.noise import noisy_caption_index
from fastncl.evaluation import KEYS
from fastncl.train import Trainer

from helpers import killed_at

pytestmark = pytest.mark.slow

TRAIN_IMAGES, CPI, NOISE, SEED = 40, 5, 0.4, 0
TINY = [
    f"data.synthetic.train_images={TRAIN_IMAGES}", "data.synthetic.dev_images=10", "data.synthetic.test_images=10",
    "data.synthetic.feature_dim=16",
    "data.synthetic.regions=8",  # the synthetic images need >= 7 regions (6 attributes, one shown twice)
    "data.synthetic.idiosyncratic_words=50", "model.embed_dim=16", "model.word_dim=8", "optim.batch_size=16",
    "optim.warmup_epochs=1", "optim.epochs=2", "optim.lr_step=0", "sps.quasi_clean_start=0", "sps.noisy_start=1",
    "esc.noisy_start=1", "ncr.noisy_start=1", "esc.train_noisy=true", "ncr.train_noisy=true", "runtime.progress=false", "runtime.threads=1", "runtime.device=cpu",
]
RUNS = {  # flags, and overrides after the common ones
    "vanilla": (["--method", "vanilla"], []),
    "hinge": (["--method", "hinge"], []),
    "ncr": (["--method", "ncr"], []),
    # epsilon_1 = 0.99 leaves one model's reliable set empty on data this small
    "sps": (["--method", "sps"], ["sps.reliable_threshold=0.8"]),
    "esc": (["--method", "esc"], []),
    "sps-official": (["--preset", "sps-official"], []),
    "esc-official": (["--preset", "esc-official"], []),
}
EPOCHS = 3


def train_args(name: str, out) -> list[str]:
    flags, overrides = RUNS[name]
    return ["train", *flags, "--noise", str(NOISE), "--seed", str(SEED), "--out", str(out), *TINY, *overrides]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # runtime.threads=1 sets it process-wide


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> run folder, each run trained once per module (on first use)."""
    root = tmp_path_factory.mktemp("runs")
    done = {}

    def get(name):
        if name not in done:
            out = root / name
            assert main(train_args(name, out)) == 0
            done[name] = out
        return done[name]

    return get


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def results(run):
    return json.loads((run / "results.json").read_text())


def losses(run):
    return [r["losses"] for r in read_metrics(run)]


# ---------------------------------------------------------------------------------------------
# every method


@pytest.mark.parametrize("name", list(RUNS))
def test_run_folder(trained, name):
    run = trained(name)
    for f in ("config.yaml", "env.json", "log.txt", "metrics.jsonl", "noise_index.npy", "results.json",
              "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / f).is_file(), f
    assert not list(run.rglob("*.tmp")), "a temporary file of an atomic write was left behind"

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["noise"] == NOISE and cfg["seed"] == SEED and cfg["out"] == str(run)
    if name.endswith("official"):
        assert cfg["preset"] == name

    records = read_metrics(run)
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    for r in records:
        assert set(KEYS) | {"rsum"} <= set(r["dev"])
        for model in r["losses"].values():
            assert all(np.isfinite(v) for v in model.values())

    index = np.load(run / "noise_index.npy")
    assert index.dtype == np.int64
    np.testing.assert_array_equal(index, noisy_caption_index(TRAIN_IMAGES * CPI, CPI, NOISE, SEED))
    env = json.loads((run / "env.json").read_text())
    assert env["device"] == "cpu" and "torch" in env and len(env["noise_index_sha256"]) == 64
    assert env["precision"] == "fp32" and "device cpu, fp32;" in (run / "log.txt").read_text()

    for which in ("last", "best"):
        state = torch.load(run / "checkpoints" / f"{which}.pt", weights_only=True)
        assert len(state["models"]) == 2 and len(state["optimizers"]) == 2
        assert all(isinstance(v, torch.Tensor) for v in state["models"][0].values())
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == EPOCHS - 1

    res = results(run)
    method = name.split("-")[0]
    assert res["method"] == method and res["noise"] == NOISE and res["seed"] == SEED
    assert set(res["test"]) == {*KEYS, "rsum"}
    assert all(0 <= res["test"][k] <= 100 for k in KEYS)
    assert res["test"]["rsum"] == pytest.approx(sum(res["test"][k] for k in KEYS))
    assert 0 <= res["best_epoch"] < EPOCHS
    if method in ("vanilla", "hinge"):  # no split
        assert res["split"] is None
    else:
        assert 0 <= res["split"]["auc"] <= 1
        assert {"precision", "recall", "f1", "models"} <= set(res["split"])
    assert "epoch 3/3" in (run / "log.txt").read_text()


@pytest.mark.parametrize("name, stage_terms", [
    ("sps", {1: {"re", "cro", "met", "qc"}, 2: {"re", "qc", "n"}}),
    ("sps-official", {1: {"re", "qc"}, 2: {"re", "qc", "n"}}),
    ("esc", {1: {"soft_clean", "esc"}, 2: {"soft_clean", "esc", "soft_noisy"}}),
    ("esc-official", {1: {"soft_clean", "esc"}, 2: {"soft_clean", "esc", "soft_noisy"}}),
    ("ncr", {1: {"loss"}, 2: {"loss"}}),
])
def test_every_curriculum_stage_runs(trained, name, stage_terms):
    records = read_metrics(trained(name))
    assert records[0]["phase"] == "warmup"
    for epoch, terms in stage_terms.items():
        assert records[epoch]["phase"] == "train"
        for model in ("A", "B"):
            got = set(records[epoch]["losses"][model])
            assert terms <= got, f"epoch {epoch} model {model}: terms {sorted(got)} lack {sorted(terms - got)}"
    if name.startswith("esc"):  # the noisy set only joins at esc.noisy_start = 1
        assert "soft_noisy" not in records[1]["losses"]["A"]
    if name.startswith("sps"):
        assert "n" not in records[1]["losses"]["A"]


# ---------------------------------------------------------------------------------------------
# noise file, determinism, resume


def test_a_diverged_run_stops_with_status_1_and_keeps_its_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A non-finite loss in the first co-training epoch: one line, exit status 1, no results, and
    checkpoints/last.pt still holds the warm-up epoch."""
    from fastncl.methods import NCR

    train_groups = NCR.train_groups

    def nan_groups(self, *args):
        return [lambda g=g: {**g(), "loss": g()["loss"] * float("nan")} for g in train_groups(self, *args)]

    monkeypatch.setattr(NCR, "train_groups", nan_groups)
    out = tmp_path / "run"
    code = main(["train", "--method", "ncr", "--out", str(out), *TINY, "optim.warmup_epochs=1", "optim.epochs=2"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fastncl: diverged: epoch 2: non-finite loss (model A: clean nan, loss nan; model B:")
    assert "checkpoints/last.pt holds epoch 1" in lines[0] and "Traceback" not in captured.err
    assert not (out / "results.json").exists() and len(read_metrics(out)) == 1
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("floor, expected", [
    ("0.5", ["reliable set below its floor (0 pairs with p > 0.9999)"]),
    ("0", ["reliable subset empty", "trains nothing: its reliable subset is empty"]),
])
def test_a_degenerate_split_is_said_in_the_epoch_line_and_metrics(tmp_path, floor, expected):
    """No reliable pair passes epsilon_1: with the floor SPS falls back and says so; without it the
    epoch trains nothing, and says that."""
    out = tmp_path / "run"
    args = ["train", "--method", "sps", "--noise", str(NOISE), "--out", str(out), *TINY,
            "sps.reliable_threshold=0.9999", f"sps.min_reliable_fraction={floor}", "optim.warmup_epochs=1",
            "optim.epochs=1"]
    assert main(args) == 0
    warnings = read_metrics(out)[1]["warnings"]
    line = next(x for x in (out / "log.txt").read_text().splitlines() if x.startswith("epoch 2/2"))
    for text in expected:
        assert any(text in w for w in warnings), (text, warnings)
        assert text in line.split("| warning: ", 1)[1]
    assert "warnings" not in read_metrics(out)[0]  # the warm-up has no split


def test_progress_lines_without_a_terminal(tmp_path, capsys, monkeypatch):
    """runtime.progress unset and stderr no terminal (pytest captures it): plain progress lines."""
    import fastncl.progress

    monkeypatch.setattr(fastncl.progress, "PROGRESS_SECONDS", 0.0)
    args = ["train", "--method", "ncr", "--out", str(tmp_path / "run"), *TINY, "runtime.progress=",
            "optim.warmup_epochs=1", "optim.epochs=1"]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert "epoch 0 A: 1/13 steps, 0s" in err and "split pass: 1/13 steps, 0s" in err
    assert main([*args[:3], "--out", str(tmp_path / "quiet"), *args[5:], "runtime.progress=false"]) == 0
    assert capsys.readouterr().err == ""  # progress switched off: nothing


def test_noise_file_reproduces_the_noise_index(trained, tmp_path, capsys):
    source = trained("sps") / "noise_index.npy"
    out = tmp_path / "reuse"
    args = ["train", "--method", "ncr", "--seed", "1", "--noise-file", str(source), "--out", str(out), *TINY,
            "optim.warmup_epochs=1", "optim.epochs=0"]
    assert main(args) == 0
    np.testing.assert_array_equal(np.load(out / "noise_index.npy"), np.load(source))
    env_a = json.loads((trained("sps") / "env.json").read_text())
    env_b = json.loads((out / "env.json").read_text())
    assert env_a["noise_index_sha256"] == env_b["noise_index_sha256"]
    assert len(env_a["data_sha256"]) == 64 and env_a["data_sha256"] == env_b["data_sha256"]
    res = results(out)
    assert res["noise_file"] == str(source)
    # labelled with the index's measured rate (captions not on their own image), not --noise's default 0
    measured = float(np.mean(np.load(source) != np.arange(TRAIN_IMAGES * CPI) // CPI))
    assert 0.3 < measured <= NOISE and res["noise"] == pytest.approx(measured)
    assert res["noise_file_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert f"noise {measured:g} (measured, {source})" in (out / "log.txt").read_text()
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert f"noise {measured:g}," in capsys.readouterr().out


@pytest.mark.parametrize("name", ["esc", "sps-official"])
def test_same_seed_same_results(trained, tmp_path, name):
    out = tmp_path / "again"
    assert main(train_args(name, out)) == 0
    assert results(out)["test"] == results(trained(name))["test"]
    assert losses(out) == losses(trained(name))
    assert [r["dev"] for r in read_metrics(out)] == [r["dev"] for r in read_metrics(trained(name))]


@pytest.mark.parametrize("name", ["sps", "esc"])
def test_resume_after_an_interruption_gives_the_uninterrupted_results(trained, tmp_path, monkeypatch, name):
    full = trained(name)
    out = tmp_path / "interrupted"
    original = Trainer._epoch

    def interrupted(self, epoch, total):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch, total)

    monkeypatch.setattr(Trainer, "_epoch", interrupted)
    assert main(train_args(name, out)) == 130
    monkeypatch.setattr(Trainer, "_epoch", original)
    assert not (out / "results.json").exists()
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1

    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert [r["epoch"] for r in read_metrics(out)] == list(range(EPOCHS))
    assert results(out)["test"] == results(full)["test"]
    assert losses(out) == losses(full)
    assert [r["dev"] for r in read_metrics(out)] == [r["dev"] for r in read_metrics(full)]


@pytest.mark.parametrize("kill_at", ["best", "metrics", "last"])
def test_a_kill_at_any_commit_point_resumes_to_the_uninterrupted_results(trained, tmp_path, monkeypatch, kill_at):
    """An epoch commits best.pt, then its metrics line, then last.pt: a kill just before any of
    them (at the run's best epoch) resumes to the same results. With
    last.pt written first, a kill before best.pt lost the best checkpoint of that epoch."""
    full = trained("ncr")
    epoch = results(full)["best_epoch"]  # the last epoch that writes best.pt
    assert epoch >= 1, "the tiny run's best epoch must come after an earlier checkpoint"
    out = tmp_path / "killed"
    with killed_at(monkeypatch, kill_at, epoch):
        assert main(train_args("ncr", out)) == 130
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert results(out)["test"] == results(full)["test"] and results(out)["best_epoch"] == results(full)["best_epoch"]
    assert [r["dev"] for r in read_metrics(out)] == [r["dev"] for r in read_metrics(full)]


def test_a_metrics_line_cut_by_a_kill_is_dropped(trained, tmp_path):
    from fastncl.run import RunDir

    out = tmp_path / "copy"
    shutil.copytree(trained("ncr"), out)
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text + '{"epoch": 3, "dev": {"rs')  # a torn last line
    assert [r.epoch for r in RunDir(out).read_metrics()] == list(range(EPOCHS))
    assert main(["train", "--resume", "--out", str(out)]) == 0  # drops it (truncate_metrics)
    assert (out / "metrics.jsonl").read_text() == text


def test_resume_drops_metrics_of_an_unsaved_epoch(trained, tmp_path):
    """metrics.jsonl lines after the checkpoint's epoch (an epoch cut short) are dropped on resume."""
    out = tmp_path / "copy"
    shutil.copytree(trained("ncr"), out)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == EPOCHS - 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines + [json.dumps({"epoch": EPOCHS, "phase": "train", "lr": 0.002, "stale": True})]) + "\n")
    assert main(["train", "--resume", "--out", str(out)]) == 0  # nothing left to train: evaluates and finishes
    assert [r["epoch"] for r in read_metrics(out)] == list(range(EPOCHS))
    assert results(out)["test"] == results(trained("ncr"))["test"]


# ---------------------------------------------------------------------------------------------
# eval and report


def test_eval_prints_the_r_at_k_table(trained, capsys):
    run = trained("esc")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| Image->Text R@1 | R@5 | R@10 | Text->Image R@1 | R@5 | R@10 | RSum |" in out
    assert "best checkpoint" in out
    test = results(run)["test"]
    row = "| " + " | ".join(f"{test[k]:.1f}" for k in (*KEYS, "rsum")) + " |"
    assert row in out  # the best checkpoint evaluated again gives the run's own numbers


def test_eval_dev_split_last_checkpoint(trained, capsys):
    run = trained("vanilla")
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "dev", "--checkpoint", "last"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dev (last checkpoint") and "RSum" in out
    assert f", epoch {EPOCHS}):" in out.splitlines()[0] and "best epoch" not in out
    dev = read_metrics(run)[-1]["dev"]
    assert f"| {dev['rsum']:.1f} |" in out


def test_report_writes_report_md(trained, capsys):
    run = trained("sps")
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert text.startswith("# fastncl run")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) == EPOCHS
    assert "Image->Text R@1" in text and "noisy-pair detection" in text
    lines = text.splitlines()
    detection = next(i for i, line in enumerate(lines) if line.startswith("noisy-pair detection"))
    assert lines[detection - 1] == ""  # not read as one more row of the table above it
    assert "report written to" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the Triton backend (in Triton's interpreter on a machine without a GPU)


def assert_trains_like_the_reference(reference_run, run, name):
    """The warm-up epoch's losses of ``run`` match the reference backend's run; every later epoch's
    are finite (the splits may part on a borderline pair after the warm-up)."""
    reference, kernels = losses(reference_run), losses(run)
    assert len(kernels) == EPOCHS
    for model in ("A", "B"):
        for term, value in reference[0][model].items():
            assert kernels[0][model][term] == pytest.approx(value, rel=1e-4), f"{name} warm-up {model} {term}"
    for record in kernels[1:]:
        for model in record.values():
            assert all(np.isfinite(v) for v in model.values())


@pytest.mark.parametrize("name", ["vanilla", "ncr", "sps", "esc", "sps-official", "esc-official"])
def test_triton_backend_trains_like_the_reference(trained, tmp_path, name):
    """Every method runs end to end with runtime.backend=triton (every loss op, fused objective
    and argmax through the kernels); the warm-up epoch's losses match the reference backend's run,
    and every later epoch's are finite (the splits may part on a borderline pair after that)."""
    pytest.importorskip("triton")
    out = tmp_path / name
    assert main(train_args(name, out) + ["runtime.backend=triton"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["runtime"]["backend"] == "triton"
    assert_trains_like_the_reference(trained(name), out, name)



@pytest.mark.parametrize("name", ["vanilla", "sps"])
def test_embedding_level_ops_train_like_the_matrix_ops(trained, tmp_path, monkeypatch, name):
    """With the Triton backend a vse batch from fastncl.kernels.EMBED_MIN_BATCH pairs on takes
    its InfoNCE (and SPS's consistency terms) straight from the embeddings; here every batch does:
    the warm-up losses match the reference backend's run, and every later epoch's are finite."""
    pytest.importorskip("triton")
    import fastncl.kernels as K

    monkeypatch.setattr(K, "EMBED_MIN_BATCH", 1)
    called = []
    for op in ("infonce_terms_embed", "cross_consistency_embed", "metric_consistency_embed"):
        # the Triton twin the run's Ops binds (kernels.triton_impl's cache)
        monkeypatch.setitem(K._triton_impls, op, lambda *a, _op=K.triton_impl(op), _name=op, **kw:
                            called.append(_name) or _op(*a, **kw))
    out = tmp_path / name
    assert main(train_args(name, out) + ["runtime.backend=triton"]) == 0
    assert {"infonce_terms_embed"} <= set(called)
    if name == "sps":
        assert {"cross_consistency_embed", "metric_consistency_embed"} <= set(called)
    assert_trains_like_the_reference(trained(name), out, name)


def test_consistency_closed_form_trains_like_the_reference(tmp_path, monkeypatch):
    """SPS with the SPS code's alpha = 0 and every batch through the embedding-level ops takes the
    consistency terms' D x D closed form (here from any B): the warm-up losses and the consistency
    terms of every epoch match the reference backend's run with the same alpha."""
    pytest.importorskip("triton")
    import fastncl.kernels
    from fastncl.kernels import consistency_embed

    monkeypatch.setattr(fastncl.kernels, "EMBED_MIN_BATCH", 1)
    monkeypatch.setattr(consistency_embed, "CLOSED_FORM_MIN_RATIO", dict.fromkeys(consistency_embed.CLOSED_FORM_MIN_RATIO, 0))
    calls = []
    apply = consistency_embed._ClosedForm.apply
    monkeypatch.setattr(consistency_embed._ClosedForm, "apply", lambda *a: calls.append(a[3]) or apply(*a))
    args = train_args("sps", tmp_path / "torch") + ["sps.consistency_margin=0"]
    assert main(args) == 0
    assert not calls  # the reference backend never takes it
    assert main(train_args("sps", tmp_path / "triton") + ["sps.consistency_margin=0", "runtime.backend=triton"]) == 0
    assert set(calls) == {True, False}  # cross and metric
    assert_trains_like_the_reference(tmp_path / "torch", tmp_path / "triton", "sps alpha=0")
    # and the consistency terms of the co-training epochs too (this run's splits do not part)
    for epoch, (reference, kernels) in enumerate(zip(losses(tmp_path / "torch"), losses(tmp_path / "triton"))):
        for model in ("A", "B"):
            for term in set(reference[model]) & {"cro", "met"}:
                assert kernels[model][term] == pytest.approx(reference[model][term], rel=1e-4), (epoch, model, term)


# ---------------------------------------------------------------------------------------------
# report figures, split files, compare, TensorBoard

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", list(RUNS))
def test_report_figures_for_every_method(trained, capsys, name):
    run = trained(name)
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    figures = {p.name: p for p in (run / "report").glob("*.png")}
    # the split of every co-training epoch is plotted (first, middle and last of 2); vanilla and hinge have no split
    expected = {"dev_rsum.png"} if name in ("vanilla", "hinge") else {
        "dev_rsum.png", "split_quality.png", *(f"losses_epoch{e + 1:02d}.png" for e in range(1, EPOCHS))}
    assert set(figures) == expected
    text = (run / "report.md").read_text()
    for fig_name, path in figures.items():
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, fig_name
        assert f"(report/{fig_name})" in text
    assert f"figures in {run / 'report'}" in out


def test_report_chosen_epochs_and_stale_figures(trained, capsys):
    run = trained("ncr")
    assert main(["report", str(run), "--epochs", "3"]) == 0
    assert sorted(p.name for p in (run / "report").glob("losses_*.png")) == ["losses_epoch03.png"]
    capsys.readouterr()
    assert main(["report", str(run), "--epochs", "1"]) == 2  # a warm-up epoch has no split
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epochs: no split saved for epoch 1 (epochs with a split: 2, 3)" in err


def test_report_without_matplotlib_names_the_extra(trained, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(trained("vanilla"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fastncl[report]'" in err


def test_split_files_hold_each_epochs_per_sample_record(trained):
    run = trained("esc")
    files = sorted((run / "splits").glob("*.npz"))
    assert [f.name for f in files] == [f"epoch_{e:03d}.npz" for e in range(1, EPOCHS)]
    records = {r["epoch"]: r for r in read_metrics(run)}
    truth = np.load(run / "noise_index.npy") == np.arange(TRAIN_IMAGES * CPI) // CPI
    for f in files:
        record = records[int(f.stem.split("_")[1])]
        with np.load(f, allow_pickle=False) as z:
            assert z["losses"].shape == z["normalized"].shape == z["clean_prob"].shape == (2, TRAIN_IMAGES * CPI)
            assert str(z["mixture"]) == "gmm" and len(json.loads(str(z["params"]))) == 2  # esc.mixture default
            assert np.array_equal(z["clean_mask"], truth)
            for k, model in enumerate(record["split"]["models"]):
                assert z["noisy_cut"][k] == model["noisy_cut"]
                for code, name in enumerate(z["subset_names"]):
                    assert (z["subset"][k] == code).sum() == model["subsets"][str(name)]["size"]


def test_dev_rsum_of_each_model_and_the_ensemble(trained):
    for r in read_metrics(trained("sps")):
        assert set(r["dev_models"]) == {"A", "B"}
        assert set(r["dev_models"]["A"]) == set(r["dev"])
    assert read_metrics(trained("sps"))[-1]["active_subsets"] == ["reliable", "quasi_clean", "noisy"]


def test_compare_markdown_and_csv(trained, capsys):
    runs = [trained(name) for name in ("vanilla", "sps")]
    capsys.readouterr()
    assert main(["compare", *map(str, runs)]) == 0
    md = capsys.readouterr().out.splitlines()
    # two methods: no seed group, so no aggregate row (tests/test_compare.py has those)
    assert md[0].startswith("| run | method | noise | seed | backbone | data |") and len(md) == 4
    for run, line in zip(runs, md[2:]):
        res = results(run)
        assert line.startswith(f"| {run.name} | {res['method']} | 40% | 0 | vse | synthetic |")
        assert f"**{res['test']['rsum']:.1f}**" in line
    assert main(["compare", *map(str, runs), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["method"] for r in rows] == ["vanilla", "sps"] and [r["data"] for r in rows] == ["synthetic"] * 2
    assert float(rows[1]["rsum"]) == pytest.approx(results(runs[1])["test"]["rsum"], abs=1e-3)
    assert rows[0]["split_auc"] == "" and float(rows[1]["split_auc"]) == pytest.approx(results(runs[1])["split"]["auc"], abs=1e-4)
    assert float(rows[0]["time_s"]) > 0


def test_compare_an_unfinished_run(trained, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained("vanilla"), unfinished)
    (unfinished / "results.json").unlink()
    assert main(["compare", str(trained("vanilla")), str(unfinished)]) == 2
    assert "the run has not finished (no results.json)" in capsys.readouterr().err


def test_tensorboard_logs_the_metrics_and_loss_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(train_args("ncr", out) + ["--tensorboard"]) == 0
    board = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    board.Reload()
    tags = board.Tags()
    assert {"dev/rsum", "dev_models/A/rsum", "split/auc", "losses/A/loss", "lr", "time"} <= set(tags["scalars"])
    metrics = read_metrics(out)
    logged = board.Scalars("dev/rsum")
    assert [e.step for e in logged] == [r["epoch"] + 1 for r in metrics]
    assert [e.value for e in logged] == pytest.approx([r["dev"]["rsum"] for r in metrics], rel=1e-6)
    assert {"split_losses/A", "split_losses/A_clean", "split_losses/B_noisy", "clean_prob/A"} <= set(tags["histograms"])
    assert [e.step for e in board.Histograms("split_losses/A")] == list(range(2, EPOCHS + 1))


def test_tensorboard_missing_is_one_line_and_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(train_args("vanilla", out) + ["--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fastncl[tensorboard]'" in err
    assert not out.exists()


def test_amp_dev_recalls_are_those_of_fastncl_eval(tmp_path, capsys):
    """Under --amp the per-epoch dev evaluation runs as `fastncl eval` does (same precision, same
    views), and the vse similarities stay fp32 under autocast."""
    from fastncl.models import build_backbone
    from fastncl.config import ModelConfig
    from fastncl.evaluation import evaluate_run

    model = build_backbone(ModelConfig(embed_dim=8, word_dim=4), 6, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = model.encode_images(torch.randn(3, 5, 6))
        cap = model.encode_captions(torch.randint(1, 20, (4, 7)), torch.tensor([7, 5, 3, 1]))
        assert model.similarity(img, cap).dtype == torch.float32
    out = tmp_path / "amp"
    assert main(train_args("vanilla", out) + ["--amp"]) == 0
    last = read_metrics(out)[-1]["dev"]
    text = evaluate_run(str(out), split="dev", checkpoint="last")
    assert f"| {last['rsum']:.1f} |" in text, (text, last)
