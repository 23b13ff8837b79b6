"""Wall time of `fastncl train --method M` with the defaults on the embedded data (CPU).

One round per method (each is a full training run of a few minutes): the foundation issue's
budget is 5 minutes per method on a 2-core CPU. Run with `pytest bench/bench_train_cpu.py --cpu-train`
(without the option, `pytest bench/` skips them). Ctrl-C stops the session, not only the run.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastncl.cli import main


@pytest.mark.cpu_train
@pytest.mark.parametrize("method", ["vanilla", "hinge", "ncr", "sps", "esc"])
def bench_train_default(benchmark, tmp_path, method):
    out = tmp_path / method

    def train():
        code = main(["train", "--method", method, "--noise", "0.4", "--out", str(out), "--device", "cpu",
                     "--no-progress"])
        if code == 130:  # fastncl train caught a Ctrl-C: stop the session, not only this benchmark
            raise KeyboardInterrupt
        assert code == 0, f"fastncl train exited with {code}"

    benchmark.pedantic(train, rounds=1, iterations=1)
    results = json.loads((out / "results.json").read_text())
    benchmark.extra_info.update(method=method, torch=torch.__version__, threads=torch.get_num_threads(),
                                test_rsum=results["test"]["rsum"])
