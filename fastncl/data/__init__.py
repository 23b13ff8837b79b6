"""Data: the embedded synthetic default, the built-in real sets (emoji, glyphs, icons: built on first use), the SCAN/NCR precomputed layout, noise, batches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastncl.config import DataConfig

from .noise import load_noise_index, measured_rate, noisy_caption_index, own_images
from .split import Dataset, Split, Vocab, tokenize


@dataclass
class TrainingPairs:
    """The training pairs a run trains on: which image each caption is paired with, and the ground truth."""

    caption_to_image: np.ndarray  # (num_captions,) int64, after the injected noise or --noise-file's index
    clean: np.ndarray | None  # (num_captions,) bool, the pair is the caption's own image; None: no noise injected
    noise_rate: float  # what the run is labelled with: data.noise, or --noise-file's measured rate


def training_pairs(train: Split, cfg: DataConfig, seed: int) -> TrainingPairs:
    """The noisy training pairs of ``cfg`` (data.noise drawn with data.noise_seed, default ``seed``,
    or data.noise_file's saved index) and their ground truth."""
    if cfg.noise_file:
        index = load_noise_index(cfg.noise_file, train.num_captions, train.num_images)
    else:
        index = noisy_caption_index(train.num_captions, train.captions_per_image, cfg.noise,
                                    seed if cfg.noise_seed is None else cfg.noise_seed)
    injected = bool(cfg.noise_file) or cfg.noise > 0
    clean = index == own_images(train.num_captions, train.captions_per_image) if injected else None
    rate = measured_rate(index, train.captions_per_image) if cfg.noise_file else cfg.noise
    return TrainingPairs(index, clean, rate)


def load_dataset(cfg: DataConfig) -> Dataset:
    if cfg.source == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic(cfg.synthetic)
    if cfg.source == "synthetic-f30k":  # Flickr30K's shapes, for benchmarks
        from .fullshape import make_f30k_shaped

        dataset = make_f30k_shaped(cfg.synthetic.seed, cfg.max_len)
        dataset.dev = dataset.dev.truncated(cfg.dev_images)
        return dataset
    from .precomp import load_precomp

    from .builtin import SETS, ensure

    source = cfg.source
    if source in SETS:  # a built-in real set, built once into the cache (fastncl.data.builtin)
        source = ensure(source)
    dataset = load_precomp(source, dev_split=cfg.dev_split, test_split=cfg.test_split, vocab_path=cfg.vocab,
                           max_len=cfg.max_len)
    dataset.dev = dataset.dev.truncated(cfg.dev_images)
    if cfg.source in SETS:
        dataset.name = cfg.source
    return dataset


__all__ = ["Dataset", "Split", "TrainingPairs", "Vocab", "load_dataset", "tokenize", "training_pairs"]
