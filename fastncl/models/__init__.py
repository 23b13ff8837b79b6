"""Backbones: a batch of images and captions -> similarity matrix + pooled features."""
from __future__ import annotations

from fastncl.config import ModelConfig

from .base import BackboneOutput, Encoding, encode_pairs, forward_pairs, intramodal_features, intramodal_similarity
from .vse import VSE


def build_backbone(cfg: ModelConfig, image_dim: int, vocab_size: int):
    if cfg.backbone == "vse":
        return VSE(image_dim, vocab_size, cfg.embed_dim, cfg.word_dim, cfg.dropout, cfg.pooling)
    raise ValueError(f"unknown backbone {cfg.backbone!r}")


__all__ = ["BackboneOutput", "Encoding", "VSE", "build_backbone", "encode_pairs", "forward_pairs", "intramodal_features",
           "intramodal_similarity"]
