"""The run folder: config, metrics, checkpoints, results. Every file is written atomically.

Layout: ``config.yaml`` (the resolved config), ``env.json`` (versions, device, noise-index hash),
``log.txt``, ``metrics.jsonl`` (one line per epoch), ``noise_index.npy`` (caption -> image, int64),
``checkpoints/{last,best}.pt``, ``results.json`` and, for the methods that split the training
set, ``splits/epoch_NNN.npz`` (per-sample division losses, clean probabilities, subsets and the
fitted mixture of both models at that epoch; what ``fastncl report`` plots). Checkpoints hold only tensors, plain
containers and scalars, so ``torch.load(weights_only=True)`` reads them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastncl import FastnclError, __version__
from fastncl.records import EpochRecord, SplitFile


TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"  # write_atomic's temporary files: .NAME.XXXX.tmp


def _temporary(path: Path) -> bool:
    """A temporary file of write_atomic (left behind only by a kill)."""
    return path.name.startswith(TMP_PREFIX) and path.name.endswith(TMP_SUFFIX)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX)
    try:
        # mkstemp creates the file private (0600); give it the mode a plain open() would (0666 less
        # the umask), so that colleagues can read a shared run folder
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run folder (one with a config.yaml)."""
        run = cls(path)
        if not run.file("config.yaml").exists():
            raise FastnclError(f"{run.path}: not a fastncl run folder (no config.yaml)")
        return run

    def config(self) -> dict:
        """config.yaml as written (no defaults filled in)."""
        from fastncl.config import load_yaml

        return load_yaml(self.file("config.yaml"))

    @classmethod
    def create(cls, path: str | Path, resume: bool) -> "RunDir":
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise FastnclError(f"--out {run.path}: not a folder")
        # a folder of empty folders, or of write_atomic's leftover temporary files (a run killed
        # before its config.yaml was in place), may be reused
        written = run.path.exists() and any(p.is_file() and not _temporary(p) for p in run.path.rglob("*"))
        if not resume and written:
            raise FastnclError(f"--out {run.path}: the run folder exists and is not empty; use --resume or another --out")
        try:
            (run.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file on the way, a read-only place
            raise FastnclError(f"--out {run.path}: cannot create the run folder ({e.strerror})") from None
        return run

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data) -> None:
        write_atomic(self.file(name), json.dumps(data, indent=2) + "\n")

    def write_noise_index(self, index: np.ndarray) -> str:
        buf = io.BytesIO()
        np.save(buf, index.astype(np.int64))
        write_atomic(self.file("noise_index.npy"), buf.getvalue())
        return hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest()

    def append_metrics(self, record: EpochRecord) -> None:
        with open(self.file("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json()) + "\n")

    def read_metrics(self) -> list[EpochRecord]:
        path = self.file("metrics.jsonl")
        if not path.exists():
            return []
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")[:-1]  # a last line without its newline was cut by a kill: not a record
        return [EpochRecord.from_json(json.loads(line), f"{path}:{i}") for i, line in enumerate(lines, 1)
                if line.strip()]

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep the lines of epochs <= last_epoch (after a resume)."""
        kept = [r for r in self.read_metrics() if r.epoch <= last_epoch]
        write_atomic(self.file("metrics.jsonl"), "".join(json.dumps(r.to_json()) + "\n" for r in kept))

    def write_split(self, epoch: int, split: SplitFile) -> None:
        """One epoch's split as a compressed .npz, atomically."""
        buf = io.BytesIO()
        np.savez_compressed(buf, **split.to_arrays())
        write_atomic(self.file(f"splits/epoch_{epoch:03d}.npz"), buf.getvalue())

    def split_epochs(self, records: list[EpochRecord]) -> list[int]:
        """The epochs, sorted, that have a splits/epoch_NNN.npz and that ``records`` (the metrics) still hold."""
        epochs = {r.epoch for r in records}
        saved = (int(path.stem.split("_")[1]) for path in self.file("splits").glob("epoch_*.npz"))
        return sorted(epoch for epoch in saved if epoch in epochs)

    def read_split(self, epoch: int) -> SplitFile:
        """One epoch's splits/epoch_NNN.npz."""
        path = self.file(f"splits/epoch_{epoch:03d}.npz")
        with np.load(path, allow_pickle=False) as z:
            return SplitFile.from_arrays({k: z[k] for k in z.files}, str(path))

    def save_checkpoint(self, name: str, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(self.file(f"checkpoints/{name}.pt"), buf.getvalue())

    def load_checkpoint(self, name: str, map_location="cpu") -> dict:
        path = self.file(f"checkpoints/{name}.pt")
        if not path.exists():
            raise FastnclError(f"{path}: no such checkpoint")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise FastnclError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None


def environment(device: torch.device) -> dict:
    import sklearn

    return {
        "fastncl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "world_size": 1,
    }
