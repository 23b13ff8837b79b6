"""Data parallelism under torchrun: N processes, one global batch, the single-process result.

``torchrun --nproc_per_node=N -m fastncl train ...`` starts N copies of ``fastncl train``; each
finds its rank in the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and joins the process group (``launched``): NCCL for CUDA devices, gloo otherwise,
``runtime.dist_backend`` to override. Without torchrun (WORLD_SIZE unset or 1) nothing here runs.

How a training step is spread (``ShardedBackbone``):
* every rank draws the same global batches (one seeded permutation) and holds the global batch's
  inputs, but encodes only its own rows (``bounds``: B / N each) and all-gathers the encodings
  with autograd (``gather``; backward: the sum over the ranks' gradients, own rows kept);
* a dot-product backbone (vse) then scores the global batch on every rank (B x B x D: cheap next
  to the encoders); a pairwise head (sgr/saf) scores all B images against its own B / N captions,
  the expensive part split N ways, and all-gathers the columns;
* every rank so computes, through the unchanged method code, the loss of the global batch that one
  process would compute: the same negatives, hardest negatives, anchors and proxy searches;
* backward runs on the loss divided by N; each gather's backward sums the ranks' gradients, so
  every rank gets its own rows' single-process gradient, and summing the parameter gradients over
  the ranks (``reduce_gradients``: one all-reduce per optimizer step) gives every rank the
  single-process gradient, and every rank takes the same step. A computation that every rank
  repeats without a gather (a batch of fewer rows than ranks) gives 1/N of its gradient on each
  rank, which the sum restores: the two kinds mix freely in one step.

Why not DistributedDataParallel: a step runs several forward passes of the same model per
backward (SPS's noisy step encodes four times, NCR and ESC predict in eval mode inside the
step), optionally one optimizer step per loss group, through the encode methods rather than
``forward``; DDP's reducer hooks ``forward`` and expects one forward per backward. One
coalesced all-reduce after backward is what DDP's buckets would send, without the overlap.

Batch norm: a backbone's BatchNorm1d layers (sgr/saf's visual self-attention) take the global
batch's statistics in training mode (``GlobalBatchNorm1d``), as one process would. SAF's gate
norm takes per-caption statistics over all images, which a rank's columns hold; its running
statistics (one update per caption, in order) are summed over the ranks' columns: the wrapper
tells it, for the call, which columns this rank scores (its ``shard_columns``), and it sums its
part over the ranks (``sum_over_ranks``). Float buffers are also averaged with the gradients, so
every rank evaluates the same model.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fastncl import FastnclError
from fastncl.profiling import nvtx_range

# bytes each collective carried on this rank since the last reset (the payload: a gathered
# tensor's full size, an all-reduced tensor's size), by kind; tools/comm_volume.py reads them
TRAFFIC = {"gather": 0, "gather_backward": 0, "gradients": 0}


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise FastnclError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None


def size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes the run folder and logs."""
    return rank() == 0


def bounds(n: int, world: int | None = None) -> list[int]:
    """Row boundaries of n rows over the ranks (torch.tensor_split's: the first n % N get one more)."""
    world = world or size()
    q, r = divmod(n, world)
    out = [0]
    for i in range(world):
        out.append(out[-1] + q + (i < r))
    return out


def own(n: int) -> slice:
    """This rank's rows of n rows."""
    b = bounds(n)
    return slice(b[rank()], b[rank() + 1])


@contextlib.contextmanager
def launched(backend: str, timeout_s: float, device_type: str):
    """The process group for a run under torchrun (a no-op for a single process), destroyed at exit."""
    _, world, local_rank = env_world()
    if world <= 1 or dist.is_initialized():
        yield
        return
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise FastnclError("runtime.dist_backend=nccl needs CUDA devices; use gloo on the CPU")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield
    except Exception as e:  # not raised by every rank alike: the CLI names the rank that saw it
        if not getattr(e, "agreed", False):
            e.rank_only = rank()
        raise
    finally:
        dist.destroy_process_group()


def seed_epoch(seed: int, epoch: int) -> None:
    """Under torchrun, torch's seed for ``epoch`` on this rank: each rank its own dropout draws,
    the same again on a resume (one process keeps torch's random stream, which its checkpoint holds)."""
    if size() > 1:
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank()]).generate_state(1)[0]))


def check_batch(batch_size: int) -> None:
    """The global batch must split evenly over the ranks (so that the result does not depend on N)."""
    n = size()
    if batch_size % n:
        raise FastnclError(f"optim.batch_size={batch_size} is the global batch and must divide by the "
                           f"{n} processes (per process {batch_size / n:g})")


# -- collectives ----------------------------------------------------------------------------
def _all_gather(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """The ranks' chunks of an n-row (along ``dim``) tensor, each rank holding its ``bounds`` rows."""
    b = bounds(n)
    widest = max(b[i + 1] - b[i] for i in range(size()))
    flag = x.dtype == torch.bool  # gloo has no bool
    x = x.to(torch.uint8) if flag else x
    pad = widest - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(size())]
    with nvtx_range("all_gather"):
        dist.all_gather(parts, x.contiguous())
    out = torch.cat([p.narrow(dim, 0, b[i + 1] - b[i]) for i, p in enumerate(parts)], dim=dim)
    return out.bool() if flag else out


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, n):
        ctx.dim, ctx.n = dim, n
        return _all_gather(x, dim, n)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        TRAFFIC["gather_backward"] += grad.numel() * grad.element_size()
        with nvtx_range("all_reduce gather backward"):
            dist.all_reduce(grad)
        mine = own(ctx.n)
        return grad.narrow(ctx.dim, mine.start, mine.stop - mine.start), None, None


def gather(x: torch.Tensor | None, n: int, dim: int = 0) -> torch.Tensor | None:
    """The n-row tensor whose ``own(n)`` rows (along ``dim``) are ``x``, on every rank; with
    autograd, its backward sums every rank's gradient and keeps this rank's rows."""
    if x is None:
        return None
    full = list(x.shape)
    full[dim] = n
    TRAFFIC["gather"] += int(torch.Size(full).numel()) * x.element_size()
    if torch.is_grad_enabled() and x.requires_grad:
        return _Gather.apply(x, dim, n)
    return _all_gather(x, dim, n)


def reduce_gradients(modules) -> None:
    """Sum the parameter gradients of ``modules`` over the ranks (each rank's backward ran on its
    loss divided by N, ``step.run_step``) and average their float buffers (batch-norm running
    statistics): one coalesced all-reduce per dtype."""
    world = size()
    if world == 1:
        return
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    by_dtype: dict = {}
    for t in grads + buffers:
        by_dtype.setdefault(t.dtype, []).append(t)
    is_buffer = {id(b) for b in buffers}
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        TRAFFIC["gradients"] += flat.numel() * flat.element_size()
        with nvtx_range("all_reduce gradients"):
            dist.all_reduce(flat)
        for t, total in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(total / world if id(t) in is_buffer else total)


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (identical initial weights)."""
    if size() == 1:
        return
    with torch.no_grad(), nvtx_range("broadcast weights"):
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_object(obj):
    """Rank 0's ``obj`` (picklable) on every rank."""
    if size() == 1:
        return obj
    box = [obj]
    with nvtx_range("broadcast"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(error: BaseException) -> BaseException:
    """``error``, marked as raised by every rank alike (the CLI prints it from rank 0 only)."""
    error.agreed = True
    return error


def agree(error: Exception | None) -> None:
    """Every rank raises the same error when any rank failed (rank 0's, else the first failing
    rank's, naming it), so that no rank waits for one that has stopped."""
    if size() == 1:
        if error is not None:
            raise error
        return
    messages = [None] * size()
    with nvtx_range("all_gather errors"):
        dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    r, message = failed[0]
    if error is not None and r == rank():
        raise agreed(error)
    raise agreed(FastnclError(message if r == 0 else f"rank {r}: {message}"))


def on_main(fn):
    """``fn()`` run on rank 0 and its result sent to every rank; an error it raised is raised on
    every rank (a single process: just ``fn()``)."""
    if size() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # its message goes to the other ranks: every rank stops alike
            error = e
    result, message = broadcast_object((result, None if error is None else str(error)))
    if error is not None:
        raise agreed(error)
    if message is not None:
        raise agreed(FastnclError(f"rank 0: {message}"))
    return result


# -- models -----------------------------------------------------------------------------------
def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of ``x`` (a copy; ``x`` is left as it is)."""
    x = x.clone()
    with nvtx_range("all_reduce batch-norm statistics"):
        dist.all_reduce(x)
    return x


@contextlib.contextmanager
def _told(modules: list[nn.Module], name: str, value):
    """Each of ``modules`` has attribute ``name`` = ``value`` for the block (what its forward
    reads), then the value it had before."""
    before = [getattr(m, name) for m in modules]
    for m in modules:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, old in zip(modules, before):
            setattr(m, name, old)


class ShardedBackbone:
    """A backbone (or its compiled view) run data-parallel over the ranks: every method call takes
    the global batch's inputs and returns the global batch's encodings and similarities, having
    encoded (and, for a pairwise head, scored) only this rank's share. A batch of fewer rows than
    ranks is encoded whole on every rank. Attribute access falls through to the wrapped view."""

    def __init__(self, view):
        self.view = view
        self._pairwise = hasattr(view, "score_block")
        # the modules told, for a call, what share of the batch this rank holds: the batch norms
        # (``replicated``: every rank encodes the whole batch) and the modules of a pairwise head
        # that declare ``shard_columns`` (SAF's gate norm: the captions it scores)
        modules = list(view.modules())
        self._norms = [m for m in modules if isinstance(m, GlobalBatchNorm1d)]
        self._column_users = [m for m in modules if hasattr(type(m), "shard_columns")]

    def _encode(self, encode, n: int, *inputs):
        if n < size():  # every rank encodes the whole (tiny) batch: its own batch-norm statistics
            with _told(self._norms, "replicated", True):
                return encode(*inputs)
        rows = own(n)
        enc = encode(*(x[rows] for x in inputs))
        with nvtx_range("gather encodings"):
            return type(enc)(*(gather(t, n) for t in enc))

    def encode_images(self, images):
        return self._encode(self.view.encode_images, images.shape[0], images)

    def encode_captions(self, tokens, lengths):
        return self._encode(self.view.encode_captions, tokens.shape[0], tokens, lengths)

    def similarity(self, images, captions):
        n = captions.global_.shape[0]
        if not self._pairwise or n < size():  # a dot product: every rank scores the global batch
            return self.view.similarity(images, captions)
        cols = own(n)
        mine = type(captions)(*(None if t is None else t[cols] for t in captions))
        with _told(self._column_users, "shard_columns", (cols.start, n)):
            scores = self.view.similarity(images, mine)
        with nvtx_range("gather scores"):
            return gather(scores, n, dim=1)

    def __getattr__(self, name):
        if name == "view":
            raise AttributeError(name)
        return getattr(self.view, name)


@torch.compiler.disable
def _global_stats(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, count) per channel of the global batch (Chan's parallel combination
    of each rank's mean and sum of squared deviations, in fp32), differentiable."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    count = x.numel() // x.shape[1]
    mean = x.mean(dim=dims)
    m2 = ((x - mean.view(_channel_shape(x))) ** 2).sum(dim=dims)
    c = x.shape[1]
    stats = torch.cat([mean, m2, mean.new_full((1,), float(count))]).view(1, -1)
    every = gather(stats, size())  # (N, 2C + 1): each rank's means, squared deviations and count
    means, m2s, counts = every[:, :c], every[:, c : 2 * c], every[:, 2 * c].detach()
    total = counts.sum()
    mean = (counts.view(-1, 1) * means).sum(0) / total
    m2 = (m2s + counts.view(-1, 1) * (means - mean) ** 2).sum(0)
    return mean, m2 / total, total


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics are the global batch's, over every rank (the
    single-process statistics); eval mode, a single process and a batch every rank encodes whole
    (``replicated``, set by ShardedBackbone for the call) are BatchNorm1d's own."""

    replicated = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or size() == 1 or self.replicated:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        mean, var, count = _global_stats(x, dims)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp_min(1), alpha=m)
                self.num_batches_tracked.add_(1)
        shape = _channel_shape(x)
        y = (x.to(mean.dtype) - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm1d taking the global batch's statistics (same parameters,
    buffers and state-dict keys); unchanged for a single process."""
    if size() > 1:
        for m in module.modules():
            if type(m) is nn.BatchNorm1d:
                m.__class__ = GlobalBatchNorm1d
    return module
