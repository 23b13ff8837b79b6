"""Bytes each rank's collectives carry in one training step under torchrun (fastncl.distributed).

    python tools/comm_volume.py --backbone sgr --batch 128 --method sps
    python tools/comm_volume.py --backbone vse --batch 1024 8192 --embed-dim 256
    python tools/comm_volume.py --backbone sgr --method sps --batch 128 --set sps.separate_steps=true

Starts ``--world`` gloo processes on this machine (file rendezvous), builds the backbone with
Flickr30K's shapes (36 regions x 2048 features, a vocabulary of 8,500 words, captions of
``--caption-length`` tokens) and runs one co-training step of the method with every subset
active (SPS: reliable, quasi-clean and noisy batches, each of the global batch size), counting
the payload of each collective (distributed.TRAFFIC): the encodings and scores all-gathered in
the forward passes, the all-reduces of their gradients in backward, and the all-reduce of the
parameter gradients (and float buffers). A payload is the collective's whole tensor on one rank;
on the wire a ring all-gather sends (N - 1) / N of it per rank and a ring all-reduce 2 (N - 1) / N.
Prints a Markdown table; the numbers do not depend on the device.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REGIONS, IMAGE_DIM, VOCAB = 36, 2048, 8_500


def _batch(size: int, length: int, seed: int):
    from fastncl.data.batches import Batch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((size,), length)
    tokens = torch.randint(4, VOCAB, (size, length), generator=g)
    images = torch.rand(size, REGIONS, IMAGE_DIM, generator=g)
    return Batch(torch.arange(size), images, tokens, lengths)


def _measure(args, batch_size: int) -> dict:
    from fastncl import distributed, kernels
    from fastncl.config import parse_override, resolve
    from fastncl.methods import build_method
    from fastncl.models import build_backbone
    from fastncl.step import run_step

    overrides = [f"model.backbone={args.backbone}", f"model.embed_dim={args.embed_dim}", "model.dropout=0",
                 *args.overrides]
    if args.backbone != "vse":
        overrides.append("model.word_dim=300")
    cfg = resolve(method=args.method, overrides=[parse_override(o) for o in overrides])
    method = build_method(cfg, kernels.Ops("torch"))
    torch.manual_seed(0)
    models = [distributed.global_batch_norm(build_backbone(cfg.model, IMAGE_DIM, VOCAB, REGIONS)) for _ in range(2)]
    views = [distributed.ShardedBackbone(m) for m in models]
    opt = torch.optim.Adam(models[0].parameters())
    batches = {name: _batch(batch_size, args.caption_length, i) for i, name in enumerate(method.subset_names)}
    peer_prob = torch.full((batch_size,), 0.9)
    for key in distributed.TRAFFIC:
        distributed.TRAFFIC[key] = 0
    groups = method.train_groups(views[0], views[1], batches, peer_prob, co_epoch=10**6)
    run_step(opt, groups, method.separate_steps, 2.0, modules=[models[0]])
    params = sum(p.numel() for p in models[0].parameters())
    return {**distributed.TRAFFIC, "params": params}


def _worker(rank: int, world: int, init: str, args, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        rows = [(b, _measure(args, b)) for b in args.batch]
        if rank == 0:
            torch.save(rows, Path(out) / "rows.pt")
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vse", choices=("vse", "sgr", "saf"))
    parser.add_argument("--method", default="sps")
    parser.add_argument("--batch", type=int, nargs="+", default=[128], help="global batch sizes")
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--caption-length", type=int, default=14, help="tokens per caption (F30K: ~12 words + 2)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. --set sps.separate_steps=true (repeatable)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.world, str(Path(tmp) / "rendezvous"), args, tmp), nprocs=args.world)
        rows = torch.load(Path(tmp) / "rows.pt", weights_only=True)
    mb = 1 / 2**20
    print(f"{args.method} on {args.backbone}, embed_dim {args.embed_dim}, {args.world} ranks, captions of "
          f"{args.caption_length} tokens, one step with every subset; payload per rank (MiB)\n")
    print("| global batch | parameters | forward all-gathers | their gradients' all-reduces | parameter all-reduce "
          "| total |")
    print("|---|---|---|---|---|---|")
    for b, t in rows:
        total = t["gather"] + t["gather_backward"] + t["gradients"]
        print(f"| {b} | {t['params'] / 1e6:.1f} M | {t['gather'] * mb:.1f} | {t['gather_backward'] * mb:.1f} | "
              f"{t['gradients'] * mb:.1f} | {total * mb:.1f} |")


if __name__ == "__main__":
    main()
