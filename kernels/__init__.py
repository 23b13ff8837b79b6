"""fastncl.kernels: the loss ops of noisy correspondence learning, with backend dispatch.

Each public op takes ``backend="auto" | "torch" | "triton"``. ``"torch"`` is the reference in
``reference.py`` (the contract, and the CPU backend); ``"triton"`` the fused Triton kernels (one
module per op, imported on first use, so that the CPU path never imports ``triton``). ``"auto"``
picks Triton for fp16/bf16/fp32 CUDA tensors when Triton imports, and the reference otherwise.
The environment variable ``FASTNCL_BACKEND`` overrides ``"auto"``.

``"triton"`` on CPU tensors runs the kernels in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` set before ``triton`` is imported (the parity tests do this).
"""
if __name__ != "fastncl.kernels":  # the folder is installed under fastncl; see pyproject.toml
    raise ImportError(
        f"this folder must be imported as fastncl.kernels, not {__name__!r}; install with `pip install -e .`"
    )

import importlib
import os

import torch

from . import reference

__all__ = [*reference.__all__, "resolve_backend", "check_backend"]

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # upcast to fp32 on load; fp32 accumulation
_TRITON_MODULES = {  # op -> the module that holds its Triton twin
    "infonce_terms": "infonce",
    "cross_consistency": "consistency",
    "metric_consistency": "consistency",
    "esc_anchor_terms": "anchor",
    "triplet_terms": "triplet",
    "proxy_argmax": "proxy",
    "sps_reliable_objective": "sps_objective",
    "esc_division_terms": "esc_division",
    "infonce_terms_embed": "infonce_embed",
    "cross_consistency_embed": "consistency_embed",
    "metric_consistency_embed": "consistency_embed",
}
_triton_available = None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Whether ``import triton`` works (checked once)."""
    global _triton_available
    if _triton_available is None:
        try:
            import triton  # noqa: F401

            _triton_available = True
        except ImportError:
            _triton_available = False
    return _triton_available


def resolve_backend(backend: str = "auto", tensor: torch.Tensor | None = None) -> str:
    """The backend an op call on ``tensor`` will use: "torch" or "triton".

    Without a tensor, "auto" stays "auto" unless ``FASTNCL_BACKEND`` names a backend.
    """
    if backend == "auto":
        backend = os.environ.get("FASTNCL_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"the environment variable FASTNCL_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto" or tensor is None:
        return backend
    cuda = tensor.device.type == "cuda" and tensor.dtype in KERNEL_DTYPES
    return "triton" if cuda and triton_available() else "torch"


def check_backend(backend: str, device: torch.device) -> str:
    """Validate a configured backend for a device before any work starts; returns the backend every
    op call will use ("torch" or "triton"), so that hot paths need no lookup."""
    resolved = resolve_backend(backend)
    if resolved == "auto":
        resolved = "triton" if device.type == "cuda" and triton_available() else "torch"
    elif resolved == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install 'fastncl[triton]'")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs a CUDA device (got {device}); on CPU the kernels run only in "
                             "Triton's interpreter (TRITON_INTERPRET=1, slow, for tests)")
    if resolved == "triton":
        for name in _TRITON_MODULES:  # imported now, never while torch.compile traces a step
            triton_impl(name)
    return resolved


_triton_impls: dict = {}


def triton_impl(name: str):
    """The Triton twin of op ``name``, its module imported on first use and cached, so that a
    traced call (torch.compile) finds a plain dict lookup."""
    fn = _triton_impls.get(name)
    if fn is None:
        if not triton_available():
            raise ValueError(f"{name}: backend='triton' needs the triton package: pip install 'fastncl[triton]'")
        module = importlib.import_module(f".{_TRITON_MODULES[name]}", __name__)
        fn = _triton_impls[name] = getattr(module, name)
    return fn


def _impl(name: str, backend: str, tensor: torch.Tensor):
    if resolve_backend(backend, tensor) == "torch":
        return getattr(reference, name)
    return triton_impl(name)


def infonce_terms(sim, tau, *, backend="auto"):
    return _impl("infonce_terms", backend, sim)(sim, tau)


def cross_consistency(sim, alpha, *, backend="auto"):
    return _impl("cross_consistency", backend, sim)(sim, alpha)


def metric_consistency(sim_img, sim_txt, alpha, *, backend="auto"):
    return _impl("metric_consistency", backend, sim_img)(sim_img, sim_txt, alpha)


def esc_anchor_terms(sim, anchor, alpha=0.0, normalize=False, *, backend="auto"):
    return _impl("esc_anchor_terms", backend, sim)(sim, anchor, alpha, normalize)


def triplet_terms(sim, margin, hardest, *, backend="auto"):
    return _impl("triplet_terms", backend, sim)(sim, margin, hardest)


def proxy_argmax(query, keys, key_mask=None, *, backend="auto"):
    return _impl("proxy_argmax", backend, query)(query, keys, key_mask)


def sps_reliable_objective(sim, sim_img, sim_txt, tau, alpha, cross_weight, metric_weight, *, backend="auto"):
    return _impl("sps_reliable_objective", backend, sim)(sim, sim_img, sim_txt, tau, alpha, cross_weight,
                                                         metric_weight)


def esc_division_terms(sim, margin, esc_weight, alpha=0.0, hardest=True, normalize=False, *, backend="auto"):
    return _impl("esc_division_terms", backend, sim)(sim, margin, esc_weight, alpha, hardest, normalize)


def infonce_terms_embed(img, txt, tau, *, backend="auto"):
    return _impl("infonce_terms_embed", backend, img)(img, txt, tau)


def cross_consistency_embed(img, txt, alpha, *, backend="auto"):
    return _impl("cross_consistency_embed", backend, img)(img, txt, alpha)


def metric_consistency_embed(img_feats, txt_feats, alpha, *, backend="auto"):
    return _impl("metric_consistency_embed", backend, img_feats)(img_feats, txt_feats, alpha)


for _name in reference.__all__:
    globals()[_name].__doc__ = getattr(reference, _name).__doc__
