"""The batched SGR/SAF heads against the official per-caption loop (bench/sgraf_loop.py), in float64.

Tiny shapes (E = 8, S = 5, 4 regions); ragged caption lengths including 1 and the padded maximum.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastncl.models import build_backbone, forward_pairs
from fastncl.models.sgraf import SGRAF, BiGRU
from tolerances import assert_close

_spec = importlib.util.spec_from_file_location("sgraf_loop", Path(__file__).parents[1] / "bench" / "sgraf_loop.py")
sgraf_loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sgraf_loop)

IMAGE_DIM, VOCAB, REGIONS = 6, 20, 4


def _model(head, seed=0, dropout=0.0, pair_block=128, dtype=torch.float64):
    torch.manual_seed(seed)
    return SGRAF(IMAGE_DIM, VOCAB, REGIONS, head=head, embed_dim=8, word_dim=6, sim_dim=5, sgr_steps=3,
                 dropout=dropout, pair_block=pair_block).to(dtype)


def _inputs(n_img, n_cap, seed=1, max_len=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, REGIONS, IMAGE_DIM, generator=g, dtype=dtype)
    lengths = torch.randint(1, max_len + 1, (n_cap,), generator=g)
    lengths[0], lengths[-1] = 1, max_len
    tokens = torch.randint(1, VOCAB, (n_cap, max_len), generator=g)
    tokens[torch.arange(max_len).view(1, -1) >= lengths.view(-1, 1)] = 0
    return images, tokens, lengths


def test_bigru_equals_packed_bidirectional_gru_in_both_paths():
    torch.manual_seed(0)
    ours = BiGRU(5, 4).double()
    ref = torch.nn.GRU(5, 4, batch_first=True, bidirectional=True).double()
    with torch.no_grad():
        for name, value in ours.named_parameters():  # nn.GRU's own parameter names
            getattr(ref, name).copy_(value)
    x = torch.randn(6, 7, 5, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 3, 5, 2, 7])
    out, _ = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=7)
    expected = (out[..., :4] + out[..., 4:]) / 2
    valid = (torch.arange(7).view(1, -1) < lengths.view(-1, 1)).unsqueeze(-1)
    for unrolled in (False, True):
        assert_close(ours(x, lengths, unrolled=unrolled) * valid, expected * valid, 1e-12, f"unrolled={unrolled}")


@pytest.mark.parametrize("head", ["sgr", "saf"])
@pytest.mark.parametrize("training", [False, True])
def test_batched_equals_per_caption_loop_values_and_gradients(head, training):
    model = _model(head)
    model.train(training)  # dropout 0: train mode differs by its batch-norm statistics
    images, tokens, lengths = _inputs(5, 6)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    img, cap = model.encode_images(images), model.encode_captions(tokens, lengths)
    batched = model.similarity(img, cap)
    after_batched = {k: v.clone() for k, v in model.named_buffers()}
    grads = torch.autograd.grad(batched.sum(), list(model.parameters()), allow_unused=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    img, cap = model.encode_images(images), model.encode_captions(tokens, lengths)
    loop = sgraf_loop.loop_similarity(model, img, cap)
    loop_grads = torch.autograd.grad(loop.sum(), list(model.parameters()), allow_unused=True)
    assert batched.shape == (5, 6) and batched.dtype == torch.float64
    assert_close(batched, loop, 1e-10, "similarities")
    scale = max(float(r.abs().max()) for r in loop_grads if r is not None)  # some are 0 in exact math
    for (name, _), g, ref in zip(model.named_parameters(), grads, loop_grads):
        if ref is None:
            assert g is None or not g.abs().max() > 0, name
            continue
        assert_close(g, ref, 1e-9, f"grad {name}", scale=scale)
    for k, v in model.named_buffers():  # SAF's per-caption running statistics, updated in caption order
        assert_close(after_batched[k].double(), v.double(), 1e-10, f"buffer {k}")


@pytest.mark.parametrize("head", ["sgr", "saf"])
def test_blocked_evaluation_equals_one_block(head):
    model = _model(head, pair_block=3).eval()
    images, tokens, lengths = _inputs(7, 11, max_len=12)
    lengths[:] = lengths.clamp_max(5)  # the blocks' words are cut to their own longest caption
    lengths[4] = 12
    with torch.no_grad():
        img, cap = model.encode_images(images), model.encode_captions(tokens, lengths)
        blocked = model.similarity(img, cap)
        model.pair_block = 128
        whole = model.similarity(img, cap)
    assert blocked.shape == (7, 11)
    assert_close(blocked, whole, 1e-12)


def test_encodings_carry_mean_pooled_features_and_masked_words():
    model = _model("sgr").eval()
    images, tokens, lengths = _inputs(3, 4)
    img, cap = model.encode_images(images), model.encode_captions(tokens, lengths)
    assert_close(img.pooled, img.local.mean(dim=1), 1e-12)
    for j, n in enumerate(lengths.tolist()):
        assert_close(cap.pooled[j], cap.local[j, :n].mean(dim=0), 1e-12)
        assert cap.local[j, n:].abs().max() == 0 if n < tokens.shape[1] else True
        # more padding changes nothing
    wider = torch.cat([tokens, torch.zeros(4, 3, dtype=tokens.dtype)], dim=1)
    assert_close(model.encode_captions(wider, lengths).global_, cap.global_, 1e-12)
    assert_close(img.global_.norm(dim=1), torch.ones(3, dtype=torch.float64), 1e-7)


def test_build_backbone_from_config_and_forward_pairs():
    from fastncl.config import ModelConfig

    cfg = ModelConfig(backbone="saf", embed_dim=8, word_dim=6, sim_dim=5)
    model = build_backbone(cfg, IMAGE_DIM, VOCAB, num_regions=REGIONS)
    images, tokens, lengths = _inputs(4, 4, dtype=torch.float32)
    out = forward_pairs(model, images, tokens, lengths)
    assert out.sim.shape == (4, 4) and out.sim.dtype == torch.float32
    assert ((out.sim > 0) & (out.sim < 1)).all()
    assert out.images.pooled.shape == (4, 8) and out.captions.pooled.shape == (4, 8)


def test_bf16_autocast_on_cpu_returns_fp32_similarities_close_to_fp32():
    model = _model("sgr", dtype=torch.float32).eval()
    images, tokens, lengths = _inputs(4, 5, dtype=torch.float32)
    with torch.no_grad():
        ref = forward_pairs(model, images, tokens, lengths).sim
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = forward_pairs(model, images, tokens, lengths).sim
    assert low.dtype == torch.float32
    assert_close(low, ref, 5e-2)


@pytest.mark.parametrize("head, fn", [("sgr", "encode_images"), ("sgr", "encode_captions"), ("sgr", "score_block"),
                                      ("saf", "score_block")])
def test_compiled_functions_have_no_graph_break(head, fn):
    """Dynamo traces each compiled function of the backbone into one graph (backend-independent)."""
    model = _model(head, dtype=torch.float32).train()
    images, tokens, lengths = _inputs(3, 4, dtype=torch.float32)
    img, cap = model.encode_images(images), model.encode_captions(tokens, lengths)
    args = {"encode_images": (images,), "encode_captions": (tokens, lengths),
            "score_block": (img.local, img.global_, cap.local, cap.mask, cap.global_)}[fn]
    explanation = torch._dynamo.explain(getattr(model, fn))(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
