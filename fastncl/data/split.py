"""The in-memory form of one split, whatever its source, and the tokenizer.

A split holds region features for its images and padded token ids for its captions; caption k
belongs to image ``k // captions_per_image`` (the SCAN/NCR convention). Feature arrays may be
memory-mapped: rows are copied out only when a batch asks for them.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
import torch

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# The tokens nltk.word_tokenize gives on captions, without its downloaded punkt model:
# hyphenated words stay whole ("t-shirt"), clitics split off ("man's" -> "man", "'s";
# "don't" -> "do", "n't"), every other punctuation mark is its own token.
_NEGATION = re.compile(r"(?<=[a-z])n't\b")
_TOKEN = re.compile(r"n't|'(?:s|m|d|re|ve|ll)\b|[a-z0-9]+(?:[-.][a-z0-9]+)*|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of a caption, as SCAN/NCR vocabularies (built with nltk) expect."""
    return _TOKEN.findall(_NEGATION.sub(" n't", text.lower()))


@dataclass
class Vocab:
    word2idx: dict[str, int]

    def __post_init__(self):
        for token in SPECIALS:
            if token not in self.word2idx:
                raise ValueError(f"vocabulary lacks the special token {token}")

    def __len__(self) -> int:
        return max(self.word2idx.values()) + 1

    @classmethod
    def build(cls, words) -> "Vocab":
        word2idx = {token: i for i, token in enumerate(SPECIALS)}
        for w in words:
            word2idx.setdefault(w, len(word2idx))
        return cls(word2idx)

    def encode(self, text: str) -> list[int]:
        unk = self.word2idx[UNK]
        return [self.word2idx[START], *(self.word2idx.get(w, unk) for w in tokenize(text)), self.word2idx[END]]


def pad_captions(encoded: list[list[int]], max_len: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) int64 token ids padded with ``pad_id`` and (N,) lengths; captions are cut at ``max_len``."""
    length = min(max_len, max((len(e) for e in encoded), default=1))
    tokens = np.full((len(encoded), length), pad_id, dtype=np.int64)
    lengths = np.empty(len(encoded), dtype=np.int64)
    for k, ids in enumerate(encoded):
        ids = ids[:length]
        tokens[k, : len(ids)] = ids
        lengths[k] = len(ids)
    return tokens, lengths


@dataclass
class Split:
    images: np.ndarray  # (N_img, R, D) float, possibly a read-only memmap
    tokens: np.ndarray  # (N_cap, L) int64, padded with 0
    lengths: np.ndarray  # (N_cap,) int64
    captions_per_image: int

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def num_captions(self) -> int:
        return self.tokens.shape[0]

    def image_batch(self, index: np.ndarray) -> torch.Tensor:
        """(len(index), R, D) float32 region features."""
        return torch.from_numpy(np.ascontiguousarray(self.images[index], dtype=np.float32))

    def caption_batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (len(index), L) and lengths (len(index),)."""
        return torch.from_numpy(self.tokens[index]), torch.from_numpy(self.lengths[index])

    def truncated(self, max_images: int | None) -> "Split":
        """The first ``max_images`` images and their captions (the official dev-set truncation)."""
        if not max_images or max_images >= self.num_images:
            return self
        n_cap = max_images * self.captions_per_image
        return Split(self.images[:max_images], self.tokens[:n_cap], self.lengths[:n_cap], self.captions_per_image)


@dataclass
class Dataset:
    train: Split
    dev: Split
    test: Split
    vocab: Vocab
    name: str

    @property
    def image_dim(self) -> int:
        return self.train.images.shape[2]

    def fingerprint(self, images: int = 256) -> str:
        """SHA-256 of what the run trains and is scored on, cheap at any size: every split's shape,
        captions and lengths, the vocabulary, and the region features of each split's first
        ``images`` images. Two runs whose data were built apart (another descriptor version, another
        encoder) differ here, so run records from different builds are not compared as equals."""
        h = hashlib.sha256()
        for split in (self.train, self.dev, self.test):
            h.update(repr((split.images.shape, str(split.images.dtype), split.captions_per_image)).encode())
            h.update(np.ascontiguousarray(split.tokens).tobytes())
            h.update(np.ascontiguousarray(split.lengths).tobytes())
            h.update(np.ascontiguousarray(split.images[:images]).tobytes())
        h.update(json.dumps(sorted(self.vocab.word2idx.items())).encode())
        return h.hexdigest()
