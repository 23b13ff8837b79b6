"""fastncl.config: defaults, presets, load order, YAML, validation errors, round trips."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from fastncl import FastnclError
from fastncl.config import (Config, dump_yaml, fill_defaults, from_dict, load_yaml, parse_override, presets,
                            resolve, validate)

PRESETS = presets()


def overrides(*texts):
    return [parse_override(t) for t in texts]


def test_defaults_validate():
    cfg = validate(fill_defaults(Config()))
    assert cfg.method == "sps" and cfg.data.source == "synthetic" and cfg.data.noise == 0.0
    assert resolve().to_dict() == cfg.to_dict()  # resolve = defaults filled, then validated
    assert Config().optim.warmup_epochs is None and validate(Config()).optim.warmup_epochs is None  # no mutation


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_resolves_and_validates(preset):
    cfg = resolve(preset=preset)
    assert cfg.preset == preset
    assert cfg.method == PRESETS[preset]["method"]
    validate(cfg)
    # the preset with its own method named explicitly is not a contradiction
    assert resolve(preset=preset, method=PRESETS[preset]["method"]).to_dict() == cfg.to_dict()


def test_sps_official_preset_values():
    cfg = resolve(preset="sps-official")
    s = cfg.sps
    assert cfg.method == "sps"
    assert s.reliable_threshold == 0.6
    assert s.cross_weight == 25.0 and s.metric_weight == 25.0
    assert s.proxy_label == "official"
    assert s.proxy_directions == "i2t"
    assert s.separate_steps is True
    assert s.intramodal == "pooled" and s.consistency_margin == 0.0
    assert cfg.optim.lr == 2e-4


def test_esc_official_preset_values():
    cfg = resolve(preset="esc-official")
    e = cfg.esc
    assert cfg.method == "esc"
    assert e.esc_normalize is True
    assert e.train_esc == "anchor"
    assert e.division_hardest is False
    assert e.anchors_clean is False
    assert e.warmup == "select"
    assert e.separate_steps is True
    assert e.label_ratio == "code"


def test_presets_leave_other_methods_at_their_defaults():
    defaults = Config()
    # noisy_start None resolves to half the preset's epochs
    assert dataclasses.replace(resolve(preset="sps-official").esc, noisy_start=None) == defaults.esc
    assert resolve(preset="esc-official").sps == defaults.sps


def test_load_order_defaults_preset_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 7\n  batch_size: 32\nsps:\n  cross_weight: 3.0\n", encoding="utf-8")
    cfg = resolve(preset="sps-official", config_file=str(path), overrides=overrides("optim.epochs=9"))
    assert cfg.optim.epochs == 9  # override beats file
    assert cfg.optim.batch_size == 32  # file beats default
    assert cfg.sps.cross_weight == 3.0  # file beats preset
    assert cfg.sps.metric_weight == 25.0  # preset beats default
    assert cfg.optim.lr == 2e-4  # preset value untouched by file and overrides
    assert cfg.sps.tau == Config().sps.tau  # default


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 2e-4 as the string "2e-4"
    assert isinstance(yaml.safe_load("lr: 2e-4")["lr"], str)
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2e-4\nsps:\n  tau: 5e-2\n", encoding="utf-8")
    cfg = resolve(config_file=str(path))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 2e-4
    assert isinstance(cfg.sps.tau, float) and cfg.sps.tau == 5e-2
    cfg = resolve(overrides=overrides("optim.lr=3e-4"))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-4


def test_int_given_for_a_float_field_becomes_a_float():
    cfg = resolve(overrides=overrides("optim.lr=1"))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


def test_override_parsing():
    assert parse_override("optim.epochs=3") == ("optim.epochs", 3)
    assert parse_override("sps.separate_steps=true") == ("sps.separate_steps", True)
    assert parse_override("data.noise_file=") == ("data.noise_file", None)
    assert parse_override("data.source=/a/b=c") == ("data.source", "/a/b=c")
    with pytest.raises(FastnclError, match="optim.epochs"):
        parse_override("optim.epochs")


@pytest.mark.parametrize("key, value", [
    ("nonsense", 1),
    ("optim.nonsense", 1),
    ("data.synthetic.nonsense", 1),
])
def test_unknown_key_raises_naming_it(key, value):
    with pytest.raises(FastnclError, match=f"unknown config key '{key}'"):
        resolve(overrides=[(key, value)])


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sps:\n  nonsense: 1\n", encoding="utf-8")
    with pytest.raises(FastnclError, match=r"bad\.yaml.*'sps\.nonsense'"):
        resolve(config_file=str(path))


def test_unknown_key_in_from_dict_names_the_source():
    values = Config().to_dict()
    values["optim"]["bogus"] = 1
    with pytest.raises(FastnclError, match=r"run/config\.yaml.*'optim\.bogus'"):
        from_dict(values, "run/config.yaml")


def test_section_given_a_scalar_raises():
    with pytest.raises(FastnclError, match="'sps'"):
        resolve(overrides=[("sps", 3)])


@pytest.mark.parametrize("key, value", [
    ("optim.epochs", "ten"),
    ("optim.epochs", 2.5),
    ("optim.epochs", True),
    ("optim.lr", "fast"),
    ("optim.lr", True),
    ("sps.separate_steps", 1),
    ("sps.separate_steps", "maybe"),
    ("ncr.separate_steps", "maybe"),
    ("seed", None),
    ("optim.batch_size", [1, 2]),
    ("data.source", {"a": 1}),
])
def test_wrong_type_raises_naming_the_key(key, value):
    with pytest.raises(FastnclError, match=f"'{key}'"):
        resolve(overrides=[(key, value)])


@pytest.mark.parametrize("key", ["optim.lr", "sps.cross_weight", "esc.margin", "model.dropout"])
@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_refused(key, text):
    """optim.lr: .inf used to train to a chance-level table with exit status 0. Each is refused
    naming the key (a range check may come first: model.dropout must lie in [0, 1))."""
    with pytest.raises(FastnclError, match=f"^{key}: must be"):
        resolve(overrides=[parse_override(f"{key}={text}")])
    if text in (".inf", "1e999") and key != "model.dropout":
        with pytest.raises(FastnclError, match=f"^{key}: must be a finite number, got inf"):
            resolve(overrides=[parse_override(f"{key}={text}")])


@pytest.mark.parametrize("key", ["ncr.clean_threshold", "sps.reliable_threshold", "sps.noisy_threshold",
                                 "esc.clean_threshold", "esc.warmup_rate", "sps.proxy_cut",
                                 "esc.label_anchor_fraction", "sps.min_noisy_fraction"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_probability_out_of_range_raises(key, value):
    other = []
    if key == "sps.noisy_threshold" and value < 0:  # keep epsilon_2 <= epsilon_1 out of the way
        other = [("sps.reliable_threshold", 0.9)]
    with pytest.raises(FastnclError, match=key.replace(".", r"\.")):
        resolve(overrides=[*other, (key, value)])


@pytest.mark.parametrize("value", [0.0, -0.5, 1.01])
def test_clip_quantile_out_of_range_raises(value):
    with pytest.raises(FastnclError, match=r"split\.clip_quantile: must be in \(0, 1\]"):
        resolve(overrides=[("split.clip_quantile", value)])


def test_official_presets_normalise_as_the_official_codes():
    assert resolve().split.clip_quantile == 1.0
    emoji = [("data.source", "emoji")]
    assert resolve(overrides=emoji).split.clip_quantile == 0.99  # the emoji set's own setting
    for preset in ("ncr-official", "sps-official", "esc-official", "esc-official-f30k", "sps-official-coco"):
        assert resolve(preset=preset, overrides=emoji).split.clip_quantile == 1.0, preset
    # NCR's defaults are its code but for its two optimizer steps, its broadcast margins and its
    # co-training loss and noisy phase (its noisy start: half its own 40 epochs)
    official, default = resolve(preset="ncr-official").ncr, resolve(method="ncr").ncr
    assert official.separate_steps and official.noisy_start == 20 and official.margins == "broadcast"
    code_loss = {"negatives": "mixed", "train_noisy": False}  # the defaults' co-training loss (docs/results.md)
    assert dataclasses.replace(official, separate_steps=False, noisy_start=default.noisy_start, margins="per_pair",
                               **code_loss) == default


def test_probability_bounds_are_inclusive():
    resolve(overrides=[("sps.reliable_threshold", 1.0), ("sps.noisy_threshold", 0.0)])


@pytest.mark.parametrize("noise", [1.0, 1.5, -0.1, float("nan")])
def test_noise_outside_unit_interval_raises(noise):
    with pytest.raises(FastnclError, match="--noise"):
        resolve(overrides=[("data.noise", noise)])


def test_noise_zero_and_just_below_one_are_fine():
    assert resolve(overrides=[("data.noise", 0.0)]).data.noise == 0.0
    assert resolve(overrides=[("data.noise", 0.99)]).data.noise == 0.99


@pytest.mark.parametrize("key, value", [
    ("sps.proxy_label", "magic"),
    ("sps.intramodal", "local"),
    ("sps.proxy_directions", "t2i"),
    ("esc.mixture", "kmeans"),
    ("esc.train_esc", "both"),
    ("esc.warmup", "some"),
    ("esc.label_ratio", "min"),
    ("ncr.margins", "rows"),
    ("esc.margins", "columns"),
    ("esc.clean_label_cut", "paper"),
    ("runtime.backend", "cuda"),
    ("model.backbone", "clip"),
    ("data.test_protocol", "5k"),
])
def test_bad_choice_raises_naming_key_and_choices(key, value):
    with pytest.raises(FastnclError, match=key.replace(".", r"\.") + ": must be one of") as info:
        resolve(overrides=[(key, value)])
    assert repr(value) in str(info.value)


def test_bad_method_raises_naming_the_option():
    with pytest.raises(FastnclError, match="--method"):
        resolve(method="bogus")


@pytest.mark.parametrize("key, value", [
    ("optim.batch_size", 0), ("optim.lr", 0.0), ("model.embed_dim", -1), ("sps.tau", 0.0),
    ("optim.epochs", -1), ("sps.noisy_start", -2), ("runtime.threads", -1),
])
def test_non_positive_sizes_raise(key, value):
    with pytest.raises(FastnclError, match=key.replace(".", r"\.")):
        resolve(overrides=[(key, value)])


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_dropout_outside_unit_interval_raises(value):
    with pytest.raises(FastnclError, match=r"model\.dropout: must be in \[0, 1\)"):
        resolve(overrides=[("model.dropout", value)])


def test_noisy_threshold_above_reliable_threshold_raises():
    with pytest.raises(FastnclError, match="sps.noisy_threshold"):
        resolve(overrides=[("sps.reliable_threshold", 0.4), ("sps.noisy_threshold", 0.5)])


def test_nothing_to_train_raises():
    with pytest.raises(FastnclError, match="optim.epochs"):
        resolve(overrides=[("optim.epochs", 0), ("optim.warmup_epochs", 0)])


def test_method_contradicting_preset_raises():
    with pytest.raises(FastnclError, match="--method ncr contradicts --preset sps-official"):
        resolve(preset="sps-official", method="ncr")


def test_unknown_preset_raises_naming_the_option():
    with pytest.raises(FastnclError, match="--preset.*'nope'"):
        resolve(preset="nope")


def test_method_without_preset_sets_the_method():
    assert resolve(method="esc").method == "esc"


@pytest.mark.parametrize("content, match", [
    ("a: [1, 2", "not valid YAML"),
    ("- 1\n- 2\n", "mapping at the top level"),
    ("just a string\n", "mapping at the top level"),
])
def test_malformed_config_file_raises_naming_it(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(FastnclError, match=match) as info:
        resolve(config_file=str(path))
    assert "bad.yaml" in str(info.value) and "--config" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_raises_naming_it(tmp_path):
    with pytest.raises(FastnclError, match=r"--config .*missing\.yaml: cannot read it"):
        resolve(config_file=str(tmp_path / "missing.yaml"))


def test_empty_config_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_yaml(path) == {}
    assert resolve(config_file=str(path)).to_dict() == validate(fill_defaults(Config())).to_dict()


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_round_trip_through_dump_yaml_and_from_dict(preset):
    cfg = resolve(preset=preset, overrides=overrides("optim.lr=2e-4", "data.noise=0.2", "data.noise_file=",
                                                     "runtime.progress=false", "out=runs/x", "sps.proxy_gamma=1e-8"))
    text = dump_yaml(cfg)
    back = from_dict(yaml.safe_load(text), "config.yaml")
    assert back == cfg
    assert dump_yaml(back) == text


def test_round_trip_keeps_types():
    cfg = resolve(overrides=overrides("optim.lr=1"))
    back = from_dict(yaml.safe_load(dump_yaml(cfg)), "config.yaml")
    for f in dataclasses.fields(back.optim):
        assert type(getattr(back.optim, f.name)) is type(getattr(cfg.optim, f.name)), f.name


@pytest.mark.parametrize("method, epochs", [("vanilla", 4), ("sps", 4), ("ncr", 2), ("esc", 2)])
def test_warmup_defaults_to_the_methods_own_and_an_explicit_value_wins(method, epochs):
    assert resolve(method=method).optim.warmup_epochs == epochs
    assert resolve(method=method, overrides=[("optim.warmup_epochs", 7)]).optim.warmup_epochs == 7


def test_a_config_from_before_a_section_keeps_what_it_trained_with():
    old = resolve(method="vanilla", overrides=overrides("sps.tau=0.05")).to_dict()
    del old["split"], old["vanilla"]  # a config.yaml of fastncl <= 0.1.0
    cfg = from_dict(old, "config.yaml")
    assert cfg.split.clip_quantile == 1.0 and cfg.vanilla.tau == 0.05
    emoji = resolve(overrides=[("data.source", "emoji")]).to_dict()
    assert from_dict(emoji, "config.yaml").split.clip_quantile == 0.99  # as written, not re-derived


def test_the_paper_presets_normalise_as_the_papers():
    for preset in ("sps-f30k", "esc-coco", "sps-official-cc152k"):
        assert resolve(preset=preset, overrides=[("data.source", "emoji")]).split.clip_quantile == 1.0
