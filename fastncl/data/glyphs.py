"""The glyphs set: one fine-grained caption per image, like CC152K's web pairs, built offline.

Every character of the DejaVu Sans font that matplotlib ships which Unicode names and which
prints (no marks, controls, spaces or unassigned points) is rendered black on white, centred,
at 44 pt on 72x72 pixels, and captioned with its Unicode name in lower case: "latin small
letter a with acute", "latin small letter a with grave", "cyrillic capital letter zhe with
descender", "black spade suit", "braille pattern dots-2". Near-identical images differ by one
small mark and their captions by one word, the fine-grained case. Characters that render to
the same pixels (hyphen-minus and hyphen, Latin A and Greek Alpha, ...) keep the lowest code
point only, so that no test caption has two right answers.

The images are embedded with the ``patches`` encoder; dev and test images (500 each) are drawn
by image id (the code point, ``U+00E1``) by ``fastncl data embed``. Fonts: DejaVu (Bitstream
Vera licence, with matplotlib's copy of it); names: the Unicode Character Database (Unicode
licence), through Python's ``unicodedata``.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from fastncl import FastnclError

from .builtin import embed_rendered, limited_sizes, packages

CREDIT = "DejaVu Sans glyphs, Bitstream Vera licence; Unicode character names"  # the line `fastncl data` ends with
# 2: the patches descriptor's version 2 (the same bits on every CPU; 1 followed numpy's SIMD routines)
VERSION = 2
SIZE, POINTS = 72, 44
FONT = "DejaVuSans.ttf"
SPLIT_IMAGES = {"dev": 500, "test": 500}
NOT_PRINTED = {"Mn", "Me", "Mc", "Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}
INSTALL_HINT = "pip install 'fastncl[report]' (matplotlib, which ships the DejaVu fonts, and pillow)"
ATTRIBUTION = """\
Glyph images rendered from DejaVu Sans (https://dejavu-fonts.github.io/), as shipped by
matplotlib {matplotlib}: Bitstream Vera Fonts copyright, with DejaVu changes in the public domain;
see LICENSE_DEJAVU in matplotlib's mpl-data/fonts/ttf folder.
Captions: character names of the Unicode Character Database {unicode} (Unicode License v3),
read through Python's unicodedata.
"""


def require():
    """Its packages, or a one-line FastnclError naming the extra to install."""
    return packages("glyphs", INSTALL_HINT, "matplotlib", "fontTools.ttLib", "PIL.ImageFont")[0]


def glyphs() -> list[tuple[str, object, list[str], None]]:
    """(image id, image, [caption], None) per distinct printable named character, in code point order."""
    matplotlib = require()
    from fontTools.ttLib import TTFont
    from PIL import Image, ImageDraw, ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONT
    if not path.exists():
        raise FastnclError(f"{path}: matplotlib ships no {FONT}")
    font = ImageFont.truetype(str(path), POINTS)
    seen, out = set(), []
    for code in sorted(TTFont(str(path)).getBestCmap()):
        ch = chr(code)
        name = unicodedata.name(ch, "")
        if code <= 0x20 or not name or unicodedata.category(ch) in NOT_PRINTED:
            continue
        im = Image.new("L", (SIZE, SIZE), 255)
        ImageDraw.Draw(im).text((SIZE / 2, SIZE / 2), ch, font=font, fill=0, anchor="mm")
        pixels = im.tobytes()
        if im.getextrema()[0] == 255 or pixels in seen:  # no ink, or the pixels of a lower code point
            continue
        seen.add(pixels)
        out.append((f"U+{code:04X}", im, [name.lower()], None))
    return out


def build(out_dir: str | Path, limit: int | None = None) -> Path:
    """Build the glyphs set into ``out_dir`` (which must not hold files)."""
    from .embed import _check_out
    from .encoders import package_version

    out = Path(out_dir)
    _check_out(out)
    records = glyphs()
    sizes = limited_sizes(limit, len(records), **SPLIT_IMAGES)
    if limit is not None and limit < len(records):  # a small build (tests): every k-th glyph
        records = records[:: len(records) // limit][:limit]
    versions = {"matplotlib": package_version("matplotlib"), "unicode": unicodedata.unidata_version}
    return embed_rendered(out, records, version=VERSION, name="glyphs", packages=versions, splits=sizes,
                          extra_files={"ATTRIBUTION.txt": ATTRIBUTION.format(**versions), "README.md": _readme(len(records))})


def _readme(n: int) -> str:
    return f"""# fastncl glyphs retrieval set (v{VERSION})

Built by `fastncl data glyphs` in the SCAN/NCR precomputed layout: {n} images (500 dev and 500
test drawn by image id, the rest training), one caption per image, 36 region vectors of
dimension 65 per image (the `patches` encoder of `fastncl data embed`).

* Images: the printable named characters of DejaVu Sans (as shipped by matplotlib), black on
  white, {POINTS} pt on {SIZE}x{SIZE}; characters rendering to the same pixels keep the lowest code point.
* Captions: the Unicode character name in lower case: one fine-grained caption per image.
* Licences: see ATTRIBUTION.txt.
"""
