"""``fastncl data embed SRC OUT``: images with captions -> a training folder in the SCAN/NCR layout.

What it writes in OUT (what ``fastncl train --data OUT`` reads, ``fastncl.data.precomp``):
* ``{train,dev,test}_ims.npy``: (N, R, D) vectors, R = 1 (one vector per image) or the encoder's
  regions / patch tokens, float16 or float32;
* ``{split}_caps.txt``: K captions per image, caption k of image k // K;
* ``{split}_images.txt``: row i's image, ``image_id<TAB>where it was read``;
* ``vocab.json`` (the training and dev captions' words), ``skipped.txt`` (images and samples left
  out, and why; only when there are some) and ``manifest.json``: the source, the encoder and its
  checkpoint's SHA-256, the preprocessing, package versions, counts and the SHA-256 of every file.

How (``embed``):
1. **Plan** (rank 0): read the source (``fastncl.data.sources``), fix K (``--captions-per-image``,
   default the most common count: images with more keep their first K, images with fewer are
   skipped), take the splits from the source's split column or draw them by image id (the
   SHA-256 of the id orders the images: the first ``--test-images`` are test, the next
   ``--dev-images`` dev; an image's captions never straddle splits).
2. **Work folder** ``OUT.partial``: the output arrays pre-allocated at their full size and a
   journal of finished batches per rank. Batches are fixed slices of each split
   (``--batch-size`` rows), the same for any number of processes.
3. **Embed**: each process (under torchrun, each rank) takes every N-th unfinished batch, decodes
   the next batch's images on ``--workers`` background threads while the encoder runs, writes its
   rows in place (``os.pwrite``: nothing held in memory, so a set larger than memory streams) and
   journals the batch. A killed run started again with the same command resumes where it stopped
   (so does one stopped by an undecodable image under ``--on-bad-image error``, once the image is
   fixed); vectors that no rerun of the command can store (a varying shape, NaN, beyond float16)
   stop it and remove the work folder, so that the corrected command starts afresh.
4. **Finish** (rank 0): standardise (the patches encoder: with the training rows' statistics,
   read in chunks), drop the images that did not decode, write the captions, maps, vocabulary and
   manifest into ``OUT.partial/final`` and rename it to OUT. OUT exists only when it is complete.

The bytes written depend on the inputs and options only, not on the number of processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastncl import FastnclError, __version__
from fastncl.data.encoders import Encoder, _first_line, package_version, pil_image
from fastncl.data.sources import Item, Source, read_source, sha256_of
from fastncl.data.split import Vocab, tokenize

FORMAT = 1
SPLIT_NAMES = ("train", "dev", "test")
DTYPES = ("float16", "float32")
CHUNK_BYTES = 1 << 25  # the finishing pass reads the arrays 32 MiB at a time
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Plan:
    splits: dict[str, list[Item]]  # every image with exactly captions_per_image captions
    captions_per_image: int
    splits_from: str  # "column" or "image id"
    source: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said as warnings


@dataclass(frozen=True)
class Batch:
    index: int
    split: str
    start: int
    stop: int


# -- the plan ---------------------------------------------------------------------------------
def _id_order(image_id: str) -> bytes:
    return hashlib.sha256(image_id.encode("utf-8")).digest()


def make_plan(source: Source, *, captions_per_image: int | None = None, dev_images: int | None = None,
              test_images: int | None = None, on_bad_image: str = "skip") -> Plan:
    items, skipped, notes = list(source.items), list(source.skipped), []
    if not items:
        raise FastnclError(f"{source.description.get('file') or 'SRC'}: no image with a caption")
    missing = [it for it in items if not it.ref.exists()]
    if missing and on_bad_image == "error":
        raise FastnclError(f"{missing[0].ref.name()}: no such image file ({len(missing)} missing in all; "
                           "--on-bad-image skip lists and skips them)")
    skipped += [(it.ref.name(), "no such file") for it in missing]
    missing_ids = {it.image_id for it in missing}
    items = [it for it in items if it.image_id not in missing_ids]
    counts = [len(it.captions) for it in items]
    if captions_per_image is None:  # the most common count; a tie goes to the larger
        values, freq = np.unique(counts, return_counts=True)
        k = int(values[np.flatnonzero(freq == freq.max())[-1]])
    else:
        k = captions_per_image
    few = [it for it in items if len(it.captions) < k]
    skipped += [(it.ref.name(), f"{len(it.captions)} captions, fewer than {k}") for it in few]
    more = sum(len(it.captions) - k for it in items if len(it.captions) > k)
    if few:
        notes.append(f"{len(few)} images have fewer than {k} captions and are skipped (--captions-per-image)")
    if more:
        notes.append(f"{more} captions beyond the first {k} of their image are left out (--captions-per-image)")
    items = [Item(it.image_id, it.ref, it.source, it.captions[:k], it.split) for it in items if len(it.captions) >= k]
    if not items:
        raise FastnclError(f"--captions-per-image {k}: no image has that many captions")

    with_split = [it for it in items if it.split is not None]
    if with_split:
        if len(with_split) != len(items):
            first = next(it for it in items if it.split is None)
            raise FastnclError(f"{first.source}: has no split while {len(with_split)} images have one "
                               "(give every image a split, or none)")
        if dev_images is not None or test_images is not None:
            raise FastnclError("--dev-images/--test-images: the source gives the splits (its split column)")
        splits = {s: [it for it in items if it.split == s] for s in SPLIT_NAMES}
        splits_from = "column"
    else:
        n = len(items)
        default = min(1000, n // 10)
        dev_n = default if dev_images is None else dev_images
        test_n = default if test_images is None else test_images
        if min(dev_n, test_n) < 1 or dev_n + test_n >= n:
            raise FastnclError(f"--dev-images {dev_n} / --test-images {test_n}: each at least 1 and together fewer "
                               f"than the {n} images, so that some are left to train on")
        order = sorted(range(n), key=lambda i: _id_order(items[i].image_id))
        split_of = {}
        for rank_, i in enumerate(order):
            split_of[i] = "test" if rank_ < test_n else "dev" if rank_ < test_n + dev_n else "train"
        splits = {s: [it for i, it in enumerate(items) if split_of[i] == s] for s in SPLIT_NAMES}
        splits_from = "image id"
    empty = [s for s in SPLIT_NAMES if not splits[s]]
    if empty:
        raise FastnclError(f"{source.description.get('file') or 'SRC'}: no image in split {empty[0]}")
    return Plan(splits, k, splits_from, source.description, skipped, notes)


def _rows_digest(plan: Plan) -> str:
    """The SHA-256 of every row's split, image id, image and captions (streamed: no list of them)."""
    h = hashlib.sha256()
    for s in SPLIT_NAMES:
        for it in plan.splits[s]:
            h.update("\t".join((s, it.image_id, it.ref.name(), *it.captions)).encode("utf-8") + b"\n")
    return h.hexdigest()


def batches(plan: Plan, batch_size: int) -> list[Batch]:
    out = []
    for s in SPLIT_NAMES:
        for start in range(0, len(plan.splits[s]), batch_size):
            out.append(Batch(len(out), s, start, min(start + batch_size, len(plan.splits[s]))))
    return out


# -- arrays on disk (no memory maps: the resident memory stays flat) ---------------------------------
def _allocate(path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    """A .npy file of ``shape`` (its header and a sparse body)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    del arr


def _data_offset(path: Path) -> tuple[int, np.dtype, tuple[int, ...]]:
    """Where a .npy file's data starts, its dtype and shape (mapping it touches no page)."""
    arr = np.load(path, mmap_mode="r")
    return arr.offset, arr.dtype, arr.shape


def _read_rows(f, offset: int, dtype: np.dtype, row_shape: tuple, start: int, stop: int) -> np.ndarray:
    per_row = int(np.prod(row_shape))
    f.seek(offset + start * per_row * dtype.itemsize)
    rows = np.fromfile(f, dtype=dtype, count=(stop - start) * per_row)
    return rows.reshape(stop - start, *row_shape)


# -- the work folder ----------------------------------------------------------------------------
class Work:
    """``OUT.partial``: the fingerprint of what is being embedded, the pre-allocated arrays and the
    journals of finished batches (one line per batch: its index and the rows that did not decode)."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".partial")

    def array(self, split: str) -> Path:
        return self.path / f"{split}_ims.npy"

    def prepare(self, fingerprint: dict, plan: Plan, dtype: str, row_shape: tuple) -> tuple[set, dict]:
        """A new work folder, or the one a killed run left with the same fingerprint: the finished
        batches and the rows that did not decode so far."""
        key = json.dumps(fingerprint, sort_keys=True)
        stamp = self.path / "fingerprint.json"
        if self.path.exists():
            if not stamp.exists() or stamp.read_text(encoding="utf-8") != key:
                raise FastnclError(f"{self.path}: holds an unfinished embed of other inputs or options; "
                                   "delete it to start over")
            return self.journal()
        tmp = self.path.with_name(self.path.name + ".new")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for s in SPLIT_NAMES:
            _allocate(tmp / f"{s}_ims.npy", dtype, (len(plan.splits[s]), *row_shape))
        (tmp / "fingerprint.json").write_text(key, encoding="utf-8")
        os.rename(tmp, self.path)
        return set(), {}

    def journal(self) -> tuple[set, dict]:
        done, bad = set(), {}
        for path in sorted(self.path.glob("journal.*.txt")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a kill: that batch is done again
                    continue
                done.add(entry["batch"])
                for split, row, why in entry["bad"]:
                    bad[(split, row)] = why
        return done, bad


# -- decoding on background threads ------------------------------------------------------------------
def _decode(item: Item, encoder: Encoder):
    """(preprocessed array, None, seconds), or (None, why, seconds) for an image that cannot be
    read or decoded."""
    image_mod = pil_image()
    start = time.perf_counter()
    try:
        with image_mod.open(io.BytesIO(item.ref.read())) as im:
            return encoder.preprocess(im), None, time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 (Pillow raises many kinds on corrupt data; each is a bad image)
        return None, _first_line(e), time.perf_counter() - start


def _prefetched(todo: list[Batch], plan: Plan, encoder: Encoder, pool: ThreadPoolExecutor):
    """(batch, futures of its decoded images), the next batch's decoding already submitted."""
    pending = None
    for b in todo:
        futures = [pool.submit(_decode, it, encoder) for it in plan.splits[b.split][b.start:b.stop]]
        if pending is not None:
            yield pending
        pending = (b, futures)
    if pending is not None:
        yield pending


@dataclass
class Timing:
    images: int = 0
    wait_s: float = 0.0  # the encoder waiting for decoded images
    decode_s: float = 0.0  # reading, decoding and preprocessing, summed over the decoding threads
    encode_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0


def embed_batches(work: Work, plan: Plan, todo: list[Batch], encoder: Encoder, dtype: str, row_shape: tuple, *,
                  rank: int, workers: int, on_bad_image: str, progress: bool) -> Timing:
    """Embed ``todo`` into the work arrays, journalling each batch."""
    from tqdm import tqdm

    timing, start = Timing(), time.perf_counter()
    files = {s: os.open(work.array(s), os.O_WRONLY) for s in SPLIT_NAMES}
    offsets = {s: _data_offset(work.array(s))[0] for s in SPLIT_NAMES}
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    journal = os.open(work.path / f"journal.{rank}.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bar = tqdm(total=sum(b.stop - b.start for b in todo), unit="img", desc="embed", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            for b, futures in _prefetched(todo, plan, encoder, pool):
                t0 = time.perf_counter()
                decoded = [f.result() for f in futures]
                t1 = time.perf_counter()
                items = plan.splits[b.split][b.start:b.stop]
                bad = [(b.split, b.start + i, why) for i, (x, why, _) in enumerate(decoded) if x is None]
                if bad and on_bad_image == "error":
                    error = FastnclError(f"{items[bad[0][1] - b.start].ref.name()}: cannot decode the image "
                                         f"({bad[0][2]}); --on-bad-image skip lists and skips such images (the "
                                         f"finished batches wait in {work.path}: the same command resumes)")
                    error.resumable = True  # the work folder stays (embed)
                    raise error
                rows = np.zeros((b.stop - b.start, *row_shape), dtype=dtype)
                good = [i for i, (x, _, _) in enumerate(decoded) if x is not None]
                if good:
                    vectors = encoder.encode(np.stack([decoded[i][0] for i in good]))
                    rows[good] = _checked(vectors, row_shape, dtype, items[good[0]])
                t2 = time.perf_counter()
                os.pwrite(files[b.split], rows.tobytes(), offsets[b.split] + b.start * row_bytes)
                os.write(journal, (json.dumps({"batch": b.index, "bad": bad}) + "\n").encode())
                timing.wait_s += t1 - t0
                timing.decode_s += sum(seconds for _, _, seconds in decoded)
                timing.encode_s += t2 - t1
                timing.write_s += time.perf_counter() - t2
                timing.images += len(items)
                bar.update(len(items))
    finally:
        bar.close()
        for fd in (*files.values(), journal):
            os.close(fd)
    timing.total_s = time.perf_counter() - start
    return timing


def _checked(vectors: np.ndarray, row_shape: tuple, dtype: str, first: Item) -> np.ndarray:
    if vectors.shape[1:] != row_shape:
        raise FastnclError(f"the encoder gave shape {vectors.shape[1:]} for {first.ref.name()}'s batch, "
                           f"{row_shape} for the first image: an encoder's output shape must not vary")
    if not np.isfinite(vectors).all():
        raise FastnclError(f"the encoder gave NaN or inf vectors in the batch of {first.ref.name()}")
    if dtype == "float16" and np.abs(vectors).max() > FLOAT16_MAX:
        raise FastnclError(f"the encoder's vectors exceed float16's range (max |x| = {np.abs(vectors).max():.3g}) "
                           f"in the batch of {first.ref.name()}: use --dtype float32")
    return vectors


# -- finishing ----------------------------------------------------------------------------------
def _train_statistics(path: Path, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (float64) of the kept training rows' vectors,
    accumulated row by row in order in two passes, read in chunks: the same numbers as numpy's
    ``x.mean(axis=0, dtype=float64)`` and ``x.std(axis=0, dtype=float64)`` over the whole array."""
    offset, dtype, shape = _data_offset(path)
    dim = shape[-1]
    rows = max(1, CHUNK_BYTES // max(1, int(np.prod(shape[1:])) * 8))
    total = np.zeros(dim)
    count = 0
    with open(path, "rb") as f:
        for mean_pass in (True, False):
            acc = np.zeros(dim)
            for a in range(0, shape[0], rows):
                chunk = _read_rows(f, offset, dtype, shape[1:], a, min(a + rows, shape[0]))
                chunk = chunk[keep[a:a + rows]].reshape(-1, dim)
                if mean_pass:
                    count += chunk.shape[0]
                    values = chunk.astype(np.float64)
                else:
                    values = chunk - total
                    values = values * values
                # one row after another (np.add.reduce over axis 0 adds the rows in order)
                acc = np.add.reduce(np.concatenate([acc[None], values]), axis=0)
            if mean_pass:
                total = acc / count
            else:
                sd = np.sqrt(acc / count)
    sd[sd < 1e-6] = 1.0
    return total, sd


def _write_final_array(src: Path, dst: Path, keep: np.ndarray, dtype: str, stats) -> None:
    offset, src_dtype, shape = _data_offset(src)
    if keep.all() and stats is None and np.dtype(dtype) == src_dtype:
        try:
            os.link(src, dst)  # a hard link: the work file stays until OUT is in place
        except OSError:
            shutil.copyfile(src, dst)
        return
    _allocate(dst, dtype, (int(keep.sum()), *shape[1:]))
    out_offset = _data_offset(dst)[0]
    rows = max(1, CHUNK_BYTES // max(1, int(np.prod(shape[1:])) * 8))
    written = 0
    with open(src, "rb") as f, open(dst, "r+b") as g:
        for a in range(0, shape[0], rows):
            chunk = _read_rows(f, offset, src_dtype, shape[1:], a, min(a + rows, shape[0]))[keep[a:a + rows]]
            if stats is not None:
                chunk = (chunk - stats[0]) / stats[1]
            chunk = np.ascontiguousarray(chunk.astype(dtype))
            if not np.isfinite(chunk).all():  # standardised values beyond float16's range
                raise FastnclError(f"{dst.name}: standardised vectors exceed {dtype}'s range: use --dtype float32")
            g.seek(out_offset + written)
            g.write(chunk.tobytes())
            written += chunk.nbytes


def _text_line(text: str) -> str:
    return " ".join(str(text).split("\t")).replace("\n", " ").replace("\r", " ")


def finish(work: Work, out: Path, plan: Plan, encoder: Encoder, describe: dict, dtype: str, bad: dict,
           extra_files: dict, manifest_extra: dict) -> dict:
    """The complete folder OUT from the work folder; returns the manifest."""
    final = work.path / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    keep = {s: np.array([(s, i) not in bad for i in range(len(plan.splits[s]))], dtype=bool) for s in SPLIT_NAMES}
    empty = [s for s in SPLIT_NAMES if not keep[s].any()]
    if empty:
        raise FastnclError(f"no image of split {empty[0]} could be decoded (see {work.path}/journal.*.txt)")
    stats = _train_statistics(work.array("train"), keep["train"]) if encoder.standardise else None
    k = plan.captions_per_image
    kept = {s: [it for it, ok in zip(plan.splits[s], keep[s]) if ok] for s in SPLIT_NAMES}
    for s in SPLIT_NAMES:
        _write_final_array(work.array(s), final / f"{s}_ims.npy", keep[s], dtype, stats)
        captions = [c for it in kept[s] for c in it.captions]
        (final / f"{s}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        (final / f"{s}_images.txt").write_text("".join(f"{it.image_id}\t{_text_line(it.source)}\n" for it in kept[s]),
                                               encoding="utf-8")
    words = sorted({w for s in ("train", "dev") for it in kept[s] for c in it.captions for w in tokenize(c)})
    (final / "vocab.json").write_text(json.dumps({"word2idx": Vocab.build(words).word2idx}, indent=0) + "\n",
                                      encoding="utf-8")
    undecoded = [(plan.splits[s][i].ref.name(), f"cannot decode: {why}") for (s, i), why in sorted(bad.items())]
    skipped = plan.skipped + undecoded
    if skipped:
        (final / "skipped.txt").write_text("".join(f"{_text_line(w)}\t{_text_line(y)}\n" for w, y in skipped),
                                           encoding="utf-8")
    for name, text in extra_files.items():
        (final / name).write_text(text, encoding="utf-8")
    shape = _data_offset(final / "train_ims.npy")[2]
    packages = {"numpy": np.__version__, "pillow": package_version("pillow")}
    if encoder.kind != "patches":
        packages["torch"] = package_version("torch")
    manifest = {
        "format": FORMAT, "fastncl": __version__, "source": plan.source, "encoder": describe, "dtype": dtype,
        "images": {s: int(keep[s].sum()) for s in SPLIT_NAMES},
        "captions_per_image": k, "regions": int(shape[1]), "feature_dim": int(shape[2]),
        "splits_from": plan.splits_from, "skipped": len(skipped),
        **manifest_extra,
        "packages": {**packages, **manifest_extra.get("packages", {})},
        "sha256": {p.name: sha256_of(p) for p in sorted(final.iterdir())},
    }
    (final / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    final.chmod(0o755)
    if out.exists():
        out.rmdir()  # empty (checked before the embed started)
    os.rename(final, out)
    shutil.rmtree(work.path)
    return manifest


# -- the command --------------------------------------------------------------------------------
@dataclass
class EmbedOptions:
    encoder: str = "patches"
    checkpoint: str | None = None
    arch: str | None = None
    image_size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    granularity: str | None = None
    dtype: str | None = None  # default: the encoder's (float32 for patches, float16 otherwise)
    captions_per_image: int | None = None
    dev_images: int | None = None
    test_images: int | None = None
    columns: dict = field(default_factory=dict)  # role -> column name
    on_bad_image: str = "skip"
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    progress: bool | None = None
    dist_timeout_s: float = 3600.0


def _check_options(o: EmbedOptions) -> None:
    if o.batch_size < 1:
        raise FastnclError(f"--batch-size {o.batch_size}: at least 1")
    if o.workers < 1:
        raise FastnclError(f"--workers {o.workers}: at least 1")
    if o.dtype is not None and o.dtype not in DTYPES:
        raise FastnclError(f"--dtype {o.dtype}: one of {', '.join(DTYPES)}")
    if o.captions_per_image is not None and o.captions_per_image < 1:
        raise FastnclError(f"--captions-per-image {o.captions_per_image}: at least 1")
    if o.on_bad_image not in ("skip", "error"):
        raise FastnclError(f"--on-bad-image {o.on_bad_image}: skip or error")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FastnclError(f"{out}: exists and is not an empty folder")


def _say(message: str) -> None:
    print(f"fastncl: {message}", file=sys.stderr)


class _Alone:
    """The collectives of fastncl.distributed for one process that embeds on its own, even inside a
    process group (the emoji set, which every rank of a training run builds for itself)."""

    @staticmethod
    def on_main(fn):
        return fn()

    @staticmethod
    def agree(error):
        if error is not None:
            raise error


def _device_type(device: str, kind: str) -> str:
    if kind == "patches":
        return "cpu"
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def embed(src: str | Path | None, out: str | Path, options: EmbedOptions | None = None, *, source: Source | None = None,
          extra_files: dict | None = None, manifest_extra: dict | None = None, quiet: bool = False,
          alone: bool = False) -> dict:
    """Embed ``src`` (or an already read ``source``) into the folder ``out``; returns its manifest.

    Under torchrun every rank calls this with the same arguments and the ranks share the batches;
    ``alone``: this process embeds everything by itself, whatever the environment. ``extra_files``
    (name -> text) and ``manifest_extra`` go into the folder as they are (the emoji set's credits).
    """
    from fastncl import distributed
    from fastncl.data.encoders import build_encoder

    o = options or EmbedOptions()
    out = Path(out).expanduser()
    _check_options(o)
    group = _Alone if alone else distributed
    launch = contextlib.nullcontext() if alone else distributed.launched(
        "gloo", o.dist_timeout_s, _device_type(o.device, o.encoder))  # objects only: gloo also beside CUDA
    with launch:
        rank, world = (0, 1) if alone else (distributed.rank(), distributed.size())
        talk = not quiet and rank == 0

        def plan_it():
            _check_out(out)
            read = source if source is not None else read_source(src, o.columns)
            return make_plan(read, captions_per_image=o.captions_per_image, dev_images=o.dev_images,
                             test_images=o.test_images, on_bad_image=o.on_bad_image)

        plan = group.on_main(plan_it)
        error, encoder, probe = None, None, None
        try:
            encoder = build_encoder(o.encoder, checkpoint=o.checkpoint, granularity=o.granularity,
                                    image_size=o.image_size, mean=o.mean, std=o.std, device=o.device, arch=o.arch)
            image_mod = pil_image()
            probe = encoder.encode(np.stack([encoder.preprocess(image_mod.new("RGB", (64, 64), (255, 255, 255)))]))
        except FastnclError as e:  # every rank alike: agreed, so that rank 0 alone says it
            error = e
        group.agree(error)
        dtype = o.dtype or encoder.default_dtype
        work_dtype = "float32" if encoder.standardise else dtype
        row_shape = tuple(int(d) for d in probe.shape[1:])
        describe = group.on_main(encoder.describe)  # the checkpoint's SHA-256, read once
        all_batches = batches(plan, o.batch_size)
        fingerprint = {
            "format": FORMAT, "encoder": describe, "dtype": work_dtype, "row_shape": list(row_shape),
            "device": str(getattr(encoder, "device", "cpu")).split(":")[0],  # CPU and GPU arithmetic differ
            "batch_size": o.batch_size, "captions_per_image": plan.captions_per_image,
            "rows_sha256": _rows_digest(plan),
        }
        work = Work(out)
        done, _ = group.on_main(lambda: work.prepare(fingerprint, plan, work_dtype, row_shape))
        if talk:
            for note in plan.notes:
                _say(f"warning: {note}")
            counts = ", ".join(f"{s} {len(plan.splits[s])}" for s in SPLIT_NAMES)
            _say(f"embedding {counts} images ({plan.captions_per_image} captions each, splits by {plan.splits_from}) "
                 f"with {encoder.kind} into {out}: rows of shape {row_shape}, {dtype}"
                 + (f"; resuming, {len(done)} of {len(all_batches)} batches done" if done else ""))
        todo = [b for b in all_batches if b.index not in done][rank::world]
        progress = o.progress if o.progress is not None else sys.stderr.isatty()
        error, timing = None, Timing()
        try:
            timing = embed_batches(work, plan, todo, encoder, work_dtype, row_shape, rank=rank, workers=o.workers,
                                   on_bad_image=o.on_bad_image, progress=progress and rank == 0)
        except FastnclError as e:
            error = e
        try:
            group.agree(error)
        except FastnclError:
            if error is not None and not getattr(error, "resumable", False):
                # vectors this command cannot store (their shape, NaN, float16's range): its work
                # folder could only block the corrected command, so it goes (the other ranks have stopped)
                shutil.rmtree(work.path, ignore_errors=True)
            raise

        def finish_it():
            _, bad = work.journal()
            return finish(work, out, plan, encoder, describe, dtype, bad, extra_files or {}, manifest_extra or {})

        manifest = group.on_main(finish_it)
        if talk:
            if manifest["skipped"]:
                _say(f"warning: {manifest['skipped']} images or captions skipped, listed in {out / 'skipped.txt'}")
            if timing.images:
                _say(f"rank 0 embedded {timing.images} images in {timing.total_s:.1f} s "
                     f"({timing.images / max(timing.total_s, 1e-9):.0f} images/s; encoder {timing.encode_s:.1f} s, "
                     f"waiting for decoding {timing.wait_s:.1f} s, decoding {timing.decode_s:.1f} s of thread time on "
                     f"{o.workers} threads, writing {timing.write_s:.1f} s)")
    return manifest
