"""fastncl.kernels: the loss ops of noisy correspondence learning, with backend dispatch.

Each public op takes ``backend="auto" | "torch" | "triton"``. ``"torch"`` is the reference in
``reference.py`` (the contract, and the CPU backend). ``"auto"`` picks Triton for CUDA tensors
once the Triton kernels exist, and the reference otherwise. The environment variable
``FASTNCL_BACKEND`` overrides ``"auto"``.
"""
if __name__ != "fastncl.kernels":  # the folder is installed under fastncl; see pyproject.toml
    raise ImportError(
        f"this folder must be imported as fastncl.kernels, not {__name__!r}; install with `pip install -e .`"
    )

import os

from . import reference

__all__ = [*reference.__all__, "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str = "auto") -> str:
    """The backend an op call will use: "torch" or "triton"."""
    if backend == "auto":
        backend = os.environ.get("FASTNCL_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError(
            "backend='triton': the Triton kernels are not part of this version of fastncl; use 'torch' or 'auto'"
        )
    return "torch"  # "auto": no Triton kernel is registered yet, so the reference serves every device


def _impl(name: str, backend: str):
    resolve_backend(backend)
    return getattr(reference, name)


def infonce_terms(sim, tau, *, backend="auto"):
    return _impl("infonce_terms", backend)(sim, tau)


def cross_consistency(sim, alpha, *, backend="auto"):
    return _impl("cross_consistency", backend)(sim, alpha)


def metric_consistency(sim_img, sim_txt, alpha, *, backend="auto"):
    return _impl("metric_consistency", backend)(sim_img, sim_txt, alpha)


def esc_anchor_terms(sim, anchor, alpha=0.0, normalize=False, *, backend="auto"):
    return _impl("esc_anchor_terms", backend)(sim, anchor, alpha, normalize)


def triplet_terms(sim, margin, hardest, *, backend="auto"):
    return _impl("triplet_terms", backend)(sim, margin, hardest)


def proxy_argmax(query, keys, key_mask=None, *, backend="auto"):
    return _impl("proxy_argmax", backend)(query, keys, key_mask)


for _name in reference.__all__:
    globals()[_name].__doc__ = getattr(reference, _name).__doc__
