"""NVTX ranges for Nsight Systems, in one domain ("fastncl").

Ranges wrap phases from the outside (epoch, split pass, mixture fit, subset steps, evaluation,
checkpoint), never code inside a compiled or captured region. Without the ``nvtx`` package
they cost nothing.
"""
from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:  # optional at run time: the ranges become no-ops
    _nvtx = None

DOMAIN = "fastncl"


def nvtx_range(name: str):
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain=DOMAIN)
