"""`fastncl data embed SRC OUT`: images with captions -> a training folder, offline.

Inputs are drawn here (tests/embed_inputs.py): a few dozen small PNG (RGB, RGBA) and JPEG
images, written as a CSV, a TSV, a JSONL table and webdataset tar shards, and tiny random image
encoders (torch.jit, torch.export, a transformers CLIP folder). What is checked: row order,
captions and manifest against the inputs and the encoder itself; splits; captions per image;
the same bytes from one process and from two under torchrun; a killed run resumes to the same
bytes; bad input is one line on stderr with exit status 2 and leaves nothing behind; every
method trains on the result; the hf encoder's image and token vectors; float16's range.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from embed_inputs import (
    array,
    caption,
    captions_of,
    draw_folder,
    encoded,
    load_module,
    rows_of,
    save_export,
    save_hf,
    save_torchscript,
    table_rows,
    write_jsonl,
    write_shards,
    write_table,
)
from helpers import one_thread  # noqa: F401 (an autouse fixture)

from fastncl.cli import main
from fastncl.data import encoders, sources

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")  # the traced test encoders

SPLITS = ("train", "dev", "test")
N = 40  # images of the shared inputs: splits of 32 / 4 / 4 by default
SIZE = 16  # the torchscript encoders' input size
TIMEOUT = 300  # seconds for a subprocess: a hang fails the test instead of the CI job


# -- helpers ------------------------------------------------------------------------------------
def embed(src, out, *args) -> int:
    return main(["data", "embed", str(src), str(out), *args])


def partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def assert_user_error(code, capsys, *mentions, out: Path | None = None, started: bool = False) -> str:
    """Exit status 2, one line on stderr starting 'fastncl: error:', no traceback; with ``out``:
    neither OUT nor OUT.partial exists. ``started``: an error met while embedding, after the one
    line that says what is being embedded (and whether it resumes)."""
    captured = capsys.readouterr()
    assert code == 2, f"exit status {code}; stderr:\n{captured.err}"
    lines = captured.err.strip().splitlines()
    if started:
        assert lines and lines[0].startswith("fastncl: embedding "), captured.err
        lines = lines[1:]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{captured.err}"
    assert lines[0].startswith("fastncl: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for m in mentions:
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    if out is not None:
        assert not out.exists(), f"{out} was created"
        assert not partial(out).exists(), f"{partial(out)} was left behind"
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_folder(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"


def pixels(data: bytes, size: int, mean=encoders.CLIP_MEAN, std=encoders.CLIP_STD) -> np.ndarray:
    with encoders.pil_image().open(io.BytesIO(data)) as im:
        return encoders.clip_pixels(im, size, mean, std)


def model_vectors(model, datas: list[bytes], size: int = SIZE) -> np.ndarray:
    """The encoder run here on each image alone: (N, D)."""
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(pixels(d, size)[None])).float().numpy() for d in datas])


def id_order(ids) -> list[str]:
    """The documented draw: images ordered by the SHA-256 of their id (test first, then dev)."""
    return sorted(ids, key=lambda s: hashlib.sha256(s.encode("utf-8")).digest())


def check_manifest(out: Path, counts: dict, k: int, kind: str, checkpoint: Path | None) -> dict:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["images"] == counts
    assert manifest["captions_per_image"] == k
    assert manifest["encoder"]["kind"] == kind
    if checkpoint is not None:
        assert manifest["encoder"]["checkpoint_sha256"] == sha256(checkpoint)
    listed = manifest["sha256"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    for name, digest in listed.items():
        assert sha256(out / name) == digest, name
    skipped = out / "skipped.txt"
    assert manifest["skipped"] == (len(skipped.read_text().splitlines()) if skipped.exists() else 0)
    shape = array(out, "train").shape
    assert (manifest["regions"], manifest["feature_dim"]) == shape[1:]
    for s in SPLITS:
        assert array(out, s).dtype == np.dtype(manifest["dtype"])
    return manifest


def check_rows(out: Path, images, k: int, order: list[str]) -> dict[str, list[str]]:
    """Each split's rows: in ``order`` (the source's), each image's first k captions, disjoint
    splits covering exactly the images of ``images``; returns the ids per split."""
    by_id = {im.image_id: im for im in images}
    ids = {}
    for s in SPLITS:
        rows = rows_of(out, s)
        ids[s] = [i for i, _ in rows]
        assert [where for _, where in rows] == [by_id[i].path for i in ids[s]]
        position = [order.index(i) for i in ids[s]]
        assert position == sorted(position), f"{s}: rows not in the source's order"
        want = [" ".join(c.split()) for i in ids[s] for c in by_id[i].captions[:k]]  # one line, single spaces
        assert captions_of(out, s) == want, s  # K per image, caption j of image j // K
        assert len(array(out, s)) == len(ids[s])
    every = [i for s in SPLITS for i in ids[s]]
    assert len(every) == len(set(every)), "an image in two splits"
    assert set(every) == set(by_id)
    return ids


def check_vectors(out: Path, model, data_of: dict, size: int = SIZE, rtol: float = 1e-5) -> None:
    """Row i's vector is the encoder's vector of the image the map file names for row i."""
    for s in SPLITS:
        want = model_vectors(model, [data_of[i] for i, _ in rows_of(out, s)], size)
        got = array(out, s)[:, 0].astype(np.float32)
        np.testing.assert_allclose(got, want.astype(array(out, s).dtype).astype(np.float32), rtol=rtol, atol=rtol)


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


# -- shared inputs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """N images with two captions each in a CSV table (rows shuffled, captions interleaved), and the
    torchscript encoder."""
    root = tmp_path_factory.mktemp("inputs")
    images = draw_folder(root, N, 2)
    shuffled = images[:]
    random.Random(0).shuffle(shuffled)
    table = write_table(root / "captions.csv", table_rows(shuffled))
    ckpt = save_torchscript(root / "encoder.pt", size=SIZE)
    data = {im.image_id: (root / im.path).read_bytes() for im in images}
    return {"root": root, "images": images, "table": table, "order": [im.image_id for im in shuffled],
            "ckpt": ckpt, "data": data}


TS = ["--encoder", "torchscript", "--image-size", str(SIZE)]


# -- 1. rows, captions, manifest --------------------------------------------------------------------
def test_csv_rows_captions_and_manifest(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert embed(inputs["table"], out, *TS, "--checkpoint", str(inputs["ckpt"]), "--dtype", "float32",
                 "--batch-size", "5") == 0
    err = capsys.readouterr().err
    assert "splits by image id" in err and "warning" not in err
    ids = check_rows(out, inputs["images"], 2, inputs["order"])
    manifest = check_manifest(out, {s: len(ids[s]) for s in SPLITS}, 2, "torchscript", inputs["ckpt"])
    assert {s: len(ids[s]) for s in SPLITS} == {"train": 32, "dev": 4, "test": 4}
    assert manifest["dtype"] == "float32" and manifest["regions"] == 1 and manifest["feature_dim"] == 8
    assert manifest["splits_from"] == "image id" and manifest["skipped"] == 0
    assert manifest["source"] == {"kind": "table", "file": str(inputs["table"]), "sha256": sha256(inputs["table"])}
    assert manifest["encoder"]["preprocessing"]["input_size"] == SIZE
    assert not (out / "skipped.txt").exists() and not partial(out).exists()
    # the splits as documented: by the SHA-256 of the image id, test first
    drawn = id_order([im.image_id for im in inputs["images"]])
    assert set(ids["test"]) == set(drawn[:4]) and set(ids["dev"]) == set(drawn[4:8])
    check_vectors(out, load_module(inputs["ckpt"]), inputs["data"])
    # the vocabulary: the training and dev captions' words, not the test images' own
    vocab = json.loads((out / "vocab.json").read_text())["word2idx"]
    picture = {s: {w for c in captions_of(out, s) for w in c.split() if w.startswith("picture")} for s in SPLITS}
    assert picture["train"] | picture["dev"] <= set(vocab) and not picture["test"] & set(vocab)


def test_default_dtype_is_float16_and_export_files_load(inputs, tmp_path):
    """float16 by default for a torch encoder; a torch.export file gives the traced module's vectors."""
    exported = save_export(tmp_path / "encoder.pt2", size=SIZE)
    out = tmp_path / "out"
    assert embed(inputs["table"], out, *TS, "--checkpoint", str(exported), "--batch-size", "6") == 0
    manifest = check_manifest(out, {"train": 32, "dev": 4, "test": 4}, 2, "torchscript", exported)
    assert manifest["dtype"] == "float16"
    check_vectors(out, load_module(inputs["ckpt"]), inputs["data"], rtol=2e-3)


# -- 2. splits -----------------------------------------------------------------------------------
def test_split_column_and_image_ids_of_a_tsv(tmp_path, capsys):
    """A split column gives the splits; captions gather by the id column; several rows per id."""
    splits = {i: ("test" if i % 5 == 0 else "dev" if i % 5 == 1 else "train") for i in range(25)}
    images = draw_folder(tmp_path, 25, 3, ids=True, splits=splits)
    shuffled = images[::-1]
    table = write_table(tmp_path / "caps.tsv", table_rows(shuffled), ids=True, split=True)
    ckpt = save_torchscript(tmp_path / "enc.pt", size=SIZE)
    out = tmp_path / "out"
    assert embed(table, out, *TS, "--checkpoint", str(ckpt), "--batch-size", "4") == 0
    ids = check_rows(out, images, 3, [im.image_id for im in shuffled])
    for s in SPLITS:
        assert set(ids[s]) == {im.image_id for im in images if im.split == s}
        assert all(i.startswith("photo-") for i in ids[s])
        # an image's captions stay in its split
        tags = {w for c in captions_of(out, s) for w in c.split() if w.startswith("picture")}
        assert tags == {f"picture{int(i[6:])}" for i in ids[s]}
    manifest = check_manifest(out, {s: len(ids[s]) for s in SPLITS}, 3, "torchscript", ckpt)
    assert manifest["splits_from"] == "column"
    check_vectors(out, load_module(ckpt), {im.image_id: (tmp_path / im.path).read_bytes() for im in images},
                  rtol=2e-3)
    # the source gives the splits: the options that draw them are refused
    capsys.readouterr()
    out2 = tmp_path / "out2"
    assert_user_error(embed(table, out2, *TS, "--checkpoint", str(ckpt), "--dev-images", "3"), capsys,
                      "--dev-images", "split column", out=out2)


def test_drawn_splits_are_sized_and_do_not_depend_on_row_order(inputs, tmp_path, capsys):
    images = inputs["images"]
    again = images[:]
    random.Random(1).shuffle(again)
    other = write_table(inputs["root"] / "shuffled.csv", table_rows(again, interleave=False))
    got = {}
    for name, table, order in (("a", inputs["table"], inputs["order"]), ("b", other, [im.image_id for im in again])):
        out = tmp_path / name
        assert embed(table, out, *TS, "--checkpoint", str(inputs["ckpt"]), "--dev-images", "3", "--test-images",
                     "5", "--batch-size", "16") == 0
        got[name] = check_rows(out, images, 2, order)
    assert [len(got["a"][s]) for s in SPLITS] == [32, 3, 5]
    for s in SPLITS:
        assert set(got["a"][s]) == set(got["b"][s]), s
    assert got["a"]["train"] != got["b"]["train"]  # the rows follow each table's own order
    drawn = id_order([im.image_id for im in images])
    assert set(got["a"]["test"]) == set(drawn[:5]) and set(got["a"]["dev"]) == set(drawn[5:8])
    capsys.readouterr()
    out = tmp_path / "c"
    assert_user_error(embed(inputs["table"], out, *TS, "--checkpoint", str(inputs["ckpt"]), "--dev-images", "20",
                            "--test-images", "20"), capsys, "--dev-images 20", "--test-images 20", out=out)


# -- 3. captions per image ------------------------------------------------------------------------
def _counts(i: int) -> int:
    return 4 if i % 5 == 0 else 1 if i % 7 == 0 else 3


def test_jsonl_lists_and_captions_per_image(inputs, tmp_path, capsys):
    """JSONL rows with lists of captions: K is the most common count (3); images with fewer are
    skipped and listed, extras dropped; --captions-per-image 1 keeps every image."""
    images = draw_folder(tmp_path, 36, _counts)
    table = write_jsonl(tmp_path / "caps.jsonl", images)
    ckpt = inputs["ckpt"]
    out = tmp_path / "three"
    assert embed(table, out, *TS, "--checkpoint", str(ckpt), "--batch-size", "8") == 0
    err = capsys.readouterr().err
    few = [im for im in images if len(im.captions) < 3]
    assert len(few) == 4 and "4 images have fewer than 3 captions" in err
    assert "captions beyond the first 3" in err
    kept = [im for im in images if len(im.captions) >= 3]
    ids = check_rows(out, kept, 3, [im.image_id for im in kept])
    manifest = check_manifest(out, {s: len(ids[s]) for s in SPLITS}, 3, "torchscript", ckpt)
    assert manifest["skipped"] == 4
    skipped = [line.split("\t") for line in (out / "skipped.txt").read_text().splitlines()]
    assert skipped == [[str(tmp_path / im.path), "1 captions, fewer than 3"] for im in few]
    for s in SPLITS:  # the fourth captions are left out
        assert not any(c.endswith("caption3") for c in captions_of(out, s))

    one = tmp_path / "one"
    assert embed(table, one, *TS, "--checkpoint", str(ckpt), "--captions-per-image", "1") == 0
    ids = check_rows(one, images, 1, [im.image_id for im in images])
    check_manifest(one, {s: len(ids[s]) for s in SPLITS}, 1, "torchscript", ckpt)
    assert not (one / "skipped.txt").exists()
    check_vectors(one, load_module(ckpt), {im.image_id: (tmp_path / im.path).read_bytes() for im in images},
                  rtol=2e-3)

    four = tmp_path / "four"  # K chosen: only the images with 4 captions are kept
    assert embed(table, four, *TS, "--checkpoint", str(ckpt), "--captions-per-image", "4", "--dev-images", "1",
                 "--test-images", "1") == 0
    ids = check_rows(four, [im for im in images if len(im.captions) >= 4], 4, [im.image_id for im in images])
    assert sum(len(ids[s]) for s in SPLITS) == 8
    assert len((four / "skipped.txt").read_text().splitlines()) == 36 - 8

    capsys.readouterr()
    none = tmp_path / "none"
    assert_user_error(embed(table, none, *TS, "--checkpoint", str(ckpt), "--captions-per-image", "5"), capsys,
                      "--captions-per-image 5", out=none)


# -- webdataset shards ----------------------------------------------------------------------------
def test_webdataset_shards(inputs, tmp_path, capsys):
    """KEY.png + KEY.txt and KEY.jpg + KEY.json samples in two shards: ids from the json (else the
    key), captions from either, images read from the shards by offset."""
    images = draw_folder(tmp_path / "drawn", 24, 2, ids=True)
    shards = write_shards(tmp_path / "shards", images, orphan=True)
    ckpt = inputs["ckpt"]
    out = tmp_path / "out"
    assert embed(tmp_path / "shards", out, *TS, "--checkpoint", str(ckpt), "--batch-size", "5") == 0
    skipped = [line.split("\t") for line in (out / "skipped.txt").read_text().splitlines()]
    assert skipped == [[f"{shards[0]}:orphan", "no image (.jpg, .jpeg, .png, .webp)"]]
    order = [im.image_id for im in images if im.index % 2 == 0] + [im.image_id for im in images if im.index % 2]
    ids = check_rows(out, images, 2, order)
    assert {i for s in SPLITS for i in ids[s]} >= {"sample000", "photo-001"}
    manifest = check_manifest(out, {s: len(ids[s]) for s in SPLITS}, 2, "torchscript", ckpt)
    assert manifest["source"]["kind"] == "webdataset"
    assert [s["file"] for s in manifest["source"]["shards"]] == [str(p) for p in shards]
    check_vectors(out, load_module(ckpt), {im.image_id: encoded(im.index)[1] for im in images}, rtol=2e-3)

    # the json's split: a shard where every sample has one gives the splits
    splits = {i: ("test" if i % 6 == 1 else "dev" if i % 6 == 3 else "train") for i in range(24)}
    for im in images:
        im.split = splits[im.index]
    write_shards(tmp_path / "split", images, json_split=True)
    out2 = tmp_path / "out2"
    assert embed(tmp_path / "split" / "shard-001.tar", out2, *TS, "--checkpoint", str(ckpt)) == 0
    odd = [im for im in images if im.index % 2]
    ids = check_rows(out2, odd, 2, [im.image_id for im in odd])
    for s in SPLITS:
        assert set(ids[s]) == {im.image_id for im in odd if im.split == s}
    assert json.loads((out2 / "manifest.json").read_text())["splits_from"] == "column"
    # some samples with a split and some without: one line naming the first without
    capsys.readouterr()
    out3 = tmp_path / "out3"
    assert_user_error(embed(tmp_path / "split", out3, *TS, "--checkpoint", str(ckpt)), capsys,
                      "shard-000.tar:sample000", "has no split", out=out3)


# -- 4. one process or two -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["torchscript", "patches"])
def test_two_processes_write_the_same_bytes(inputs, tmp_path, encoder):
    """torchrun --nproc_per_node=2 (gloo) against one process: every file byte for byte. Batches
    of 7: 5 training batches (the last of 4), one dev and one test batch, shared unevenly."""
    args = (["--encoder", "patches"] if encoder == "patches" else
            [*TS, "--checkpoint", str(inputs["ckpt"])]) + ["--batch-size", "7"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert embed(inputs["table"], one, *args) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastncl",
           "data", "embed", str(inputs["table"]), str(two), *args, "--threads", "1"]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("train with:") == 1, "rank 1 printed too"
    assert_same_folder(one, two)
    assert not partial(two).exists()
    if encoder == "patches":  # standardised with the training rows' statistics
        train = array(two, "train").reshape(-1, array(two, "train").shape[-1])
        assert np.allclose(train.mean(axis=0), 0, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["model refuses the input", "float16 overflow"])
def test_bad_input_stops_both_ranks_in_one_line(inputs, tmp_path, case):
    """Each rank as torchrun starts it: exit 2 on both, one line from rank 0 and none from rank 1,
    neither OUT nor OUT.partial. The input size is refused before embedding (when the encoder is
    probed), the float16 range while embedding (every rank's batches)."""
    if case == "model refuses the input":
        args = _fixed_size(tmp_path)
    else:
        ckpt = save_torchscript(tmp_path / "loud.pt", size=SIZE, scale=1e7)
        args = [*TS, "--checkpoint", str(ckpt), "--batch-size", "8"]
    out = tmp_path / "out"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(subprocess_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "fastncl", "data", "embed", str(inputs["table"]), str(out),
                                       *args, "--threads", "1"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    lines = [line for line in outputs[0][1].strip().splitlines() if not line.startswith("fastncl: embedding ")]
    assert len(lines) == 1 and lines[0].startswith("fastncl: error: "), outputs[0]
    assert ("--image-size 20" if case == "model refuses the input" else "--dtype float32") in lines[0]
    assert outputs[1][1].strip() == "", outputs[1]
    assert not out.exists() and not partial(out).exists()


# -- 5. resume after a kill ----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, capsys):
    images = draw_folder(tmp_path, 40, 1)
    table = write_table(tmp_path / "caps.csv", table_rows(images))
    ckpt = save_torchscript(tmp_path / "slow.pt", size=32, slow=10)  # ~50 ms an image
    args = ["--encoder", "torchscript", "--checkpoint", str(ckpt), "--image-size", "32", "--batch-size", "1",
            "--workers", "1"]
    whole = tmp_path / "whole"
    assert embed(table, whole, *args) == 0
    capsys.readouterr()

    out = tmp_path / "out"
    journal = partial(out) / "journal.0.txt"
    cmd = [sys.executable, "-m", "fastncl", "data", "embed", str(table), str(out), *args, "--threads", "1"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + TIMEOUT
        try:
            while not (journal.exists() and journal.read_text().count("\n") >= 1):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.time() < deadline
                time.sleep(0.005)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not out.exists(), "the run ended before it was killed"
    listing = sorted(p.name for p in partial(out).iterdir())
    again = tmp_path / "again"  # the same leftover, resumed by two processes below
    shutil.copytree(partial(out), partial(again))

    # other options against the leftover work folder: one line, the folder untouched
    code = embed(table, out, *args[:-4], "--batch-size", "2")
    assert_user_error(code, capsys, str(partial(out)), "other inputs or options")
    assert sorted(p.name for p in partial(out).iterdir()) == listing and not out.exists()

    assert embed(table, out, *args) == 0
    err = capsys.readouterr().err
    found = re.search(r"resuming, (\d+) of (\d+) batches done", err)
    assert found, err
    assert 1 <= int(found.group(1)) < int(found.group(2)) == 40
    assert_same_folder(whole, out)
    assert not partial(out).exists()

    # resumed by two processes (torchrun): the same batches done, the same bytes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastncl",
           "data", "embed", str(table), str(again), *args, "--threads", "1"]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming, {found.group(1)} of 40 batches done" in done.stderr
    assert_same_folder(whole, again)
    assert not partial(again).exists()


# -- 6. bad input: one line, nothing written ------------------------------------------------------------
def _garbage(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 8)
    return ["--encoder", "torchscript", "--checkpoint", str(path)]


def _fixed_size(tmp_path):
    """A model that takes 16x16 inputs only, given --image-size 20."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).eval()
    path = tmp_path / "fixed.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 16, 16)), str(path))
    return ["--encoder", "torchscript", "--checkpoint", str(path), "--image-size", "20"]


@pytest.mark.parametrize("case", ["no caption column", "garbage checkpoint", "no checkpoint", "checkpoint elsewhere",
                                  "model refuses the input", "open_clip not installed", "no such source",
                                  "one id, two images", "tokens from an image model", "std not positive",
                                  "batch size 0", "missing image file", "an unquoted comma", "image size 0",
                                  "no such device", "cuda without cuda"])
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, capsys, monkeypatch, case):
    src, args, mentions = inputs["table"], [*TS, "--checkpoint", str(inputs["ckpt"])], []
    if case == "no caption column":
        src = tmp_path / "caps.csv"
        src.write_text("image,description\nimages/im000.png,a dog\n")
        mentions = [str(src), "no caption column", "the header has: image, description"]
    elif case == "garbage checkpoint":
        args = _garbage(tmp_path)
        mentions = ["garbage.pt", "not a TorchScript or torch.export file"]
    elif case == "no checkpoint":
        args = ["--encoder", "torchscript"]
        mentions = ["--checkpoint"]
    elif case == "checkpoint elsewhere":
        args = ["--encoder", "torchscript", "--checkpoint", str(tmp_path / "nowhere.pt")]
        mentions = ["nowhere.pt", "does not exist"]
    elif case == "model refuses the input":
        args = _fixed_size(tmp_path)
        mentions = ["fixed.pt", "shapes cannot be multiplied", "--image-size 20"]
    elif case == "open_clip not installed":
        monkeypatch.setitem(sys.modules, "open_clip", None)  # import raises ImportError
        args = ["--encoder", "open_clip", "--arch", "ViT-B-32", "--checkpoint", str(inputs["ckpt"])]
        mentions = ["--encoder open_clip needs open_clip_torch", "pip install"]
    elif case == "no such source":
        src = tmp_path / "nothing.csv"
        mentions = ["nothing.csv", "does not exist"]
    elif case == "one id, two images":
        src = tmp_path / "caps.csv"
        src.write_text(f"image,caption,id\n{inputs['root']}/images/im000.png,a cat,x\n"
                       f"{inputs['root']}/images/im001.jpg,a dog,x\n")
        mentions = [f"{src}:3", "image id 'x'"]
    elif case == "tokens from an image model":
        args += ["--granularity", "tokens"]
        mentions = ["encoder.pt", "--granularity image"]
    elif case == "std not positive":
        args += ["--std", "0.2,0,0.3"]
        mentions = ["--mean/--std", "std > 0"]
    elif case == "batch size 0":
        args += ["--batch-size", "0"]
        mentions = ["--batch-size 0"]
    elif case == "missing image file":
        src = tmp_path / "caps.csv"
        images = draw_folder(tmp_path, 12, 1)
        (tmp_path / images[5].path).unlink()
        write_table(src, table_rows(images))
        args += ["--on-bad-image", "error", "--dev-images", "2", "--test-images", "2"]
        mentions = [str(tmp_path / images[5].path), "no such image file", "1 missing"]
    elif case == "an unquoted comma":  # the caption would be cut at the comma
        src = tmp_path / "caps.csv"
        src.write_text(f"image,caption\n{inputs['root']}/images/im000.png,a dog, running fast\n")
        mentions = [f"{src}:2", "3 fields, the header has 2", "quote a caption"]
    elif case == "image size 0":
        args += ["--image-size", "0"]
        mentions = ["--image-size 0", "at least 1"]
    elif case == "no such device":
        args += ["--device", "foo"]
        mentions = ["--device foo", "not a device"]
    elif case == "cuda without cuda":
        if __import__("torch").cuda.is_available():
            pytest.skip("this machine has a CUDA device")
        args += ["--device", "cuda"]
        mentions = ["--device cuda", "no CUDA device"]
    out = tmp_path / "out"
    assert_user_error(embed(src, out, *args), capsys, *mentions, out=out)


def test_columns_named_by_option(inputs, tmp_path, capsys):
    """Columns the aliases do not find are named with --image-column, --caption-column, --id-column
    and --split-column; a named column the header lacks is one line listing the header."""
    images = draw_folder(tmp_path, 20, 2, ids=True, splits={i: SPLITS[max(0, i % 6 - 3)] for i in range(20)})
    with open(tmp_path / "caps.csv", "w", encoding="utf-8") as f:
        f.write("picture,description,key,part\n")
        f.writelines(f"{im.path},{c},{im.image_id},{im.split}\n" for im, c in table_rows(images))
    out = tmp_path / "out"
    named = ["--image-column", "picture", "--caption-column", "description", "--id-column", "key", "--split-column",
             "part"]
    assert embed(tmp_path / "caps.csv", out, *TS, "--checkpoint", str(inputs["ckpt"]), *named) == 0
    ids = check_rows(out, images, 2, [im.image_id for im in images])
    for s in SPLITS:
        assert set(ids[s]) == {im.image_id for im in images if im.split == s}
    capsys.readouterr()
    out2 = tmp_path / "out2"
    assert_user_error(embed(tmp_path / "caps.csv", out2, *TS, "--checkpoint", str(inputs["ckpt"]), *named[:2],
                            "--caption-column", "text"), capsys, "caps.csv", "no column 'text'",
                      "the header has: picture, description, key, part", out=out2)


def test_clip_preprocessing():
    """CLIP's preprocessing: transparent pixels on white, the shorter side resized to the input
    size, the centre square, normalised, channels first."""
    image_mod = encoders.pil_image()
    clear = image_mod.new("RGBA", (32, 24), (200, 10, 10, 0))
    x = encoders.clip_pixels(clear, 16, encoders.CLIP_MEAN, encoders.CLIP_STD)
    white = (1.0 - np.array(encoders.CLIP_MEAN)) / np.array(encoders.CLIP_STD)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x, np.broadcast_to(white[:, None, None], x.shape), rtol=1e-6)
    thirds = image_mod.new("RGB", (72, 24), (255, 0, 0))  # red | green | blue: the crop is the green third
    thirds.paste((0, 255, 0), (24, 0, 48, 24))
    thirds.paste((0, 0, 255), (48, 0, 72, 24))
    x = encoders.clip_pixels(thirds, 8, (0, 0, 0), (1, 1, 1))
    np.testing.assert_allclose(x[:, :, 2:6], np.broadcast_to(np.array([0, 1, 0])[:, None, None], (3, 8, 4)),
                               atol=0.02)


def test_output_folder_that_is_not_empty(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(embed(inputs["table"], out, *TS, "--checkpoint", str(inputs["ckpt"])), capsys,
                      str(out), "exists and is not an empty folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not partial(out).exists()
    (out / "keep.txt").unlink()  # an empty folder is fine
    assert embed(inputs["table"], out, *TS, "--checkpoint", str(inputs["ckpt"])) == 0
    assert (out / "manifest.json").exists()


def test_missing_image_files_are_skipped_and_listed(inputs, tmp_path, capsys):
    images = draw_folder(tmp_path, 30, 2)
    gone = [images[3], images[17]]
    for im in gone:
        (tmp_path / im.path).unlink()
    table = write_table(tmp_path / "caps.csv", table_rows(images))
    out = tmp_path / "out"
    assert embed(table, out, *TS, "--checkpoint", str(inputs["ckpt"]), "--dtype", "float32") == 0
    assert "2 images or captions skipped" in capsys.readouterr().err
    kept = [im for im in images if im not in gone]
    ids = check_rows(out, kept, 2, [im.image_id for im in kept])
    check_manifest(out, {s: len(ids[s]) for s in SPLITS}, 2, "torchscript", inputs["ckpt"])
    skipped = [line.split("\t") for line in (out / "skipped.txt").read_text().splitlines()]
    assert skipped == [[str(tmp_path / im.path), "no such file"] for im in gone]


def _corrupt_inputs(tmp_path, ckpt):
    images = draw_folder(tmp_path, 30, 2)
    table = write_table(tmp_path / "caps.csv", table_rows(images))
    train_ids = set(id_order([im.image_id for im in images])[6:])  # 3 dev, 3 test below
    bad = [im for im in images if im.image_id in train_ids][7]  # in the second batch of 5
    good = (tmp_path / bad.path).read_bytes()
    (tmp_path / bad.path).write_bytes(good[:40] + b"\0garbage" * 20)  # a header, then nonsense
    args = ["--dtype", "float32", "--batch-size", "5", "--dev-images", "3", "--test-images", "3"]
    if ckpt is not None:
        args = [*TS, "--checkpoint", str(ckpt), *args]
    return images, table, bad, good, args


def test_an_undecodable_image_is_skipped_by_default(inputs, tmp_path, capsys):
    images, table, bad, _, args = _corrupt_inputs(tmp_path, inputs["ckpt"])
    out = tmp_path / "out"
    assert embed(table, out, *args) == 0
    assert "1 images or captions skipped" in capsys.readouterr().err
    kept = [im for im in images if im is not bad]
    ids = check_rows(out, kept, 2, [im.image_id for im in kept])
    assert (len(ids["train"]), len(ids["dev"]), len(ids["test"])) == (23, 3, 3)
    check_manifest(out, {"train": 23, "dev": 3, "test": 3}, 2, "torchscript", inputs["ckpt"])
    skipped = [line.split("\t") for line in (out / "skipped.txt").read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0][0] == str(tmp_path / bad.path) and skipped[0][1].startswith("cannot decode")
    assert not any(f"picture{bad.index} " in c for c in captions_of(out, "train"))
    # the rows after the dropped one are their own images' vectors
    check_vectors(out, load_module(inputs["ckpt"]), {im.image_id: (tmp_path / im.path).read_bytes() for im in kept})


def test_patches_standardise_with_the_decoded_training_rows(tmp_path):
    """The patches encoder with an undecodable training image: the rows are the kept images'
    region features, standardised with their own statistics (the skipped row plays no part)."""
    images, table, bad, _, args = _corrupt_inputs(tmp_path, None)
    out = tmp_path / "out"
    assert embed(table, out, "--encoder", "patches", *args) == 0
    kept = [im for im in images if im is not bad]
    ids = check_rows(out, kept, 2, [im.image_id for im in kept])
    check_manifest(out, {s: len(ids[s]) for s in SPLITS}, 2, "patches", None)
    by_id = {im.image_id: im for im in kept}

    def raw(s):
        return encoders.region_features(np.stack([encoders.patches_pixels(encoders.pil_image().open(
            tmp_path / by_id[i].path)) for i in ids[s]]))

    train = raw("train").reshape(-1, 65)
    mu, sd = train.mean(axis=0, dtype=np.float64), train.std(axis=0, dtype=np.float64)
    sd[sd < 1e-6] = 1.0
    for s in SPLITS:
        got = array(out, s)
        assert got.shape == (len(ids[s]), 36, 65) and got.dtype == np.float32
        np.testing.assert_allclose(got, ((raw(s) - mu) / sd).astype(np.float32), rtol=1e-5, atol=1e-5)


def test_torchscript_tokens_with_its_own_normalisation(inputs, tmp_path):
    """--granularity tokens: a (B, T, D) model's every token, rows in the map files' order, the
    pixels normalised with --mean/--std."""
    ckpt = save_torchscript(tmp_path / "tokens.pt", size=SIZE, tokens=True)
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.3, 0.4)
    out = tmp_path / "out"
    assert embed(inputs["table"], out, *TS, "--checkpoint", str(ckpt), "--granularity", "tokens", "--dtype",
                 "float32", "--batch-size", "9", "--mean", "0.5,0.25,0.75", "--std", "0.2,0.3,0.4") == 0
    manifest = check_manifest(out, {"train": 32, "dev": 4, "test": 4}, 2, "torchscript", ckpt)
    pre = manifest["encoder"]["preprocessing"]
    assert (pre["mean"], pre["std"], manifest["encoder"]["granularity"]) == (list(mean), list(std), "tokens")
    model = load_module(ckpt)
    for s in SPLITS:
        x = torch.from_numpy(np.stack([pixels(inputs["data"][i], SIZE, mean, std) for i, _ in rows_of(out, s)]))
        with torch.inference_mode():
            want = model(x).numpy()
        assert array(out, s).shape == (len(x), 1 + 16, 8)
        np.testing.assert_allclose(array(out, s), want, rtol=1e-5, atol=1e-5)


def test_an_undecodable_image_stops_an_error_mode_run_that_resumes_when_fixed(inputs, tmp_path, capsys):
    """--on-bad-image error: one line naming the image; the finished batches wait in OUT.partial
    (the message says so) and the same command, once the image is fixed, finishes the folder that
    a clean run writes."""
    images, table, bad, good, args = _corrupt_inputs(tmp_path, inputs["ckpt"])
    out = tmp_path / "out"
    code = embed(table, out, *args, "--on-bad-image", "error")
    line = assert_user_error(code, capsys, str(tmp_path / bad.path), "cannot decode", str(partial(out)),
                             started=True)
    assert "--on-bad-image skip" in line and not out.exists()
    (tmp_path / bad.path).write_bytes(good)
    assert embed(table, out, *args, "--on-bad-image", "error") == 0
    assert re.search(r"resuming, [1-9]\d* of 7 batches done", capsys.readouterr().err)
    clean = tmp_path / "clean"
    assert embed(table, clean, *args, "--on-bad-image", "error") == 0
    assert_same_folder(clean, out)
    check_rows(out, images, 2, [im.image_id for im in images])


# -- 7. training on the result ----------------------------------------------------------------------
TRAIN = ["--noise", "0.2", "--seed", "0", "runtime.threads=1", "runtime.progress=false", "runtime.device=cpu",
         "optim.epochs=1", "optim.warmup_epochs=1", "optim.batch_size=8", "model.embed_dim=16", "model.word_dim=8",
         "sps.quasi_clean_start=0", "sps.noisy_start=1", "esc.noisy_start=1", "ncr.noisy_start=1",
         "esc.train_noisy=true", "ncr.train_noisy=true"]


@pytest.fixture(scope="module")
def embedded(inputs, tmp_path_factory):
    """The shared inputs embedded twice: one vector per image (torchscript) and regions (patches)."""
    root = tmp_path_factory.mktemp("embedded")
    vectors, regions = root / "vectors", root / "regions"
    assert embed(inputs["table"], vectors, *TS, "--checkpoint", str(inputs["ckpt"]), "--granularity", "image") == 0
    assert embed(inputs["table"], regions, "--encoder", "patches") == 0
    return {"vectors": vectors, "regions": regions}


@pytest.mark.parametrize("data, method, backbone", [("vectors", m, "vse") for m in
                                                    ("vanilla", "hinge", "ncr", "sps", "esc")]
                         + [("regions", "sps", "vse"), ("regions", "ncr", "sgr")])
def test_every_method_trains_on_the_result(embedded, tmp_path, data, method, backbone):
    out = tmp_path / "run"
    extra = ["model.sim_dim=8"] if backbone == "sgr" else []
    assert main(["train", "--method", method, "--backbone", backbone, "--data", str(embedded[data]), "--out",
                 str(out), *TRAIN, *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test"]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2, epochs  # the warm-up epoch and one co-training epoch


# -- 8. the hf encoder ---------------------------------------------------------------------------------
def _transformers():
    """transformers, imported the way the hf encoder imports it (the repository root, on sys.path under
    `python -m pytest`, holds a `kernels/` folder that transformers would take for its own)."""
    with encoders._own_kernels_off_path():
        transformers = pytest.importorskip("transformers")
        with contextlib.suppress(ImportError):
            import kernels  # noqa: F401
        transformers.CLIPVisionModelWithProjection  # noqa: B018 (its lazy import, while the root is off)
    return transformers


def test_hf_image_vectors_and_tokens(inputs, tmp_path, capsys):
    transformers = _transformers()
    ckpt = save_hf(transformers, tmp_path / "clip")
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(str(ckpt)).eval()
    image, tokens = tmp_path / "image", tmp_path / "tokens"
    base = ["--encoder", "hf", "--checkpoint", str(ckpt), "--dtype", "float32", "--batch-size", "6"]
    assert embed(inputs["table"], image, *base) == 0
    assert embed(inputs["table"], tokens, *base, "--granularity", "tokens") == 0
    counts = {"train": 32, "dev": 4, "test": 4}
    manifest = check_manifest(image, counts, 2, "hf", None)
    assert manifest["encoder"]["checkpoint_sha256"] == sources.sha256_of(ckpt)
    assert manifest["encoder"]["preprocessing"]["input_size"] == 32  # the config's image_size
    assert manifest["encoder"]["preprocessing"]["mean"] == list(encoders.CLIP_MEAN)
    check_manifest(tokens, counts, 2, "hf", None)
    for s in SPLITS:
        assert rows_of(image, s) == rows_of(tokens, s)
        x = torch.from_numpy(np.stack([pixels(inputs["data"][i], 32) for i, _ in rows_of(image, s)]))
        with torch.inference_mode():
            want = model(pixel_values=x).image_embeds.numpy()
            hidden = model.vision_model(pixel_values=x).last_hidden_state
            want_tokens = model.visual_projection(model.vision_model.post_layernorm(hidden)).numpy()
        vec, tok = array(image, s), array(tokens, s)
        assert vec.shape == (len(x), 1, 16) and tok.shape == (len(x), 1 + 16, 16)
        np.testing.assert_allclose(vec[:, 0], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tok, want_tokens, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tok[:, 0], vec[:, 0], rtol=1e-5, atol=1e-6)  # CLS projected = the image vector


def test_hf_reads_its_preprocessor_config(inputs, tmp_path, capsys):
    transformers = _transformers()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    ckpt = save_hf(transformers, tmp_path / "clip", preprocessor={"image_mean": mean, "image_std": std,
                                                    "crop_size": {"height": 24, "width": 24}})
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(str(ckpt)).eval()
    base = ["--encoder", "hf", "--checkpoint", str(ckpt), "--dtype", "float32"]
    # crop_size 24 is what the preprocessing takes: this 32-pixel model refuses it, in one line
    capsys.readouterr()
    out = tmp_path / "refused"
    assert_user_error(embed(inputs["table"], out, *base), capsys, "clip", out=out)
    out = tmp_path / "out"
    assert embed(inputs["table"], out, *base, "--image-size", "32") == 0
    pre = json.loads((out / "manifest.json").read_text())["encoder"]["preprocessing"]
    assert (pre["input_size"], pre["mean"], pre["std"]) == (32, mean, std)
    rows = rows_of(out, "train")
    x = torch.from_numpy(np.stack([pixels(inputs["data"][i], 32, mean, std) for i, _ in rows]))
    with torch.inference_mode():
        want = model(pixel_values=x).image_embeds.numpy()
    np.testing.assert_allclose(array(out, "train")[:, 0], want, rtol=1e-4, atol=1e-5)


def test_hf_crop_size_without_image_size(inputs, tmp_path):
    """crop_size 32 (the model's own size) in preprocessor_config.json, given as a plain number."""
    transformers = _transformers()
    ckpt = save_hf(transformers, tmp_path / "clip", preprocessor={"crop_size": 32})
    out = tmp_path / "out"
    assert embed(inputs["table"], out, "--encoder", "hf", "--checkpoint", str(ckpt)) == 0
    pre = json.loads((out / "manifest.json").read_text())["encoder"]["preprocessing"]
    assert pre["input_size"] == 32 and pre["mean"] == list(encoders.CLIP_MEAN)


def test_hf_whole_clip_model_folder(inputs, tmp_path):
    """A whole CLIPModel folder (the usual saved checkpoint): its image features, the text tower unused."""
    transformers = _transformers()
    ckpt = save_hf(transformers, tmp_path / "clip", whole=True)
    model = transformers.CLIPModel.from_pretrained(str(ckpt)).eval()
    out = tmp_path / "out"
    assert embed(inputs["table"], out, "--encoder", "hf", "--checkpoint", str(ckpt), "--dtype", "float32") == 0
    check_manifest(out, {"train": 32, "dev": 4, "test": 4}, 2, "hf", None)
    rows = rows_of(out, "dev")
    x = torch.from_numpy(np.stack([pixels(inputs["data"][i], 32) for i, _ in rows]))
    with torch.inference_mode():
        want = model.get_image_features(pixel_values=x)
    want = (want if isinstance(want, torch.Tensor) else want.pooler_output).numpy()
    assert want.shape == (4, 16)
    np.testing.assert_allclose(array(out, "dev")[:, 0], want, rtol=1e-4, atol=1e-5)


def test_open_clip_checkpoint(inputs, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                              "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fastncl-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("fastncl-tiny").eval()
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "out"
    assert embed(inputs["table"], out, "--encoder", "open_clip", "--arch", "fastncl-tiny", "--checkpoint", str(ckpt),
                 "--dtype", "float32") == 0
    manifest = check_manifest(out, {"train": 32, "dev": 4, "test": 4}, 2, "open_clip", ckpt)
    pre = manifest["encoder"]["preprocessing"]
    rows = rows_of(out, "test")
    x = torch.from_numpy(np.stack([pixels(inputs["data"][i], 32, pre["mean"], pre["std"]) for i, _ in rows]))
    with torch.inference_mode():
        want = model.encode_image(x).numpy()
    np.testing.assert_allclose(array(out, "test")[:, 0], want, rtol=1e-4, atol=1e-5)


# -- 9. float16's range ----------------------------------------------------------------------------------
def test_vectors_beyond_float16_name_float32(inputs, tmp_path, capsys):
    ckpt = save_torchscript(tmp_path / "loud.pt", size=SIZE, scale=1e7)
    args = [*TS, "--checkpoint", str(ckpt), "--batch-size", "8"]
    out = tmp_path / "out"
    assert_user_error(embed(inputs["table"], out, *args), capsys, "float16", "--dtype float32", out=out,
                      started=True)
    assert embed(inputs["table"], out, *args, "--dtype", "float32") == 0  # as the error says: no leftover in the way
    assert np.abs(array(out, "train")).max() > 65504
    check_vectors(out, load_module(ckpt), inputs["data"])


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_a_caption_stays_one_line(tmp_path, inputs, kind):
    """Tabs and line breaks inside a caption (a quoted CSV cell spanning lines; U+2028, which is no
    line end to CSV or JSON) become single spaces between its words: one caption a line."""
    images = draw_folder(tmp_path, 20, 1)
    images[4].captions = ["a caption\twith a tab\nand a  line\r\nbreak\u2028then more"]
    images[9].captions = ['"quoted" words, and a comma']
    if kind == "jsonl":
        table = tmp_path / "caps.jsonl"
        table.write_text("".join(json.dumps({"image": im.path, "caption": im.captions[0]}, ensure_ascii=False) + "\n"
                                 for im in images), encoding="utf-8")
    else:
        table = write_table(tmp_path / f"caps.{kind}", table_rows(images))
    out = tmp_path / "out"
    assert embed(table, out, *TS, "--checkpoint", str(inputs["ckpt"]), "--dev-images", "2", "--test-images", "2") == 0
    check_rows(out, images, 1, [im.image_id for im in images])
    caps = [c for s in SPLITS for c in captions_of(out, s)]
    assert "a caption with a tab and a line break then more" in caps and '"quoted" words, and a comma' in caps
    assert len(caps) == 20 and caption(0, 0) in caps
