"""The split as one value (methods.base.Division: subsets, the cuts used, notes) as the run folder
records it, and the collapse guard (optim.collapse) that reads it: a collapse is said in the epoch
line and metrics.jsonl, and the run recovers (best weights back, lower learning rate, a new
split), stops, or goes on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastncl.cli import main

from helpers import killed_at

TINY = ["data.synthetic.train_images=16", "data.synthetic.dev_images=8", "data.synthetic.test_images=8",
        "data.synthetic.feature_dim=8", "data.synthetic.regions=8", "data.synthetic.idiosyncratic_words=20",
        "model.embed_dim=16", "model.word_dim=8", "optim.batch_size=16", "optim.warmup_epochs=1",
        "runtime.progress=false", "runtime.threads=1", "--noise", "0.4"]


def _train(out, *args, method="ncr"):
    return main(["train", "--method", method, "--out", str(out), *TINY, *args])


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["ncr", "sps", "esc"])
def test_a_degenerate_split_is_a_collapse_and_the_run_recovers(tmp_path, capsys, method):
    # every primary subset is below 99 % of the pairs: each co-training epoch "collapses"
    out = tmp_path / "run"
    assert _train(out, "optim.epochs=4", "optim.collapse_min_fraction=0.99", "optim.collapse_max_recoveries=2",
                  method=method) == 0
    lines = capsys.readouterr().out.splitlines()
    records = _records(out)
    assert [r["phase"] for r in records] == ["warmup", "train", "train", "train"]  # stopped after the third collapse
    first, second, third = records[1:]
    assert first["collapse"]["action"] == "recovered" and first["collapse"]["restored_epoch"] == 0
    assert first["collapse"]["lr_scale"] == pytest.approx(0.1) and second["collapse"]["lr_scale"] == pytest.approx(0.01)
    assert second["lr"] == pytest.approx(records[0]["lr"] * 0.1)  # the lower learning rate from the next epoch on
    assert third["collapse"]["action"] == "stopped"
    assert all(any(w.startswith("collapse: ") and "subset holds" in w for w in r["warnings"]) for r in records[1:])
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    said = epoch_lines[1].split(" | warning: ")[1]  # after the split's own notes, if any
    assert "collapse: " in said and "restored epoch 1's weights" in said
    assert "training stopped" in epoch_lines[3]
    # the restored weights are the best epoch's (the warm-up's): last.pt after the first recovery trained
    # one more epoch from them, and best.pt is still epoch 0
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 0
    results = json.loads((out / "results.json").read_text())
    assert results["best_epoch"] == 0


def test_the_restored_weights_are_the_best_checkpoints(tmp_path):
    out = tmp_path / "run"
    # one co-training epoch, which collapses: last.pt is written after the recovery
    assert _train(out, "optim.epochs=1", "optim.collapse_min_fraction=0.99", "optim.collapse=recover") == 0
    records = _records(out)
    assert records[1]["collapse"]["action"] == "recovered"
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and best["epoch"] == 0 and last["recoveries"] == 1 and not last["stopped"]
    assert last["lr_scale"] == pytest.approx(0.1)
    for b, l in zip(best["models"], last["models"]):  # the collapsed epoch's training is undone
        assert all(torch.equal(b[k], l[k]) for k in b)
    for b, l in zip(best["optimizers"], last["optimizers"]):
        assert all(torch.equal(b["state"][i]["exp_avg"], l["state"][i]["exp_avg"]) for i in b["state"])


def test_a_dev_rsum_below_half_the_best_is_a_collapse(tmp_path):
    out = tmp_path / "run"
    # ratio 1: any co-training epoch below the best so far counts
    assert _train(out, "optim.epochs=3", "optim.collapse_rsum_ratio=1.0", "optim.collapse=warn") == 0
    records = _records(out)
    best = records[0]["dev"]["rsum"]
    for r in records[1:]:
        below = r["dev"]["rsum"] < best
        assert (r.get("collapse") is not None) == below
        if below:
            assert r["collapse"]["action"] == "none" and "dev rsum" in r["collapse"]["reasons"][0]
        best = max(best, r["dev"]["rsum"])


def test_dev_similarities_all_alike_are_a_collapse(tmp_path):
    """The hardest-negative collapse: a model scoring every dev caption alike (its similarities' std
    below optim.collapse_min_spread; here any std, the bound being 10) is said, and recovered from."""
    out = tmp_path / "run"
    assert _train(out, "optim.epochs=2", "optim.collapse_min_spread=10", "optim.collapse_max_recoveries=1") == 0
    records = _records(out)
    assert [r["collapse"]["action"] for r in records[1:]] == ["recovered", "stopped"]
    for r in records[1:]:
        said = [x for x in r["collapse"]["reasons"] if "dev similarities all alike" in x]
        assert [x.split("'s")[0] for x in said] == ["model A", "model B"]
        std = float(said[0].split("(std ")[1].split(" <")[0])
        assert 0 < std < 10 and "< 10, mean " in said[0]
    # by default (bound 0) it never fires
    out = tmp_path / "default"
    assert _train(out, "optim.epochs=2", "optim.collapse=warn") == 0
    assert not any("all alike" in w for r in _records(out) for w in r.get("warnings", []))


@pytest.mark.parametrize("mode, phases", [("stop", ["warmup", "train"]), ("off", ["warmup", "train", "train"])])
def test_stop_and_off(tmp_path, mode, phases):
    out = tmp_path / "run"
    assert _train(out, "optim.epochs=2", "optim.collapse_min_fraction=0.99", f"optim.collapse={mode}") == 0
    records = _records(out)
    assert [r["phase"] for r in records] == phases
    assert all(("collapse" in r) == (mode == "stop" and r["phase"] == "train") for r in records)


def test_the_baselines_are_not_guarded(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "optim.epochs=2", "optim.collapse_min_fraction=0.99", method="vanilla") == 0
    assert not any("collapse" in r for r in _records(out))


def test_a_resumed_run_keeps_the_guards_state(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ("optim.collapse_min_fraction=0.99", "optim.collapse_max_recoveries=3", "model.dropout=0",
            "ncr.noisy_start=1")  # else half of each run's epochs
    assert _train(whole, "optim.epochs=3", *args) == 0
    assert _train(cut, "optim.epochs=1", *args) == 0  # ends after one recovery: last.pt holds lr_scale 0.1
    cfg = (cut / "config.yaml").read_text().replace("  epochs: 1\n", "  epochs: 3\n")
    (cut / "config.yaml").write_text(cfg)
    assert main(["train", "--resume", "--out", str(cut)]) == 0
    a, b = _records(whole), _records(cut)
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["collapse"]["lr_scale"] for r in a[1:]] == [r["collapse"]["lr_scale"] for r in b[1:]]
    assert [r["dev"]["rsum"] for r in a] == [r["dev"]["rsum"] for r in b]


def test_split_files_and_metrics_hold_the_cuts_the_split_used(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "optim.epochs=1", "sps.min_reliable_fraction=1.0", method="sps") == 0  # the floor fires
    from fastncl.records import SplitFile

    z = np.load(out / "splits" / "epoch_001.npz")
    split = SplitFile.from_arrays(dict(z), "test")
    record = _records(out)[1]
    for k in range(2):
        reliable = split.cuts["reliable"][k]
        assert split.cuts["noisy"][k] == split.noisy_cut[k] == record["split"]["models"][k]["cuts"]["noisy"]
        assert reliable == record["split"]["models"][k]["cuts"]["reliable"]
        # the subsets are what those cuts give (up to the float32 the file stores the probabilities in)
        p, at = split.clean_prob[k], np.float32(reliable)
        in_reliable = split.subset[k] == split.subset_names.index("reliable")
        assert in_reliable.any() and (p[in_reliable] >= at).all() and (p[~in_reliable] <= at).all()
    assert any("fell back to" in w for w in record["warnings"])


@pytest.mark.parametrize("method", ["ncr", "sps"])
def test_the_mean_signal_fits_the_average_of_the_normalised_losses(tmp_path, method):
    from fastncl.methods.mixture import normalize_losses
    from fastncl.records import SplitFile

    out = tmp_path / "run"
    assert _train(out, "optim.epochs=3", "split.signal=mean", "optim.collapse=off", method=method) == 0
    files = sorted((out / "splits").glob("epoch_*.npz"))
    assert len(files) == 3
    seen = [[], []]
    for path in files:
        split = SplitFile.from_arrays(dict(np.load(path)), str(path))
        for k in range(2):
            seen[k].append(normalize_losses(split.losses[k].astype(np.float64)))
            # what the mixture saw: the running mean, min-max normalised again by the fit
            want = normalize_losses(np.mean(seen[k], axis=0))
            assert np.allclose(split.normalized[k], want, atol=1e-4), (path.name, k)
    # a resumed run carries the running sums on
    cut = tmp_path / "cut"
    assert _train(cut, "optim.epochs=1", "split.signal=mean", "optim.collapse=off", "model.dropout=0",
                  "ncr.noisy_start=1", method=method) == 0
    cfg = (cut / "config.yaml").read_text().replace("  epochs: 1\n", "  epochs: 3\n")
    (cut / "config.yaml").write_text(cfg)
    assert main(["train", "--resume", "--out", str(cut)]) == 0
    whole = tmp_path / "whole"
    assert _train(whole, "optim.epochs=3", "split.signal=mean", "optim.collapse=off", "model.dropout=0",
                  "ncr.noisy_start=1", method=method) == 0
    for name in ("epoch_003.npz",):
        a = np.load(whole / "splits" / name)
        b = np.load(cut / "splits" / name)
        assert np.array_equal(a["normalized"], b["normalized"]) and np.array_equal(a["subset"], b["subset"])


@pytest.mark.parametrize("method", ["ncr", "sps", "esc"])
def test_the_truth_signal_splits_by_the_injected_noise(tmp_path, method):
    """split.signal=truth (a diagnostic): every model's clean probability is the ground truth, the
    primary subset holds exactly the pairs the noise left matched (core or not), and the split
    file keeps the losses the fit would have seen."""
    from fastncl.methods.mixture import normalize_losses
    from fastncl.records import SplitFile

    out = tmp_path / "run"
    # ESC adds its anchors to the clean subset after the split (Eq. 12); here they are left out
    extra = ["esc.anchors_clean=false"] if method == "esc" else []
    assert _train(out, "optim.epochs=2", "split.signal=truth", "split.clean_side=core", "optim.collapse=off",
                  *extra, method=method) == 0
    for path in sorted((out / "splits").glob("epoch_*.npz")):
        split = SplitFile.from_arrays(dict(np.load(path)), str(path))
        truth = split.clean_mask
        assert truth is not None and 0 < truth.sum() < len(truth)
        assert split.mixture == "truth"
        for k in range(2):
            assert np.array_equal(split.clean_prob[k], truth.astype(split.clean_prob.dtype))
            assert np.allclose(split.normalized[k], normalize_losses(split.losses[k].astype(np.float64)), atol=1e-6)
            primary = np.flatnonzero(split.subset[k] == 0)  # the first subset: clean, reliable
            assert np.array_equal(np.sort(primary), np.flatnonzero(truth)), (path.name, k)
    last = _records(out)[-1]
    assert last["split"]["auc"] == pytest.approx(1.0)
    assert not (out / "structure.npy").exists()  # no fit: split.structure (default knn) does not apply


def test_the_truth_signal_needs_injected_noise(capsys):
    args = [a for a in TINY if a not in ("--noise", "0.4")]
    assert main(["train", "--method", "ncr", "--out", "unused", *args, "split.signal=truth"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "split.signal" in err and "--noise" in err


def test_a_collapse_before_any_best_epoch_only_warns(tmp_path):
    out = tmp_path / "run"  # no warm-up: the first epoch has no best epoch to go back to
    assert _train(out, "optim.warmup_epochs=0", "optim.epochs=2", "optim.collapse_min_fraction=0.99") == 0
    first, second = _records(out)
    assert first["collapse"]["action"] == "none" and "no earlier epoch" in first["warnings"][-1]
    assert second["collapse"]["action"] == "recovered"
    assert json.loads((out / "results.json").read_text())["best_epoch"] == 0


def test_under_warn_a_flagged_epoch_may_still_be_the_best(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "optim.epochs=4", "optim.collapse_min_fraction=0.99", "optim.collapse=warn") == 0
    records = _records(out)
    assert all(r["collapse"]["action"] == "none" for r in records[1:])
    best = max(range(len(records)), key=lambda i: (records[i]["dev"]["rsum"], -i))
    assert json.loads((out / "results.json").read_text())["best_epoch"] == best


def test_a_plateau_warm_up_ends_when_dev_rsum_stops_rising(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "optim.warmup=plateau", "optim.warmup_max_epochs=6", "optim.epochs=2", "optim.collapse=off") == 0
    records = _records(out)
    warm = [r for r in records if r["phase"] == "warmup"]
    assert [r["phase"] for r in records] == ["warmup"] * len(warm) + ["train"] * 2  # then the co-training epochs
    best = -1.0
    for i, r in enumerate(warm):  # every warm-up epoch but the last improved on the best so far
        rsum = r["dev"]["rsum"]
        if i < len(warm) - 1:
            assert rsum > best
        best = max(best, rsum)
    last = warm[-1]
    assert len(warm) == 6 or last["dev"]["rsum"] <= max(r["dev"]["rsum"] for r in warm[:-1])
    assert any(n.startswith(f"warm-up ends after epoch {len(warm)}") for n in last["notes"])
    assert records[len(warm)]["lr"] == pytest.approx(records[0]["lr"])  # the schedule counts from the warm-up's end


def test_a_plateau_warm_up_stops_at_its_cap_and_resumes(tmp_path):
    capped = tmp_path / "capped"
    assert _train(capped, "optim.warmup=plateau", "optim.warmup_max_epochs=1", "optim.epochs=1") == 0
    records = _records(capped)
    assert [r["phase"] for r in records] == ["warmup", "train"] and "the cap" in records[0]["notes"][0]
    last = torch.load(capped / "checkpoints" / "last.pt", weights_only=True)
    assert last["warmup_end"] == 1
    # a resumed run keeps the warm-up's end it found
    cut = tmp_path / "cut"
    args = ("optim.warmup=plateau", "optim.warmup_max_epochs=8", "model.dropout=0", "optim.collapse=off",
            "ncr.noisy_start=1")
    assert _train(cut, "optim.epochs=0", *args) == 0
    ended = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["warmup_end"]
    assert ended is not None
    cfg = (cut / "config.yaml").read_text().replace("  epochs: 0\n", "  epochs: 2\n")
    (cut / "config.yaml").write_text(cfg)
    assert main(["train", "--resume", "--out", str(cut)]) == 0
    whole = tmp_path / "whole"
    assert _train(whole, "optim.epochs=2", *args) == 0
    assert [r["dev"]["rsum"] for r in _records(whole)] == [r["dev"]["rsum"] for r in _records(cut)]


@pytest.mark.parametrize("width", [0.0, 0.5])
def test_the_clean_core_keeps_only_the_pairs_up_to_its_end(tmp_path, width):
    """split.clean_side=core: the clean subset ends at the clean component's mean plus
    split.core_width of its standard deviations."""
    from fastncl.records import SplitFile

    out = tmp_path / "run"
    # the core's own cut: without the structure, which hands the probabilities out by more than the loss
    assert _train(out, "optim.epochs=2", "split.clean_side=core", f"split.core_width={width}", "optim.collapse=off",
                  "split.structure=off", method="ncr") == 0
    for path in sorted((out / "splits").glob("epoch_*.npz")):
        split = SplitFile.from_arrays(dict(np.load(path)), str(path))
        for k in range(2):
            params = split.params[k]  # the clean component's, on the normalised scale
            cut = params["means"][0] + width * np.sqrt(params["variances"][0])
            x, p = split.normalized[k], split.clean_prob[k]
            above = x > np.float32(cut) + 1e-6
            assert above.any() and (p[above] == 0).all()  # the rest of the clean component is noisy now
            clean = split.subset[k] == split.subset_names.index("clean")
            assert clean.any() and (x[clean] <= np.float32(cut) + 1e-6).all()
            if width:  # the wider core holds pairs above the mean
                assert (x[clean] > np.float32(params["means"][0]) + 1e-6).any()


def test_reload_starts_co_training_from_the_warm_up_epoch_kept(tmp_path, monkeypatch):
    """optim.warmup_best=reload (SPS's code): the warm-up epoch kept is the last one whose dev RSum
    and six recalls all reach those of the one kept before it, and co-training starts from its weights."""
    from fastncl.train import Trainer

    started = []
    train = Trainer._train

    def spy(self, epoch, co_epoch, split, warnings):
        if co_epoch == 0:  # after the first split, before its steps
            started.append([{k: v.clone() for k, v in m.state_dict().items()} for m in self.models])
        return train(self, epoch, co_epoch, split, warnings)

    monkeypatch.setattr(Trainer, "_train", spy)
    for reload in ("reload", "keep"):
        out = tmp_path / reload
        assert _train(out, "optim.warmup_epochs=4", "optim.epochs=1", f"optim.warmup_best={reload}",
                      "optim.collapse=off", "sps.min_reliable_fraction=0.5", method="sps") == 0
    records = _records(tmp_path / "reload")
    kept, dev = 0, records[0]["dev"]
    for i, r in enumerate(records[1:4], start=1):
        if all(r["dev"][k] >= dev[k] for k in dev):
            kept, dev = i, r["dev"]
    assert kept < 3, "this seed's warm-up must keep an epoch before the last, or nothing is reloaded"
    saved = torch.load(tmp_path / "reload" / "checkpoints" / "warmup.pt", weights_only=True)
    assert saved["epoch"] == kept and saved["warmup_kept"] == kept
    assert records[4]["notes"] == [f"co-training starts from warm-up epoch {kept + 1}'s weights "
                                   "(optim.warmup_best=reload)"]
    for state, model in zip(saved["models"], started[0]):  # the split and the steps start from them
        assert all(torch.equal(state[k], model[k]) for k in state)
    last_warmup = torch.load(tmp_path / "keep" / "checkpoints" / "last.pt", weights_only=True)
    assert not all(torch.equal(a, b) for a, b in zip(started[0][0].values(), started[1][0].values()))
    assert not (tmp_path / "keep" / "checkpoints" / "warmup.pt").exists() and last_warmup["warmup_kept"] == -1


def test_skip_never_makes_a_warm_up_epoch_the_best(tmp_path):
    """optim.warmup_best=skip (ESC's code does not validate the warm-up): best.pt is a co-training
    epoch's even when a warm-up epoch scored higher on dev."""
    out = tmp_path / "run"
    assert _train(out, "optim.warmup_epochs=2", "optim.epochs=2", "optim.warmup_best=skip", "optim.collapse=off",
                  method="esc") == 0
    records = _records(out)
    train = [r["dev"]["rsum"] for r in records if r["phase"] == "train"]
    assert max(r["dev"]["rsum"] for r in records if r["phase"] == "warmup") > max(train), \
        "this seed's warm-up must score higher, or skip changes nothing"
    result = json.loads((out / "results.json").read_text())
    assert result["best_epoch"] == 2 + int(np.argmax(train))  # the first of a tie, among co-training epochs only
    assert not (out / "checkpoints" / "warmup.pt").exists()


def test_skip_and_a_plateau_warm_up_are_refused(capsys, tmp_path):
    assert _train(tmp_path / "run", "optim.warmup_best=skip", "optim.warmup=plateau") == 2
    err = capsys.readouterr().err
    assert "optim.warmup_best" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("once", [False, True])
def test_sps_quasi_clean_once_passes_over_that_subset_once(tmp_path, once, monkeypatch):
    """sps.quasi_clean_once (SPS's code): the quasi-clean subset's batches run out after one pass and
    the epoch's remaining steps train without L^qc; otherwise it cycles to keep pace."""
    from fastncl.methods import SPS

    seen, qc_values = [], {}
    groups = SPS.train_groups

    def spy(self, model, peer, batches, peer_prob, co_epoch):
        seen.append((id(model), sorted(batches)))
        out = groups(self, model, peer, batches, peer_prob, co_epoch)

        def recorded(fn):
            def call():
                terms = fn()
                if "qc" in terms:
                    qc_values.setdefault(id(model), []).append(float(terms["qc"].detach()))
                return terms
            return call
        return [recorded(fn) for fn in out]

    monkeypatch.setattr(SPS, "train_groups", spy)
    out = tmp_path / "run"
    # every pair reliable or quasi-clean at a loose epsilon_1; the curriculum trains L^qc from the first epoch
    assert _train(out, "optim.epochs=1", "optim.batch_size=4", "sps.quasi_clean_start=0", "sps.noisy_start=5",
                  "sps.reliable_threshold=0.9", "sps.min_reliable_fraction=0", "optim.collapse=off",
                  f"sps.quasi_clean_once={str(once).lower()}", method="sps") == 0
    from fastncl.records import SplitFile
    split = SplitFile.from_arrays(dict(np.load(out / "splits" / "epoch_001.npz")), "split")
    names = split.subset_names
    order = list(dict.fromkeys(m for m, _ in seen))  # model A trains first, then B
    assert len(order) == 2
    for k, model_steps in enumerate([keys for m, keys in seen if m == who] for who in order):
        sizes = np.bincount(split.subset[1 - k], minlength=len(names))  # model k trains on its peer's split
        reliable, qc = sizes[names.index("reliable")], sizes[names.index("quasi_clean")]
        if not (reliable and qc):
            pytest.skip("this tiny split left a subset empty")
        with_qc = sum("quasi_clean" in keys for keys in model_steps)
        steps = len(model_steps)
        assert with_qc == (min(steps, -(-qc // min(4, qc))) if once else steps)
        if once:
            assert with_qc < steps, "the quasi-clean subset must run out before the epoch ends"
        # metrics.jsonl: L^qc's epoch mean over the steps it ran in, not over all steps
        logged = _records(out)[1]["losses"]["AB"[k]]["qc"]
        assert logged == pytest.approx(np.mean(qc_values[order[k]]), rel=1e-5)


@pytest.mark.parametrize("kill_at", [("warmup", 1), ("last", 1), ("last", 3), ("metrics", 4)])
def test_a_killed_reload_run_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch, kill_at):
    """optim.warmup_best=reload: a kill at any commit point of the warm-up (the kept epoch's
    warmup.pt, last.pt of the epoch before co-training) or of the first co-training epoch resumes
    to the same records and results."""
    args = ("optim.warmup_epochs=4", "optim.epochs=1", "optim.warmup_best=reload", "optim.collapse=off")
    full = tmp_path / "full"
    assert _train(full, *args, method="sps") == 0
    assert torch.load(full / "checkpoints" / "warmup.pt", weights_only=True)["epoch"] == 1  # the kept epoch is killed at
    out = tmp_path / "killed"
    with killed_at(monkeypatch, *kill_at):
        assert _train(out, *args, method="sps") == 130
    assert main(["train", "--resume", "--out", str(out)]) == 0
    strip = ("time", "time_split", "time_fit", "time_eval")
    assert [{k: v for k, v in r.items() if k not in strip} for r in _records(out)] == \
           [{k: v for k, v in r.items() if k not in strip} for r in _records(full)]
    assert json.loads((out / "results.json").read_text())["test"] == json.loads((full / "results.json").read_text())["test"]


@pytest.mark.parametrize("method", ["ncr", "sps", "esc"])
def test_the_structure_reorders_the_split_and_keeps_its_counts(tmp_path, capsys, method):
    """split.structure=knn: the first split's fit is the run's without it (the same warm-up), its
    subsets hold as many pairs, its clean probabilities are the same values handed out in another
    order (methods.mixture.with_structure), and the run says what the structure scored."""
    from fastncl.records import SplitFile

    runs = {}
    for name, extra in (("plain", ["split.structure=off"]),
                        ("knn", ["split.structure=knn", "split.structure_k=5"])):
        out = tmp_path / name
        assert _train(out, "optim.epochs=1", "optim.collapse=off", *extra, method=method) == 0
        runs[name] = SplitFile.from_arrays(dict(np.load(out / "splits" / "epoch_001.npz")), name)
    said = capsys.readouterr()
    assert "structure (knn, k 5): mean overlap" in said.out + said.err and "auc" in said.out + said.err
    plain, knn = runs["plain"], runs["knn"]
    assert np.array_equal(plain.losses, knn.losses)
    for k in range(2):
        assert np.array_equal(np.sort(plain.clean_prob[k]), np.sort(knn.clean_prob[k]))
        assert np.array_equal(np.bincount(plain.subset[k] + 1), np.bincount(knn.subset[k] + 1))
    assert any(not np.array_equal(plain.clean_prob[k], knn.clean_prob[k]) for k in range(2))
    # the scores are kept in the run folder; a resumed run reads them back instead of computing them
    out = tmp_path / "knn"
    scores = np.load(out / "structure.npy")
    assert scores.shape == (len(knn.losses[0]),) and scores.dtype == np.float64
    cfg = (out / "config.yaml").read_text().replace("  epochs: 1\n", "  epochs: 2\n")
    (out / "config.yaml").write_text(cfg)
    assert main(["train", "--resume", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "structure (knn" not in said.out + said.err and (out / "splits" / "epoch_002.npz").exists()
    assert np.array_equal(np.load(out / "structure.npy"), scores)


def test_the_report_draws_no_loss_cuts_for_a_reordered_split(tmp_path, monkeypatch):
    """Under split.structure the subsets are not cut at a loss: the loss histograms draw none."""
    axes = pytest.importorskip("matplotlib.axes")
    drawn = []
    original = axes.Axes.axvline
    monkeypatch.setattr(axes.Axes, "axvline", lambda self, *a, **k: drawn.append(a) or original(self, *a, **k))
    counts = {}
    for name, extra in (("plain", ["split.structure=off"]),
                        ("knn", ["split.structure=knn", "split.structure_k=5"])):
        out = tmp_path / name
        assert _train(out, "optim.epochs=1", "optim.collapse=off", *extra) == 0
        drawn.clear()
        assert main(["report", str(out)]) == 0
        counts[name] = len(drawn)
    assert counts["plain"] > 0 and counts["knn"] == 0
