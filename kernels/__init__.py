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

import importlib as _importlib
import os as _os

import torch as _torch

from . import reference

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (_torch.float16, _torch.bfloat16, _torch.float32)  # upcast to fp32 on load; fp32 accumulation
# The ops: name -> the module that holds its Triton twin. The reference (reference.py) defines each
# op under the same name and signature; the dispatching functions below and ``Ops`` derive from this.
OPS = {
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
if set(OPS) != set(reference.__all__):
    raise ImportError(f"fastncl.kernels: OPS and reference.__all__ name different ops: {set(OPS) ^ set(reference.__all__)}")
# From this batch size on, a dot-product backbone's InfoNCE and consistency terms come straight from
# its embeddings with the Triton backend (linear memory); below it the (B, B) matrix ops and the
# fused per-batch objectives (one launch each way) are the faster path.
EMBED_MIN_BATCH = 512

__all__ = [*OPS, "AUTO", "BACKENDS", "EMBED_MIN_BATCH", "OPS", "Ops", "check_backend", "resolve_backend"]
_triton_available = None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return _os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def resolve_backend(backend: str = "auto", tensor: _torch.Tensor | None = None) -> str:
    """The backend an op call on ``tensor`` will use: "torch" or "triton".

    Without a tensor, "auto" stays "auto" unless ``FASTNCL_BACKEND`` names a backend.
    """
    if backend == "auto":
        backend = _os.environ.get("FASTNCL_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"the environment variable FASTNCL_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto" or tensor is None:
        return backend
    cuda = tensor.device.type == "cuda" and tensor.dtype in KERNEL_DTYPES
    return "triton" if cuda and triton_available() else "torch"


def check_backend(backend: str, device: _torch.device) -> str:
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
        for name in OPS:  # imported now, never while torch.compile traces a step
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
        module = _importlib.import_module(f".{OPS[name]}", __name__)
        fn = _triton_impls[name] = getattr(module, name)
    return fn


def _impl(name: str, backend: str, tensor: _torch.Tensor):
    if resolve_backend(backend, tensor) == "torch":
        return getattr(reference, name)
    return triton_impl(name)


def _dispatching(name: str):
    """Op ``name`` with a ``backend`` keyword, resolved per call from its first tensor."""
    ref = getattr(reference, name)

    def op(*args, backend="auto", **kwargs):
        tensor = args[0] if args else next(iter(kwargs.values()), None)  # the first argument, by keyword too
        return _impl(name, backend, tensor)(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = ref.__doc__
    op.__wrapped__ = ref  # inspect.signature shows the reference's parameters
    return op


for _name in OPS:
    globals()[_name] = _dispatching(_name)


class Ops:
    """The ops bound to one backend, resolved once (``check_backend``): ``ops.triplet_terms(sim,
    margin, hardest)`` is a plain attribute lookup, no dispatch per call. ``"auto"`` binds the
    dispatching functions (resolved per call from the tensor)."""

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        for name in OPS:
            if backend == "auto":
                fn = globals()[name]
            else:
                fn = getattr(reference, name) if backend == "torch" else triton_impl(name)
            setattr(self, name, fn)

    def from_embeddings(self, n: int, dot_product: bool) -> bool:
        """Whether a batch of ``n`` pairs of a dot-product backbone takes its InfoNCE and
        consistency terms straight from its (n, E) embeddings (Triton only, from EMBED_MIN_BATCH
        pairs on): no (n, n) matrix, so memory grows linearly with the batch."""
        return self.backend == "triton" and dot_product and n >= EMBED_MIN_BATCH

    def __repr__(self) -> str:
        return f"Ops({self.backend!r})"


AUTO = Ops("auto")
