"""End-to-end SGR benchmark (GPU): training step and dev evaluation, three ways (bench/e2e.py).

    pytest bench/bench_e2e.py                      # or: python tools/bench_e2e.py (JSON + table)

* ``bench_train_step[loop|batched|fast]``: one optimizer step at B = 128 on Flickr30K-shaped data
  (128 x 128 = 16,384 image-caption pairs); ``extra_info`` has pairs/s, the warm-up (compile)
  time and, for ``fast``, the number of graphs Dynamo compiled during the timed rounds (0: no
  recompiles in the steady state) and its graph breaks.
* ``bench_dev_eval[loop|batched|fast]``: the 1000 x 5000 dev similarity matrix of one model.

Targets (issue 4, H100): ``fast`` at least 10x faster than ``loop``, for both.
"""
from __future__ import annotations

import time

import pytest
import torch

from conftest import run_synchronized
from e2e import BATCH, VARIANTS, make_setup, warm_up

ROUNDS = {"loop": 5, "batched": 20, "fast": 50}


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


@pytest.mark.parametrize("variant", VARIANTS)
def bench_train_step(benchmark, cuda, variant):
    torch._dynamo.reset()
    setup = make_setup(variant, cuda)
    warmup_s = warm_up(setup)
    warm_up(setup)  # a second pass: CUDA graphs record on a later call than the compile
    before = _dynamo_counts()
    run_synchronized(benchmark, setup.step, rounds=ROUNDS[variant], warmup=0)  # warm after the two passes
    after = _dynamo_counts()
    benchmark.extra_info.update(
        variant=variant, batch=BATCH, pairs_per_step=BATCH * BATCH, warmup_s=warmup_s,
        pairs_per_s=BATCH * BATCH / benchmark.stats["median"],
        caption_lengths=sorted({int(b.tokens.shape[1]) for b in setup.batches}),
        graphs_compiled_in_timed_rounds=after["unique_graphs"] - before["unique_graphs"],
        graph_breaks=after["graph_breaks"],
    )


@pytest.mark.parametrize("variant", VARIANTS)
def bench_dev_eval(benchmark, cuda, variant):
    torch._dynamo.reset()
    setup = make_setup(variant, cuda, n_batches=1)
    t0 = time.perf_counter()
    sim = setup.evaluate()  # compiles (fast) and checks the shape; a CPU tensor, so already synchronised
    first_s = time.perf_counter() - t0
    assert sim.shape == (1000, 5000) and torch.isfinite(sim).all()
    run_synchronized(benchmark, setup.evaluate, rounds=1 if variant == "loop" else 3, warmup=0)
    benchmark.extra_info.update(variant=variant, images=1000, captions=5000, first_call_s=first_s)
