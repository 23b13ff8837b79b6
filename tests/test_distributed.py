"""Data parallelism (fastncl.distributed) on gloo, two processes against one, in float64.

The step-level tests run every method's loss groups through ``ShardedBackbone`` on two ranks
(file rendezvous) and through the plain model in this process, from the same weights and the
same global batches: the per-step losses, the split losses and the parameters after a few
optimizer steps must agree to float64 round-off (a rank that saw only its own rows' negatives,
or gradients summed instead of averaged, is off by far more). The CLI tests (test_torchrun.py)
launch `torchrun` itself.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastncl import distributed, kernels
from fastncl.config import parse_override
from fastncl.data.batches import Batch
from fastncl.methods import build_method
from fastncl.models import build_backbone, encode_pairs
from fastncl.step import run_step

from helpers import IMAGE_DIM, REGIONS, VOCAB, config, one_thread  # noqa: F401

B = 8  # the global batch: 4 rows per rank
STEPS = 3
# (method, backbone, overrides): every method on vse; NCR, SPS and ESC on sgr (visual batch norm
# over the global batch, similarity columns split over the ranks) and SAF
CASES = [
    ("vanilla", "vse", []),
    ("hinge", "vse", []),
    ("ncr", "vse", []),
    ("sps", "vse", []),
    ("sps", "vse", ["sps.separate_steps=true", "sps.intramodal=pooled", "sps.proxy_directions=i2t"]),
    ("esc", "vse", []),
    ("esc", "vse", ["esc.separate_steps=true", "esc.train_esc=anchor", "esc.clean_labels=bicro"]),
    ("ncr", "sgr", []),
    ("sps", "sgr", []),
    ("esc", "sgr", []),
    ("ncr", "saf", []),  # SAF: per-caption gate batch norm, its running statistics summed over the ranks
    ("sps", "saf", []),
    # a secondary batch of one pair, fewer than the ranks: encoded whole on each (its gradient 1/N per rank)
    ("sps", "vse", [], (B, 7, 1)),
]
# a Linear's bias feeding a batch norm has no gradient in exact arithmetic: Adam turns its round-off
# gradient into steps of the learning rate's size in any direction (in one process as well), and
# the running mean takes the bias in; neither changes an output (the losses and scores are compared)
BEFORE_BATCH_NORM = {f"visual_sa.{part}" for part in ("local.0.bias", "global_.0.bias", "local.1.running_mean",
                                                      "global_.1.running_mean")}
BEFORE_BATCH_NORM |= {"filtration.attn.bias", "filtration.running_mean"}
SUBSETS = {"vanilla": ("all",), "hinge": ("all",), "ncr": ("clean", "noisy"), "esc": ("clean", "noisy"),
           "sps": ("reliable", "quasi_clean", "noisy")}


def _batch(seed: int, size: int, first: int, dtype) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (size,), generator=g)
    lengths[0] = 6  # the batch's longest caption fills the token width
    tokens = torch.randint(1, VOCAB, (size, 6), generator=g) * (torch.arange(6) < lengths.view(-1, 1))
    images = torch.randn(size, REGIONS, IMAGE_DIM, generator=g, dtype=dtype)
    return Batch(torch.arange(first, first + size), images, tokens, lengths)


def _case(method: str, backbone: str, overrides: list[str], sizes: tuple = (B, 7, 5)) -> dict:
    """Warm-up steps, then co-training steps on every subset, and the split losses: what one rank
    computes (the plain model when no process group is up)."""
    cfg = config(*(parse_override(o) for o in (f"model.backbone={backbone}", "model.embed_dim=8", "model.word_dim=8",
                                               "model.sim_dim=4", "model.dropout=0", *overrides)), method=method)
    m = build_method(cfg, kernels.Ops("torch"))
    torch.manual_seed(0)
    models = [distributed.global_batch_norm(build_backbone(cfg.model, IMAGE_DIM, VOCAB, REGIONS)).double()
              for _ in range(2)]
    for model in models:
        distributed.broadcast_module(model)
    views = [distributed.ShardedBackbone(x) if distributed.size() > 1 else x for x in models]
    opt = torch.optim.Adam(models[0].parameters(), lr=1e-2)
    peer_prob = torch.linspace(0.05, 0.95, 64, dtype=torch.float64)
    losses = []
    for step in range(STEPS):
        batch = _batch(step, B, 0, torch.float64)

        def warmup(b=batch):
            return m.warmup_loss(views[0], b)

        terms = run_step(opt, [warmup], False, 2.0, modules=[models[0]])
        losses.append({k: float(v.detach()) for k, v in terms.items()})
    for step in range(STEPS):
        batches = {name: _batch(10 * step + i, sizes[i], 8 * i, torch.float64)  # 7, 5: uneven shards
                   for i, name in enumerate(SUBSETS[method])}
        groups = m.train_groups(views[0], views[1], batches, peer_prob, co_epoch=10)
        terms = run_step(opt, groups, m.separate_steps, 2.0, modules=[models[0]])
        losses.append({k: float(v.detach()) for k, v in terms.items()})
    with torch.no_grad():
        models[0].eval()
        split = m.split_losses(views[0], _batch(99, B, 0, torch.float64)) if m.uses_split else (torch.zeros(1), None)
        probe = _batch(98, B, 0, torch.float64)
        img, cap = encode_pairs(views[0], probe.images, probe.tokens, probe.lengths)
        sim = views[0].similarity(img, cap)
    return {"losses": losses, "split": split[0].clone(), "sim": sim.clone(),
            "params": {k: v.detach().clone() for k, v in models[0].state_dict().items()}}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [_case(*c) for c in CASES]
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    """Every case run on two gloo ranks (one spawn for all): rank -> results."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, str(Path(tmp) / "rendezvous"), tmp), nprocs=2, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _case_id(case) -> str:
    method, backbone, overrides, *sizes = case
    return "-".join([method, backbone] + overrides[:1] + ["x".join(map(str, s)) for s in sizes])


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_two_ranks_equal_one_process(two_ranks, index):
    single = _case(*CASES[index])
    for rank in range(2):
        got = two_ranks[rank][index]
        assert len(got["losses"]) == len(single["losses"]) == 2 * STEPS
        for step, (a, b) in enumerate(zip(got["losses"], single["losses"])):
            assert a.keys() == b.keys(), step
            for name in a:
                assert a[name] == pytest.approx(b[name], rel=1e-9, abs=1e-12), (step, name)
        torch.testing.assert_close(got["split"], single["split"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["sim"], single["sim"], rtol=1e-9, atol=1e-12)
        for name, value in single["params"].items():
            if name in BEFORE_BATCH_NORM:
                continue
            torch.testing.assert_close(got["params"][name], value, rtol=1e-9, atol=1e-10, msg=name)
    # and the ranks hold the same model, bit for bit
    for name, value in two_ranks[0][index]["params"].items():
        assert torch.equal(value, two_ranks[1][index]["params"][name]), name


def test_bounds_split_rows_as_tensor_split():
    for n in (0, 1, 5, 8, 13):
        for world in (1, 2, 3):
            b = distributed.bounds(n, world)
            sizes = [len(c) for c in torch.tensor_split(torch.arange(n), world)]
            assert np.diff(b).tolist() == sizes


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch):
    from fastncl import FastnclError, assemble

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(FastnclError, match="runtime.device=cuda:1: under torchrun each process takes the GPU"):
        assemble.resolve_device("cuda:1")
