"""Inputs of the `fastncl data embed` tests (a helper, not a test module): small images drawn with
Pillow, the caption tables and webdataset shards that name them, and tiny random image encoders
saved as a test would receive them (torch.jit, torch.export, a transformers CLIP folder)."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "black": (20, 20, 20), "white": (245, 245, 245), "orange": (240, 140, 30), "purple": (130, 50, 170),
           "grey": (128, 128, 128), "pink": (240, 150, 190), "brown": (120, 70, 30)}
SHAPES = ("circle", "square", "bar", "triangle")
FORMATS = (("png", "RGB"), ("png", "RGBA"), ("jpg", "RGB"))  # image i is drawn as FORMATS[i % 3]
SIZE = (32, 24)  # width x height: not square, so that the centre crop matters


@dataclass
class Image:
    """One drawn image: its file (relative to the folder), id and captions."""

    index: int
    path: str
    image_id: str
    captions: list[str] = field(default_factory=list)
    split: str | None = None


def draw(i: int):
    """Image ``i``: a shape of one colour on a background of another, at an i-dependent place."""
    from PIL import Image as PILImage, ImageDraw

    names = list(COLOURS)
    back, front = COLOURS[names[i % len(names)]], COLOURS[names[(3 * i + 5) % len(names)]]
    if back == front:
        front = tuple(255 - c for c in front)
    ext, mode = FORMATS[i % len(FORMATS)]
    w, h = SIZE
    im = PILImage.new(mode, (w, h), back + ((255,) if mode == "RGBA" else ()))
    if mode == "RGBA":  # a transparent band: composited on white by every encoder
        im.paste((0, 0, 0, 0), (0, 0, w, 3 + i % 5))
    d = ImageDraw.Draw(im)
    x0, y0 = (5 * i) % (w - 12), (3 * i) % (h - 10)
    box = (x0, y0, x0 + 8 + i % 5, y0 + 7 + i % 3)
    fill = front + ((200,) if mode == "RGBA" else ())
    shape = SHAPES[i % len(SHAPES)]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "bar":
        d.rectangle((0, y0, w, y0 + 2 + i % 4), fill=fill)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return im


def encoded(i: int) -> tuple[str, bytes]:
    """Image ``i`` as (extension, file bytes)."""
    ext, _ = FORMATS[i % len(FORMATS)]
    buf = io.BytesIO()
    draw(i).save(buf, format="JPEG" if ext == "jpg" else "PNG", **({"quality": 95} if ext == "jpg" else {}))
    return ext, buf.getvalue()


def caption(i: int, k: int) -> str:
    names = list(COLOURS)
    return (f"a {names[(3 * i + 5) % len(names)]} {SHAPES[i % len(SHAPES)]} on {names[i % len(names)]} "
            f"picture{i} caption{k}")


def draw_folder(folder: Path, n: int, captions=2, *, ids: bool = False, splits: dict | None = None) -> list[Image]:
    """``n`` images in ``folder/images``; ``captions``: a count for every image or a function
    i -> count; ``ids``: ids unlike the paths; ``splits``: i -> split (else None)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ext, data = encoded(i)
        path = f"images/im{i:03d}.{ext}"
        (folder / path).write_bytes(data)
        count = captions(i) if callable(captions) else captions
        out.append(Image(i, path, f"photo-{i:03d}" if ids else path, [caption(i, k) for k in range(count)],
                         (splits or {}).get(i)))
    return out


def table_rows(images: list[Image], interleave: bool = True) -> list[tuple[Image, str]]:
    """One row per caption; ``interleave``: every image's first caption, then every second one, ...
    (an image's captions spread over the table)."""
    if not interleave:
        return [(im, c) for im in images for c in im.captions]
    most = max(len(im.captions) for im in images)
    return [(im, im.captions[k]) for k in range(most) for im in images if k < len(im.captions)]


def write_table(path: Path, rows: list[tuple[Image, str]], *, ids: bool = False, split: bool = False,
                caption_column: str = "caption") -> Path:
    """A CSV or TSV caption table (by ``path``'s suffix)."""
    header = ["image", caption_column] + (["image_id"] if ids else []) + (["split"] if split else [])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",", lineterminator="\n")
        w.writerow(header)
        for im, c in rows:
            w.writerow([im.path, c] + ([im.image_id] if ids else []) + ([im.split] if split else []))
    return path


def write_jsonl(path: Path, images: list[Image], *, ids: bool = False, split: bool = False) -> Path:
    """A JSONL caption table: one row per image with the list of its captions."""
    with open(path, "w", encoding="utf-8") as f:
        for im in images:
            row = {"file_name": im.path, "captions": im.captions}
            if ids:
                row["image_id"] = im.image_id
            if split:
                row["split"] = im.split
            f.write(json.dumps(row) + "\n")
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, images: list[Image], *, json_split: bool = False, orphan: bool = False) -> list[Path]:
    """Two webdataset shards in ``folder``: the even images as ``KEY.png|jpg`` + ``KEY.txt`` (a caption
    a line) in shard-000.tar, the odd ones as ``KEY.ext`` + ``KEY.json`` (``captions``, ``image_id``,
    and ``split`` with ``json_split``) in shard-001.tar. The images' ``path`` becomes ``shard:member``
    and the id of a .txt sample its key. ``orphan``: shard-000 also holds ``orphan.txt``, a caption
    without an image."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = [folder / "shard-000.tar", folder / "shard-001.tar"]
    with tarfile.open(shards[0], "w", format=tarfile.USTAR_FORMAT) as t0, \
            tarfile.open(shards[1], "w", format=tarfile.USTAR_FORMAT) as t1:
        for im in images:
            ext, data = encoded(im.index)
            key = f"sample{im.index:03d}"
            if im.index % 2 == 0:
                _add(t0, f"{key}.{ext}", data)
                _add(t0, f"{key}.txt", ("\n".join(im.captions) + "\n").encode())
                im.path, im.image_id = f"{shards[0]}:{key}.{ext}", key
            else:  # the three caption keys in turn, a list or (one caption) a string
                key_name = ("captions", "caption", "text")[(im.index // 2) % 3]
                meta = {key_name: im.captions if len(im.captions) > 1 else im.captions[0], "image_id": im.image_id}
                if json_split:
                    meta["split"] = im.split
                _add(t1, f"{key}.{ext}", data)
                _add(t1, f"{key}.json", json.dumps(meta).encode())
                im.path = f"{shards[1]}:{key}.{ext}"
        if orphan:
            _add(t0, "orphan.txt", b"a caption without its image\n")
    return shards


# -- encoders -----------------------------------------------------------------------------------
def _module(dim: int, scale: float, tokens: bool, slow: int):
    import torch
    from torch import nn

    class Tiny(nn.Module):
        """A conv stem and a linear head: (B, 3, S, S) -> (B, dim), or (B, 1 + patches, dim)."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 12, kernel_size=4, stride=4)
            self.head = nn.Linear(12, dim)

        def forward(self, x):
            h = self.stem(x)  # (B, 12, S/4, S/4)
            for _ in range(slow):  # busy work: a run that can be killed mid-way
                g = h.flatten(1)
                h = h + 1e-3 * torch.sin(g.unsqueeze(2) * g.unsqueeze(1)).mean(dim=2).view_as(h)
            t = h.flatten(2).transpose(1, 2)  # (B, patches, 12)
            if tokens:
                return self.head(torch.cat([t.mean(dim=1, keepdim=True), t], dim=1)) * scale
            return self.head(t.mean(dim=1)) * scale

    torch.manual_seed(0)
    return Tiny().eval()


def save_torchscript(path: Path, *, size: int = 16, dim: int = 8, scale: float = 1.0, tokens: bool = False,
                     slow: int = 0) -> Path:
    """A random image encoder saved with torch.jit.save(torch.jit.trace(...)); ``scale`` multiplies
    its output, ``slow`` adds that many rounds of busy work per image."""
    import torch

    model = _module(dim, scale, tokens, slow)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, torch.zeros(2, 3, size, size)), str(path))
    return path


def save_export(path: Path, *, size: int = 16, dim: int = 8) -> Path:
    """The same encoder saved with torch.export.save (a dynamic batch dimension)."""
    import torch

    model = _module(dim, 1.0, False, 0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def load_module(path: Path):
    """The saved torchscript or export encoder, for the tests' own forward passes."""
    import torch

    try:
        return torch.jit.load(str(path))
    except Exception:  # noqa: BLE001
        return torch.export.load(str(path)).module()


HF_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, projection_dim=16)


def save_hf(transformers, folder: Path, *, preprocessor: dict | None = None, whole: bool = False) -> Path:
    """A random tiny CLIPVisionModelWithProjection (``whole``: a CLIPModel, text tower and all)
    saved with save_pretrained (and, when given, ``preprocessor`` as its preprocessor_config.json)."""
    import torch

    torch.manual_seed(0)
    if whole:
        vision = {k: v for k, v in HF_CONFIG.items() if k != "projection_dim"}
        text = dict(vocab_size=50, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=16)
        config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                         projection_dim=HF_CONFIG["projection_dim"])
        model = transformers.CLIPModel(config).eval()
    else:
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**HF_CONFIG)).eval()
    model.save_pretrained(str(folder))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor), encoding="utf-8")
    return folder


def rows_of(out: Path, split: str) -> list[tuple[str, str]]:
    """``{split}_images.txt``: (image id, where it was read) per row."""
    return [tuple(line.split("\t")) for line in (out / f"{split}_images.txt").read_text(encoding="utf-8").splitlines()]


def captions_of(out: Path, split: str) -> list[str]:
    return (out / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()


def array(out: Path, split: str) -> np.ndarray:
    return np.load(out / f"{split}_ims.npy")
