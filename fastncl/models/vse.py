"""The `vse` backbone: a fast dual encoder with cosine similarity.

Images: a per-region linear projection (Xavier init, as SGRAF's 2048 -> 1024 layer), each
region L2-normalised. Captions: word embeddings (U(-0.1, 0.1)), dropout, a bidirectional GRU
whose two halves are averaged, each word L2-normalised. Each side is pooled over its regions or
valid words (``pooling="max"``, element-wise, the default; or ``"mean"``) and L2-normalised;
the similarity of image i and caption j is the cosine of the two, so a (B_img, B_cap) similarity
matrix is one matrix product. (Mean pooling makes hardest-negative hinge training collapse onto
a few hub images under noise on the embedded data; max pooling keeps it stable.)

The encodings also carry the mean of the normalised local features (un-normalised): the
"mean-pooled features" the official SPS and BiCro codes use for intramodal similarity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .base import Encoding, cosine_matrix


class VSE(nn.Module):
    # similarity(img, cap) is img.global_ @ cap.global_.T: with the Triton backend, large batches
    # take their losses straight from the embeddings (fastncl.kernels.EMBED_MIN_BATCH)
    dot_product = True
    # ESC's BiCro labels compare the features the similarity is built on: the pooled-and-normalised
    # global embeddings (the mean of the regions/words plays no part in a vse score)
    label_features = "global"

    def __init__(self, image_dim: int, vocab_size: int, embed_dim: int = 256, word_dim: int = 128,
                 dropout: float = 0.1, pooling: str = "max"):
        super().__init__()
        if pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.region_proj = nn.Linear(image_dim, embed_dim)
        self.word_embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.word_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(word_dim, embed_dim, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim
        nn.init.xavier_uniform_(self.region_proj.weight)
        nn.init.zeros_(self.region_proj.bias)
        nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)

    def encode_images(self, images: torch.Tensor) -> Encoding:
        """images: (B, R, D_in) region features."""
        regions = F.normalize(self.region_proj(images), dim=-1)  # (B, R, E)
        pooled = regions.mean(dim=1)  # (B, E)
        pool = regions.amax(dim=1) if self.pooling == "max" else pooled
        return Encoding(global_=F.normalize(pool, dim=-1), pooled=pooled)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoding:
        """tokens: (B, L) ids padded with 0; lengths: (B,)."""
        x = self.word_dropout(self.word_embed(tokens))  # (B, L, W)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])  # (B, L, 2E)
        words = F.normalize((out[..., : self.embed_dim] + out[..., self.embed_dim :]) / 2, dim=-1)
        valid = (torch.arange(tokens.shape[1], device=tokens.device) < lengths.view(-1, 1)).unsqueeze(-1)
        pooled = (words * valid).sum(dim=1) / lengths.view(-1, 1).clamp_min(1)  # (B, E)
        pool = words.masked_fill(~valid, float("-inf")).amax(dim=1) if self.pooling == "max" else pooled
        return Encoding(global_=F.normalize(pool, dim=-1), pooled=pooled)

    def similarity(self, images: Encoding, captions: Encoding) -> torch.Tensor:
        """(B_img, B_cap) cosine similarities, rows = images (fp32, also under autocast)."""
        return cosine_matrix(images.global_, captions.global_)
