"""Data: the embedded synthetic default, the emoji set (built on first use), the SCAN/NCR precomputed layout, noise, batches."""
from __future__ import annotations

from fastncl.config import DataConfig

from .split import Dataset, Split, Vocab, tokenize


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

    source = cfg.source
    if source == "emoji":  # built once into the cache (fastncl.data.emoji)
        from .emoji import ensure_emoji

        source = ensure_emoji()
    dataset = load_precomp(source, dev_split=cfg.dev_split, test_split=cfg.test_split, vocab_path=cfg.vocab,
                           max_len=cfg.max_len)
    dataset.dev = dataset.dev.truncated(cfg.dev_images)
    if cfg.source == "emoji":
        dataset.name = "emoji"
    return dataset


__all__ = ["Dataset", "Split", "Vocab", "load_dataset", "tokenize"]
