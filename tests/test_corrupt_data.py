"""Random corruptions of a small valid data folder (truncated or byte-flipped .npy files, NaN rows,
shuffled or out-of-range vocabularies, dropped or blank caption lines) end in a clean one-line
error (exit status 2, no traceback, no run folder) or a normal run, never anything else."""
from __future__ import annotations

import json

import numpy as np
import pytest
from precomp_folder import make_scan

from fastncl.cli import main

TINY = ["model.embed_dim=8", "model.word_dim=4", "optim.batch_size=10", "optim.warmup_epochs=1", "optim.epochs=0",
        "runtime.progress=false", "runtime.threads=1", "runtime.device=cpu"]


def truncate_npy(folder, rng):
    path = folder / str(rng.choice(["train_ims.npy", "dev_ims.npy", "test_ims.npy"]))
    data = path.read_bytes()
    path.write_bytes(data[: int(rng.integers(0, len(data)))])


def flip_header_byte(folder, rng):
    path = folder / str(rng.choice(["train_ims.npy", "dev_ims.npy", "test_ims.npy"]))
    data = bytearray(path.read_bytes())
    i = int(rng.integers(0, 128))
    data[i] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(data))


def nan_row(folder, rng):
    path = folder / "train_ims.npy"
    images = np.load(path)
    images[int(rng.integers(0, len(images)))] = np.nan
    np.save(path, images)


def shuffle_vocab(folder, rng):
    vocab = json.loads((folder / "vocab.json").read_text())
    words = list(vocab["word2idx"])
    indices = rng.permutation(len(words)).tolist()
    vocab["word2idx"] = dict(zip(words, indices))
    (folder / "vocab.json").write_text(json.dumps(vocab))


def shuffle_vocab_keeping_pad(folder, rng):
    """Still a valid vocabulary: the run must train normally."""
    vocab = json.loads((folder / "vocab.json").read_text())
    words = [w for w in vocab["word2idx"] if w != "<pad>"]
    vocab["word2idx"] = {"<pad>": 0, **dict(zip(words, (rng.permutation(len(words)) + 1).tolist()))}
    (folder / "vocab.json").write_text(json.dumps(vocab))


def vocab_out_of_range(folder, rng):
    vocab = json.loads((folder / "vocab.json").read_text())
    word = str(rng.choice(list(vocab["word2idx"])))
    vocab["word2idx"][word] = int(rng.choice([-3, 10**10, len(vocab["word2idx"]) + 5]))
    (folder / "vocab.json").write_text(json.dumps(vocab))


def drop_caption_line(folder, rng):
    path = folder / str(rng.choice(["train_caps.txt", "dev_caps.txt", "test_caps.txt"]))
    lines = path.read_text().splitlines()
    del lines[int(rng.integers(0, len(lines)))]
    path.write_text("\n".join(lines) + "\n")


def blank_caption_line(folder, rng):
    path = folder / "train_caps.txt"
    lines = path.read_text().splitlines()
    lines[int(rng.integers(0, len(lines)))] = ""
    path.write_text("\n".join(lines) + "\n")


CORRUPTIONS = [truncate_npy, flip_header_byte, nan_row, shuffle_vocab, shuffle_vocab_keeping_pad, vocab_out_of_range,
               drop_caption_line, blank_caption_line]


@pytest.mark.parametrize("case", range(48))
def test_a_corrupted_folder_gives_a_clean_error_or_a_normal_run(tmp_path, capsys, case):
    rng = np.random.default_rng(case)
    folder = make_scan(tmp_path / "data", images={"train": 10, "dev": 4, "test": 4})
    corruption = CORRUPTIONS[case % len(CORRUPTIONS)]
    corruption(folder, rng)
    out = tmp_path / "run"
    code = main(["train", "--method", "vanilla", "--data", str(folder), "--out", str(out), *TINY])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, corruption.__name__
    if corruption is shuffle_vocab_keeping_pad:
        assert code == 0, captured.err
    if code == 0:  # the corruption left a valid folder
        assert (out / "results.json").exists()
    else:
        assert code == 2, f"{corruption.__name__}: exit status {code}: {captured.err}"
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastncl: error: "), (corruption.__name__, captured.err)
        assert not out.exists(), f"{corruption.__name__}: a run folder was left"
