"""Random inputs for the kernel tests: generators seeded from a test's parameters (OpenCLIP style),
similarity matrices, upstream gradients, and the reference gradients they are compared with."""
from __future__ import annotations

import zlib

import torch


def make_generator(*params) -> tuple[torch.Generator, int]:
    """A generator seeded from the test's parameters (OpenCLIP style), and its seed."""
    seed = zlib.crc32(repr(params).encode())
    return torch.Generator().manual_seed(seed), seed


def uniform(shape, gen, low=-1.0, high=1.0, dtype=torch.float32) -> torch.Tensor:
    """Uniform values in [low, high), drawn in float64 and then rounded to ``dtype``."""
    x = torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low
    return x.to(dtype)


def random_sim(n, gen, dtype=torch.float32) -> torch.Tensor:
    """(n, n) cosine-like similarities in [-1, 1)."""
    return uniform((n, n), gen, dtype=dtype)


def upstream_grad(shape, gen) -> torch.Tensor:
    """Random float64 upstream gradient with about a quarter of its entries zeroed (never ones)."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return g * (torch.rand(shape, generator=gen, dtype=torch.float64) > 0.25)


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def reference_grads(fn, inputs, upstreams):
    """Gradients of sum(out * upstream) with respect to each input (in the input's dtype)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = as_tuple(fn(*leaves))
    total = sum((o.double() * u).sum() for o, u in zip(outs, upstreams))
    return torch.autograd.grad(total, leaves)


def kink_free_sim(n, gen, ok, tries=200, dtype=torch.float64) -> torch.Tensor:
    """A random similarity matrix in ``dtype`` for which ``ok(sim)`` holds on its values upcast to
    float64 (keeps hinges off their kinks)."""
    for _ in range(tries):
        sim = random_sim(n, gen, dtype)
        if ok(sim.double()):
            return sim
    raise RuntimeError("could not draw a kink-free matrix; loosen the condition")


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    return x[~torch.eye(x.shape[0], dtype=torch.bool)]
