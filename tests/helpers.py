"""Helpers shared by several test files: a tool script loaded as a module, the tiny models,
batches, fits and configs of the method tests, and a run killed at one of its commit points."""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fastncl.config import resolve
from fastncl.data.batches import Batch
from fastncl.methods.mixture import MixtureFit
from fastncl.models import VSE

ROOT = Path(__file__).resolve().parents[1]
IMAGE_DIM, VOCAB, REGIONS = 8, 20, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread, so that OpenMP waits on a busy machine cost nothing (a test module
    that imports this fixture uses it for all its tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(*overrides, preset=None, method=None):
    return resolve(preset=preset, method=method, overrides=list(overrides))


# NCR's and ESC's co-training loss, noisy phase and clean side as their papers and codes have them
# (the defaults train the clean component's core alone, with the hardest and the mean negative added)
CODE_LOSS = (("ncr.negatives", "hardest"), ("ncr.train_noisy", True), ("esc.negatives", "hardest"),
             ("esc.train_noisy", True), ("split.clean_side", "posterior"))


def code_config(*overrides, preset=None, method=None):
    """``config`` with NCR's and ESC's loss, noisy phase and clean side as their codes (CODE_LOSS), then ``overrides``."""
    return config(*CODE_LOSS, *overrides, preset=preset, method=method)


def fake_fit(clean_prob) -> MixtureFit:
    p = np.asarray(clean_prob, dtype=np.float64)
    return MixtureFit(clean_prob=p, normalized=1 - p, kind="gmm", params={})


def tiny_model(seed: int, dropout: float = 0.0) -> VSE:
    torch.manual_seed(seed)
    return VSE(IMAGE_DIM, VOCAB, embed_dim=16, word_dim=8, dropout=dropout)


def tiny_batch(seed: int, size: int = 6, first_index: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (size,), generator=g)
    tokens = torch.randint(1, VOCAB, (size, 6), generator=g)
    tokens = tokens * (torch.arange(6) < lengths.view(-1, 1))  # padded with 0
    images = torch.randn(size, REGIONS, IMAGE_DIM, generator=g)
    return Batch(torch.arange(first_index, first_index + size), images, tokens, lengths)


def close(actual, expected, rtol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), rtol=rtol,
                               atol=rtol)


@contextlib.contextmanager
def killed_at(monkeypatch, what: str, epoch: int):
    """Inside the block a run is killed (KeyboardInterrupt) as it commits ``epoch``: just before it
    saves checkpoints/WHAT.pt, or (``what="metrics"``) appends that epoch's metrics line."""
    from fastncl.checkpoint import Checkpoint
    from fastncl.run import RunDir

    save, append = Checkpoint.save, RunDir.append_metrics

    def killing_save(self, path):
        if path.stem == what and self.epoch == epoch:
            raise KeyboardInterrupt
        return save(self, path)

    def killing_append(self, record):
        if what == "metrics" and record.epoch == epoch:
            raise KeyboardInterrupt
        return append(self, record)

    monkeypatch.setattr(Checkpoint, "save", killing_save)
    monkeypatch.setattr(RunDir, "append_metrics", killing_append)
    try:
        yield
    finally:
        monkeypatch.setattr(Checkpoint, "save", save)
        monkeypatch.setattr(RunDir, "append_metrics", append)
