"""Tiny SCAN/NCR precomputed-feature folders for the data and CLI tests (a helper, not a test module)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = "a dog cat runs on the grass beach red blue ball sits near tree".split()
SPLIT_IMAGES = {"train": 6, "dev": 4, "test": 3}


def captions(n: int, seed: int, extra: str = "") -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) + extra for _ in range(n)]


def make_scan(folder: Path, *, cpi: int = 5, regions: int = 4, dim: int = 8, images: dict | None = None,
              vocab: dict | None = "default", seed: int = 0) -> Path:
    """A SCAN/NCR folder: {split}_ims.npy (N, regions, dim) float32 and {split}_caps.txt, cpi captions per image.

    ``vocab="default"`` writes ``vocab.json`` with a word2idx map of WORDS (SCAN order: <pad> 0,
    <start> 1, <end> 2, <unk> 3); ``None`` writes no vocabulary; a dict is written as given.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, (split, n) in enumerate((images or SPLIT_IMAGES).items()):
        np.save(folder / f"{split}_ims.npy", rng.standard_normal((n, regions, dim)).astype(np.float32))
        (folder / f"{split}_caps.txt").write_text("\n".join(captions(n * cpi, seed + k)) + "\n", encoding="utf-8")
    if vocab == "default":
        vocab = scan_vocab(WORDS)
    if vocab is not None:
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    return folder


def make_cc152k(folder: Path, *, regions: int = 4, dim: int = 8, seed: int = 0) -> Path:
    """A CC152K-style folder: {split}_caps.tsv with ``id<TAB>caption``, one caption per image; no vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, (split, n) in enumerate(SPLIT_IMAGES.items()):
        np.save(folder / f"{split}_ims.npy", rng.standard_normal((n, regions, dim)).astype(np.float32))
        lines = [f"{1000 * k + i}\t{c}" for i, c in enumerate(captions(n, seed + k, extra="."))]
        (folder / f"{split}_caps.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def scan_vocab(words) -> dict:
    word2idx = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}
    for w in words:
        word2idx.setdefault(w, len(word2idx))
    return {"word2idx": word2idx, "idx2word": {str(i): w for w, i in word2idx.items()}, "idx": len(word2idx)}
