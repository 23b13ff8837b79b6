"""The run folder's records, defined once: the epoch record (a line of ``metrics.jsonl``), the
run's result (``results.json``) and the split file (``splits/epoch_NNN.npz``). The trainer writes
them; report, board, compare, eval and the tools read them through these classes, never through
key strings of their own.

Every record, and ``results.json``, carries ``format`` (``FORMAT``). A record without one was written by fastncl 0.1.0,
whose fields are the same; a newer format than this fastncl reads is a one-line error.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

from fastncl import FastnclError

FORMAT = 1


def check_format(found, where: str, kind: str = "record", newest: int = FORMAT) -> None:
    """A ``format`` number this fastncl reads (None: written before formats were numbered)."""
    if found is not None and int(found) > newest:
        raise FastnclError(f"{where}: written by a newer fastncl ({kind} format {int(found)}; this one reads up to "
                           f"{newest}); upgrade fastncl to read it")


def _from_json(cls, d: dict, where: str, what: str):
    """The record ``cls`` (a dataclass whose only nested record is ``split``) from its JSON ``d``,
    after checking its format and its required fields."""
    check_format(d.get("format"), where)
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in d]
    if missing:
        raise FastnclError(f"{where}: not {what} (no {', '.join(missing)})")
    values = {f.name: d[f.name] for f in fields if f.name in d}
    if values.get("split") is not None:
        values["split"] = SplitQuality.from_json(values["split"])
    return cls(**values)


@dataclass
class SubsetCount:
    size: int
    clean: int | None = None  # its pairs that are clean by the ground truth (injected noise only)


@dataclass
class SplitQuality:
    """How well a split found the noisy pairs (precision, recall and F1 of the detected noisy set,
    ROC AUC of the clean probability; None without ground truth), and each subset's size. The
    epoch record's top level averages both models' clean probabilities; ``models`` holds each
    model's own split (model k's trains model 1 - k)."""

    noisy_cut: float
    detected_noisy: int
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    auc: float | None = None
    subsets: dict[str, SubsetCount] = field(default_factory=dict)
    models: list[SplitQuality] = field(default_factory=list)
    cuts: dict[str, float] = field(default_factory=dict)  # a model's every cut (the noisy one too), by name

    def to_json(self) -> dict:
        out = {"noisy_cut": self.noisy_cut, "detected_noisy": self.detected_noisy}
        if self.cuts:
            out["cuts"] = dict(self.cuts)
        if self.subsets:
            out["subsets"] = {name: {k: v for k, v in dataclasses.asdict(s).items() if v is not None}
                              for name, s in self.subsets.items()}
        if self.auc is not None or self.precision is not None:
            out.update(precision=self.precision, recall=self.recall, f1=self.f1, auc=self.auc)
        if self.models:
            out["models"] = [m.to_json() for m in self.models]
        return out

    @classmethod
    def from_json(cls, d: dict) -> SplitQuality:
        return cls(d["noisy_cut"], d["detected_noisy"], d.get("precision"), d.get("recall"), d.get("f1"), d.get("auc"),
                   {name: SubsetCount(**s) for name, s in (d.get("subsets") or {}).items()},
                   [cls.from_json(m) for m in d.get("models") or []], dict(d.get("cuts") or {}))


@dataclass
class EpochRecord:
    """One epoch: its phase, learning rate, mean losses per model ("A", "B") and term, the dev
    recalls of the ensemble and of each model, the split's quality (epochs with a split), the
    subsets trained, what was degenerate (``warnings``), a collapse and what the guard did
    (``collapse``: reason, action, restored epoch, learning-rate scale) and the time of each phase
    (seconds)."""

    epoch: int  # 0-based
    phase: str  # "warmup" or "train"
    lr: float
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    dev: dict[str, float] = field(default_factory=dict)
    dev_models: dict[str, dict[str, float]] = field(default_factory=dict)
    split: SplitQuality | None = None
    active_subsets: list[str] | None = None
    warnings: list[str] = field(default_factory=list)
    collapse: dict | None = None  # the collapse guard's finding and action (optim.collapse)
    notes: list[str] = field(default_factory=list)  # events that are no warning (a plateau warm-up's end)
    time: float = 0.0
    time_split: float | None = None
    time_fit: float | None = None
    time_eval: float | None = None

    def to_json(self) -> dict:
        out = {"format": FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name in ("warnings", "notes") and not value):
                continue
            out[f.name] = value.to_json() if isinstance(value, SplitQuality) else value
        return out

    @classmethod
    def from_json(cls, d: dict, where: str) -> EpochRecord:
        return _from_json(cls, d, where, "an epoch record")

    def line(self, total_epochs: int) -> str:
        """The epoch line of the log."""
        d = self.dev
        losses = " ".join(f"{m}:{v['loss']:.3f}" for m, v in self.losses.items() if "loss" in v)
        msg = (f"epoch {self.epoch + 1}/{total_epochs} [{self.phase}] lr {self.lr:.1e} loss {losses} | "
               f"dev R@1 {d['i2t_r1']:.1f}/{d['t2i_r1']:.1f} rsum {d['rsum']:.1f}")
        s = self.split
        if s and s.auc is not None:
            msg += f" | split auc {s.auc:.3f} P {s.precision:.2f} R {s.recall:.2f}"
        if s:
            sizes = s.models[0].subsets if s.models else {}
            msg += " | " + " ".join(f"{name} {v.size}" for name, v in sizes.items())
        msg += f" | {self.time:.1f}s"
        if self.notes:
            msg += " | " + "; ".join(self.notes)
        if self.warnings:
            msg += " | warning: " + "; ".join(self.warnings)
        return msg


@dataclass(kw_only=True)
class RunResult:
    """``results.json``: the test recalls of the best checkpoint (``test``; ``test_coco1k`` under
    data.test_protocol=coco), the dev RSum that chose it, the last split's diagnostics, and what
    the run was (method, preset, noise rate, or noise file with its SHA-256, seed, data set).
    Written once, when the run ends; ``fastncl compare``, ``eval`` and ``report`` read it."""

    method: str
    preset: str | None = None
    noise: float  # a --noise-file run: the index's measured rate
    noise_file: str | None = None
    noise_file_sha256: str | None = None
    seed: int | None = None
    data: str | None = None
    best_epoch: int  # 0-based
    dev_rsum: float | None = None
    test: dict[str, float]
    split: SplitQuality | None = None
    test_coco1k: dict[str, float] | None = None

    def to_json(self) -> dict:
        out = {"format": FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "test_coco1k" or value is not None:
                out[f.name] = value.to_json() if isinstance(value, SplitQuality) else value
        return out

    @classmethod
    def from_json(cls, d: dict, where: str) -> RunResult:
        return _from_json(cls, d, where, "a fastncl results.json")


@dataclass
class SplitFile:
    """One epoch's split of both models (axis 0: model A, B): raw and normalised per-sample
    division losses, clean probabilities, the noisy cut, each pair's subset (an index into
    ``subset_names``, -1: none), the mixture's kind and fitted parameters, and the ground truth
    (True: clean pair) when the noise was injected."""

    losses: np.ndarray  # (2, N) float32
    normalized: np.ndarray  # (2, N) float32
    clean_prob: np.ndarray  # (2, N) float32
    noisy_cut: np.ndarray  # (2,) float64
    subset: np.ndarray  # (2, N) int8
    subset_names: list[str]
    mixture: str  # "gmm" or "bmm"
    params: list[dict]  # per model: the mixture's weights and component parameters, clean first
    clean_mask: np.ndarray | None = None  # (N,) bool
    # every cut each model's split used, by name: (2,) float64 each ("noisy" as noisy_cut, and e.g.
    # SPS's effective epsilon_1 as "reliable"); empty in a folder written before they were stored
    cuts: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def build(cls, losses, fits, divisions, clean_mask) -> SplitFile:
        """From the split pass's raw ``losses``, the MixtureFit and the ``methods.base.Division``
        per model, and the ground truth."""
        names = list(divisions[0].subsets)
        subset = np.full((len(fits), len(fits[0].clean_prob)), -1, dtype=np.int8)
        for k, division in enumerate(divisions):
            for code, name in enumerate(names):
                subset[k, division.subsets[name]] = code
        cuts = {name: np.asarray([d.cuts[name] for d in divisions], dtype=np.float64) for name in divisions[0].cuts}
        return cls(np.stack([np.asarray(x, dtype=np.float32) for x in losses]),
                   np.stack([f.normalized.astype(np.float32) for f in fits]),
                   np.stack([f.clean_prob.astype(np.float32) for f in fits]),
                   cuts["noisy"], subset, names, fits[0].kind, [f.params for f in fits],
                   None if clean_mask is None else np.asarray(clean_mask, dtype=bool), cuts)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"format": np.asarray(FORMAT), "losses": self.losses, "normalized": self.normalized,
               "clean_prob": self.clean_prob, "noisy_cut": self.noisy_cut, "subset": self.subset,
               "subset_names": np.asarray(self.subset_names, dtype=str), "mixture": np.asarray(self.mixture),
               "params": np.asarray(json.dumps(self.params)),
               "cuts": np.asarray(json.dumps({k: v.tolist() for k, v in self.cuts.items()}))}
        if self.clean_mask is not None:
            out["clean_mask"] = self.clean_mask
        return out

    @classmethod
    def from_arrays(cls, z: dict, where: str) -> SplitFile:
        check_format(z["format"] if "format" in z else None, where)
        return cls(z["losses"], z["normalized"], z["clean_prob"], z["noisy_cut"], z["subset"],
                   [str(n) for n in z["subset_names"]], str(z["mixture"]), json.loads(str(z["params"])),
                   z.get("clean_mask"),
                   {k: np.asarray(v, dtype=np.float64) for k, v in json.loads(str(z["cuts"])).items()}
                   if "cuts" in z else {})
