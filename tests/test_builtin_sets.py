"""The glyphs and icons sets: small builds, offline and deterministic, through `fastncl data embed`."""
from __future__ import annotations

import json
import sys
import unicodedata

import numpy as np
import pytest

from fastncl.cli import main
from fastncl.config import DataConfig
from fastncl.data import builtin, glyphs, icons, load_dataset
from fastncl.data.precomp import load_precomp

LIMIT = 60


@pytest.fixture(scope="module", params=["glyphs", "icons"])
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "small"
    assert main(["data", request.param, str(out), "--limit", str(LIMIT)]) == 0
    return request.param, out


def _lines(folder, name):
    return (folder / name).read_text(encoding="utf-8").splitlines()


def test_layout_counts_credits_and_the_loader(built):
    name, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == name and manifest["encoder"]["kind"] == "patches"
    assert manifest["captions_per_image"] == {"glyphs": 1, "icons": 3}[name]
    assert sum(manifest["images"].values()) == pytest.approx(LIMIT, abs=10) and min(manifest["images"].values()) >= 2
    data = load_precomp(out)
    assert data.train.images.shape[1:] == (36, 65) and data.train.captions_per_image == manifest["captions_per_image"]
    assert not (data.train.tokens == data.vocab.word2idx["<unk>"]).any()
    credit = (out / "ATTRIBUTION.txt").read_text()
    assert {"glyphs": "DejaVu", "icons": "Phosphor Icons"}[name] in credit and "licen" in credit.lower()


def test_glyph_captions_are_the_unicode_names_of_distinct_images(tmp_path):
    out = glyphs.build(tmp_path / "g", limit=LIMIT)
    seen = []
    for split in ("train", "dev", "test"):
        ids = [line.split("\t")[0] for line in _lines(out, f"{split}_images.txt")]
        caps = _lines(out, f"{split}_caps.txt")
        assert [unicodedata.name(chr(int(i[2:], 16))).lower() for i in ids] == caps
        seen += ids
    assert len(set(seen)) == len(seen)
    # characters that render to the same pixels keep only the lowest code point
    records = glyphs.glyphs()
    pixels = [im.tobytes() for _, im, _, _ in records]
    assert len(set(pixels)) == len(pixels)
    names = {caps[0] for _, _, caps, _ in records}
    assert "latin capital letter a" in names and "greek capital letter alpha" not in names  # same pixels in DejaVu
    assert {"latin small letter a with acute", "latin small letter a with grave"} <= names  # one mark apart


def test_icon_weights_share_a_split_and_differ_by_one_word(tmp_path):
    out = icons.build(tmp_path / "i", limit=LIMIT)
    where = {}
    for split in ("train", "dev", "test"):
        ids = [line.split("\t")[0] for line in _lines(out, f"{split}_images.txt")]
        caps = _lines(out, f"{split}_caps.txt")
        for i, image_id in enumerate(ids):
            icon, weight = image_id.rsplit(".", 1)
            where.setdefault(icon, set()).add(split)
            first = caps[3 * i]
            assert first.endswith({"regular": ", outline", "fill": ", filled"}[weight])
    assert all(len(splits) == 1 for splits in where.values())


def test_the_builds_are_deterministic(built, tmp_path):
    name, out = built
    again = builtin.module(name).build(tmp_path / "again", limit=LIMIT)
    assert json.loads((again / "manifest.json").read_text())["sha256"] == json.loads((out / "manifest.json").read_text())["sha256"]


@pytest.mark.parametrize("name, missing, extra", [("glyphs", "matplotlib", "fastncl[report]"),
                                                  ("icons", "py_phosphor_icons", "fastncl[icons]"),
                                                  ("icons", "resvg_py", "fastncl[icons]")])
def test_missing_packages_name_the_extra(tmp_path, capsys, monkeypatch, name, missing, extra):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    assert main(["data", name, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install '{extra}'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(builtin.SETS))
def test_data_name_builds_once_into_the_cache(tmp_path, monkeypatch, name):
    monkeypatch.setenv("FASTNCL_CACHE", str(tmp_path / "cache"))
    data_set = builtin.module(name)
    calls, real = [], data_set.build

    def small(out, limit=None):  # a full set takes 10-15 s: build a small one in its place
        calls.append(out)
        return real(out, limit=40)

    monkeypatch.setattr(data_set, "build", small)
    first = load_dataset(DataConfig(source=name))
    second = load_dataset(DataConfig(source=name))
    folder = tmp_path / "cache" / f"{name}-v{data_set.VERSION}"
    assert len(calls) == 1 and calls[0].parent.parent == folder.parent  # built beside it, then renamed
    assert (folder / "manifest.json").exists() and [p.name for p in folder.parent.iterdir()] == [folder.name]
    assert first.name == second.name == name
    assert np.array_equal(first.train.tokens, second.train.tokens)


def test_an_interrupted_build_started_again_resumes(tmp_path, monkeypatch):
    from fastncl.data import embed

    real, calls = embed.finish, []

    def killed(*args, **kwargs):  # every batch embedded, then the process dies before the folder is written
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(embed, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        glyphs.build(tmp_path / "g", limit=30)
    assert (tmp_path / "g.partial").exists() and not (tmp_path / "g").exists()
    monkeypatch.setattr(embed, "finish", real)
    out = glyphs.build(tmp_path / "g", limit=30)  # the same rows, the same fingerprint: it resumes
    assert (out / "manifest.json").exists() and not (tmp_path / "g.partial").exists()
    again = glyphs.build(tmp_path / "whole", limit=30)
    for name in ("train_ims.npy", "dev_ims.npy", "test_ims.npy", "vocab.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
