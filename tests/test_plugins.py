"""A method is a plug-in: a toy method defined in this file alone (its module, config section and
preset) registers and trains end to end through the CLI, with no other file touched."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import yaml

from fastncl.cli import main
from fastncl.config import POSITIVE, option, presets, resolve
from fastncl.methods import registry
from fastncl.methods.base import Method, two_way_split
from fastncl.models import encode_pairs

from helpers import load_tool
from helpers import one_thread  # noqa: F401 (an autouse fixture)

TINY = [
    "data.synthetic.train_images=30", "data.synthetic.dev_images=10", "data.synthetic.test_images=10",
    "data.synthetic.feature_dim=16", "data.synthetic.regions=8", "data.synthetic.idiosyncratic_words=50",
    "model.embed_dim=16", "model.word_dim=8", "optim.batch_size=16", "optim.epochs=2", "runtime.progress=false",
    "runtime.threads=1", "runtime.device=cpu",
]


@dataclass
class ToyConfig:
    tau: float = option(0.1, **POSITIVE)
    subset: str = option("clean", choices=("clean", "all"))  # what co-training epochs train on


class Toy(Method):
    """InfoNCE split by a GMM; co-training on the peer's clean pairs (or on every pair)."""

    name = "toy"
    config = ToyConfig
    warmup_epochs = 1
    subset_names = ("clean", "noisy")
    cut_label = "θ"

    @classmethod
    def presets(cls):
        return {"toy-warm": {"toy": {"tau": 0.2}, "optim": {"warmup_epochs": 2}}}

    def _infonce(self, model, batch):
        return self.infonce(model, *encode_pairs(model, batch.images, batch.tokens, batch.lengths), self.cfg.toy.tau)

    def split_losses(self, model, batch):
        return self._infonce(model, batch)[0], None

    def noisy_cut(self, fit):
        return 0.5

    def subsets(self, fit, anchors, co_epoch):
        if self.cfg.toy.subset == "all":
            return {"clean": np.arange(len(anchors)), "noisy": np.arange(0)}
        clean, noisy = two_way_split(fit.clean_prob, 0.5)
        return {"clean": clean, "noisy": noisy}

    def active_subsets(self, co_epoch):
        return ("clean",)

    def warmup_loss(self, model, batch):
        return {"loss": self._infonce(model, batch)[0].mean()}

    def train_groups(self, model, peer, batches, peer_prob, co_epoch):
        return [lambda: self.warmup_loss(model, batches["clean"])]


@pytest.fixture
def toy():
    registry.register(Toy)
    yield Toy
    registry.unregister("toy")


def test_a_registered_method_is_everywhere_the_registry_reaches(toy, capsys):
    assert registry.names()[-1] == "toy" and "toy-warm" in presets() and presets()["toy"] == {"method": "toy"}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "toy" in capsys.readouterr().out
    cfg = resolve(method="toy")
    assert cfg.toy == ToyConfig() and cfg.optim.warmup_epochs == 1 and "toy" in cfg.to_dict()
    warm = resolve(preset="toy-warm")
    assert warm.method == "toy" and warm.toy.tau == 0.2 and warm.optim.warmup_epochs == 2
    assert "toy" in load_tool("noise_table").method_names()


def test_a_registered_method_trains_end_to_end_through_the_cli(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "toy", "--noise", "0.4", "--out", str(out), *TINY, "toy.tau=0.2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "toy" and results["test"]["rsum"] > 0
    assert results["split"]["models"][0]["subsets"]["clean"]["size"] > 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["toy"] == {"tau": 0.2, "subset": "clean"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warmup", "train", "train"]
    assert main(["eval", str(out)]) == 0  # the run folder's config reads back with the toy section
    capsys.readouterr()


def test_a_registered_method_s_field_metadata_validates_its_values(toy, tmp_path, capsys):
    for override, why in (("toy.subset=some", "toy.subset: must be one of clean, all; got 'some'"),
                          ("toy.tau=0", "toy.tau: must be positive, got 0.0")):
        assert main(["train", "--method", "toy", "--out", str(tmp_path / "bad"), *TINY, override]) == 2
        assert capsys.readouterr().err.strip() == f"fastncl: error: {why}"
    assert not (tmp_path / "bad").exists()


def test_an_unregistered_method_is_an_unknown_one(tmp_path, capsys):
    assert "toy" not in registry.names()
    assert main(["train", "--preset", "toy-warm", "--out", str(tmp_path / "run")]) == 2
    assert "--preset: unknown preset 'toy-warm'" in capsys.readouterr().err


def test_a_plug_in_without_future_annotations_and_a_reserved_name():
    namespace = {}
    exec("from dataclasses import dataclass\n"  # a plug-in module without `from __future__ import annotations`
         "@dataclass\nclass Plain:\n    tau: float = 0.1\n    start: int | None = None\n", namespace)

    class PlainMethod(Toy):
        name = "plain"
        config = namespace["Plain"]

    registry.register(PlainMethod)
    try:
        cfg = resolve(method="plain", overrides=[("plain.tau", 1), ("plain.start", 3)])
        assert cfg.plain.tau == 1.0 and isinstance(cfg.plain.tau, float) and cfg.plain.start == 3
    finally:
        registry.unregister("plain")

    class Split(Toy):
        name = "split"

    with pytest.raises(ValueError, match="may not be named 'split'"):
        registry.register(Split)


def test_an_installed_plug_in_is_found_by_its_entry_point(monkeypatch, capsys):
    import importlib.metadata
    import sys
    import types

    module = types.ModuleType("fastncl_toy_plugin")

    def load():
        sys.modules["fastncl_toy_plugin"] = module
        return registry.register(Toy)

    entry = types.SimpleNamespace(name="toy", value="fastncl_toy_plugin", load=load)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [entry] if group == registry.ENTRY_POINTS else [])
    monkeypatch.setattr(registry, "_loaded", False)
    try:
        assert "toy" in registry.names()
        with pytest.raises(SystemExit):
            main(["train", "--help"])
        assert "toy" in capsys.readouterr().out
    finally:
        registry.unregister("toy")

    def broken():
        raise ImportError("No module named 'mypkg'")

    entry.load = broken
    monkeypatch.setattr(registry, "_loaded", False)
    assert main(["train", "--method", "sps"]) == 2
    assert capsys.readouterr().err == ("fastncl: error: method plug-in toy (fastncl_toy_plugin): cannot import it "
                                       "(No module named 'mypkg')\n")
    monkeypatch.setattr(registry, "_loaded", True)
