"""The per-dataset SGR presets (notes section H) load, validate and say what the papers and codes say."""
from __future__ import annotations

import pytest

from fastncl.config import presets, resolve
from fastncl.methods.presets import DATASETS

PRESETS = presets()

DATASET_PRESETS = [f"{m}{v}-{d}" for m in ("sps", "esc") for v in ("", "-official") for d in DATASETS]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves(name):
    cfg = resolve(preset=name)
    assert cfg.preset == name and cfg.method == PRESETS[name]["method"]


def test_the_dataset_presets_exist_and_the_old_names_are_unchanged():
    assert set(DATASET_PRESETS) <= set(PRESETS)
    assert resolve(preset="sps").model.backbone == "vse"
    official = resolve(preset="sps-official")
    assert (official.model.backbone, official.optim.lr, official.optim.epochs) == ("vse", 2e-4, 40)


@pytest.mark.parametrize("name", DATASET_PRESETS)
def test_dataset_presets_train_the_papers_sgr_with_batch_128(name):
    cfg = resolve(preset=name)
    m = cfg.model
    assert (m.backbone, m.embed_dim, m.word_dim, m.sim_dim, m.sgr_steps, m.dropout, m.smooth) == \
        ("sgr", 1024, 300, 256, 3, 0.4, 9.0)
    assert cfg.optim.batch_size == 128 and cfg.optim.lr == 2e-4 and cfg.optim.grad_clip == 2.0
    assert cfg.runtime.length_multiple == 8
    coco = name.endswith("coco")
    assert (cfg.data.test_split, cfg.data.test_protocol) == (("testall", "coco") if coco else ("test", "full"))
    assert cfg.optim.fill_epoch is ("official" not in name)


@pytest.mark.parametrize("dataset, epochs", [("f30k", 40), ("coco", 20), ("cc152k", 40)])
def test_sps_schedules(dataset, epochs):
    for name in (f"sps-{dataset}", f"sps-official-{dataset}"):
        cfg = resolve(preset=name)
        assert (cfg.optim.warmup_epochs, cfg.optim.epochs, cfg.optim.lr_step) == (5, epochs, 10)
        assert (cfg.sps.quasi_clean_start, cfg.sps.noisy_start) == (10, 15)
    paper, official = resolve(preset=f"sps-{dataset}"), resolve(preset=f"sps-official-{dataset}")
    assert paper.sps.reliable_threshold == 0.99 and official.sps.reliable_threshold == 0.6
    assert official.sps.cross_weight == official.sps.metric_weight == 25.0 and official.sps.separate_steps


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_esc_schedules(dataset):
    paper, official = resolve(preset=f"esc-{dataset}"), resolve(preset=f"esc-official-{dataset}")
    for cfg in (paper, official):
        assert (cfg.optim.warmup_epochs, cfg.optim.epochs, cfg.optim.lr_step, cfg.esc.noisy_start) == (10, 40, 30, 20)
    assert paper.esc.warmup == "all" and official.esc.warmup == "select" and official.esc.esc_normalize
    assert official.seed == 96 and paper.seed == 0


def test_ncr_official_runs_the_codes_epoch_and_steps():
    """ncr-official: one pass over the clean subset per epoch, two optimizer steps per iteration and
    the targets broadcast into the margins (NCR's co_train.py and model.py); the schedule of NCR's
    run.py and its README's Flickr30K command (lr 2e-4, x0.1 at 30, 5 warm-up epochs, 40); the plain
    min-max normalisation."""
    official, default = resolve(preset="ncr-official"), resolve(method="ncr")
    assert official.optim.fill_epoch is False and default.optim.fill_epoch is True
    assert official.ncr.separate_steps is True and default.ncr.separate_steps is False
    assert official.ncr.margins == "broadcast" and default.ncr.margins == "per_pair"
    schedule = ("lr", "lr_step", "warmup_epochs", "epochs")
    assert [getattr(official.optim, k) for k in schedule] == [2e-4, 30, 5, 40]
    assert official.ncr.noisy_start == 20  # half of 40, as the code's num_epochs // 2
    same = ("batch_size", "grad_clip")
    assert [getattr(official.optim, k) for k in same] == [getattr(default.optim, k) for k in same]
    assert official.split.clip_quantile == 1.0


def test_a_preset_value_can_still_be_overridden():
    cfg = resolve(preset="sps-f30k", overrides=[("model.sim_dim", 64), ("optim.epochs", 2)])
    assert cfg.model.sim_dim == 64 and cfg.optim.epochs == 2 and cfg.model.embed_dim == 1024


def test_ncr_and_esc_default_loss_and_the_presets_that_restore_the_papers():
    """The defaults train the clean subset alone with the hardest and the mean negative added (chosen
    leave-one-data-set-out, docs/results.md); every paper or code preset restores the hardest negative
    and the noisy phase."""
    for method in ("ncr", "esc"):
        section = getattr(resolve(method=method), method)
        assert (section.negatives, section.train_noisy) == ("mixed", False)
    for name in ("ncr-official", "esc-official", "esc-f30k", "esc-official-coco", "esc-cc152k"):
        section = getattr(resolve(preset=name), name.split("-")[0])
        assert (section.negatives, section.train_noisy) == ("hardest", True), name


def test_the_clean_side_is_the_core_for_ncr_and_esc_and_the_posterior_in_the_papers_presets():
    """Left out, split.clean_side is the method's: the clean component's core for NCR and ESC (chosen
    leave-one-data-set-out, docs/results.md), its posterior for SPS; every paper or code preset
    takes the posterior, and an explicit value wins over the method's."""
    assert [resolve(method=m).split.clean_side for m in ("ncr", "esc", "sps")] == ["core", "core", "posterior"]
    for name in ("ncr-official", "esc-official", "esc-f30k", "esc-official-coco", "sps-official", "sps-cc152k"):
        assert resolve(preset=name).split.clean_side == "posterior", name
    assert resolve(method="ncr", overrides=[("split.clean_side", "posterior")]).split.clean_side == "posterior"
    assert resolve(method="sps", overrides=[("split.clean_side", "core")]).split.clean_side == "core"


def test_the_core_ends_half_a_spread_above_the_clean_mean_for_esc_and_at_it_for_ncr():
    """Left out, split.core_width is the method's (chosen leave-one-data-set-out, docs/results.md):
    0.5 for ESC, 0 for NCR (and SPS, whose posterior ignores it); an explicit value wins."""
    assert [resolve(method=m).split.core_width for m in ("ncr", "esc", "sps")] == [0.0, 0.5, 0.0]
    assert resolve(method="esc", overrides=[("split.core_width", 0.0)]).split.core_width == 0.0
    assert resolve(method="ncr", overrides=[("split.core_width", 0.5)]).split.core_width == 0.5
    assert resolve(preset="esc-official").split.clean_side == "posterior"  # the width does not apply


def test_esc_official_runs_the_codes_margins_and_clean_labels():
    """esc-official (and esc-official-<dataset>): the (B,) labels broadcast against the scores as
    ESC's code does (esc.margins=broadcast) and D_c's BiCro labels clamped and cut as the code's
    (esc.clean_label_cut=code); the defaults and the paper presets keep pair i's margin in both
    directions and the labels as they come (the paper's D_c labels are 1: esc.clean_labels=one)."""
    for name in ("esc-official", *(f"esc-official-{d}" for d in DATASETS)):
        esc = resolve(preset=name).esc
        assert (esc.margins, esc.clean_label_cut, esc.clean_labels) == ("broadcast", "code", "bicro"), name
    for cfg in (resolve(method="esc"), *(resolve(preset=f"esc-{d}") for d in DATASETS)):
        assert (cfg.esc.margins, cfg.esc.clean_label_cut, cfg.esc.clean_labels) == ("per_pair", "none", "one")


@pytest.mark.parametrize("name, warmup_best", [("ncr-official", "skip"), ("sps-official", "reload"),
                                               ("sps-official-f30k", "reload"), ("esc-official", "skip"),
                                               ("esc-official-coco", "skip")])
def test_the_official_presets_judge_the_warm_up_as_their_codes_and_only_warn_of_a_collapse(name, warmup_best):
    """SPS's code reloads its best warm-up epoch; NCR's and ESC's never make a warm-up epoch the
    best checkpoint; none has a collapse guard, so fastncl's only says so under their presets."""
    cfg = resolve(preset=name)
    assert cfg.optim.warmup_best == warmup_best and cfg.optim.collapse == "warn"
    assert cfg.sps.quasi_clean_once == name.startswith("sps")  # SPS's code: one pass over the quasi-clean loader
    defaults = resolve(method=name.split("-")[0])
    assert (defaults.optim.warmup_best, defaults.optim.collapse, defaults.sps.quasi_clean_once) == ("keep", "recover", False)
