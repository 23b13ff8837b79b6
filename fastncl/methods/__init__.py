"""Methods: division losses, mixture fits, subsets and per-batch objectives."""
from __future__ import annotations

from fastncl.config import Config

from .base import Method
from .esc import ESC
from .hinge import Hinge
from .ncr import NCR
from .sps import SPS
from .vanilla import Vanilla

REGISTRY = {cls.name: cls for cls in (Vanilla, Hinge, NCR, SPS, ESC)}


def build_method(cfg: Config) -> Method:
    return REGISTRY[cfg.method](cfg)


__all__ = ["ESC", "Hinge", "Method", "NCR", "SPS", "Vanilla", "build_method"]
