"""Configuration: the core sections, field metadata, presets, YAML load/dump, overrides, validation.

Load order: dataclass defaults < the data set's preset < ``--preset`` < ``--config FILE.yaml`` <
explicit flags and ``key.path=value`` overrides. The resolved config is written to the run folder.

Each method declares its own section (``cfg.ncr``, ``cfg.sps``, ...), warm-up default and presets
in its module (fastncl.methods.registry); this module knows the core sections only. A field's
allowed values live in its metadata (``option``), so that validation is one loop over the fields.

Values the papers leave unstated (their appendices are not available) carry a comment saying
where the default comes from; docs/methods.md maps every paper symbol to its field.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastncl import FastnclError

_BOUNDS = {"inf": math.inf, "2**63": 2**63}


def option(default, *, choices: tuple | None = None, interval: str | None = None):
    """A config field whose allowed values ``validate`` checks: one of ``choices``, or within
    ``interval``, written as in mathematics ("[0, 1]", "(0, inf)", "[0, 2**63)"). None (a value
    resolved later) is never checked."""
    metadata = {}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if interval is not None:  # parsed once, here: (the text, lower bound, upper bound)
        lo, hi = (part.strip() for part in interval[1:-1].split(","))
        metadata["interval"] = (interval, float(_BOUNDS.get(lo, lo)), float(_BOUNDS.get(hi, hi)))
    return field(default=default, metadata=metadata)


def option_choices(section: type, name: str) -> tuple:
    """The allowed values of an ``option`` field with choices (e.g. for a CLI flag)."""
    return next(f.metadata["choices"] for f in dataclasses.fields(section) if f.name == name)


def _outside(interval: tuple, value) -> str | None:
    """Why ``value`` lies outside an ``option`` interval, or None."""
    text, lo, hi = interval
    low_ok = value >= lo if text[0] == "[" else value > lo
    high_ok = value <= hi if text[-1] == "]" else value < hi
    if low_ok and high_ok:
        return None
    if text == "(0, inf)":
        return "must be positive"
    if text == "[0, inf)":
        return "must not be negative"
    if text[0] == "[" and text.endswith(", inf)"):
        return f"must be at least {text[1:text.index(',')]}"
    return f"must be in {text}"


POSITIVE = {"interval": "(0, inf)"}
NON_NEGATIVE = {"interval": "[0, inf)"}
PROBABILITY = {"interval": "[0, 1]"}
SEED = {"interval": "[0, 2**63)"}  # what torch.manual_seed and NumPy take


@dataclass
class SyntheticConfig:
    train_images: int = option(1000, **POSITIVE)
    dev_images: int = option(500, **POSITIVE)
    test_images: int = option(1000, **POSITIVE)
    captions_per_image: int = option(5, **POSITIVE)
    regions: int = option(12, interval="[7, inf)")  # one region per attribute (6), one shown twice
    feature_dim: int = option(256, **POSITIVE)
    idiosyncratic_words: int = 1500
    region_noise: float = 2.0  # std of the per-region noise (prototypes have unit-variance entries)
    instance_weight: float = 2.0  # weight of the per-image instance vector added to every region
    seed: int = option(0, **SEED)  # the data's own seed: the same data whatever the training seed


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic", "emoji" (built once into the cache), "synthetic-f30k" (Flickr30K
    # shapes), or a SCAN/NCR folder
    noise: float = option(0.0, interval="[0, 1)")  # NCR-protocol noise rate
    noise_file: str | None = None  # a saved caption -> image index (.npy), instead of `noise`; runs record its
    # measured rate (the fraction of captions not on their own image)
    noise_seed: int | None = option(None, **SEED)  # default: the run seed
    dev_split: str = "dev"
    test_split: str = "test"  # MS-COCO: "testall"
    dev_images: int = 1000  # official code: validation on the first 1000 dev images
    test_protocol: str = option("full", choices=("full", "coco"))  # "coco" adds COCO 1K 5-fold to 5K
    vocab: str | None = None  # vocabulary JSON; default: searched next to the data folder
    max_len: int = option(64, **POSITIVE)  # captions are cut at this many tokens (with <start>/<end>)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    # "vse" (fast dual encoder), "sgr" or "saf" (the papers' SGRAF heads)
    backbone: str = option("vse", choices=("vse", "sgr", "saf"))
    embed_dim: int = option(256, **POSITIVE)  # papers (SGRAF): 1024
    # vse: pooling of the normalised region and word features
    pooling: str = option("max", choices=("max", "mean"))
    word_dim: int = option(128, **POSITIVE)  # papers: 300
    dropout: float = option(0.1, interval="[0, 1)")  # on word embeddings (sgr/saf: also self-attention; papers: 0.4)
    sim_dim: int = option(256, **POSITIVE)  # sgr/saf: similarity-vector size (papers: 256)
    sgr_steps: int = option(3, **POSITIVE)  # sgr: graph-reasoning steps (papers: 3)
    smooth: float = option(9.0, **POSITIVE)  # sgr/saf: lambda of the SCAN text-to-image attention (papers: 9)
    pair_block: int = option(128, **POSITIVE)  # sgr/saf: images x captions per scored block without gradients


@dataclass
class OptimConfig:
    batch_size: int = option(128, **POSITIVE)  # both papers
    lr: float = option(2e-3, **POSITIVE)  # papers: 2e-4 for SGR; the small vse backbone on the embedded data wants more
    lr_step: int = option(8, **NON_NEGATIVE)  # multiply the lr by 0.1 every lr_step co-training epochs (0: never)
    grad_clip: float = 2.0  # all official codes
    # None: the method's own default (its ``warmup_epochs``; SPS code: 5, ESC paper: 10)
    warmup_epochs: int | None = option(None, **NON_NEGATIVE)
    # "fixed": warmup_epochs of warm-up (the papers); "plateau": at least warmup_epochs, then until an
    # epoch's dev RSum does not beat the best so far, at most warmup_max_epochs (the warm-up ends on
    # evidence rather than on a count chosen for one data set)
    warmup: str = option("fixed", choices=("fixed", "plateau"))
    warmup_max_epochs: int = option(10, **NON_NEGATIVE)
    # which warm-up epoch co-training starts from and whether warm-up epochs may be the best
    # checkpoint: "keep" (ours: every epoch is judged alike; co-training starts from the last
    # warm-up epoch), "reload" (SPS's code, from CREAM's: the warm-up epoch whose dev RSum and six
    # recalls are all at least those of the warm-up epoch kept before it is kept, and both models'
    # weights are reloaded from it before the first split) or "skip" (NCR's and ESC's codes: no
    # warm-up epoch becomes the best checkpoint; NCR's validates the last one and discards it)
    warmup_best: str = option("keep", choices=("keep", "reload", "skip"))
    fill_epoch: bool = True  # an epoch trains on at least N pairs, cycling small subsets (official: one
    # pass over the primary subset, so a tiny reliable set gives SPS a tiny epoch)
    epochs: int = option(12, **NON_NEGATIVE)  # co-training epochs after warm-up (papers: 40 on F30K)
    # a co-training epoch whose dev RSum falls below collapse_rsum_ratio x the best so far, or whose
    # split puts fewer than collapse_min_fraction of the pairs in a model's primary (clean /
    # reliable) subset, has collapsed: "recover" restores the best epoch's weights and optimizer
    # states, multiplies the learning rate by collapse_lr_factor and splits again (after
    # collapse_max_recoveries recoveries the run stops early and reports its best checkpoint);
    # "stop" stops at the first; "warn" only says it; "off" does not look. Always said in the epoch
    # line and metrics.jsonl.
    collapse: str = option("recover", choices=("recover", "warn", "stop", "off"))
    collapse_rsum_ratio: float = option(0.5, **PROBABILITY)
    collapse_min_fraction: float = option(0.02, **PROBABILITY)
    # ... or one of whose models scores every dev caption alike with every image: the standard
    # deviation of its dev similarities below collapse_min_spread (the hardest-negative collapse,
    # every embedding pulled to one point). Off (0) by default: at 60 % noise the collapsed hinge
    # runs' checkpoints had 0.0004-0.005, but NCR's working runs on glyphs (test RSum 190) had
    # 0.0037-0.011, so no one bound separates them (docs/usage.md)
    collapse_min_spread: float = option(0.0, **NON_NEGATIVE)
    collapse_lr_factor: float = option(0.1, interval="(0, 1]")
    collapse_max_recoveries: int = option(3, **NON_NEGATIVE)


@dataclass
class SplitConfig:
    # per-sample losses above this quantile are clipped to it before the min-max normalisation that
    # every mixture fit sees (1.0: no clipping, as all the codes). On the emoji set a few extreme
    # losses squeeze the bulk into a narrow band and the GMM calls most pairs clean (its data preset:
    # 0.99); on the embedded data clipping costs at 60 % noise (docs/methods.md)
    clip_quantile: float = option(1.0, interval="(0, 1]")
    # what each model's mixture is fitted to: "loss", its per-pair division loss of this epoch (all
    # the codes), or "mean", its min-max normalised losses averaged over this run's split epochs so
    # far, clipped (clip_quantile) and normalised once more by the fit (a pair the model has lately memorised keeps the higher losses of earlier epochs;
    # tools/split_signals.py scores both offline from a run's split files), or "truth", a diagnostic
    # with injected noise only: no fit, the ground truth (clean probability 1 for the pairs the noise
    # left matched, 0 for the rest; split.clean_side does not apply), what a perfect split gives the method
    signal: str = option("loss", choices=("loss", "mean", "truth"))
    # which pairs the fit calls clean: "posterior", those the clean component's posterior gives (all
    # the codes), or "core", only those of them at or below the clean component's mean (plus
    # core_width of its standard deviations; the rest get clean probability 0). Left out: the
    # method's (Method.clean_side): "core" for NCR and ESC, chosen leave-one-data-set-out at 60 %
    # noise (docs/results.md), "posterior" for SPS, whose three-way split was not measured with it.
    # On glyphs and icons the posterior's clean side held about 1.7x the truly clean pairs at purity
    # 0.56-0.57 whatever the signal (docs/methods.md)
    clean_side: str | None = option(None, choices=("posterior", "core"))
    # where the core ends (clean_side=core; ignored otherwise): at the clean component's mean plus
    # this many of its standard deviations (0: the mean; a large width keeps the whole clean side).
    # Left out: the method's (Method.core_width): 0.5 for ESC, 0 for NCR, chosen leave-one-data-set-out
    # on glyphs, icons, emoji and the embedded data at 40 and 60 % noise (docs/results.md)
    core_width: float | None = option(None, **NON_NEGATIVE)
    # a second, model-free piece of evidence combined with every mixture fit: "knn": for each pair,
    # the overlap of its image's structure_k nearest images (region features as stored) and its
    # caption's structure_k nearest captions (tf-idf of word ids), computed once before training
    # (fastncl.data.structure). The fit (and core) still says how many pairs are clean; which ones,
    # its posterior and the structure scores (calibrated on that posterior) say together
    # (methods.mixture.with_structure); "off": the fit alone (the codes, the papers' presets).
    # Left out: the method's (Method.structure): "knn" for NCR and SPS, "off" for ESC, chosen
    # leave-one-data-set-out on glyphs, icons and emoji at 40 and 60 % noise (docs/results.md).
    # split.signal=truth has no fit: the structure does not apply
    structure: str | None = option(None, choices=("off", "knn"))
    structure_k: int = option(100, **POSITIVE)


@dataclass
class RuntimeConfig:
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    backend: str = option("auto", choices=("auto", "torch", "triton"))  # loss-op backend
    eval_batch: int = option(1000, **POSITIVE)  # images/captions encoded per chunk in evaluation and the split pass
    progress: bool | None = None  # progress bars; default: when stderr is a terminal
    threads: int = option(0, **NON_NEGATIVE)  # torch CPU threads (0: torch's default)
    compile: bool = False  # torch.compile the backbones (training step, split pass, evaluation)
    cuda_graphs: bool = True  # with compile on a GPU: CUDA graphs (mode="reduce-overhead") for steps and split pass
    # mixed precision: "off", "auto" (bf16 where supported, else fp16), "bf16", "fp16" (+ scaler)
    amp: str = option("off", choices=("off", "auto", "bf16", "fp16"))
    # training captions cut to the batch's longest, rounded up to this (0: never); None: 8 for the
    # pairwise sgr/saf heads (cost grows with the length), 0 for vse (keeps its dropout draws as before)
    length_multiple: int | None = option(None, **NON_NEGATIVE)
    tensorboard: bool = False  # also log to RUN/tb (needs the tensorboard package)
    # under torchrun: the process-group backend ("auto": nccl on CUDA devices, gloo otherwise) and how
    # long a collective waits for a rank before the job fails (a rank that died ends the run)
    dist_backend: str = option("auto", choices=("auto", "nccl", "gloo"))
    dist_timeout: float = option(600.0, **POSITIVE)


def _registry():
    from fastncl.methods import registry  # the methods import this module: bound when first needed

    return registry


def _section_classes() -> dict[str, type]:
    """Each registered method's config dataclass, by section name."""
    return {name: cls.config for name, cls in _registry().methods().items() if cls.config is not None}


def _method_sections() -> dict:
    return {name: section() for name, section in _section_classes().items()}


@dataclass
class Config:
    method: str = "sps"
    seed: int = option(0, **SEED)
    out: str | None = None
    preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # each registered method's own section, read as an attribute: cfg.ncr, cfg.sps, ...
    sections: dict = field(default_factory=_method_sections)

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"config has no section {name!r}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        out.update(self.sections)
        return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}


# A built-in data set's own tested settings (core sections; methods add theirs as ``data_presets``),
# below --preset, --config and overrides. The dataclass defaults are tuned for synthetic, the default.
DATA_PRESETS: dict[str, dict[str, Any]] = {
    # an emoji epoch holds 12,680 pairs, 2.5x the synthetic set's 5,000: 2 + 6 epochs take about as many
    # steps as the synthetic 4 + 12, and SPS's curriculum is scaled alike; a 128-d GRU costs a third
    "emoji": {
        "model": {"embed_dim": 128},
        "optim": {"warmup_epochs": 2, "epochs": 6, "lr_step": 4},
        "split": {"clip_quantile": 0.99},  # chosen on its dev set at 60 % noise (docs/methods.md)
    },
}


def deep_update(base: dict, update: dict) -> dict:
    """``base`` with ``update`` merged in, section by section (neither is changed)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def presets() -> dict[str, dict]:
    """Every preset by name: each method's own (fastncl.methods.registry)."""
    return _registry().presets()


def data_preset(source) -> dict | None:
    """The data set's preset: the core sections' and each method's, or None for other data."""
    if not isinstance(source, str):
        return None  # a wrong type fails in _build
    return _registry().data_preset(DATA_PRESETS.get(source), source)


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


def _coerce(path: str, annotation, value: Any, where: str) -> Any:
    """Check a value against its field's annotation: a string as written in a module with
    ``from __future__ import annotations`` ("int | None"), or the type itself (a plug-in without it)."""
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", None) or str(annotation).replace("NoneType", "None")
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
        if f.name == "sections" and cls is Config:
            kwargs[f.name] = {name: _build(section, values[name], where, name + ".")
                              for name, section in _section_classes().items()}
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[f.name] = _build(f.default_factory, values[f.name], where, path + ".")
        else:
            kwargs[f.name] = _coerce(path, f.type, values[f.name], where)
    return cls(**kwargs)


def _fields(section, prefix: str = ""):
    """(path, field, value) of every leaf field of a config tree; a method section's own fields
    are its leaves (the section itself has no field)."""
    named = [(f.name, f, getattr(section, f.name)) for f in dataclasses.fields(section) if f.name != "sections"]
    if isinstance(section, Config):
        named += [(name, None, value) for name, value in section.sections.items()]
    for name, f, value in named:
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f, value


_FLAGS = {"method": "--method", "seed": "--seed", "data.noise": "--noise"}


def fill_defaults(cfg: Config) -> Config:
    """Resolve the values left None to be decided from others: the method's warm-up, clean side and core width,
    its own (``Method.fill_defaults``), the caption-length rounding."""
    method = _registry().get(cfg.method)
    if cfg.optim.warmup_epochs is None:
        cfg.optim.warmup_epochs = method.warmup_epochs
    if cfg.split.clean_side is None:
        cfg.split.clean_side = method.clean_side
    if cfg.split.core_width is None:
        cfg.split.core_width = method.core_width
    if cfg.split.structure is None:
        cfg.split.structure = method.structure
    method.fill_defaults(cfg)
    if cfg.runtime.length_multiple is None:
        cfg.runtime.length_multiple = 0 if cfg.model.backbone == "vse" else 8
    return cfg


def validate(cfg: Config) -> Config:
    """Check a resolved config, without changing it: every field against its metadata, then the
    rules across fields (the method's own: ``Method.check``)."""
    method = _registry().get(cfg.method)  # an unknown method: "--method: must be one of ..."
    for path, f, value in _fields(cfg):
        flag = _FLAGS.get(path, path)
        if isinstance(value, float) and not math.isfinite(value):  # optim.lr: .inf trained to chance level
            raise FastnclError(f"{flag}: must be a finite number, got {value}")
        meta = f.metadata if f is not None else {}
        if value is None or not meta:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise FastnclError(f"{flag}: must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
        if "interval" in meta and (why := _outside(meta["interval"], value)):
            raise FastnclError(f"{flag}: {why}, got {value}")
    if cfg.data.noise_file and cfg.data.noise > 0:
        raise FastnclError(f"--noise {cfg.data.noise:g} and --noise-file: give one of them (the file fixes the noisy "
                           "pairs; its measured noise rate is recorded)")
    if cfg.split.signal == "truth" and not (cfg.data.noise > 0 or cfg.data.noise_file):
        raise FastnclError("split.signal: truth splits by the injected noise's ground truth; give --noise or --noise-file")
    if cfg.optim.warmup_best == "skip" and cfg.optim.warmup == "plateau":
        raise FastnclError("optim.warmup_best: skip never judges a warm-up epoch, and optim.warmup=plateau ends the "
                           "warm-up on their dev rsum; use warmup=fixed or warmup_best keep or reload")
    if cfg.optim.warmup_best == "skip" and cfg.optim.epochs == 0:
        raise FastnclError("optim.warmup_best: skip never judges a warm-up epoch, and optim.epochs=0 trains no other: "
                           "no checkpoint to test")
    if cfg.optim.epochs + (cfg.optim.warmup_epochs or 0) == 0:
        raise FastnclError("optim.epochs: nothing to train (epochs and warmup_epochs are both 0)")
    method.check(cfg)
    return cfg


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2). PyYAML's YAML 1.1 rules also read on, off,
    yes and no as booleans, so `runtime.amp=off` or `collapse: off` reached a string field as False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise FastnclError(f"override '{text}': expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else None
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
        data = _yaml(path.read_text(encoding="utf-8"))
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


def resolve(preset: str | None = None, config_file: str | None = None, overrides: list[tuple[str, Any]] = (),
            method: str | None = None) -> Config:
    """Defaults < the data set's preset < preset < YAML file < overrides; defaults filled, validated."""
    layers = []
    known = presets()
    if preset is not None:
        if preset not in known:
            raise FastnclError(f"--preset: unknown preset {preset!r}; choose from {', '.join(known)}")
        layers.append((f"preset {preset}", known[preset]))
    if config_file is not None:
        layers.append((f"--config {config_file}", load_yaml(config_file)))
    layers += [(f"override {key}", nest(key, value)) for key, value in overrides]
    values = Config().to_dict()
    for where, layer in layers:  # first pass: which data set
        _merge(values, layer, where)
    source = values["data"]["source"]
    preset_values = data_preset(source)
    if preset_values is not None:
        values = Config().to_dict()
        _merge(values, preset_values, f"data preset {source}")
        for where, layer in layers:
            _merge(values, layer, where)
    if preset is not None:
        values["preset"] = preset
    if method is not None:
        if preset is not None and known[preset]["method"] != method:
            raise FastnclError(f"--method {method} contradicts --preset {preset} (a {known[preset]['method']} preset)")
        values["method"] = method
    return validate(fill_defaults(_build(Config, values, "config")))


def from_dict(values: dict, where: str) -> Config:
    """A config from a dict (e.g. a run folder's config.yaml): unknown keys are errors. A config
    written before the ``vanilla`` section existed keeps its temperature: sps.tau."""
    base = Config().to_dict()
    if "vanilla" not in values and "tau" in values.get("sps", {}):
        base["vanilla"]["tau"] = values["sps"]["tau"]
    _merge(base, values, where)
    return validate(fill_defaults(_build(Config, base, where)))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
