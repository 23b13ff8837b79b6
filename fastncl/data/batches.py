"""Fixed-size training batches over (a subset of) the training pairs.

Training pairs are indexed by caption: pair k is (image ``caption_to_image[k]``, caption k), so
each epoch visits every caption once (the NCR convention). Every batch has exactly the batch size
(shapes stay static for torch.compile and CUDA graphs): the last batch of an epoch is filled up
with other pairs of the same subset, drawn without repetition inside the batch. A subset smaller
than one batch yields a single batch of its own size. With ``length_multiple`` the token ids are
cut to the batch's longest caption rounded up to that multiple (a pairwise head's cost grows with
the caption length; a few length buckets keep the number of compiled shapes small).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .split import Split


_PREFETCHER: list[ThreadPoolExecutor] = []


def _prefetcher() -> ThreadPoolExecutor:
    """One worker thread for every loader: host-side batch assembly overlaps the device's work."""
    if not _PREFETCHER:
        _PREFETCHER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastncl-batches"))
    return _PREFETCHER[0]


@dataclass
class Batch:
    index: torch.Tensor  # (B,) int64 caption indices into the training split
    images: torch.Tensor  # (B, R, D) float32
    tokens: torch.Tensor  # (B, L) int64
    lengths: torch.Tensor  # (B,) int64

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.index, self.images, self.tokens, self.lengths)))


class PairBatches:
    """Shuffled fixed-size batches over ``subset`` (caption indices) of the training pairs."""

    def __init__(self, split: Split, caption_to_image: np.ndarray, subset: np.ndarray, batch_size: int,
                 rng: np.random.Generator, device="cpu", length_multiple: int = 0):
        self.split, self.caption_to_image = split, caption_to_image
        self.subset = np.asarray(subset, dtype=np.int64)
        self.batch_size = min(batch_size, len(self.subset))
        self.rng, self.device = rng, device
        self.length_multiple = length_multiple

    def __len__(self) -> int:
        return -(-len(self.subset) // self.batch_size) if len(self.subset) else 0

    def batch(self, index: np.ndarray) -> Batch:
        tokens, lengths = self.split.caption_batch(index)
        if self.length_multiple > 0:  # on the host, from the numpy lengths: no device sync
            m = self.length_multiple
            tokens = tokens[:, : min(tokens.shape[1], -(-int(lengths.max()) // m) * m)]
        images = self.split.image_batch(self.caption_to_image[index])
        return Batch(torch.from_numpy(index), images, tokens, lengths).to(self.device)

    def epoch_indices(self) -> list[np.ndarray]:
        if not len(self):
            return []
        order = self.rng.permutation(self.subset)
        b = self.batch_size
        batches = [order[s : s + b] for s in range(0, len(order), b)]
        short = b - len(batches[-1])
        if short:
            others = np.setdiff1d(self.subset, batches[-1], assume_unique=True)
            batches[-1] = np.concatenate([batches[-1], self.rng.choice(others, size=short, replace=False)])
        return batches

    def __iter__(self) -> Iterator[Batch]:
        """The epoch's batches, each assembled (rows gathered, copied to the device) on a background
        thread while the previous one is in use; the order was drawn up front, so it is unchanged."""
        pending = None
        for index in self.epoch_indices():
            future = _prefetcher().submit(self.batch, index)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()

    def cycle(self) -> Iterator[Batch]:
        """Endless batches, reshuffled at each pass (secondary subsets that must keep pace)."""
        while len(self):
            yield from self
