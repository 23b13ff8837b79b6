"""Where ``fastncl data embed`` reads images and captions: a caption table or webdataset tar shards.

* **A caption table** (CSV, TSV or JSONL), given as the file or as the one table in a folder:
  a row per caption (or, in JSONL, a list of captions per row), with the image's path (relative
  to the table's folder, or absolute), an optional image id (default: the path) and an optional
  split. Column names are found among common spellings (``ALIASES``) or named by option. The
  captions of an image are gathered by its id, in table order.
* **Tar shards** in the webdataset convention, given as a ``.tar`` file or a folder of them:
  ``KEY.jpg|jpeg|png|webp`` beside ``KEY.txt`` (each non-empty line a caption) or ``KEY.json``
  (``caption``/``captions``/``text``: one string or a list; optional ``image_id`` and
  ``split``). KEY is the member's path up to the first dot of its file name. Images are read
  later by offset, so a shard is never unpacked.

``read_source`` returns the images in the order they first appear, each with its captions.
A problem with the table (a missing column, a row without a path, an id with two images) is a
one-line error naming the file and line.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from fastncl import FastnclError

TABLES = (".csv", ".tsv", ".jsonl")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
ALIASES = {
    "image": ("image", "image_path", "filepath", "file_path", "path", "file", "filename", "file_name", "img"),
    "caption": ("caption", "captions", "text", "sentence", "title"),
    "image_id": ("image_id", "imageid", "img_id", "id"),
    "split": ("split", "subset", "partition"),
}
SPLITS = {"train": "train", "training": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev",
          "test": "test", "testing": "test"}


@dataclass(frozen=True, slots=True)  # slots: a 100,000-image plan holds 100,000 of each
class ImageRef:
    """Where an image's bytes are: a file, or ``size`` bytes at ``offset`` of a tar shard."""

    path: str
    member: str | None = None
    offset: int = 0
    size: int = 0

    def read(self) -> bytes:
        if self.member is None:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: {self.member} is cut short")
        return data

    def exists(self) -> bool:
        return self.member is not None or Path(self.path).is_file()

    def name(self) -> str:
        """How the image map file and the skipped list name it."""
        return f"{self.path}:{self.member}" if self.member is not None else self.path


@dataclass(slots=True)
class Item:
    """One image and its captions."""

    image_id: str
    ref: ImageRef
    source: str  # the image as the source names it (table path or shard:member)
    captions: list[str] = field(default_factory=list)
    split: str | None = None


@dataclass
class Source:
    items: list[Item]
    description: dict  # for the manifest: kind, files (with SHA-256 for tables, sizes for shards)
    skipped: list[tuple[str, str]]  # (what, why): samples without an image or a caption, empty captions


def clean_caption(text: str) -> str:
    """One line of single spaces (a caption file holds one caption per line)."""
    return " ".join(str(text).split())


def _clean_id(value, where: str) -> str:
    text = str(value).strip()
    if not text or any(c in text for c in "\t\r\n"):
        raise FastnclError(f"{where}: image id {text!r} is empty or holds a tab or line break")
    return text


def _split_value(value, where: str) -> str | None:
    text = str(value).strip().lower() if value is not None else ""
    if not text:
        return None
    if text not in SPLITS:
        raise FastnclError(f"{where}: split {value!r} is not one of train, dev (val), test")
    return SPLITS[text]


class _Gatherer:
    """Images by id in first-appearance order, their captions appended."""

    def __init__(self):
        self.items: dict[str, Item] = {}
        self.skipped: list[tuple[str, str]] = []

    def add(self, image_id: str, ref: ImageRef, source: str, captions: list[str], split: str | None, where: str):
        item = self.items.get(image_id)
        if item is None:
            item = self.items[image_id] = Item(image_id, ref, source, [], split)
        elif item.ref != ref:
            raise FastnclError(f"{where}: image id {image_id!r} names {source}, but an earlier row gave it {item.source}")
        elif split is not None and item.split is not None and split != item.split:
            raise FastnclError(f"{where}: image id {image_id!r} is in split {split} here and {item.split} earlier")
        item.split = item.split or split
        for c in captions:
            c = clean_caption(c)
            if c:
                item.captions.append(c)
            else:
                self.skipped.append((f"{where}", "empty caption"))


def _column(header: list[str], role: str, given: str | None, path: Path, required: bool) -> str | None:
    if given:
        if given not in header:
            raise FastnclError(f"{path}: no column {given!r} (the header has: {', '.join(header)})")
        return given
    lower = {h.strip().lower(): h for h in header}
    for alias in ALIASES[role]:
        if alias in lower:
            return lower[alias]
    if required:
        raise FastnclError(f"{path}: no {role} column (looked for {', '.join(ALIASES[role])}; the header has: "
                           f"{', '.join(header) or 'nothing'}); name it with --{role.replace('_', '-')}-column")
    return None


def _table_rows(path: Path, columns: dict):
    """(line number, image, captions, image id or None, split or None) per row of a caption table."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FastnclError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() == ".jsonl":
        header = None
        for n, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028 and the like raw
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise FastnclError(f"{path}:{n}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise FastnclError(f"{path}:{n}: not a JSON object")
            if header is None:  # the first row's keys name the columns
                header = list(row)
                names = {role: _column(header, role, columns.get(role), path, role in ("image", "caption"))
                         for role in ALIASES}
            if names["image"] not in row or names["caption"] not in row:
                raise FastnclError(f"{path}:{n}: lacks {names['image']!r} or {names['caption']!r}")
            caps = row[names["caption"]]
            caps = caps if isinstance(caps, list) else [caps]
            yield (n, row[names["image"]], [c for c in caps if c is not None],
                   row.get(names["image_id"]) if names["image_id"] else None,
                   row.get(names["split"]) if names["split"] else None)
        if header is None:
            raise FastnclError(f"{path}: no rows")
        return
    # newline="": a quoted cell keeps its line breaks (str.splitlines would drop them, and split
    # lines at U+2028 and other characters that are no line ends to csv)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    header = next(reader, None)
    if not header:
        raise FastnclError(f"{path}: empty (a header row naming the columns comes first)")
    names = {role: _column(header, role, columns.get(role), path, role in ("image", "caption")) for role in ALIASES}
    index = {role: header.index(name) if name else None for role, name in names.items()}
    rows = 0
    for row in reader:
        n = reader.line_num  # the row's last line
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):  # more: an unquoted delimiter inside a caption would cut it short
            raise FastnclError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}"
                               + (" (quote a caption that holds the delimiter)" if len(row) > len(header) else ""))
        rows += 1
        cell = {role: row[i] if i is not None else None for role, i in index.items()}
        yield n, cell["image"], [cell["caption"]], cell["image_id"], cell["split"]
    if not rows:
        raise FastnclError(f"{path}: no rows after the header")


def _read_table(path: Path, columns: dict) -> Source:
    gather = _Gatherer()
    base = path.parent
    for n, image, captions, image_id, split in _table_rows(path, columns):
        where = f"{path}:{n}"
        image = str(image).strip() if image is not None else ""
        if not image:
            raise FastnclError(f"{where}: no image path")
        file = Path(image).expanduser()
        file = file if file.is_absolute() else base / file
        image_id = _clean_id(image_id, where) if image_id not in (None, "") else _clean_id(image, where)
        gather.add(image_id, ImageRef(str(file)), image, captions, _split_value(split, where), where)
    description = {"kind": "table", "file": str(path), "sha256": sha256_of(path)}
    return Source(list(gather.items.values()), description, gather.skipped)


def sha256_of(path: Path) -> str:
    """A file's SHA-256; a folder's: of its files' relative paths and SHA-256s, in sorted order."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{sha256_of(f)}\n".encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(member: str) -> tuple[str, str]:
    """webdataset's (key, extension): the path up to the first dot of the file name."""
    head, _, name = member.rpartition("/")
    stem, dot, ext = name.partition(".")
    return (f"{head}/{stem}" if head else stem), (dot + ext).lower()


def _read_shards(shards: list[Path]) -> Source:
    gather = _Gatherer()
    for shard in shards:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard, "r:") as tar:  # uncompressed: images are read by offset
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _key(m.name)
                    sample = samples.setdefault(key, {})
                    if ext in IMAGE_EXTS:
                        sample["image"] = ImageRef(str(shard), m.name, m.offset_data, m.size)
                    elif ext in (".txt", ".json"):
                        sample[ext] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError) as e:
            raise FastnclError(f"{shard}: not a readable uncompressed tar shard ({e})") from None
        for key, sample in samples.items():
            where = f"{shard}:{key}"
            if "image" not in sample:
                if ".txt" in sample or ".json" in sample:
                    gather.skipped.append((where, "no image (.jpg, .jpeg, .png, .webp)"))
                continue
            meta, captions = {}, []
            if ".json" in sample:
                try:
                    meta = json.loads(sample[".json"].decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    raise FastnclError(f"{where}.json: not a JSON object ({e})") from None
                if not isinstance(meta, dict):
                    raise FastnclError(f"{where}.json: not a JSON object")
                found = next((meta[k] for k in ("caption", "captions", "text") if k in meta), None)
                if found is not None:
                    captions = found if isinstance(found, list) else [found]
            if ".txt" in sample:
                try:
                    captions += sample[".txt"].decode("utf-8").split("\n")  # not splitlines: U+2028 is no line end
                except UnicodeDecodeError as e:
                    raise FastnclError(f"{where}.txt: not UTF-8 text (byte {e.start})") from None
            captions = [c for c in captions if c is not None and clean_caption(c)]
            if not captions:
                gather.skipped.append((where, "no caption (.txt or .json)"))
                continue
            image_id = meta.get("image_id", meta.get("id"))
            image_id = _clean_id(image_id if image_id not in (None, "") else key, where)
            gather.add(image_id, sample["image"], sample["image"].name(), captions,
                       _split_value(meta.get("split"), where), where)
    description = {"kind": "webdataset", "shards": [{"file": str(s), "bytes": s.stat().st_size} for s in shards]}
    return Source(list(gather.items.values()), description, gather.skipped)


def read_source(src: str | Path, columns: dict | None = None) -> Source:
    """The images and captions of ``src``: a caption table, a tar shard, or a folder holding one
    caption table or tar shards. ``columns``: role -> column name given by option."""
    path = Path(src).expanduser()
    columns = columns or {}
    if not path.exists():
        raise FastnclError(f"{path}: does not exist")
    if path.is_file():
        if path.suffix.lower() in TABLES:
            return _read_table(path, columns)
        if path.suffix.lower() == ".tar":
            return _read_shards([path])
        raise FastnclError(f"{path}: neither a caption table ({', '.join(TABLES)}) nor a .tar shard")
    tables = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TABLES)
    shards = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".tar")
    if len(tables) == 1 and not shards:
        return _read_table(tables[0], columns)
    if shards and not tables:
        return _read_shards(shards)
    if not tables:
        raise FastnclError(f"{path}: holds no caption table ({', '.join(TABLES)}) and no .tar shards")
    found = ", ".join(p.name for p in tables + shards)
    raise FastnclError(f"{path}: holds several sources ({found}); give the one to read as SRC")
