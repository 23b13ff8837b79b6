"""`fastncl report`: a run folder's figures and report.md, drawn from its records (`fastncl eval`:
fastncl.evaluation; `fastncl compare`: fastncl.compare).

``fastncl report RUN`` writes ``RUN/report.md`` and its figures in ``RUN/report/`` (matplotlib,
Agg backend, imported only here):
* ``losses_epochNN.png``: per-sample division losses of both models at chosen epochs, stacked by
  the ground truth (clean / noisy) when the noise was injected, with the fitted mixture's
  weighted component densities and the thresholds each method declares (SPS ε1 and ε2, ESC δ,
  NCR's cut) drawn at the loss where the clean probability crosses them;
* ``split_quality.png``: precision, recall and AUC of the noisy-pair detection per epoch, and for
  a method that declares subset colours (SPS) the ground-truth composition of its subsets (SPS Fig. 3);
* ``dev_rsum.png``: dev RSum per epoch of each model and of their ensemble, with the learning
  rate, the warm-up and the curriculum stages marked.
Nothing in it depends on the backbone: it reads ``metrics.jsonl``, ``splits/*.npz``,
``config.yaml`` and ``results.json``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fastncl import FastnclError, optional_import
from fastncl.records import EpochRecord, SplitFile
from fastncl.run import RunDir, write_atomic

REPORT_HINT = "pip install 'fastncl[report]' (matplotlib)"


# -- report.md ---------------------------------------------------------------------------------
def _pyplot():
    matplotlib = optional_import("matplotlib", f"fastncl report draws its figures with matplotlib: {REPORT_HINT}")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax) -> None:
    """The legend below the axes (under their x label), where it covers no bar, point or curve, nor
    a neighbouring panel; the figure is saved with a tight bounding box, so it is kept."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)


def _save(fig, path: Path) -> Path:
    """The figure as a PNG at ``path`` (atomically); closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path


def _epoch_table(records: list[EpochRecord]) -> list[str]:
    lines = ["| epoch | phase | lr | dev RSum (A / B / ensemble) | split AUC | precision | recall | "
             "subsets (size / GT clean) | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r.split

        def fmt(value):
            return f"{value:.3f}" if value is not None else "-"

        own = s.models[0].subsets if s is not None and s.models else {}
        subsets = ", ".join(f"{name} {v.size}/{'-' if v.clean is None else v.clean}" for name, v in own.items())
        models = r.dev_models
        dev = " / ".join([f"{models[m]['rsum']:.1f}" for m in ("A", "B") if m in models] + [f"{r.dev['rsum']:.1f}"])
        auc, precision, recall = (s.auc, s.precision, s.recall) if s is not None else (None, None, None)
        lines.append(f"| {r.epoch + 1} | {r.phase} | {r.lr:.1e} | {dev} | {fmt(auc)} | "
                     f"{fmt(precision)} | {fmt(recall)} | {subsets or '-'} | {r.time:.1f} |")
    return lines


def _cut_at(normalized: np.ndarray, clean_prob: np.ndarray, threshold: float, clean_mean: float) -> float | None:
    """The normalised loss at which the clean probability falls to ``threshold`` (above the clean mean);
    None when no pair's clean probability exceeds it."""
    if not (clean_prob > threshold).any():
        return None
    order = np.argsort(normalized, kind="stable")
    x, p = normalized[order], clean_prob[order]
    above = x >= clean_mean
    below_cut = np.flatnonzero(above & (p <= threshold))
    if not len(below_cut):
        return None
    i = below_cut[0]
    return float((x[i] + x[i - 1]) / 2) if i > 0 else float(x[i])


def _mixture(split: SplitFile, k: int):
    from fastncl.methods.mixture import MixtureFit

    return MixtureFit(split.clean_prob[k].astype(np.float64), split.normalized[k].astype(np.float64), split.mixture,
                      split.params[k])


def loss_histogram(plt, split: SplitFile, epoch: int, method: str, cfg: dict, path: Path) -> Path:
    """Both models' division losses at one epoch, by ground truth, with the mixture and thresholds."""
    from fastncl.methods import registry
    from fastncl.methods.mixture import clean_mean

    kind = registry.declarations(method)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    bins = np.linspace(0, 1, 51)
    width = bins[1] - bins[0]
    grid = np.linspace(0.002, 0.998, 400)
    clean_mask = split.clean_mask
    reordered = cfg.get("split", {}).get("structure", "off") != "off"  # split.structure: cuts follow no loss
    for k, ax in enumerate(axes):
        fit = _mixture(split, k)
        x = fit.normalized
        if clean_mask is not None:
            ax.hist([x[clean_mask], x[~clean_mask]], bins=bins, stacked=True, color=["tab:blue", "tab:red"],
                    label=[f"clean pairs ({int(clean_mask.sum())})", f"noisy pairs ({int((~clean_mask).sum())})"],
                    alpha=0.75)
        else:
            ax.hist(x, bins=bins, color="tab:gray", alpha=0.75, label=f"pairs ({len(x)})")
        if fit.kind != "truth":  # split.signal=truth: no mixture to draw
            density = fit.density(grid) * len(x) * width  # expected counts per bin
            ax.plot(grid, density[0], color="navy", lw=1.5, label=f"{fit.kind.upper()} clean component")
            ax.plot(grid, density[1], color="darkred", lw=1.5, label=f"{fit.kind.upper()} noisy component")
        cuts = [*kind.report_cuts(cfg, split, k), (kind.cut_label, float(split.noisy_cut[k]), "black")]
        if fit.kind == "truth" or reordered:  # split by the ground truth, or by loss and structure: not at a loss
            cuts = []
        for label, threshold, color in cuts:
            at = _cut_at(x, fit.clean_prob, threshold, clean_mean(fit))
            if at is not None:
                ax.axvline(at, color=color, ls="--", lw=1.2, label=f"{label}: p(clean) = {threshold:g}")
            else:  # e.g. SPS's reliable set is empty: no pair is that likely clean
                ax.plot([], [], color=color, ls="--", label=f"{label} = {threshold:g}: no pair above it")
        ax.set_ylim(0, 1.15 * np.histogram(x, bins=bins)[0].max())
        ax.set_xlabel("normalised division loss")
        ax.set_title(f"model {'AB'[k]} (split used by model {'BA'[k]})")
    axes[0].set_ylabel("pairs per bin")
    _legend(axes[1])
    note = " (split by the ground truth, split.signal=truth)" if split.mixture == "truth" else ""
    if reordered and split.mixture != "truth":
        note = " (cuts not drawn: split.structure reorders the pairs, no loss separates the subsets)"
    fig.suptitle(f"{method}: per-sample division losses, epoch {epoch + 1}{note}")
    return _save(fig, path)


def split_quality(plt, records: list[EpochRecord], method: str, path: Path) -> Path:
    with_split = [r for r in records if r.split]  # metrics.jsonl holds one record per epoch
    epochs, s = [r.epoch for r in with_split], [r.split for r in with_split]
    has_truth = any(x.auc is not None for x in s)
    from fastncl.methods import registry

    colors = registry.declarations(method).subset_colors
    composition = bool(colors) and has_truth
    fig, axes = plt.subplots(1, 2 if composition else 1, figsize=(12 if composition else 6.5, 3.8), squeeze=False)
    ax = axes[0, 0]
    e1 = [e + 1 for e in epochs]
    if has_truth:
        for key, color in (("precision", "tab:blue"), ("recall", "tab:orange"), ("auc", "tab:green")):
            ax.plot(e1, [getattr(x, key) for x in s], marker="o", color=color, label=f"{key} (mean of A, B)")
            for m, style in ((0, ":"), (1, "--")):
                ax.plot(e1, [getattr(x.models[m], key) for x in s], ls=style, color=color, lw=0.8, alpha=0.7)
        ax.set_ylabel("noisy-pair detection")
        ax.set_title("split quality (dotted: model A, dashed: model B)")
    else:
        ax.plot(e1, [x.detected_noisy for x in s], marker="o", label="detected noisy (mean of A, B)")
        ax.set_ylabel("pairs detected noisy")
        ax.set_title("split (no ground truth: no injected noise)")
    _epoch_axis(ax)
    _legend(ax)
    if composition:  # as SPS Fig. 3: each subset's size and its ground-truth clean part, model A's split
        ax = axes[0, 1]
        names = list(s[0].models[0].subsets)
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            sizes = np.array([x.models[0].subsets[name].size for x in s])
            clean = np.array([x.models[0].subsets[name].clean for x in s])
            pos = np.array(e1) + (j - (len(names) - 1) / 2) * width
            ax.bar(pos, clean, width, color=colors.get(name, "tab:gray"), label=f"{name}: GT clean")
            ax.bar(pos, sizes - clean, width, bottom=clean, color=colors.get(name, "tab:gray"), alpha=0.35,
                   hatch="//", label=f"{name}: GT noisy")
        _epoch_axis(ax)
        ax.set_ylabel("pairs")
        ax.set_title("subsets of model A's split by ground truth")
        _legend(ax)
    return _save(fig, path)


def dev_curves(plt, records: list[EpochRecord], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    e1 = [r.epoch + 1 for r in records]
    for m, style, color in (("A", ":", "tab:blue"), ("B", "--", "tab:green")):
        if all(m in r.dev_models for r in records):
            ax.plot(e1, [r.dev_models[m]["rsum"] for r in records], ls=style, marker=".", color=color,
                    label=f"model {m}")
    ax.plot(e1, [r.dev["rsum"] for r in records], color="black", marker="o", label="ensemble (A+B)/2")
    best = max(records, key=lambda r: r.dev["rsum"])
    ax.plot([best.epoch + 1], [best.dev["rsum"]], marker="*", ms=14, color="gold", mec="black", ls="",
            label=f"best (epoch {best.epoch + 1})")
    warm = [r.epoch + 1 for r in records if r.phase == "warmup"]
    if warm:
        ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="gray", alpha=0.15, label="warm-up")
    previous = None
    for r in records:  # curriculum: a subset joins the training
        active = r.active_subsets
        if active and previous is not None and active != previous:
            joined = [a for a in active if a not in previous]
            if joined:
                ax.axvline(r.epoch + 0.5, color="purple", ls="-.", lw=1)
                ax.text(r.epoch + 0.55, 0.02, "+ " + ", ".join(joined), rotation=90, fontsize=8, va="bottom",
                        color="purple", transform=ax.get_xaxis_transform())
        previous = active or previous
    _epoch_axis(ax)
    ax.set_ylabel("dev RSum")
    lr_ax = ax.twinx()
    lr_ax.step(e1, [r.lr for r in records], where="mid", color="tab:orange", alpha=0.6, lw=1)
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.set_zorder(lr_ax.get_zorder() + 1)  # the curves and legend above the lr steps
    ax.patch.set_visible(False)
    _legend(ax)
    ax.set_title("dev RSum per epoch (orange: learning rate)")
    return _save(fig, path)


def _chosen_epochs(available: list[int], wanted: list[int] | None) -> list[int]:
    if wanted:
        missing = [e for e in wanted if e - 1 not in available]
        if missing:
            shown = ", ".join(str(e + 1) for e in available) or "none"
            raise FastnclError(f"--epochs: no split saved for epoch {missing[0]} (epochs with a split: {shown})")
        return [e - 1 for e in wanted]
    if not available:
        return []
    return sorted({available[0], available[len(available) // 2], available[-1]})


def write_report(run_dir: str, epochs: list[int] | None = None) -> tuple[Path, str]:
    """report.md with the figures in RUN/report/; returns its path and its text."""
    from fastncl.evaluation import format_results

    run = RunDir.open(run_dir)
    records = run.read_metrics()
    if not records:
        raise FastnclError(f"{run.path}: no epochs in metrics.jsonl yet")
    plt = _pyplot()
    cfg = run.config()
    method = cfg.get("method", "?")
    figdir = run.file("report")
    figures = []
    for epoch in _chosen_epochs(run.split_epochs(records), epochs):  # reads only the splits it draws
        figures.append(("Per-sample division losses, epoch " + str(epoch + 1),
                        loss_histogram(plt, run.read_split(epoch), epoch, method, cfg,
                                       figdir / f"losses_epoch{epoch + 1:02d}.png")))
    if any(r.split for r in records):
        figures.append(("Split quality", split_quality(plt, records, method, figdir / "split_quality.png")))
    figures.append(("Dev RSum per epoch", dev_curves(plt, records, figdir / "dev_rsum.png")))
    for stale in set(figdir.glob("*.png")) - {path for _, path in figures}:  # e.g. other --epochs earlier
        stale.unlink()

    lines = [f"# fastncl run `{run.path}`", "", f"method {method}, noise {cfg.get('data', {}).get('noise')}, "
             f"seed {cfg.get('seed')}, backbone {cfg.get('model', {}).get('backbone')}, data "
             f"{cfg.get('data', {}).get('source')}", ""]
    lines += _epoch_table(records)
    result = run.read_result()
    if result is not None:
        # a blank line after the table: Markdown would read the detection line as one more row
        table = format_results(result).replace("\nnoisy-pair detection", "\n\nnoisy-pair detection")
        lines += ["", "## Test", "", table]
    else:
        lines += ["", "(no results.json: the run has not finished)"]
    lines += ["", "## Figures", ""]
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title}]({path.relative_to(run.path).as_posix()})", ""]
    text = "\n".join(lines) + "\n"
    write_atomic(run.file("report.md"), text)
    return run.file("report.md"), text
