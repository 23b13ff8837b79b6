"""`fastncl eval` and `fastncl report`: read a run folder back."""
from __future__ import annotations

import json
from pathlib import Path

from fastncl import FastnclError
from fastncl.run import RunDir, write_atomic


def _run(run_dir: str) -> RunDir:
    run = RunDir(run_dir)
    if not run.file("config.yaml").exists():
        raise FastnclError(f"{run.path}: not a fastncl run folder (no config.yaml)")
    return run


def evaluate_run(run_dirs, split: str = "test", checkpoint: str = "best") -> str:
    """R@K of a run's two-model ensemble; with several run folders, of all their models together.

    Several runs are the SGRAF ensemble of the papers (a trained SGR run and a trained SAF run,
    their similarity matrices averaged); they must share the data, the split and its captions.
    """
    from fastncl.config import from_dict, load_yaml
    from fastncl.data import load_dataset
    from fastncl.evaluation import fold5_metrics, retrieval_metrics, similarity_matrix
    from fastncl.models import build_backbone
    from fastncl.step import CompiledBackbone, Precision, resolve_amp
    from fastncl.train import format_results, resolve_device

    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    runs = [_run(r) for r in run_dirs]
    cfgs = [from_dict(load_yaml(run.file("config.yaml")), str(run.file("config.yaml"))) for run in runs]
    for run, cfg in zip(runs[1:], cfgs[1:]):
        if cfg.data != cfgs[0].data:
            raise FastnclError(f"{run.path}: its data settings differ from {runs[0].path}'s; an ensemble needs the "
                               "same data, splits and noise")
    states = [run.load_checkpoint(checkpoint) for run in runs]
    cfg = cfgs[0]
    device = resolve_device(cfg.runtime.device)
    data = load_dataset(cfg.data)
    part = data.test if split == "test" else data.dev
    sims = []
    for run_cfg, state in zip(cfgs, states):
        models = []
        for weights in state["models"]:
            model = build_backbone(run_cfg.model, data.image_dim, len(data.vocab), data.train.images.shape[1])
            model.to(device).load_state_dict(weights)
            models.append(CompiledBackbone(model) if run_cfg.runtime.compile else model)
        with Precision(resolve_amp(run_cfg.runtime.amp, device), device).autocast():
            sims.append(similarity_matrix(models, part, device, run_cfg.runtime.eval_batch))
    sim = sum(sims) / len(sims)
    name = cfg.method if len(runs) == 1 else " + ".join(f"{c.method}/{c.model.backbone}" for c in cfgs)
    results = {"method": name, "noise": cfg.data.noise, "best_epoch": states[0]["epoch"],
               "test": retrieval_metrics(sim, part.captions_per_image)}
    text = format_results(results).replace("test (", f"{split} ({checkpoint} checkpoint, ", 1)
    if len(runs) > 1:  # one best epoch per run
        epochs = ", ".join(str(s["epoch"] + 1) for s in states)
        text = text.replace(f"best epoch {states[0]['epoch'] + 1}", f"epochs {epochs}", 1)
    if split == "test" and cfg.data.test_protocol == "coco":
        m = fold5_metrics(sim, part.captions_per_image)
        text += f"\nCOCO 1K (5-fold): rsum {m['rsum']:.1f}"
    return text


def write_report(run_dir: str) -> tuple[Path, str]:
    """A Markdown summary of a run: per-epoch dev RSum and split quality, and the test table."""
    from fastncl.train import format_results

    run = _run(run_dir)
    records = run.read_metrics()
    lines = [f"# fastncl run `{run.path}`", ""]
    lines += ["| epoch | phase | lr | dev RSum | split AUC | precision | recall | subsets (size / GT clean) | time (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r.get("split") or {}

        def fmt(key):
            return f"{s[key]:.3f}" if s.get(key) is not None else "-"

        subsets = ", ".join(f"{name} {v['size']}/{v.get('clean', '-')}"
                            for name, v in (s.get("models") or [{}])[0].get("subsets", {}).items())
        lines.append(f"| {r['epoch'] + 1} | {r['phase']} | {r['lr']:.1e} | {r['dev']['rsum']:.1f} | {fmt('auc')} | "
                     f"{fmt('precision')} | {fmt('recall')} | {subsets or '-'} | {r['time']:.1f} |")
    results_path = run.file("results.json")
    if results_path.exists():
        results = json.loads(results_path.read_text(encoding="utf-8"))
        lines += ["", format_results(results)]
    else:
        lines += ["", "(no results.json: the run has not finished)"]
    text = "\n".join(lines) + "\n"
    write_atomic(run.file("report.md"), text)
    return run.file("report.md"), text
