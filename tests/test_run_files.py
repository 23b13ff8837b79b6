"""Run-folder files are written atomically and get the mode a plain write would (0666 less the
umask), not mkstemp's private 0600: colleagues can read a shared run folder."""
from __future__ import annotations

import os
import stat

import pytest

from fastncl.run import write_atomic


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_write_atomic_follows_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "sub" / "results.json"
    write_atomic(path, "{}\n")
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    write_atomic(path, b"[]\n")  # replacing keeps the rule
    assert path.read_bytes() == b"[]\n" and stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left


def test_records_round_trip_and_their_format_is_checked(tmp_path):
    import json

    import numpy as np

    from fastncl import FastnclError
    from fastncl.records import FORMAT, EpochRecord, SplitFile, SplitQuality, SubsetCount
    from fastncl.run import RunDir

    split = SplitQuality(0.5, 3, 0.5, 0.25, 1 / 3, 0.8, {"clean": SubsetCount(7, 5)},
                         [SplitQuality(0.5, 3, subsets={"clean": SubsetCount(7)})])
    record = EpochRecord(2, "train", 1e-3, {"A": {"loss": 1.5}}, {"rsum": 300.0}, {"A": {"rsum": 290.0}}, split,
                         ["clean"], ["split A (trains B): noisy subset empty"], 3.0, 1.0, 0.1, 0.5)
    line = record.to_json()
    assert line["format"] == FORMAT and EpochRecord.from_json(json.loads(json.dumps(line)), "m") == record
    old = {k: v for k, v in line.items() if k != "format"}  # fastncl 0.1.0 wrote no format: the same fields
    assert EpochRecord.from_json(old, "m") == record
    with pytest.raises(FastnclError, match=r"^m:3: written by a newer fastncl \(record format 99"):
        EpochRecord.from_json({**line, "format": 99}, "m:3")
    with pytest.raises(FastnclError, match=r"^m:1: not an epoch record \(no phase, lr\)"):
        EpochRecord.from_json({"epoch": 0}, "m:1")

    run = RunDir.create(tmp_path / "run", resume=False)
    run.append_metrics(record)
    assert run.read_metrics() == [record]
    fake = SplitFile(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32), np.ones((2, 4), np.float32),
                     np.array([0.5, 0.5]), np.zeros((2, 4), np.int8), ["clean", "noisy"], "gmm",
                     [{"weights": [0.5, 0.5]}] * 2, np.array([True, False, True, True]))
    run.write_split(2, fake)
    back = run.read_split(2)
    assert back.subset_names == ["clean", "noisy"] and back.mixture == "gmm" and back.params == fake.params
    assert np.array_equal(back.clean_mask, fake.clean_mask) and np.array_equal(back.losses, fake.losses)
    arrays = {**fake.to_arrays(), "format": np.asarray(FORMAT + 1)}
    with pytest.raises(FastnclError, match="written by a newer fastncl"):
        SplitFile.from_arrays(arrays, "epoch_002.npz")


def test_the_run_result_round_trips_and_old_results_still_read(tmp_path):
    import json

    from fastncl import FastnclError
    from fastncl.records import FORMAT, RunResult, SplitQuality
    from fastncl.run import RunDir

    result = RunResult(method="ncr", noise=0.4, seed=1, data="synthetic", best_epoch=3, dev_rsum=250.5,
                       test={"rsum": 300.0}, split=SplitQuality(0.5, 3, 0.5, 0.25, 1 / 3, 0.8))
    run = RunDir.create(tmp_path / "run", resume=False)
    assert run.read_result() is None  # not finished
    run.write_result(result)
    written = json.loads(run.file("results.json").read_text())
    assert written["format"] == FORMAT and "test_coco1k" not in written and written["noise_file"] is None
    assert run.read_result() == result
    # fastncl 0.1.0's results.json: no format, no noise_file_sha256
    old = {k: v for k, v in written.items() if k not in ("format", "noise_file_sha256")}
    assert RunResult.from_json(old, "r") == result
    with pytest.raises(FastnclError, match=r"^r: written by a newer fastncl \(record format 99"):
        RunResult.from_json({**written, "format": 99}, "r")
    with pytest.raises(FastnclError, match=r"^r: not a fastncl results.json \(no noise, best_epoch, test\)"):
        RunResult.from_json({"method": "ncr"}, "r")


def test_the_checkpoint_round_trips_through_weights_only_and_old_ones_still_read(tmp_path):
    import numpy as np
    import torch

    from fastncl.checkpoint import FORMAT, Checkpoint, LoopState
    from fastncl.records import SplitQuality
    from fastncl.step import Precision

    models = [torch.nn.Linear(3, 2) for _ in range(2)]
    optims = [torch.optim.Adam(m.parameters()) for m in models]
    state = LoopState(250.0, 3, 2, 0.1, 1, False, [np.arange(4.0), np.ones(4)], 2, SplitQuality(0.5, 3),
                      1, {"rsum": 250.0, "i2t_r1": 40.0})
    saved = Checkpoint.capture(4, models, optims, state, {"method": "ncr", "optim": {"warmup_epochs": 2}},
                               np.random.default_rng(0), Precision())
    path = tmp_path / "last.pt"
    saved.save(path)
    raw = torch.load(path, weights_only=True)  # tensors, plain containers and numbers only
    assert raw["format"] == FORMAT and raw["epoch"] == 4 and raw["warmup_end"] == 2
    back = Checkpoint.load(path)
    assert back.epoch == 4 and back.config == saved.config
    assert all(torch.equal(a, b) for a, b in zip(back.models[1].values(), saved.models[1].values()))
    assert [np.array_equal(a, b) for a, b in zip(back.state.signal_sum, state.signal_sum)] == [True, True]
    assert (back.state.best_rsum, back.state.best_epoch, back.state.lr_scale, back.state.recoveries) == (250.0, 3, 0.1, 1)
    assert (back.state.warmup_kept, back.state.warmup_dev) == (1, {"rsum": 250.0, "i2t_r1": 40.0})
    # a checkpoint from before the format number, the guard, the mean signal and the plateau warm-up
    old = {k: v for k, v in raw.items() if k not in ("format", "lr_scale", "recoveries", "stopped", "signal_sum",
                                                       "signal_epochs", "warmup_end", "warmup_kept",
                                                       "warmup_dev")}
    torch.save(old, path)
    back = Checkpoint.load(path).state
    assert back == LoopState(250.0, 3, 2, 1.0, 0, False, None, 0, SplitQuality(0.5, 3))
