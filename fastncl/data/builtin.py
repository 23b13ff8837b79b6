"""The built-in real data sets, built offline from registry packages and cached.

Each is a module with ``VERSION`` (bump when its files change), ``INSTALL_HINT``, ``require()``
(its packages, or a one-line FastnclError naming the extra) and ``build(out_dir, limit=None)``,
which makes the images and captions and embeds them with ``fastncl data embed``'s ``patches``
encoder (``fastncl.data.embed``): one code path for every image folder.

* ``emoji``: Twemoji PNGs with their names and metadata (5 captions per image, 3,558 images);
* ``glyphs``: the named characters of the DejaVu Sans font that matplotlib ships, rendered, each
  captioned with its Unicode name (one fine-grained caption per image: "latin small letter a
  with acute" against "... with grave"; 5,133 images);
* ``icons``: Phosphor icons in two weights (outline and filled), 3 captions per image from the
  icon's name, tags and category (2,000 images of 1,000 icons).

``--data NAME`` builds a set once into ``cache_root()/NAME-vVERSION``; ``fastncl data NAME OUT``
builds it into OUT.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

SETS = {"emoji": "fastncl.data.emoji", "glyphs": "fastncl.data.glyphs", "icons": "fastncl.data.icons"}


def module(name: str):
    return importlib.import_module(SETS[name])


def packages(set_name: str, hint: str, *names: str) -> list:
    """The modules ``names`` a set's build needs, or a one-line FastnclError naming the first
    missing one and what to install (``hint``)."""
    from fastncl import optional_import

    return [optional_import(n, f"the {set_name} data needs the package {n.split('.')[0]}: {hint}") for n in names]


def cache_root() -> Path:
    """$FASTNCL_CACHE, else $XDG_CACHE_HOME/fastncl, else ~/.cache/fastncl."""
    if os.environ.get("FASTNCL_CACHE"):
        return Path(os.environ["FASTNCL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastncl"


def ensure(name: str) -> Path:
    """The cached folder of the built-in set ``name``, built on first use."""
    mod = module(name)
    folder = cache_root() / f"{name}-v{mod.VERSION}"
    if not (folder / "manifest.json").exists():
        mod.require()  # before saying anything: a missing package is a one-line error
        print(f"fastncl: building the {name} data set into {folder} (once; under a minute)", file=sys.stderr)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # built beside the cache folder under a name of its own, then renamed: concurrent builds
        # (two training runs, or the ranks of one) never share a work folder
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            mod.build(tmp / name)
            try:
                os.rename(tmp / name, folder)
            except OSError:
                if not (folder / "manifest.json").exists():  # else a concurrent build finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def embed_rendered(out: Path, records: list, *, version: int, name: str, packages: dict, extra_files: dict,
                   splits: dict | None = None, manifest_extra: dict | None = None) -> Path:
    """Embed rendered images into ``out``: ``records`` are (image id, Pillow image, captions,
    split or None); without splits, ``splits`` gives the dev and test sizes drawn by image id.
    The images are written as PNGs beside ``out`` for the embed to read, then removed."""
    from .embed import EmbedOptions, embed
    from .sources import ImageRef, Item, Source

    # a fixed folder beside OUT: the rows name these files, so that a killed build, started again,
    # has the same fingerprint and resumes (fastncl.data.embed)
    pngs = out.with_name(f".{out.name}.png")
    shutil.rmtree(pngs, ignore_errors=True)
    pngs.mkdir(parents=True)
    try:
        items = []
        for image_id, image, captions, split in records:
            path = pngs / f"{len(items):06d}.png"
            image.save(path)
            items.append(Item(image_id, ImageRef(str(path)), image_id, list(captions), split))
        source = Source(items, {"kind": name, **packages}, [])
        sizes = splits or {}
        embed(None, out, EmbedOptions(encoder="patches", progress=False, dev_images=sizes.get("dev"),
                                      test_images=sizes.get("test")),
              source=source, quiet=True, alone=True, extra_files=extra_files,
              manifest_extra={"name": name, "version": version, "packages": packages, **(manifest_extra or {})})
    finally:
        shutil.rmtree(pngs, ignore_errors=True)
    return out


def limited_sizes(limit: int | None, total: int, dev: int, test: int) -> dict:
    """Dev and test sizes for a build of about ``limit`` images (proportions kept, at least 2 each)."""
    if limit is None or limit >= total:
        return {"dev": dev, "test": test}
    return {"dev": max(2, round(limit * dev / total)), "test": max(2, round(limit * test / total))}
