"""Packaging (house style B2): every package is listed, and kernels/ installs only as fastncl.kernels."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _package_name(folder: Path) -> str:
    """The installed name of a source folder: fastncl/x/y -> fastncl.x.y, kernels/x -> fastncl.kernels.x."""
    parts = folder.relative_to(ROOT).parts
    if parts[0] == "kernels":
        parts = ("fastncl", *parts)
    return ".".join(parts)


def test_every_folder_with_an_init_is_a_listed_package():
    tool = _pyproject()["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {_package_name(init.parent) for top in ("fastncl", "kernels") for init in (ROOT / top).rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert {"fastncl", "fastncl.kernels", "fastncl.methods"} <= found  # the walk itself works
    missing = sorted(found - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}: they would be missing from the wheel"
    stale = sorted(listed - found)
    assert not stale, f"pyproject.toml lists packages with no folder: {stale}"


def test_kernels_folder_is_mapped_under_the_fastncl_namespace():
    package_dir = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert package_dir["fastncl.kernels"] == "kernels"
    assert "kernels" not in package_dir  # never a top-level `kernels`


def test_import_fastncl_kernels_works():
    import fastncl.kernels as k

    assert k.__name__ == "fastncl.kernels"
    assert Path(k.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    for name in ("infonce_terms", "cross_consistency", "metric_consistency", "esc_anchor_terms", "triplet_terms",
                 "proxy_argmax"):
        assert callable(getattr(k, name))


def test_importing_the_folder_as_top_level_kernels_fails_with_the_name_guard(tmp_path):
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "try:\n"
        "    importlib.import_module('kernels')\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
        "    sys.exit(0)\n"
        "print('IMPORTED', sys.modules['kernels'].__file__)\n"
        "sys.exit(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"`import kernels` from the repository root succeeded:\n{proc.stdout}{proc.stderr}"
    assert "IMPORTERROR" in proc.stdout
    assert "fastncl.kernels" in proc.stdout and "'kernels'" in proc.stdout
