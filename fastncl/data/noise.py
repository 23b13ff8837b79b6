"""Synthetic noisy correspondence by the NCR protocol (used by NCR, BiCro, ESC, CREAM and SPS).

A fraction ``rate`` of the captions is chosen at random, and the images of the chosen captions
are shuffled among them. Every image is therefore still used exactly ``captions_per_image``
times; a few chosen captions land back on their own image (no derangement is enforced), so the
measured noise fraction is slightly below ``rate``, as in the official index files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastncl import FastnclError


def own_images(num_captions: int, captions_per_image: int) -> np.ndarray:
    """Caption -> image index without noise: caption k belongs to image k // captions_per_image
    (the SCAN/NCR layout)."""
    return np.arange(num_captions, dtype=np.int64) // captions_per_image


def noisy_caption_index(num_captions: int, captions_per_image: int, rate: float, seed: int) -> np.ndarray:
    """Caption -> image index after NCR-protocol noise (int64, length ``num_captions``).

    Deterministic for a given seed; caption k belongs to image k // captions_per_image before noise.
    """
    if not 0.0 <= rate < 1.0:  # a config's data.noise is validated before it gets here
        raise ValueError(f"the noise rate must be in [0, 1), got {rate}")
    if num_captions % captions_per_image:
        raise ValueError(f"{num_captions} captions is not a multiple of {captions_per_image} captions per image")
    rng = np.random.default_rng(seed)
    index = own_images(num_captions, captions_per_image)
    chosen = rng.permutation(num_captions)[: int(rate * num_captions)]
    index[chosen] = rng.permutation(index[chosen])
    return index


def load_noise_index(path: str | Path, num_captions: int, num_images: int) -> np.ndarray:
    """Read a saved caption -> image index and check that it fits the training split."""
    path = Path(path)
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise FastnclError(f"--noise-file {path}: cannot read it as a .npy array ({e})") from None
    if index.ndim != 1 or index.shape[0] != num_captions or not np.issubdtype(index.dtype, np.integer):
        raise FastnclError(
            f"--noise-file {path}: expected an integer vector of {num_captions} entries (one per training caption), "
            f"got dtype {index.dtype} and shape {index.shape}"
        )
    if index.min() < 0 or index.max() >= num_images:
        raise FastnclError(f"--noise-file {path}: image indices must lie in [0, {num_images})")
    return index.astype(np.int64)


def measured_rate(index: np.ndarray, captions_per_image: int) -> float:
    """The fraction of captions a caption -> image index puts on another image than their own."""
    return float(np.mean(index != own_images(len(index), captions_per_image)))
