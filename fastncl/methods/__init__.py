"""Methods: division losses, mixture fits, subsets and per-batch objectives."""
from __future__ import annotations

from fastncl import kernels
from fastncl.config import Config

from . import registry
from .base import Method
from .vanilla import Vanilla  # the import order is the methods' order (CLI, tables)
from .hinge import Hinge  # noqa: I001
from .ncr import NCR
from .sps import SPS
from .esc import ESC


def build_method(cfg: Config, ops: kernels.Ops = kernels.AUTO) -> Method:
    return registry.get(cfg.method)(cfg, ops)


__all__ = ["ESC", "Hinge", "Method", "NCR", "SPS", "Vanilla", "build_method"]
