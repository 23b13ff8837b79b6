"""Synthetic data with the shapes of Flickr30K, for benchmarking without the real features.

``--data synthetic-f30k``: 29,000 training images (1,014 dev, 1,000 test) of 36 regions x 2048
features, 5 captions each (145,000 training captions), a vocabulary of 8,500 words, and caption
lengths distributed like Flickr30K's (about 12 words on average, 3 to 60; plus <start>/<end>).

The region features are never stored: 29,000 x 36 x 2048 float32 would be 8.6 GB. Each image is
a fixed list of 36 codes into a pool of 2,048 non-negative random vectors (16 MB), scaled per
image, and a batch's rows are gathered from the pool when asked for (``GeneratedRegions``), so
memory stays at the pool, the codes and the token ids (about 80 MB), and every row is the same
whenever and in whatever order it is read. Captions name words tied to their image's region
codes among Zipf-distributed filler words, so that a model has something to learn; the data is
meant for timing, not for accuracy claims.
"""
from __future__ import annotations

import numpy as np

from .noise import own_images
from .split import SPECIALS, Dataset, Split, Vocab

F30K = {"train": 29_000, "dev": 1_014, "test": 1_000}
REGIONS, FEATURE_DIM, VOCAB_SIZE, POOL = 36, 2048, 8_500, 2048
CAPTIONS_PER_IMAGE = 5


class GeneratedRegions:
    """A read-only (N, R, D) float32 "array" whose rows are gathered from a pool on demand."""

    def __init__(self, pool: np.ndarray, codes: np.ndarray, scale: np.ndarray):
        self.pool, self.codes, self.scale = pool, codes, scale  # (P, D), (N, R), (N,)
        self.shape = (codes.shape[0], codes.shape[1], pool.shape[1])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return GeneratedRegions(self.pool, self.codes[key], self.scale[key])
        index = np.asarray(key)
        return self.pool[self.codes[index]] * self.scale[index][..., None, None]  # (len, R, D) float32


def _split(rng: np.random.Generator, n_images: int, pool: np.ndarray, filler_cdf: np.ndarray,
           max_len: int) -> Split:
    codes = rng.integers(0, POOL, size=(n_images, REGIONS)).astype(np.int32)
    scale = rng.uniform(0.5, 1.5, size=n_images).astype(np.float32)
    n_cap = n_images * CAPTIONS_PER_IMAGE
    # Flickr30K-like caption lengths: log-normal around 11.5 words, 3 to 60 words, + <start>/<end>
    words = np.clip(np.rint(np.exp(rng.normal(np.log(11.5), 0.38, size=n_cap))), 3, 60).astype(np.int64)
    lengths = np.minimum(words + 2, max_len)
    width = int(lengths.max())
    first = len(SPECIALS)
    n_words = VOCAB_SIZE - first
    tokens = first + np.searchsorted(filler_cdf, rng.random((n_cap, width)))  # filler words
    # about a third of the words name one of the image's regions (a word per pool vector)
    image = own_images(n_cap, CAPTIONS_PER_IMAGE)
    pick = rng.integers(0, REGIONS, size=(n_cap, width))
    named = first + codes[image[:, None], pick] % n_words
    tokens = np.where(rng.random((n_cap, width)) < 0.35, named, tokens)
    position = np.arange(width)[None, :]
    tokens[:, 0] = SPECIALS.index("<start>")
    tokens[position == (lengths - 1)[:, None]] = SPECIALS.index("<end>")
    tokens[position >= lengths[:, None]] = 0
    return Split(GeneratedRegions(pool, codes, scale), tokens.astype(np.int64), lengths, CAPTIONS_PER_IMAGE)


def make_f30k_shaped(seed: int = 0, max_len: int = 64) -> Dataset:
    rng = np.random.default_rng(seed)
    pool = np.abs(rng.standard_normal((POOL, FEATURE_DIM), dtype=np.float32))  # non-negative, as BUTD features
    rank = np.arange(1, VOCAB_SIZE - len(SPECIALS) + 1)
    filler_cdf = np.cumsum(1.0 / rank) / (1.0 / rank).sum()  # Zipf's law
    filler_cdf[-1] = 1.0
    splits = {name: _split(rng, n, pool, filler_cdf, max_len) for name, n in F30K.items()}
    vocab = Vocab.build(f"w{i:04d}" for i in range(VOCAB_SIZE - len(SPECIALS)))
    return Dataset(train=splits["train"], dev=splits["dev"], test=splits["test"], vocab=vocab, name="synthetic-f30k")
