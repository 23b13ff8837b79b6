"""The papers' presets, shared by the methods that have them: their backbone and data sets.

``<method>-<dataset>`` follows the paper, with the official schedule where the paper gives none;
``<method>-official-<dataset>`` is the released code (reference-implementations notes, D and H).
Every one trains SGR (SGRAF) with batch 128. The official schedules are for Flickr30K-size data.
"""
from __future__ import annotations

from typing import Callable

from fastncl.config import deep_update

SGR_MODEL = {"backbone": "sgr", "embed_dim": 1024, "word_dim": 300, "sim_dim": 256, "sgr_steps": 3,
             "dropout": 0.4, "smooth": 9.0}
DATASETS = {
    "f30k": {},
    "coco": {"data": {"test_split": "testall", "test_protocol": "coco"}},  # 5K and 1K 5-fold
    "cc152k": {},
}


def paper_presets(method: str, paper: dict, official: dict, schedule: Callable[[str], dict],
                  official_seed: int | None = None) -> dict[str, dict]:
    """``<method>-official`` and, per data set, ``<method>-<dataset>`` (``paper`` over the defaults)
    and ``<method>-official-<dataset>`` (``official``), both with the SGR model and ``schedule(dataset)``."""
    out = {f"{method}-official": official}
    for dataset, data in DATASETS.items():
        common = deep_update({"model": SGR_MODEL, "optim": schedule(dataset)}, data)
        # the papers normalise the losses by min-max alone (no clipping, split.clip_quantile), take the
        # clean component's posterior (split.clean_side) and nothing else (split.structure)
        split = {"clip_quantile": 1.0, "clean_side": "posterior", "structure": "off"}
        out[f"{method}-{dataset}"] = deep_update(deep_update(paper, {"split": split}), common)
        out[f"{method}-official-{dataset}"] = deep_update(official, common)
        if official_seed is not None:
            out[f"{method}-official-{dataset}"]["seed"] = official_seed
    return out
