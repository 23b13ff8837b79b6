"""The run folder: config, metrics, checkpoints, results. Every file is written atomically.

Layout: ``config.yaml`` (the resolved config), ``env.json`` (versions, device, noise-index hash),
``log.txt``, ``metrics.jsonl`` (one line per epoch), ``noise_index.npy`` (caption -> image, int64),
``structure.npy`` (with split.structure: every pair's structure score, float64),
``checkpoints/{last,best}.pt``, ``results.json`` and, for the methods that split the training
set, ``splits/epoch_NNN.npz`` (per-sample division losses, clean probabilities, subsets and the
fitted mixture of both models at that epoch; what ``fastncl report`` plots). The records' types
are in fastncl.records, the checkpoint's in fastncl.checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from fastncl import FastnclError, __version__, distributed
from fastncl.records import EpochRecord, RunResult, SplitFile


def default_out(cfg) -> str:
    """runs/<method>-noise<rate>-seed<seed>-<time> (a --noise-file run: noisefile-<its name>)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    noise = f"noisefile-{Path(cfg.data.noise_file).stem}" if cfg.data.noise_file else f"noise{cfg.data.noise:g}"
    return str(Path("runs") / f"{cfg.method}-{noise}-seed{cfg.seed}-{stamp}")


def setup_logging(run: RunDir, main: bool) -> None:
    """The "fastncl" log's lines on stdout and in log.txt, from rank 0 only under torchrun."""
    log = logging.getLogger("fastncl")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if not main:
        log.addHandler(logging.NullHandler())
        return
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run.file("log.txt"), encoding="utf-8")):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


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

    @classmethod
    def start(cls, path: str | Path, resume: bool, config_yaml: str) -> tuple["RunDir", bool]:
        """The run folder of a training run, and whether the run starts fresh (not resumed from
        a checkpoint); a fresh one gets ``config_yaml`` as its config.yaml first: from then on, a
        run killed at any point can be resumed."""
        run = cls.create(path, resume)
        fresh = not (resume and run.checkpoint("last").exists())
        if fresh:
            write_atomic(run.file("config.yaml"), config_yaml)
        return run, fresh

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data) -> None:
        write_atomic(self.file(name), json.dumps(data, indent=2) + "\n")

    def write_npy(self, name: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array)
        write_atomic(self.file(name), buf.getvalue())

    def write_noise_index(self, index: np.ndarray) -> str:
        self.write_npy("noise_index.npy", index.astype(np.int64))
        return hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest()

    def write_env(self, device: torch.device, precision: str, noise_index: np.ndarray, data_sha256: str) -> None:
        """env.json (versions, device, precision, processes, the data's fingerprint, the noise
        index's SHA-256) and noise_index.npy, when a run starts."""
        env = environment(device)
        env["data_sha256"] = data_sha256
        env["precision"] = precision
        env["world_size"] = distributed.size()
        if distributed.size() > 1:
            env["dist_backend"] = torch.distributed.get_backend()
        env["noise_index_sha256"] = self.write_noise_index(noise_index)
        self.write_json("env.json", env)

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

    def checkpoint(self, name: str) -> Path:
        """checkpoints/NAME.pt ("last", "best", or "warmup": the warm-up epoch kept under
        optim.warmup_best=reload; written and read by fastncl.checkpoint)."""
        return self.file(f"checkpoints/{name}.pt")

    def write_result(self, result: RunResult) -> None:
        self.write_json("results.json", result.to_json())

    def read_result(self) -> RunResult | None:
        """results.json, or None before the run has finished."""
        path = self.file("results.json")
        if not path.exists():
            return None
        return RunResult.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))


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
