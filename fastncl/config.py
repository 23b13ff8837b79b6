"""Configuration: dataclasses, presets, YAML load/dump, command-line overrides, validation.

Load order: dataclass defaults < ``--preset`` < ``--config FILE.yaml`` < explicit flags and
``key.path=value`` overrides. The resolved config is written to the run folder.

Values the papers leave unstated (their appendices are not available) carry a comment saying
where the default comes from; the README's glossary maps every paper symbol to its field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastncl import FastnclError

METHODS = ("vanilla", "hinge", "ncr", "sps", "esc")
# Warm-up epochs on the embedded data (resolved into the config when optim.warmup_epochs is None).
# InfoNCE models need 4 epochs to give a useful first split; the hinge methods (trained on the
# mean over negatives during warm-up) split best after 2, before they start memorising noise.
WARMUP_EPOCHS = {"vanilla": 4, "hinge": 2, "sps": 4, "ncr": 2, "esc": 2}


@dataclass
class SyntheticConfig:
    train_images: int = 1000
    dev_images: int = 500
    test_images: int = 1000
    captions_per_image: int = 5
    regions: int = 12
    feature_dim: int = 256
    idiosyncratic_words: int = 1500
    region_noise: float = 2.0  # std of the per-region noise (prototypes have unit-variance entries)
    instance_weight: float = 2.0  # weight of the per-image instance vector added to every region
    seed: int = 0  # the data's own seed: the same data whatever the training seed


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic", "emoji" (built once into the cache), "synthetic-f30k" (Flickr30K
    # shapes), or a SCAN/NCR folder
    noise: float = 0.0  # NCR-protocol noise rate in [0, 1)
    noise_file: str | None = None  # a saved caption -> image index (.npy), instead of `noise`; runs record its
    # measured rate (the fraction of captions not on their own image)
    noise_seed: int | None = None  # default: the run seed
    dev_split: str = "dev"
    test_split: str = "test"  # MS-COCO: "testall"
    dev_images: int = 1000  # official code: validation on the first 1000 dev images
    test_protocol: str = "full"  # "full" (F30K, CC152K, COCO 5K) or "coco" (adds COCO 1K 5-fold)
    vocab: str | None = None  # vocabulary JSON; default: searched next to the data folder
    max_len: int = 64  # captions are cut at this many tokens (with <start>/<end>)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    backbone: str = "vse"  # "vse" (fast dual encoder), "sgr" or "saf" (the papers' SGRAF heads)
    embed_dim: int = 256  # papers (SGRAF): 1024
    pooling: str = "max"  # vse: pooling of the normalised region and word features ("max" or "mean")
    word_dim: int = 128  # papers: 300
    dropout: float = 0.1  # on word embeddings (sgr/saf: also in the self-attention; papers: 0.4)
    sim_dim: int = 256  # sgr/saf: similarity-vector size (papers: 256)
    sgr_steps: int = 3  # sgr: graph-reasoning steps (papers: 3)
    smooth: float = 9.0  # sgr/saf: lambda of the SCAN text-to-image attention (papers: 9)
    pair_block: int = 128  # sgr/saf: images x captions per scored block without gradients (memory bound)


@dataclass
class OptimConfig:
    batch_size: int = 128  # both papers
    lr: float = 2e-3  # papers: 2e-4 for SGR; the small vse backbone on the embedded data wants more
    lr_step: int = 8  # multiply the lr by 0.1 every lr_step co-training epochs (0: never)
    grad_clip: float = 2.0  # all official codes
    warmup_epochs: int | None = None  # None: the method's default, WARMUP_EPOCHS (SPS code: 5, ESC paper: 10)
    fill_epoch: bool = True  # an epoch trains on at least N pairs, cycling small subsets (official: one
    # pass over the primary subset, so a tiny reliable set gives SPS a tiny epoch)
    epochs: int = 12  # co-training epochs after warm-up (papers: 40 on F30K)


@dataclass
class SplitConfig:
    # per-sample losses above this quantile are clipped to it before the min-max normalisation that
    # every mixture fit sees (1.0: no clipping, the official codes). A few extreme losses otherwise
    # squeeze the bulk into a narrow band and the GMM spends a component on them: every pair "clean"
    # (NCR and ESC on the emoji set at 60 % noise)
    clip_quantile: float = 0.99


@dataclass
class HingeConfig:
    margin: float = 0.2  # alpha of the VSE++ hinge (SGRAF, NCR)


@dataclass
class NCRConfig:
    margin: float = 0.2  # alpha of the hinge
    soft_margin_base: float = 10.0  # m of the exponential soft margin
    clean_threshold: float = 0.5
    min_noisy_fraction: float = 0.01  # official fallback when every pair looks clean
    # clean pairs' target: "corectified" (NCR code: p + (1 - p) q, q the model's own eval-mode
    # prediction) or "peer" (the peer's clean probability p alone; fastncl <= 0.1.0)
    clean_target: str = "corectified"
    # noisy pairs' target: "corefined" (NCR code: both models' eval-mode predictions averaged) or
    # "own" (the model's own train-mode hinge confidence / alpha; fastncl <= 0.1.0)
    noisy_target: str = "corefined"
    # noisy pairs' loss: "soft" (NCR code: every pair, margin from its target) or "hard" (BiCro's
    # noise_hard: pairs with a target <= noise_label_cut add nothing; fastncl <= 0.1.0)
    noisy_loss: str = "soft"
    noise_label_cut: float = 0.5
    noisy_start: int | None = None  # co-training epoch of the first noisy step; None: epochs // 2 (NCR code;
    # fastncl <= 0.1.0: 0)


@dataclass
class SPSConfig:
    tau: float = 0.07  # SPS Sec. 3.2
    reliable_threshold: float = 0.99  # epsilon_1: paper Fig. 4; official code 0.6
    noisy_threshold: float = 0.5  # epsilon_2
    # floor of the reliable set, as a fraction of the pairs with p > epsilon_2: below it, epsilon_1
    # falls back to the largest cut that keeps the floor (said in the epoch line; the papers have none)
    min_reliable_fraction: float = 0.5
    min_noisy_fraction: float = 0.0  # official 0.01: if every p > epsilon_2, 1 % is made noisy
    consistency_margin: float = 0.01  # alpha of Eq. 9-10 (paper: unstated; official: 0, no hinge)
    cross_weight: float = 5.0  # lambda_1 (paper: unstated; official 25 on the SGR sigmoid scale)
    metric_weight: float = 5.0  # lambda_2 (paper: unstated; official 25)
    intramodal: str = "global"  # S(I_i, I_j) from "global" embeddings (paper) or "pooled" means (official)
    proxy_label: str = "paper"  # "paper": Eq. 12; "official": prediction x cosine, cut at proxy_cut
    proxy_gamma: float = 1.0  # gamma of Eq. 12 (paper: unstated)
    proxy_beta: float = 5.0  # beta of Eq. 12 (paper: unstated)
    proxy_cut: float = 0.5  # official proxy label: zeroed below this
    proxy_directions: str = "both"  # "both" (paper) or "i2t" (official: image -> proxy caption only)
    quasi_clean_start: int = 3  # co-training epoch from which L^qc is used (official: 10 of 40)
    noisy_start: int = 5  # co-training epoch from which L^n is used (official: 15 of 40)
    separate_steps: bool = False  # official: one optimizer step each for (re+cro+met), qc and n


@dataclass
class ESCConfig:
    margin: float = 0.2  # alpha of the triplet loss (ESC Sec. 4.1)
    soft_margin_base: float = 10.0  # m of the soft margin (ESC Sec. 4.1)
    esc_weight: float = 0.5  # beta of Eq. 9
    division_margin: float = 0.0  # alpha_1 of Eq. 8
    train_margin: float = 0.0  # alpha_2 of Eq. 14
    clean_threshold: float = 0.5  # delta of Eq. 12 (paper: in the supplement; BiCro/ESC code 0.5)
    min_noisy_fraction: float = 0.0  # official 0.01: 1 % made noisy when every pair looks clean
    # "gmm" (BiCro's run.py default) or "bmm" (paper, Eq. 10): after the hinge warm-up the Beta mixture's
    # clean posterior is flat and its clean component takes 53-66 % of the pairs at 60 % noise (40 %
    # clean), so its clean set is half noisy and ESC degrades (README, "ESC's split")
    mixture: str = "gmm"
    mixture_iters: int = 10
    division_hardest: bool = True  # l_hard over the hardest negative (paper Eq. 1); official: mean
    esc_normalize: bool = False  # official: row-normalised l_ESC
    train_esc: str = "pseudo_negative"  # L_ESC per-sample pseudo-negatives (Eq. 14) or one "anchor" (official)
    anchors_clean: bool = True  # anchors always in the clean set (Eq. 12); official: by threshold only
    clean_labels: str = "one"  # clean pairs' label: "one" (paper, Sec. 3.3) or "bicro" (official: 0.5 + c/2)
    label_anchor_fraction: float = 0.1  # BiCro soft labels: top B/10 + 1 pairs of a batch are anchors
    # features the BiCro labels compare: "auto" = those the backbone's similarity uses (vse: "global";
    # sgr/saf: "pooled", the mean-pooled features of BiCro's code); fastncl <= 0.1.0 used "pooled" on vse
    label_features: str = "auto"
    noise_label_cut: float = 0.5  # BiCro noise_soft: soft labels <= this become 0
    # "hard" (BiCro's noise_hard): labels <= the cut are left out; "soft" (BiCro scripts, noise_soft): every
    # noisy pair trained, a label-0 pair with margin 0, which pulls the mismatched pairs together (README)
    noisy_loss: str = "hard"
    noisy_start: int | None = None  # co-training epoch of the first noisy step; None: epochs // 2 (paper: 20 of 40)
    warmup: str = "all"  # "all": mean hinge on every pair; "select": smallest warmup_rate only (official)
    warmup_rate: float = 0.3
    separate_steps: bool = False  # official: separate optimizer steps for noisy, clean and L_ESC


@dataclass
class RuntimeConfig:
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    backend: str = "auto"  # loss-op backend: "auto", "torch", "triton"
    eval_batch: int = 1000  # images/captions encoded per chunk in evaluation and the split pass
    progress: bool | None = None  # progress bars; default: when stderr is a terminal
    threads: int = 0  # torch CPU threads (0: torch's default)
    compile: bool = False  # torch.compile the backbones (training step, split pass, evaluation)
    cuda_graphs: bool = True  # with compile on a GPU: CUDA graphs (mode="reduce-overhead") for steps and split pass
    amp: str = "off"  # mixed precision: "off", "auto" (bf16 where supported, else fp16), "bf16", "fp16" (+ scaler)
    # training captions cut to the batch's longest, rounded up to this (0: never); None: 8 for the
    # pairwise sgr/saf heads (cost grows with the length), 0 for vse (keeps its dropout draws as before)
    length_multiple: int | None = None
    tensorboard: bool = False  # also log to RUN/tb (needs the tensorboard package)


@dataclass
class Config:
    method: str = "sps"
    seed: int = 0
    out: str | None = None
    preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    hinge: HingeConfig = field(default_factory=HingeConfig)
    ncr: NCRConfig = field(default_factory=NCRConfig)
    sps: SPSConfig = field(default_factory=SPSConfig)
    esc: ESCConfig = field(default_factory=ESCConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Presets: the official codes' behaviour (reference-implementations notes, B.3 and H). The
# official schedules (warm-up, epochs, lr, curriculum) are for Flickr30K-size data.
PRESETS: dict[str, dict[str, Any]] = {
    "vanilla": {"method": "vanilla"},
    "hinge": {"method": "hinge"},
    "ncr": {"method": "ncr"},
    "sps": {"method": "sps"},
    "esc": {"method": "esc"},
    "ncr-official": {"method": "ncr", "split": {"clip_quantile": 1.0}},  # NCR's code: the rest are the defaults
    "sps-official": {
        "method": "sps",
        "sps": {
            "reliable_threshold": 0.6, "consistency_margin": 0.0, "cross_weight": 25.0, "metric_weight": 25.0,
            "intramodal": "pooled", "proxy_label": "official", "proxy_directions": "i2t", "separate_steps": True,
            "quasi_clean_start": 10, "noisy_start": 15, "min_noisy_fraction": 0.01,
            "min_reliable_fraction": 0.0,
        },
        "split": {"clip_quantile": 1.0},
        "optim": {"lr": 2e-4, "lr_step": 10, "warmup_epochs": 5, "epochs": 40, "fill_epoch": False},
    },
    "esc-official": {
        "method": "esc",
        "esc": {
            "esc_normalize": True, "train_esc": "anchor", "division_hardest": False, "anchors_clean": False,
            "warmup": "select", "separate_steps": True, "noisy_start": 20, "clean_labels": "bicro",
            "min_noisy_fraction": 0.01, "mixture": "bmm", "noisy_loss": "soft", "label_features": "pooled",
        },
        "split": {"clip_quantile": 1.0},
        "optim": {"lr": 2e-4, "lr_step": 30, "warmup_epochs": 10, "epochs": 40, "fill_epoch": False},
    },
}

# The papers' backbone and per-dataset settings (reference-implementations notes, sections D and H).
# "<method>-<dataset>" follows the paper, with the official schedule where the paper gives none;
# "<method>-official-<dataset>" is the released code. Every one trains SGR (SGRAF) with batch 128.
SGR_MODEL = {"backbone": "sgr", "embed_dim": 1024, "word_dim": 300, "sim_dim": 256, "sgr_steps": 3,
             "dropout": 0.4, "smooth": 9.0}
DATASETS = {
    "f30k": {},
    "coco": {"data": {"test_split": "testall", "test_protocol": "coco"}},  # 5K and 1K 5-fold
    "cc152k": {},
}
_SCHEDULES = {  # method -> dataset -> optim (both variants); SPS code: 40 / 20 / 40 epochs, lr x0.1 every 10
    "sps": {d: {"lr": 2e-4, "lr_step": 10, "warmup_epochs": 5, "epochs": 20 if d == "coco" else 40,
                "batch_size": 128} for d in DATASETS},
    # ESC paper: warm-up 10 epochs, 40 epochs; code (BiCro defaults): lr 2e-4, x0.1 at epoch 30, for all datasets
    "esc": {d: {"lr": 2e-4, "lr_step": 30, "warmup_epochs": 10, "epochs": 40, "batch_size": 128} for d in DATASETS},
}
_PAPER = {  # what the papers state beyond the defaults; the code's curriculum where the paper gives only the order
    "sps": {"sps": {"quasi_clean_start": 10, "noisy_start": 15}},
    "esc": {"esc": {"noisy_start": 20, "mixture": "bmm"}},  # "clean for 20 epochs, then all"; Eq. 10
}


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


for _method in ("sps", "esc"):
    for _dataset, _data in DATASETS.items():
        _common = _deep_update({"model": SGR_MODEL, "optim": _SCHEDULES[_method][_dataset]}, _data)
        PRESETS[f"{_method}-{_dataset}"] = _deep_update(_deep_update({"method": _method}, _PAPER[_method]), _common)
        _official = _deep_update(PRESETS[f"{_method}-official"], _common)
        if _method == "esc":
            _official["seed"] = 96  # BiCro's scripts
        PRESETS[f"{_method}-official-{_dataset}"] = _official

CHOICES = {
    "method": METHODS,
    "data.test_protocol": ("full", "coco"),
    "model.backbone": ("vse", "sgr", "saf"),
    "model.pooling": ("max", "mean"),
    "sps.intramodal": ("global", "pooled"),
    "sps.proxy_label": ("paper", "official"),
    "sps.proxy_directions": ("both", "i2t"),
    "esc.mixture": ("bmm", "gmm"),
    "esc.train_esc": ("pseudo_negative", "anchor"),
    "esc.warmup": ("all", "select"),
    "esc.clean_labels": ("one", "bicro"),
    "esc.label_features": ("auto", "global", "pooled"),
    "esc.noisy_loss": ("soft", "hard"),
    "ncr.noisy_loss": ("soft", "hard"),
    "ncr.clean_target": ("corectified", "peer"),
    "ncr.noisy_target": ("corefined", "own"),
    "runtime.backend": ("auto", "torch", "triton"),
    "runtime.amp": ("off", "auto", "bf16", "fp16"),
}
PROBABILITIES = ("ncr.clean_threshold", "ncr.noise_label_cut", "sps.reliable_threshold", "sps.noisy_threshold", "esc.clean_threshold",
                 "esc.noise_label_cut", "sps.proxy_cut", "esc.warmup_rate", "esc.label_anchor_fraction",
                 "ncr.min_noisy_fraction", "sps.min_noisy_fraction", "esc.min_noisy_fraction",
                 "sps.min_reliable_fraction")
POSITIVE = ("optim.batch_size", "optim.lr", "model.embed_dim", "model.word_dim", "model.sim_dim", "model.sgr_steps",
            "model.smooth", "model.pair_block", "runtime.eval_batch",
            "data.max_len", "data.synthetic.train_images", "data.synthetic.dev_images", "data.synthetic.test_images",
            "data.synthetic.captions_per_image", "data.synthetic.regions", "data.synthetic.feature_dim",
            "sps.tau", "esc.mixture_iters")


def _merge(base: dict, update: dict, where: str, prefix: str = "") -> None:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise FastnclError(f"{where}: unknown config key '{path}'")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise FastnclError(f"{where}: '{path}' is a section; expected a mapping, got {value!r}")
            _merge(base[key], value, where, path + ".")
        else:
            base[key] = value


def _coerce(path: str, annotation: str, value: Any, where: str) -> Any:
    """Check a value against its field's annotation (a string, as written in this module)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise FastnclError(f"{where}: '{path}' may not be empty")
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if "float" in kinds and isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if "str" in kinds and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    wanted = " or ".join(k for k in kinds if k != "None")
    raise FastnclError(f"{where}: '{path}' must be {wanted}, got {value!r}")


def _build(cls, values: dict, where: str, prefix: str = ""):
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[f.name] = _build(f.default_factory, values[f.name], where, path + ".")
        else:
            kwargs[f.name] = _coerce(path, f.type, values[f.name], where)
    return cls(**kwargs)


def _get(cfg: Config, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    for path, choices in CHOICES.items():
        if _get(cfg, path) not in choices:
            flag = "--method" if path == "method" else path
            raise FastnclError(f"{flag}: must be one of {', '.join(choices)}; got {_get(cfg, path)!r}")
    if cfg.optim.warmup_epochs is None:
        cfg.optim.warmup_epochs = WARMUP_EPOCHS[cfg.method]
    for section in (cfg.ncr, cfg.esc):  # the NCR/ESC codes: the noisy set joins after half the epochs
        if section.noisy_start is None:
            section.noisy_start = cfg.optim.epochs // 2
    if cfg.runtime.length_multiple is None:
        cfg.runtime.length_multiple = 0 if cfg.model.backbone == "vse" else 8
    if not 0.0 <= cfg.data.noise < 1.0:
        raise FastnclError(f"--noise: the noise rate must be in [0, 1), got {cfg.data.noise}")
    if cfg.data.noise_file and cfg.data.noise > 0:
        raise FastnclError(f"--noise {cfg.data.noise:g} and --noise-file: give one of them (the file fixes the noisy "
                           "pairs; its measured noise rate is recorded)")
    for path in PROBABILITIES:
        if not 0.0 <= _get(cfg, path) <= 1.0:
            raise FastnclError(f"{path}: must be in [0, 1], got {_get(cfg, path)}")
    for path in POSITIVE:
        if not _get(cfg, path) > 0:
            raise FastnclError(f"{path}: must be positive, got {_get(cfg, path)}")
    if cfg.sps.noisy_threshold > cfg.sps.reliable_threshold:
        raise FastnclError("sps.noisy_threshold (epsilon_2) must not exceed sps.reliable_threshold (epsilon_1)")
    for path in ("optim.epochs", "optim.warmup_epochs", "optim.lr_step", "sps.quasi_clean_start",
                 "sps.noisy_start", "esc.noisy_start", "ncr.noisy_start", "runtime.threads", "runtime.length_multiple"):
        if _get(cfg, path) < 0:
            raise FastnclError(f"{path}: must not be negative, got {_get(cfg, path)}")
    for path in ("seed", "data.noise_seed", "data.synthetic.seed"):
        if not 0 <= (_get(cfg, path) or 0) < 2**63:  # what torch.manual_seed and NumPy take
            raise FastnclError(f"{'--seed' if path == 'seed' else path}: must lie in [0, 2**63), got {_get(cfg, path)}")
    if not 0.0 < cfg.split.clip_quantile <= 1.0:
        raise FastnclError(f"split.clip_quantile: must be in (0, 1], got {cfg.split.clip_quantile}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise FastnclError(f"model.dropout: must be in [0, 1), got {cfg.model.dropout}")
    if cfg.data.synthetic.regions < 7:
        raise FastnclError("data.synthetic.regions: must be at least 7 (one region per attribute, plus one)")
    if cfg.optim.epochs + cfg.optim.warmup_epochs == 0:
        raise FastnclError("optim.epochs: nothing to train (epochs and warmup_epochs are both 0)")
    for path, value in _floats(cfg):  # optim.lr: .inf used to train to a chance-level table
        if not math.isfinite(value):
            raise FastnclError(f"{path}: must be a finite number, got {value}")
    return cfg


def _floats(section, prefix: str = ""):
    """(path, value) of every float in a config tree."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise FastnclError(f"override '{text}': expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def nest(path: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FastnclError(f"--config {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise FastnclError(f"--config {path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise FastnclError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FastnclError(f"--config {path}: expected a mapping at the top level")
    return data


# A built-in data set's own tested settings, below --preset, --config and overrides. Synthetic
# (the embedded default) is what the dataclass defaults are tuned for.
DATA_PRESETS: dict[str, dict[str, Any]] = {
    # an emoji epoch holds 12,680 pairs, 2.5x the synthetic set's 5,000: 2 + 6 epochs take about as many
    # steps as the synthetic 4 + 12, and SPS's curriculum is scaled alike; a 128-d GRU costs a third
    "emoji": {
        "model": {"embed_dim": 128},
        "optim": {"warmup_epochs": 2, "epochs": 6, "lr_step": 4},
        "sps": {"quasi_clean_start": 2, "noisy_start": 3},
    },
}


def resolve(preset: str | None = None, config_file: str | None = None, overrides: list[tuple[str, Any]] = (),
            method: str | None = None) -> Config:
    """Defaults < the data set's preset (DATA_PRESETS) < preset < YAML file < overrides; validated."""
    layers = []
    if preset is not None:
        if preset not in PRESETS:
            raise FastnclError(f"--preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        layers.append((f"preset {preset}", PRESETS[preset]))
    if config_file is not None:
        layers.append((f"--config {config_file}", load_yaml(config_file)))
    layers += [(f"override {key}", nest(key, value)) for key, value in overrides]
    values = Config().to_dict()
    for where, layer in layers:  # first pass: which data set
        _merge(values, layer, where)
    source = values["data"]["source"]
    data_preset = DATA_PRESETS.get(source) if isinstance(source, str) else None  # a wrong type fails in _build
    if data_preset is not None:
        values = _deep_update(Config().to_dict(), data_preset)
        for where, layer in layers:
            _merge(values, layer, where)
    if preset is not None:
        values["preset"] = preset
    if method is not None:
        if preset is not None and PRESETS[preset]["method"] != method:
            raise FastnclError(f"--method {method} contradicts --preset {preset} (a {PRESETS[preset]['method']} preset)")
        values["method"] = method
    return validate(_build(Config, values, "config"))


def from_dict(values: dict, where: str) -> Config:
    """A config from a dict (e.g. a run folder's config.yaml): unknown keys are errors."""
    base = Config().to_dict()
    _merge(base, values, where)
    return validate(_build(Config, base, where))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
