"""One-way layers (house style B3), checked on the source with ast; failures name file, line and rule."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for top in ("fastncl", "kernels") for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "fastncl")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, source: str | None = None):
    """(line, absolute module name, relative?) for every import in the file, nested ones included.

    ``from pkg import name`` yields both ``pkg`` and ``pkg.name`` (the name may be a submodule).
    """
    if source is None:
        source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, False
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield node.lineno, target, bool(node.level)
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}", bool(node.level)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _violations(rule: str, paths, forbidden, sources: dict | None = None) -> list[str]:
    out = []
    for path in paths:
        for line, name, _ in _imports(path, (sources or {}).get(path)):
            for prefix in forbidden:
                if _within(name, prefix):
                    out.append(f"{_rel(path)}:{line}: imports {name} ({rule})")
    return sorted(set(out))


def _under(folder: str) -> list[Path]:
    return [p for p in SOURCES if p.relative_to(ROOT).parts[: len(Path(folder).parts)] == Path(folder).parts]


def test_the_walk_finds_the_layers():
    names = {_module_name(p) for p in SOURCES}
    assert {"fastncl.kernels", "fastncl.kernels.reference", "fastncl.methods.sps", "fastncl.cli",
            "fastncl.data.precomp", "fastncl.models.vse"} <= names


def test_relative_imports_are_resolved():
    found = {name for _, name, rel in _imports(ROOT / "fastncl" / "data" / "__init__.py") if rel}
    assert "fastncl.data.split" in found
    found = {name for _, name, rel in _imports(ROOT / "kernels" / "__init__.py") if rel}
    assert "fastncl.kernels.reference" in found


def test_kernels_import_only_themselves_torch_triton_and_the_stdlib():
    rule = ("rule: kernels/ imports nothing from fastncl; only relative imports, torch, the standard library and "
            "(outside the reference) triton")
    bad = []
    for path in _under("kernels"):
        for line, name, relative in _imports(path):
            if relative:
                if not _within(name, "fastncl.kernels"):
                    bad.append(f"{_rel(path)}:{line}: imports {name} ({rule})")
                continue
            top = name.split(".")[0]
            if top == "torch" or top in sys.stdlib_module_names or (top == "triton" and path.name != "reference.py"):
                continue
            bad.append(f"{_rel(path)}:{line}: imports {name} ({rule})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_cpu_path_never_imports_triton():
    """fastncl.kernels imports its Triton modules on first use of the Triton backend only."""
    code = ("import sys, torch, fastncl.kernels as K; K.infonce_terms(torch.zeros(3, 3), 0.07); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("layer", ["fastncl/models", "fastncl/data"])
def test_models_and_data_never_import_methods_train_or_cli(layer):
    rule = f"rule: {layer} never imports fastncl.methods, fastncl.train or fastncl.cli"
    bad = _violations(rule, _under(layer), ("fastncl.methods", "fastncl.train", "fastncl.cli"))
    assert not bad, "\n".join(bad)


def test_methods_never_import_train_run_cli_or_data():
    rule = "rule: fastncl/methods never imports fastncl.train, fastncl.run, fastncl.cli or fastncl.data"
    bad = _violations(rule, _under("fastncl/methods"), ("fastncl.train", "fastncl.run", "fastncl.cli", "fastncl.data"))
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli_but_main():
    rule = "rule: nothing imports fastncl.cli except fastncl/__main__.py"
    others = [p for p in SOURCES if p != ROOT / "fastncl" / "__main__.py"]
    bad = _violations(rule, others, ("fastncl.cli",))
    assert not bad, "\n".join(bad)
    main_imports = {name for _, name, _ in _imports(ROOT / "fastncl" / "__main__.py")}
    assert "fastncl.cli" in main_imports


def test_a_violation_message_names_file_line_and_rule():
    """The checker itself: a planted bad import (nested in a function, relative) is reported."""
    fake = ROOT / "fastncl" / "models" / "zz_planted.py"
    source = "import torch\n\n\ndef f():\n    from ..train import Trainer\n"
    bad = _violations("rule: X", [fake], ("fastncl.train",), {fake: source})
    assert bad == ["fastncl/models/zz_planted.py:5: imports fastncl.train (rule: X)",
                   "fastncl/models/zz_planted.py:5: imports fastncl.train.Trainer (rule: X)"]


def test_only_the_composition_root_builds_models_views_precision_and_backends():
    """fastncl/assemble.py is where a run's device, precision, backend, models and compiled views
    are built: the trainer, eval/report and the benchmarks ask it."""
    rule = "rule: only fastncl/assemble.py builds backbones, compiled views, precisions and op backends"
    owners = {ROOT / "fastncl" / "assemble.py", ROOT / "fastncl" / "step.py"}
    paths = [p for p in SOURCES if p not in owners and not _within(_module_name(p), "fastncl.models")
             and not _within(_module_name(p), "fastncl.kernels")]
    paths += sorted((ROOT / "bench").glob("*.py"))
    bad = _violations(rule, paths, ("fastncl.models.build_backbone", "fastncl.step.CompiledBackbone",
                                    "fastncl.step.resolve_amp", "fastncl.kernels.check_backend"))
    assert not bad, "\n".join(bad)


def test_config_knows_no_method_but_through_the_registry():
    rule = "rule: fastncl/config.py reaches the methods only through fastncl.methods.registry"
    bad = [v for v in _violations(rule, [ROOT / "fastncl" / "config.py"], ("fastncl.methods",))
           if "fastncl.methods.registry" not in v]
    assert not bad, "\n".join(bad)
    code = ("import sys, fastncl.config, fastncl.cli; "
            "assert 'fastncl.methods' not in sys.modules and 'torch' not in sys.modules, 'imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)  # the CLI and its config stay light until used


def test_the_composition_root_builds_what_a_run_trains_and_evaluates():
    import torch

    from fastncl import assemble
    from fastncl.config import resolve
    from fastncl.data import load_dataset, training_pairs
    from fastncl.step import CompiledBackbone

    cfg = resolve(method="ncr", overrides=[("data.synthetic.train_images", 20), ("data.noise", 0.4),
                                           ("model.embed_dim", 8), ("model.word_dim", 4), ("runtime.device", "cpu")])
    rt = assemble.runtime(cfg)
    assert rt.device == torch.device("cpu") and not rt.graphs and rt.precision.name == "fp32"
    data = load_dataset(cfg.data)
    models = [assemble.backbone(cfg.model, data, rt.device) for _ in range(2)]
    assert assemble.views(models, rt) == (models, models)
    compiled = assemble.views(models, assemble.runtime(resolve(overrides=[("runtime.compile", True)])))
    assert all(isinstance(v, CompiledBackbone) for views in compiled for v in views)
    method = assemble.method(cfg, rt.device)
    assert method.name == "ncr" and method.ops.backend == "torch"
    pairs = training_pairs(data.train, cfg.data, cfg.seed)
    assert pairs.noise_rate == 0.4 and pairs.clean is not None and 0.5 < pairs.clean.mean() < 0.7
    assert (pairs.caption_to_image[pairs.clean] == (pairs.clean.nonzero()[0] // 5)).all()


def test_the_ops_are_one_table_bound_once_and_kernels_exports_only_ops():
    import fastncl.kernels as K

    public = {n for n in dir(K) if not n.startswith("_")}
    assert not public & {"importlib", "os", "torch"}, "fastncl.kernels leaks its imports"
    assert set(K.OPS) == set(K.reference.__all__) and set(K.OPS) <= set(K.__all__)
    bound = K.Ops("torch")
    assert all(getattr(bound, name) is getattr(K.reference, name) for name in K.OPS)  # no dispatch per call
    assert all(getattr(K.AUTO, name) is getattr(K, name) for name in K.OPS)  # "auto": resolved per call
    assert not bound.from_embeddings(10**6, dot_product=True)  # the embedding-level path is Triton's
    with pytest.raises(ValueError, match="backend must be one of"):
        K.Ops("cuda")


def test_a_dispatching_op_takes_its_tensor_by_keyword_too():
    import torch

    import fastncl.kernels as K

    sim = torch.randn(5, 5)
    assert torch.equal(K.triplet_terms(sim=sim, margin=0.2, hardest=True), K.reference.triplet_terms(sim, 0.2, True))


def test_only_the_composition_root_builds_optimizers():
    """The trainer gets its optimizers (and the schedule that sets their learning rate) from
    fastncl/assemble.py."""
    import re

    built = [f"{_rel(p)}:{i}" for p in SOURCES if p != ROOT / "fastncl" / "assemble.py"
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"torch\.optim\.[A-Z]\w*\(|\bSchedule\(", line) and "class Schedule" not in line]
    assert not built, "rule: only fastncl/assemble.py builds optimizers and the schedule: " + ", ".join(built)
