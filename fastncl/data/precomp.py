"""Precomputed features in the SCAN/NCR layout (Flickr30K, MS-COCO, CC152K).

A data folder (e.g. ``data/f30k_precomp``) holds, per split:
* ``{split}_ims.npy``: (N_img, 36, 2048) region features, read memory-mapped;
* ``{split}_caps.txt``: one caption per line, caption k belonging to image k // (N_cap / N_img)
  (5 for Flickr30K and MS-COCO); or ``{split}_caps.tsv`` (CC152K): ``image_id<TAB>caption``,
  one caption per image.
The vocabulary is a JSON file with a ``word2idx`` map (SCAN/NCR's ``{name}_vocab.json``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastncl import FastnclError

from .split import PAD, SPECIALS, Dataset, Split, Vocab, pad_captions, tokenize


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FastnclError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise FastnclError(f"{path}: cannot read it ({e.strerror})") from None


def _read_captions(folder: Path, split: str) -> tuple[list[str], Path]:
    txt, tsv = folder / f"{split}_caps.txt", folder / f"{split}_caps.tsv"
    if txt.exists():
        path = txt
        lines = _read_text(path).splitlines()
    elif tsv.exists():
        path = tsv
        lines = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 2:
                raise FastnclError(f"{path}:{n}: expected 'image_id<TAB>caption'")
            lines.append(parts[1])
    else:
        raise FastnclError(f"{folder}: missing {split}_caps.txt (or {split}_caps.tsv)")
    while lines and not lines[-1].strip():  # trailing blank lines only
        lines.pop()
    captions = [line.strip() for line in lines]
    if not captions:
        raise FastnclError(f"{path}: no captions")
    blank = [n for n, c in enumerate(captions, 1) if not c]
    if blank:  # a dropped line would shift every later caption onto the wrong image
        raise FastnclError(f"{path}:{blank[0]}: empty caption line ({len(blank)} in all)")
    return captions, path


def _read_images(folder: Path, split: str) -> np.ndarray:
    path = folder / f"{split}_ims.npy"
    if not path.exists():
        raise FastnclError(f"{folder}: missing {split}_ims.npy")
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise FastnclError(f"{path}: not a readable .npy array ({e})") from None
    if images.ndim == 2:  # (N, D) global features: one "region" per image
        images = images[:, None, :]
    if images.ndim != 3 or not np.issubdtype(images.dtype, np.floating) or 0 in images.shape:
        raise FastnclError(
            f"{path}: expected float features of shape (N, regions, dim) or (N, dim), none of them 0, got "
            f"{images.dtype} {images.shape}"
        )
    _check_finite(images, path)
    return images


FINITE_CHUNK_BYTES = 1 << 28  # the finite check reads a memory-mapped feature file 256 MB at a time


def _check_finite(images: np.ndarray, path: Path) -> None:
    """NaN or inf features train to a chance-level table: refuse them, naming the first bad row.
    Read in chunks, so that a 33 GB COCO file is never in memory at once."""
    rows = max(1, FINITE_CHUNK_BYTES // max(1, images[0].nbytes))
    for start in range(0, images.shape[0], rows):
        ok = np.isfinite(images[start:start + rows]).reshape(min(rows, images.shape[0] - start), -1).all(axis=1)
        if not ok.all():
            raise FastnclError(f"{path}: row {start + int(np.argmin(ok))} (image) holds NaN or inf features")


def _find_vocab(folder: Path, vocab_path: str | None) -> Path | None:
    if vocab_path:
        path = Path(vocab_path)
        if not path.exists():
            raise FastnclError(f"data.vocab: {path} does not exist")
        return path
    name = folder.name
    for path in (folder / "vocab.json", folder / f"{name}_vocab.json", folder.parent / "vocab" / f"{name}_vocab.json"):
        if path.exists():
            return path
    return None


def _load_vocab(path: Path) -> Vocab:
    try:
        data = json.loads(_read_text(path))
        word2idx = {str(w): int(i) for w, i in data["word2idx"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FastnclError(f"{path}: not a vocabulary JSON with a 'word2idx' map ({type(e).__name__}: {e})") from None
    # SCAN vocabularies use <pad> = 0; make sure every special token is present
    for token in SPECIALS:
        if token not in word2idx:
            word2idx[token] = max(word2idx.values(), default=-1) + 1
    if word2idx[PAD] != 0:
        raise FastnclError(f"{path}: '<pad>' must have index 0")
    # the embedding table has max index + 1 rows: an index of 1e10 would allocate hundreds of GB,
    # a negative one fails in the lookup, a shared one merges two words
    n = len(word2idx)
    for word, i in word2idx.items():
        if not 0 <= i < n:
            raise FastnclError(f"{path}: word {word!r} has index {i}, outside [0, {n}) (the vocabulary's size)")
    if len(set(word2idx.values())) < n:
        seen = {}
        for word, i in word2idx.items():
            if i in seen:
                raise FastnclError(f"{path}: index {i} is given to two words, {seen[i]!r} and {word!r}")
            seen[i] = word
    return Vocab(word2idx)


def _load_split(folder: Path, split: str, vocab: Vocab, max_len: int) -> Split:
    images = _read_images(folder, split)
    captions, cap_path = _read_captions(folder, split)
    n_img, n_cap = images.shape[0], len(captions)
    if n_cap % n_img:
        raise FastnclError(
            f"{cap_path}: {n_cap} captions for {n_img} images in {split}_ims.npy: "
            "the caption count must be a whole multiple of the image count"
        )
    tokens, lengths = pad_captions([vocab.encode(c) for c in captions], max_len)
    return Split(images, tokens, lengths, n_cap // n_img)


def load_precomp(path: str | Path, *, dev_split="dev", test_split="test", vocab_path=None, max_len=64) -> Dataset:
    folder = Path(path)
    if not folder.is_dir():
        raise FastnclError(f"--data {folder}: not a folder (expected a SCAN/NCR precomputed-feature folder)")
    vocab_file = _find_vocab(folder, vocab_path)
    if vocab_file is not None:
        vocab = _load_vocab(vocab_file)
    else:  # no vocabulary shipped: build one from the training captions
        vocab = Vocab.build(sorted({w for c in _read_captions(folder, "train")[0] for w in tokenize(c)}))
    splits = {s: _load_split(folder, s, vocab, max_len) for s in ("train", dev_split, test_split)}
    dims = {s: sp.images.shape[2] for s, sp in splits.items()}
    if len(set(dims.values())) != 1:
        raise FastnclError(f"--data {folder}: feature dimension differs between splits: {dims}")
    return Dataset(splits["train"], splits[dev_split], splits[test_split], vocab, name=folder.name)
