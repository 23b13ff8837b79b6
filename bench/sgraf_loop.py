"""The papers' SGR/SAF similarity: the official per-caption Python loop, on a fastncl SGRAF model.

This is the computation of the SGRAF code that NCR, BiCro, ESC and SPS train with
(EncoderSimilarity.forward): for each caption, its valid words are repeated for every image, its
global vector is computed from those words alone, SCAN attention, the similarity vectors, the
graph reasoning or attention filtration (SAF's batch norm called once per caption) run over all
images, and the columns are concatenated. It is written independently of
fastncl/models/sgraf.py's batched ``score_block`` (only the layers' weights are shared) and serves
twice: as the oracle of the float64 parity tests (tests/test_sgraf.py) and as baseline (a) of the
end-to-end benchmark (bench/bench_e2e.py). It is never used for training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _l2norm(x, dim=-1, eps=1e-8):
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + eps)


def _l1norm(x, dim=-1, eps=1e-8):
    return x / (x.abs().sum(dim, keepdim=True) + eps)


def _scan_t2i(query, context, smooth):
    """query (n, L, E) words, context (n, R, E) regions -> (n, L, E) attended image vectors."""
    attn = F.leaky_relu(torch.bmm(context, query.transpose(1, 2)), 0.1)  # (n, R, L)
    attn = _l2norm(attn, 2)
    attn = F.softmax(attn.transpose(1, 2) * smooth, dim=2)  # (n, L, R)
    return _l2norm(torch.bmm(attn, context), -1)


def _text_global(sa, words):
    """The official TextSA on one caption's valid words (1, n, E)."""
    mean = words.mean(1)
    weights = sa.common(sa.local(words) * sa.global_(mean).unsqueeze(1).repeat(1, words.size(1), 1)).squeeze(2)
    return _l2norm((F.softmax(weights, dim=1).unsqueeze(2) * words).sum(dim=1), -1)


def loop_similarity(model, images, captions):
    """(n_image, n_caption) similarities, one caption at a time (official EncoderSimilarity).

    ``images`` and ``captions`` are the model's Encodings; only their local features, the
    captions' lengths (from the mask) and the images' self-attention vector are used.
    """
    regions, img_glo = images.local, images.global_
    words, lengths = captions.local, captions.mask.sum(dim=1).tolist()
    n_image = regions.size(0)
    columns = []
    for i, n_word in enumerate(lengths):
        cap_i = words[i, :n_word].unsqueeze(0)
        cap_i_expand = cap_i.repeat(n_image, 1, 1)
        cap_glo_i = _text_global(model.text_sa, cap_i)
        context = _scan_t2i(cap_i_expand, regions, model.smooth)
        sim_loc = _l2norm(model.sim_local(torch.pow(context - cap_i_expand, 2)), -1)
        sim_glo = _l2norm(model.sim_global(torch.pow(img_glo - cap_glo_i, 2)), -1)
        sim_emb = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)  # (n_image, n_word + 1, S)
        if model.head == "sgr":
            for step in model.reasoning:
                edge = torch.softmax(torch.bmm(step.query(sim_emb), step.key(sim_emb).permute(0, 2, 1)), dim=-1)
                sim_emb = torch.relu(step.out(torch.bmm(edge, sim_emb)))
            sim_vec = sim_emb[:, 0, :]
        else:
            saf = model.filtration
            logits = saf.attn(sim_emb).permute(0, 2, 1)  # (n_image, 1, n_word + 1): BatchNorm1d(1) per caption
            logits = F.batch_norm(logits, saf.running_mean, saf.running_var, saf.bn_weight, saf.bn_bias,
                                  saf.training, saf.momentum, saf.eps)
            sim_attn = _l1norm(torch.sigmoid(logits), dim=-1)
            sim_vec = _l2norm(torch.matmul(sim_attn, sim_emb).squeeze(1), dim=-1)
        columns.append(torch.sigmoid(model.sim_eval(sim_vec)))
    return torch.cat(columns, 1)
