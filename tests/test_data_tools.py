"""tools/split_signals.py and tools/embed_throughput.py on tiny inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastncl.cli import main
from fastncl.methods.mixture import normalize_losses
from fastncl.records import SplitFile

from helpers import load_tool

TINY = ["data.synthetic.train_images=16", "data.synthetic.dev_images=8", "data.synthetic.test_images=8",
        "data.synthetic.feature_dim=8", "data.synthetic.regions=8", "data.synthetic.idiosyncratic_words=20",
        "model.embed_dim=16", "model.word_dim=8", "optim.batch_size=16", "optim.warmup_epochs=1",
        "optim.epochs=3", "runtime.progress=false", "runtime.threads=1"]


def test_split_signals_scores_each_epoch_from_what_it_had_seen(tmp_path):
    from sklearn.metrics import roc_auc_score

    out = tmp_path / "run"
    assert main(["train", "--method", "ncr", "--noise", "0.4", "--out", str(out), *TINY]) == 0
    rows = load_tool("split_signals").run_signals(str(out))
    files = sorted((out / "splits").glob("epoch_*.npz"))
    assert [r["epoch"] for r in rows] == [int(f.stem.split("_")[1]) for f in files]
    first = rows[0]
    assert first["mean"] == first["ema"] == first["first"] == first["both"]  # one epoch seen
    split = SplitFile.from_arrays(dict(np.load(files[-1])), "x")
    want = np.mean([roc_auc_score(split.clean_mask, -loss) for loss in split.losses])
    assert rows[-1]["loss"] == pytest.approx(want)
    assert rows[-1]["prob"] == pytest.approx(np.mean([roc_auc_score(split.clean_mask, p) for p in split.clean_prob]))
    assert all(0 <= r[s] <= 1 for r in rows for s in load_tool("split_signals").SIGNALS)


def test_embed_throughput_draws_a_folder_and_reports(tmp_path, capsys):
    tool = load_tool("embed_throughput")
    table = tool.draw_folder(tmp_path / "folder", 24, (40, 30))
    assert len(table.read_text().splitlines()) == 25
    result = tool.run(table, tmp_path / "out", "patches", None, 1, 8, 1)
    assert result["images"] == 24 and result["images_per_s"] > 0 and result["rank0_images"] == 24
    assert result["decode_thread_s"] is not None and result["peak_rss_mib"] > 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["encoder"]["kind"] == "patches"


def test_warmup_signals_scores_every_warmup_epoch_against_the_noise(tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    tool = load_tool("warmup_signals")
    out = tmp_path / "run"
    assert tool.main(["--method", "ncr", "--noise", "0.4", "--epochs", "2", "--out", str(out), *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    epochs = [line for line in lines if line.startswith("after epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["after epoch 1", "after epoch 2"]
    assert lines[-1].startswith("ncr on synthetic at noise 0.4, seed 0: the loss splits best after epoch ")
    # the last epoch's AUC is that of a split pass of the run's own last models
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warmup", "warmup"]
    aucs = [float(x) for x in epochs[-1].split("loss A ")[1].split(" (")[0].split(" B ")]
    assert all(0 <= a <= 1 for a in aucs)
    # the saved losses reproduce the printed AUCs: epoch 1's own, and the average over both epochs
    saved = np.load(out / "warmup_losses.npz")
    assert saved["losses"].shape == (2, 2, len(saved["clean"]))
    first = [float(x) for x in epochs[0].split("loss A ")[1].split(" (")[0].split(" B ")]
    assert first == pytest.approx([roc_auc_score(saved["clean"], -x) for x in saved["losses"][0]], abs=5e-4)
    mean_a = (normalize_losses(saved["losses"][0, 0]) + normalize_losses(saved["losses"][1, 0])) / 2
    printed = float(epochs[-1].split("epochs 1-2: A ")[1].split(" ")[0])
    assert printed == pytest.approx(roc_auc_score(saved["clean"], -mean_a), abs=5e-4)


def test_warmup_signals_refuses_a_method_that_does_not_split(capsys):
    with pytest.raises(SystemExit) as e:
        load_tool("warmup_signals").main(["--method", "vanilla"])
    assert e.value.code == 2 and "--method: one that splits" in capsys.readouterr().err


def test_fullset_margin_is_the_smaller_direction_over_the_whole_set():
    tool = load_tool("warmup_signals")
    rng = np.random.default_rng(0)
    sim = torch.from_numpy(rng.normal(size=(4, 7)))
    caption_to_image = np.array([0, 0, 1, 2, 3, 3, 1])  # two captions per image, one noisy pair included
    got = tool.fullset_margin(sim, caption_to_image)
    s = sim.numpy()
    for k, i in enumerate(caption_to_image):
        best_image = max(s[j, k] for j in range(4) if j != i)
        best_caption = max(s[i, c] for c in range(7) if caption_to_image[c] != i)
        assert got[k] == pytest.approx(min(s[i, k] - best_image, s[i, k] - best_caption), abs=1e-12)


def test_warmup_signals_whole_run_scores_every_epoch_and_keeps_the_margins(tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    tool = load_tool("warmup_signals")
    out = tmp_path / "run"
    assert tool.main(["--method", "ncr", "--noise", "0.4", "--whole-run", "--out", str(out), *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warmup", "train", "train", "train"]  # the run's own schedule
    extra = [line for line in lines if line.startswith("  clean side of the fit")]
    assert len(extra) == len(records)
    saved = np.load(out / "warmup_losses.npz")
    assert saved["margins"].shape == (4, 2, len(saved["clean"]))
    printed = [float(x) for x in extra[-1].split("full-set margin A ")[1].split(" B ")]
    assert printed == pytest.approx([roc_auc_score(saved["clean"], m) for m in saved["margins"][-1]], abs=5e-4)
    assert saved["structure"].shape == (4, 2, 2, len(saved["clean"]))  # epochs, models, (all pairs, core)
    assert saved["raw_structure"].shape == (len(saved["clean"]),)
    said = [line for line in lines if line.startswith("  AUC of the structure consistency over all pairs")]
    assert len(said) == len(records)
    printed = [float(x) for x in said[-1].split("over all pairs A ")[1].split(",")[0].split(" B ")]
    assert printed == pytest.approx([roc_auc_score(saved["clean"], m[0]) for m in saved["structure"][-1]], abs=5e-4)


@pytest.mark.parametrize("anchors", [None, np.array([1, 3, 4, 6])])
def test_structure_consistency_correlates_each_pairs_neighbours_over_the_other_anchors(anchors):
    tool = load_tool("warmup_signals")
    rng = np.random.default_rng(1)
    img = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(7, 3))), dim=1)
    cap = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(7, 5))), dim=1)
    got = tool.structure_consistency(img, cap, anchors)
    index = range(7) if anchors is None else anchors
    for k in range(7):
        others = [a for a in index if a != k]
        a = [float(img[k] @ img[j]) for j in others]
        b = [float(cap[k] @ cap[j]) for j in others]
        assert got[k] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)


def test_matched_pairs_share_their_neighbours_in_the_input_features():
    """raw_features: a pair whose image and caption were drawn from one latent agrees with itself;
    shuffled captions do not."""
    from fastncl.data.split import Split
    from sklearn.metrics import roc_auc_score

    tool = load_tool("warmup_signals")
    rng = np.random.default_rng(2)
    n = 60
    topic = rng.integers(0, 6, size=n)
    images = (np.eye(6)[topic][:, None, :] * 3 + rng.normal(size=(n, 4, 6))).astype(np.float32)
    tokens = np.zeros((n, 5), dtype=np.int64)
    tokens[:, :4] = 1 + topic[:, None] * 6 + rng.integers(0, 6, size=(n, 4))
    split = Split(images, tokens, np.full(n, 4), captions_per_image=1)
    caption_to_image = np.arange(n)
    caption_to_image[:20] = rng.permutation(20)
    clean = caption_to_image == np.arange(n)
    score = tool.structure_consistency(*tool.raw_features(split, caption_to_image))
    assert score.shape == (n,) and np.isfinite(score).all()
    assert roc_auc_score(clean, score) > 0.8
