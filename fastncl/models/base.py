"""The seam every backbone implements.

A backbone encodes images and captions separately (``encode_images``, ``encode_captions``) and
scores every image against every caption (``similarity``), returning a (B_img, B_cap) matrix
with rows = images. Encodings carry the pooled per-modality features SPS and ESC use for
intramodal similarity. A pairwise head (SGR/SAF) keeps its local features inside the encoding
and does its cross-attention in ``similarity``; the trainer and the methods never look inside.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Encoding(NamedTuple):
    global_: torch.Tensor  # (B, E) L2-normalised global embedding
    pooled: torch.Tensor  # (B, E) mean of the normalised local features (official "mean-pooled")
    local: torch.Tensor | None = None  # pairwise heads: (B, R, E) regions or (B, L, E) words, zero at padding
    mask: torch.Tensor | None = None  # pairwise heads, captions: (B, L) bool, True at valid words


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode for the block (evaluation, or a prediction inside a training step),
    then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class BackboneOutput(NamedTuple):
    sim: torch.Tensor  # (B, B) rows = images, columns = captions
    images: Encoding
    captions: Encoding


def encode_pairs(model, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[Encoding, Encoding]:
    """Encode a batch of pairs: (images, captions)."""
    return model.encode_images(images), model.encode_captions(tokens, lengths)


def forward_pairs(model, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> BackboneOutput:
    """Encode a batch of pairs and score every image against every caption."""
    img, cap = encode_pairs(model, images, tokens, lengths)
    return BackboneOutput(model.similarity(img, cap), img, cap)


def intramodal_features(enc: Encoding, which: str) -> torch.Tensor:
    """(B, E) unit vectors whose dot products are the similarities within one modality, from the
    "global" embeddings or the L2-normalised "pooled" features."""
    return enc.global_ if which == "global" else F.normalize(enc.pooled, dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) dot products of the rows of ``a`` and ``b`` (unit vectors) in fp32, also
    under autocast: similarities feed log-sum-exps at 1 / tau and the mixture fit, where bf16's
    0.004 resolution near 1 would be 0.06 in a logit at tau = 0.07."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().T
