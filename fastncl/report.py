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


def evaluate_run(run_dir: str, split: str = "test", checkpoint: str = "best") -> str:
    from fastncl.config import from_dict, load_yaml
    from fastncl.data import load_dataset
    from fastncl.evaluation import fold5_metrics, retrieval_metrics, similarity_matrix
    from fastncl.models import build_backbone
    from fastncl.train import format_results, resolve_device

    run = _run(run_dir)
    cfg = from_dict(load_yaml(run.file("config.yaml")), str(run.file("config.yaml")))
    device = resolve_device(cfg.runtime.device)
    data = load_dataset(cfg.data)
    state = run.load_checkpoint(checkpoint)
    models = []
    for weights in state["models"]:
        model = build_backbone(cfg.model, data.image_dim, len(data.vocab)).to(device)
        model.load_state_dict(weights)
        models.append(model)
    part = data.test if split == "test" else data.dev
    sim = similarity_matrix(models, part, device, cfg.runtime.eval_batch)
    results = {"method": cfg.method, "noise": cfg.data.noise, "best_epoch": state["epoch"],
               "test": retrieval_metrics(sim, part.captions_per_image)}
    text = format_results(results).replace("test (", f"{split} ({checkpoint} checkpoint, ", 1)
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
