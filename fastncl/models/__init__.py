"""Backbones: a batch of images and captions -> similarity matrix + pooled features."""
from __future__ import annotations

from fastncl.config import ModelConfig

from .base import BackboneOutput, Encoding, cosine_matrix, encode_pairs, eval_mode, forward_pairs, intramodal_features
from .sgraf import SGRAF
from .vse import VSE


def build_backbone(cfg: ModelConfig, image_dim: int, vocab_size: int, num_regions: int | None = None):
    if cfg.backbone == "vse":
        return VSE(image_dim, vocab_size, cfg.embed_dim, cfg.word_dim, cfg.dropout, cfg.pooling)
    if cfg.backbone in ("sgr", "saf"):
        if num_regions is None:
            raise ValueError("the sgr/saf backbones need num_regions (their visual batch norm is over the regions)")
        return SGRAF(image_dim, vocab_size, num_regions, head=cfg.backbone, embed_dim=cfg.embed_dim,
                     word_dim=cfg.word_dim, sim_dim=cfg.sim_dim, sgr_steps=cfg.sgr_steps, dropout=cfg.dropout,
                     smooth=cfg.smooth, pair_block=cfg.pair_block)
    raise ValueError(f"unknown backbone {cfg.backbone!r}")


__all__ = ["BackboneOutput", "Encoding", "SGRAF", "cosine_matrix", "VSE", "build_backbone", "encode_pairs", "eval_mode", "forward_pairs",
           "intramodal_features"]
