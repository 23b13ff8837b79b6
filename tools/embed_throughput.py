"""Throughput and memory of `fastncl data embed` on this machine (docs/performance.md's embed table).

    python tools/embed_throughput.py --images 2000 --encoder patches [--procs 2] [--size 320x240]
    python tools/embed_throughput.py --images 256 --encoder vit-b32 [--procs 2]
    python tools/embed_throughput.py --images 100000 --encoder patches --size 64x64

Draws a folder of synthetic JPEG photos-to-be (coloured shapes on a gradient, ``--size``) with a
caption table once (cached in ``--work``), then runs ``fastncl data embed`` on it in a
subprocess (under ``torchrun --nproc_per_node=N`` for ``--procs N``) and prints one JSON line:
images/s over the whole command, rank 0's own split of its time (encoder, waiting for decoded
images, decoding thread time, writing) and the command's peak resident memory (the largest
process's, from getrusage). ``vit-b32`` is a randomly initialised ViT-B/32-sized image tower
(12 layers, width 768, 224x224 input, 512-d output) saved with torch.jit.trace: the cost of a
real CLIP tower without its weights.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "black": (20, 20, 20), "white": (245, 245, 245), "orange": (240, 140, 30), "purple": (130, 50, 170)}
SHAPES = ("circle", "square", "bar")


def draw_folder(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """n JPEG images with one caption each, and captions.csv; reused when it is there."""
    from PIL import Image, ImageDraw

    table = folder / "captions.csv"
    if table.exists():
        return table
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None]
    rows = []
    for i in range(n):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        background = (top * (1 - ramp) + bottom * ramp).repeat(h, axis=0).astype(np.uint8)
        im = Image.fromarray(background)
        draw = ImageDraw.Draw(im)
        words = []
        for _ in range(int(rng.integers(1, 4))):
            colour, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
            x0, y0 = int(rng.integers(0, w - w // 4)), int(rng.integers(0, h - h // 4))
            x1, y1 = x0 + int(rng.integers(w // 8, w // 4)), y0 + int(rng.integers(h // 8, h // 4))
            if shape == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=COLOURS[colour])
            elif shape == "square":
                draw.rectangle((x0, y0, x1, y1), fill=COLOURS[colour])
            else:
                draw.rectangle((x0, y0, x1, y0 + max(2, (y1 - y0) // 4)), fill=COLOURS[colour])
            words.append(f"a {colour} {shape}")
        path = f"images/{i:06d}.jpg"
        im.save(folder / path, quality=90)
        rows.append((path, " and ".join(words) + f" on a gradient number {i}"))
    tmp = table.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "caption"))
        writer.writerows(rows)
    os.replace(tmp, table)
    return table


def vit_b32(path: Path) -> Path:
    """A random ViT-B/32-sized image tower, traced to TorchScript (made once)."""
    if path.exists():
        return path
    import torch
    from torch import nn

    class ViT(nn.Module):
        def __init__(self, width=768, layers=12, heads=12, patch=32, size=224, out=512):
            super().__init__()
            self.patch = nn.Conv2d(3, width, patch, patch, bias=False)
            self.cls = nn.Parameter(torch.randn(width) * 0.02)
            self.pos = nn.Parameter(torch.randn((size // patch) ** 2 + 1, width) * 0.01)
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width)
            self.proj = nn.Linear(width, out, bias=False)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.pos
            return self.proj(self.norm(self.blocks(x)[:, 0]))

    torch.manual_seed(0)
    model = ViT().eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, 224, 224))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(path))
    return path


def run(table: Path, out: Path, encoder: str, checkpoint: Path | None, procs: int, batch: int, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    args = ["data", "embed", str(table), str(out), "--encoder", encoder, "--batch-size", str(batch),
            "--workers", str(workers), "--no-progress"]
    if checkpoint is not None:
        args += ["--checkpoint", str(checkpoint)]
    env = {**os.environ}
    if procs > 1:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc_per_node={procs}", "-m", "fastncl", *args]
    else:
        cmd = [sys.executable, "-m", "fastncl", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=table.parent)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"embed failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    n = sum(json.loads((out / "manifest.json").read_text())["images"].values())
    line = re.search(r"rank 0 embedded (\d+) images in ([\d.]+) s .*encoder ([\d.]+) s, waiting for decoding "
                     r"([\d.]+) s(?:, decoding ([\d.]+) s of thread time)? on \d+ threads, writing ([\d.]+) s", proc.stderr)
    split = {}
    if line:
        split = {"rank0_images": int(line[1]), "rank0_s": float(line[2]), "encoder_s": float(line[3]),
                 "wait_decode_s": float(line[4]), "decode_thread_s": float(line[5]) if line[5] else None,
                 "write_s": float(line[6])}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # MiB: the largest waited-for process
    return {"encoder": encoder, "procs": procs, "images": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 1),
            "peak_rss_mib": round(peak, 1), **split}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--encoder", choices=("patches", "vit-b32"), default="patches")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--size", default="320x240", help="image width x height")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="runs/embed-throughput", help="where the drawn folders and outputs go")
    a = p.parse_args()
    w, h = (int(x) for x in a.size.split("x"))
    work = Path(a.work).resolve()
    start = time.perf_counter()
    table = draw_folder(work / f"folder-{a.images}-{a.size}", a.images, (w, h))
    drawn = time.perf_counter() - start
    checkpoint = vit_b32(work / "vit-b32.pt") if a.encoder == "vit-b32" else None
    result = run(table, work / f"out-{a.encoder}-{a.images}-{a.procs}", "patches" if a.encoder == "patches" else "torchscript",
                 checkpoint, a.procs, a.batch_size, a.workers)
    print(json.dumps({**result, "size": a.size, "batch_size": a.batch_size, "workers": a.workers,
                      "draw_s": round(drawn, 1)}))


if __name__ == "__main__":
    main()
