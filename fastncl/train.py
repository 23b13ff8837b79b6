"""The co-teaching loop: warm-up, then per epoch split pass -> mixture fit -> subset steps ->
dev evaluation -> checkpoint; finally the test evaluation of the best checkpoint.

Two models A and B are trained side by side (every method, vanilla included, so that results
are the two-model ensembles the papers report). In a co-training epoch each model trains on the
subsets computed from its *peer's* per-sample losses at the start of the epoch.

Under torchrun each process is one rank of the run (fastncl.distributed): every rank steps
through the same global batches and computes their losses from gathered encodings, rank 0 fits
the mixtures, and only rank 0 writes the run folder.
"""
from __future__ import annotations

import hashlib
import logging
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastncl import Diverged, FastnclError, assemble, distributed
from fastncl.board import Board, check_tensorboard
from fastncl.config import Config, dump_yaml
from fastncl.data import load_dataset, training_pairs
from fastncl.data.batches import PairBatches
from fastncl.evaluation import fold5_metrics, format_results, retrieval_metrics, similarity_matrix, split_diagnostics
from fastncl.methods.mixture import normalize_losses
from fastncl.profiling import nvtx_range
from fastncl.records import FORMAT, EpochRecord, SplitFile, SplitQuality
from fastncl.run import RunDir, environment, write_atomic
from fastncl.step import mark_step, run_step

log = logging.getLogger("fastncl")


def default_out(cfg: Config) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    noise = f"noisefile-{Path(cfg.data.noise_file).stem}" if cfg.data.noise_file else f"noise{cfg.data.noise:g}"
    return str(Path("runs") / f"{cfg.method}-{noise}-seed{cfg.seed}-{stamp}")


def _setup_logging(run: RunDir) -> None:
    """Log lines on stdout and in log.txt, from rank 0 only under torchrun."""
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if not distributed.is_main():
        log.addHandler(logging.NullHandler())
        return
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run.file("log.txt"), encoding="utf-8")):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        rt = assemble.runtime(cfg)
        self.device, self.precision, self.graphs = rt.device, rt.precision, rt.graphs
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.main = distributed.is_main()  # under torchrun only rank 0 writes the run folder and logs
        # progress bars on a terminal; without one (runtime.progress unset), a plain line every
        # PROGRESS_SECONDS; runtime.progress=false: nothing
        self.progress = sys.stderr.isatty() if cfg.runtime.progress is None else cfg.runtime.progress
        self.progress_lines = cfg.runtime.progress is None and not self.progress
        # everything that can fail on bad input happens before the run folder is touched; under
        # torchrun every rank stops with the same error when any rank failed (distributed.agree)
        error = None
        try:
            distributed.check_batch(cfg.optim.batch_size)
            self.data = load_dataset(cfg.data)
            pairs = training_pairs(self.data.train, cfg.data, cfg.seed)
            self.caption_to_image, self.clean_mask, self.noise_rate = pairs.caption_to_image, pairs.clean, pairs.noise_rate
            self.method = assemble.method(cfg, self.device)
            if cfg.runtime.tensorboard:
                check_tensorboard()
        except Exception as e:
            error = e
        distributed.agree(error)
        self.run, fresh = distributed.on_main(lambda: self._create_run(resume))
        _setup_logging(self.run)
        self.board = Board(self.run.file("tb")) if cfg.runtime.tensorboard and self.main else None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.models = [assemble.backbone(cfg.model, self.data, self.device) for _ in range(2)]
        for m in self.models:  # identical initial weights on every rank
            distributed.broadcast_module(m)
        # fused Adam on GPUs (one kernel); the CPU keeps the default implementation
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optims = [torch.optim.Adam(m.parameters(), lr=cfg.optim.lr, **fused) for m in self.models]
        # what the methods call: the modules, or their compiled forms (step.py); evaluation has its own
        self.fast, self.eval_views = assemble.views(self.models, rt)
        self.rng = np.random.default_rng(cfg.seed)
        self.start_epoch, self.best_rsum, self.best_epoch = 0, -1.0, -1
        self.last_split = None
        # the collapse guard (optim.collapse): the learning rate's factor after recoveries, how many
        # there were, and whether the run stopped early
        self.lr_scale, self.recoveries, self.stopped = 1.0, 0, False
        # split.signal=mean: each model's normalised split losses summed over the split epochs so far
        self.signal_sum, self.signal_epochs = None, 0
        # the warm-up's length: optim.warmup_epochs, or (optim.warmup=plateau) None until dev RSum stops rising
        self.warmup_end = cfg.optim.warmup_epochs if cfg.optim.warmup == "fixed" else None
        if not fresh:
            self._restore()
        elif self.main:  # a new run, or a resumed one whose first epoch never finished: from the start
            if resume:
                self.run.truncate_metrics(-1)
                log.info(f"{self.run.path} holds no checkpoint yet: the run starts over")
            env = environment(self.device)
            env["precision"] = self.precision.name
            env["world_size"] = distributed.size()
            if distributed.size() > 1:
                env["dist_backend"] = torch.distributed.get_backend()
            env["noise_index_sha256"] = self.run.write_noise_index(self.caption_to_image)
            self.run.write_json("env.json", env)

    def _create_run(self, resume: bool) -> tuple[RunDir, bool]:
        """The run folder (rank 0 creates it), and whether the run starts fresh."""
        run = RunDir.create(self.cfg.out, resume)
        # config.yaml first: from here on, a run killed at any point can be resumed
        fresh = not (resume and run.file("checkpoints/last.pt").exists())
        if fresh:
            write_atomic(run.file("config.yaml"), dump_yaml(self.cfg))
        return run, fresh

    # -- checkpoints -----------------------------------------------------------------------
    def _state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "models": [m.state_dict() for m in self.models],
            "optimizers": [o.state_dict() for o in self.optims],
            "best_rsum": float(self.best_rsum),
            "best_epoch": int(self.best_epoch),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
            "grad_scaler": self.precision.state_dict(),
            "config": self.cfg.to_dict(),
            "last_split": None if self.last_split is None else self.last_split.to_json(),
            "lr_scale": float(self.lr_scale),
            "recoveries": int(self.recoveries),
            "stopped": bool(self.stopped),
            "signal_sum": None if self.signal_sum is None else [torch.from_numpy(x) for x in self.signal_sum],
            "signal_epochs": int(self.signal_epochs),
            "warmup_end": self.warmup_end,
        }

    def _load(self, name: str) -> dict:
        """A checkpoint of the run folder, read by rank 0 and sent to every rank."""
        return distributed.on_main(lambda: self.run.load_checkpoint(name))

    def _restore(self) -> None:
        state = self._load("last")
        self._check_checkpoint(state)
        for m, s in zip(self.models, state["models"]):
            m.load_state_dict(s)
        for o, s in zip(self.optims, state["optimizers"]):
            o.load_state_dict(s)
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python_rng"]))
        self.precision.load_state_dict(state.get("grad_scaler", {}))
        self.best_rsum, self.best_epoch = state["best_rsum"], state["best_epoch"]
        self.lr_scale, self.recoveries = state.get("lr_scale", 1.0), state.get("recoveries", 0)
        self.stopped = state.get("stopped", False)
        if state.get("signal_sum") is not None:
            self.signal_sum = [x.numpy().astype(np.float64) for x in state["signal_sum"]]
        self.signal_epochs = state.get("signal_epochs", 0)
        self.warmup_end = state.get("warmup_end", self.cfg.optim.warmup_epochs)
        self.last_split = SplitQuality.from_json(state["last_split"]) if state.get("last_split") else None
        self.start_epoch = state["epoch"] + 1
        if self.main:
            self.run.truncate_metrics(state["epoch"])
        log.info(f"resumed {self.run.path} after epoch {state['epoch']}")

    def _check_checkpoint(self, state: dict) -> None:
        """The checkpoint a resume loads was trained with config.yaml's method and model: one line
        naming what differs (a checkpoint copied from another run, an edited config.yaml)."""
        saved, cfg = state.get("config") or {}, self.cfg.to_dict()
        method = saved.get("method", cfg["method"])
        diffs = [f"method {method} (config.yaml: {cfg['method']})"] if method != cfg["method"] else []
        diffs += [f"model.{k} {v!r} (config.yaml: {cfg['model'].get(k)!r})" for k, v in saved.get("model", {}).items()
                  if cfg["model"].get(k) != v]
        own = self.models[0].state_dict()
        for name, tensor in state["models"][0].items():
            if name not in own:
                diffs.append(f"tensor {name} (not in config.yaml's model)")
            elif tuple(tensor.shape) != tuple(own[name].shape):
                diffs.append(f"tensor {name} of shape {tuple(tensor.shape)} "
                             f"(config.yaml's model: {tuple(own[name].shape)})")
        if diffs:
            more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            raise FastnclError(f"--resume: {self.run.file('checkpoints/last.pt')} was not trained with "
                               f"{self.run.file('config.yaml')}: " + "; ".join(diffs[:3]) + more)

    # -- pieces of an epoch ----------------------------------------------------------------
    def _total(self) -> int:
        """Warm-up and co-training epochs (while a plateau warm-up runs: with its longest warm-up)."""
        o = self.cfg.optim
        return (self.warmup_end if self.warmup_end is not None else max(o.warmup_max_epochs, o.warmup_epochs)) + o.epochs

    def _set_lr(self, epoch: int) -> float:
        o = self.cfg.optim
        co_epoch = max(epoch - (epoch if self.warmup_end is None else self.warmup_end), 0)
        lr = o.lr * (0.1 ** (co_epoch // o.lr_step) if o.lr_step else 1.0) * self.lr_scale
        for opt in self.optims:
            for group in opt.param_groups:
                group["lr"] = lr
        return lr

    def _batches(self, subset: np.ndarray) -> PairBatches:
        return PairBatches(self.data.train, self.caption_to_image, subset, self.cfg.optim.batch_size, self.rng,
                           self.device, length_multiple=self.cfg.runtime.length_multiple)

    def _bar(self, it, total, desc):
        if not self.main:
            return it
        if self.progress_lines:
            return _progress_lines(it, total, desc)
        return tqdm(it, total=total, desc=desc, leave=False, disable=not self.progress, dynamic_ncols=True)

    def _step(self, k: int, groups) -> dict:
        """One iteration of model ``k``: all loss groups in one optimizer step, or one step per group
        (step.run_step); under torchrun the ranks' gradients are summed before each step."""
        return run_step(self.optims[k], groups, self.method.separate_steps, self.cfg.optim.grad_clip, self.precision,
                        self.graphs, [self.models[k]])

    @torch.no_grad()
    def split_pass(self, model) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample division losses (and anchor flags) over the whole training set, eval mode."""
        n = self.data.train.num_captions
        losses, anchors = np.zeros(n), np.zeros(n, dtype=bool)
        model.eval()
        loader = self._batches(np.arange(n))
        done = []  # kept on the device, copied once at the end: no host sync per batch
        for batch in self._bar(loader, len(loader), "split pass"):
            if self.graphs:
                mark_step()
            with self.precision.autocast():
                loss, anchor = self.method.split_losses(model, batch)
            # clone: a CUDA-graph output is overwritten by the next replay
            done.append((batch.index, loss.float().clone(), None if anchor is None else anchor.clone()))
        model.train()
        idx = torch.cat([i for i, _, _ in done]).cpu().numpy()
        losses[idx] = torch.cat([loss for _, loss, _ in done]).cpu().numpy()
        if done and done[0][2] is not None:
            anchors[idx[torch.cat([a for _, _, a in done]).cpu().numpy()]] = True
        return losses, anchors

    def _train_model(self, k: int, subsets: dict, peer_prob, co_epoch: int | None, desc: str,
                     warnings: list[str]) -> dict:
        model, peer = self.fast[k], self.fast[1 - k]
        names = [name for name in subsets if len(subsets[name])]
        if not names or names[0] != next(iter(subsets)):
            warnings.append(f"model {'AB'[k]} trains nothing: its {next(iter(subsets))} subset is empty")
            return {}
        loaders = {name: self._batches(subsets[name]) for name in names}
        n_steps = len(loaders[names[0]])  # official: one pass over the primary subset
        if self.cfg.optim.fill_epoch:  # at least as many pairs per epoch as the training set holds
            n_steps = max(n_steps, -(-self.data.train.num_captions // (self.cfg.optim.batch_size * len(names))))
        streams = {name: loader.cycle() for name, loader in loaders.items()}
        model.train()
        peer.eval()
        sums, steps = {}, 0
        for _ in self._bar(range(n_steps), n_steps, desc):
            batches = {name: next(it) for name, it in streams.items()}
            batch = batches[names[0]]
            if co_epoch is None:
                def warmup(b=batch):
                    return self.method.warmup_loss(model, b)
                groups = [warmup]
            else:
                groups = self.method.train_groups(model, peer, batches, peer_prob, co_epoch)
            with nvtx_range("step"):
                for name, value in self._step(k, groups).items():
                    sums[name] = sums.get(name, 0.0) + value.detach()
            steps += 1
        peer.train()
        return {name: float(v) / steps for name, v in sums.items()}  # sync: once per epoch

    def evaluate(self, split, models=None) -> torch.Tensor:
        """The similarity matrix of a split, averaged over ``models`` (default: both), computed as
        training runs them (compiled views, mixed precision)."""
        return similarity_matrix(models or self.eval_views, split, self.device, self.cfg.runtime.eval_batch,
                                 self.precision)

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        n = self.data.train.num_captions
        noise = f"noise {self.noise_rate:g}" + (f" (measured, {cfg.data.noise_file})" if cfg.data.noise_file else "")
        log.info(f"fastncl {cfg.method}: {self.data.name} data, {n} training pairs, {noise}, "
                 f"seed {cfg.seed}, device {self.device}, {self.precision.name}; run folder {self.run.path}")
        epoch = self.start_epoch
        # the collapse guard may stop the run (optim.collapse); a plateau warm-up fixes the total as it ends
        while not self.stopped and epoch < self._total():
            with nvtx_range(f"epoch {epoch}"):
                self._epoch(epoch, self._total())
            epoch += 1
        return self.finish()

    def _epoch(self, epoch: int, total: int) -> None:
        o = self.cfg.optim
        t0 = time.perf_counter()
        if distributed.size() > 1:  # each rank its own dropout draws, the same again on a resume
            seed = np.random.SeedSequence([self.cfg.seed, epoch, distributed.rank()]).generate_state(1)[0]
            torch.manual_seed(int(seed))
        lr = self._set_lr(epoch)
        warmup = self.warmup_end is None or epoch < self.warmup_end
        co_epoch = None if warmup else epoch - self.warmup_end
        record = EpochRecord(epoch, "warmup" if warmup else "train", lr)
        all_pairs = {"all": np.arange(self.data.train.num_captions)}
        losses, split_file, warnings, splits = {}, None, [], None
        if warmup or not self.method.uses_split:
            for k in range(2):
                with nvtx_range(f"train model {'AB'[k]}"):
                    losses["AB"[k]] = self._train_model(k, all_pairs, None, co_epoch, f"epoch {epoch} {'AB'[k]}",
                                                        warnings)
        else:
            with nvtx_range("split pass"):
                # under torchrun every rank computes the same losses (each encodes its share of every
                # global batch); rank 0's are sent to all, and rank 0 fits the mixtures: every rank
                # then holds the same split, bit for bit
                passes = distributed.broadcast_object([self.split_pass(m) for m in self.fast])
            for k, (loss, _) in enumerate(passes):
                bad = int((~np.isfinite(loss)).sum())
                if bad:
                    self._diverged(epoch, f"model {'AB'[k]}'s per-sample division losses are not finite "
                                          f"({bad} of {len(loss)} pairs)")
            t_split = time.perf_counter()
            signals = self._signal([loss for loss, _ in passes])
            with nvtx_range("mixture fit"):
                fits = distributed.on_main(lambda: [self.method.fit(x) for x in signals])
            record.time_fit = time.perf_counter() - t_split
            record.time_split = t_split - t0
            divisions = [self.method.split(fit, anchors, co_epoch) for fit, (_, anchors) in zip(fits, passes)]
            splits = [d.subsets for d in divisions]
            record.split = self._diagnostics(fits, divisions)
            active_names = self.method.active_subsets(co_epoch)
            record.active_subsets = list(active_names)
            warnings += self._split_warnings(divisions)
            if self.main:  # the split file: written (and shown on TensorBoard) by rank 0 only
                split_file = SplitFile.build([loss for loss, _ in passes], fits, divisions, self.clean_mask)
                self.run.write_split(epoch, split_file)
            for k in range(2):  # model k trains on its peer's split
                peer_fit, subsets = fits[1 - k], splits[1 - k]
                active = {name: subsets[name] for name in active_names}
                peer_prob = torch.from_numpy(peer_fit.clean_prob).float().to(self.device)
                with nvtx_range(f"train model {'AB'[k]}"):
                    losses["AB"[k]] = self._train_model(k, active, peer_prob, co_epoch, f"epoch {epoch} {'AB'[k]}",
                                                        warnings)
        # rank 0's epoch means (a batch smaller than the ranks, encoded whole on each with its own
        # dropout draws, may give each rank its own), so that every rank takes the same decision
        record.losses = losses = distributed.broadcast_object(losses)
        bad = [f"model {m}: " + ", ".join(f"{name} {v}" for name, v in terms.items() if not np.isfinite(v))
               for m, terms in losses.items() if not all(np.isfinite(v) for v in terms.values())]
        if bad:
            self._diverged(epoch, f"non-finite loss ({'; '.join(bad)})")
        t_train = time.perf_counter()
        with nvtx_range("evaluation"):  # each model's matrix, then their average (the ensemble)
            k = self.data.dev.captions_per_image
            sims = [self.evaluate(self.data.dev, [view]) for view in self.eval_views]
            for name, sim in zip("AB", sims):
                if not torch.isfinite(sim).all():
                    self._diverged(epoch, f"model {name}'s dev similarities are not finite")
            dev = retrieval_metrics((sims[0] + sims[1]) / 2, k)
        record.dev = dev
        record.dev_models = {"AB"[i]: retrieval_metrics(s, k) for i, s in enumerate(sims)}
        record.time_eval = time.perf_counter() - t_train
        if splits is not None and self.cfg.optim.collapse != "off":
            record.collapse = self._collapse(dev["rsum"], splits, warnings)
        # an epoch the guard undid or stopped at never becomes the best (under "warn" it may)
        improved = dev["rsum"] > self.best_rsum and (record.collapse or {}).get("action", "none") == "none"
        if improved:
            self.best_rsum, self.best_epoch = dev["rsum"], epoch
        if warmup and self.warmup_end is None and epoch + 1 >= o.warmup_epochs \
                and (not improved or epoch + 1 >= o.warmup_max_epochs):
            self.warmup_end = epoch + 1  # optim.warmup=plateau: dev RSum stopped rising, or the cap
            record.notes.append(f"warm-up ends after epoch {epoch + 1} "
                                + ("(the cap, optim.warmup_max_epochs)" if improved else "(dev rsum stopped rising)"))
        # committed in an order that a kill at any point resumes correctly: best.pt, then the metrics
        # line, then last.pt (a resume restarts from last.pt, drops later metrics lines and redoes
        # the epoch, writing the same best.pt again)
        record.warnings = warnings
        if self.main:
            with nvtx_range("checkpoint"):
                state = self._state(epoch)
                if improved:
                    self.run.save_checkpoint("best", state)
            record.time = time.perf_counter() - t0
            self.run.append_metrics(record)
            with nvtx_range("checkpoint"):
                self.run.save_checkpoint("last", state)
        else:
            record.time = time.perf_counter() - t0
        if self.board is not None:
            self.board.log(record, split_file)
        log.info(record.line(total))

    def _signal(self, losses: list[np.ndarray]) -> list[np.ndarray]:
        """What each model's mixture is fitted to (split.signal): this epoch's losses, or their
        min-max normalised values averaged over the split epochs so far (the fit then clips and
        normalises the average as it would a loss)."""
        if self.cfg.split.signal == "loss":
            return losses
        normalized = [normalize_losses(x) for x in losses]  # the fit clips (split.clip_quantile) the average once
        self.signal_sum = normalized if self.signal_sum is None else [a + b for a, b in zip(self.signal_sum, normalized)]
        self.signal_epochs += 1
        return [x / self.signal_epochs for x in self.signal_sum]

    def _collapse(self, rsum: float, splits, warnings: list[str]) -> dict | None:
        """The collapse guard (optim.collapse), after a co-training epoch's evaluation: what
        collapsed and what was done, or None. Recovering restores the best epoch's weights and
        optimizer states (the next epoch splits again from them) and lowers the learning rate."""
        o, n = self.cfg.optim, self.data.train.num_captions
        reasons = []
        if self.best_rsum > 0 and rsum < o.collapse_rsum_ratio * self.best_rsum:
            reasons.append(f"dev rsum {rsum:.1f} below {o.collapse_rsum_ratio:g} x the best {self.best_rsum:.1f} "
                           f"(epoch {self.best_epoch + 1})")
        for k, subsets in enumerate(splits):
            primary = next(iter(subsets))
            if len(subsets[primary]) < o.collapse_min_fraction * n:
                reasons.append(f"split {'AB'[k]}'s {primary} subset holds {len(subsets[primary])} of {n} pairs "
                               f"(< {o.collapse_min_fraction:.0%})")
        if not reasons:
            return None
        found = {"reasons": reasons, "action": "none"}
        if self.best_epoch < 0:  # warm-up 0 and the first epoch: no best epoch to go back to yet
            said = "no earlier epoch to go back to; training goes on"
        elif o.collapse == "recover" and self.recoveries < o.collapse_max_recoveries:
            state = self._load("best")
            for m, st in zip(self.models, state["models"]):
                m.load_state_dict(st)
            for opt, st in zip(self.optims, state["optimizers"]):
                opt.load_state_dict(st)
            # split.signal=mean: the running losses as they were at the best epoch
            self.signal_sum = None if state.get("signal_sum") is None else \
                [x.numpy().astype(np.float64) for x in state["signal_sum"]]
            self.signal_epochs = state.get("signal_epochs", 0)
            self.recoveries += 1
            self.lr_scale *= o.collapse_lr_factor
            found.update(action="recovered", restored_epoch=self.best_epoch, lr_scale=self.lr_scale,
                         recoveries=self.recoveries)
            said = (f"restored epoch {self.best_epoch + 1}'s weights, learning rate x{self.lr_scale:g} from now on "
                    f"(recovery {self.recoveries} of {o.collapse_max_recoveries})")
        elif o.collapse in ("recover", "stop"):
            self.stopped = True
            found.update(action="stopped")
            said = f"training stopped; the result is the best checkpoint's (epoch {self.best_epoch + 1})"
        else:
            said = "training goes on (optim.collapse=warn)"
        warnings.append(f"collapse: {'; '.join(reasons)}: {said}")
        return found

    def _diverged(self, epoch: int, what: str):
        kept = f"checkpoints/last.pt holds epoch {epoch}" if epoch > 0 else "no checkpoint was written"
        # every rank meets it alike: the checks read values every rank holds the same
        raise distributed.agreed(Diverged(f"epoch {epoch + 1}: {what}; the run stopped ({kept}) in {self.run.path}"))

    def _split_warnings(self, divisions) -> list[str]:
        """What is degenerate in each model's split: a fallback the method took (SPS's reliable-set
        floor, the 1 % noisy fallback), an empty subset, or one subset holding every pair."""
        n = self.data.train.num_captions
        out = []
        for k, division in enumerate(divisions):
            where = f"split {'AB'[k]} (trains {'BA'[k]})"
            out += [f"{where}: {note}" for note in division.notes]
            for name, index in division.subsets.items():
                if len(index) == 0:
                    out.append(f"{where}: {name} subset empty")
                elif len(index) == n:
                    out.append(f"{where}: every pair in the {name} subset")
        return out

    def _diagnostics(self, fits, divisions) -> SplitQuality:
        per_model = []
        for fit, division in zip(fits, divisions):
            per_model.append(split_diagnostics(fit.clean_prob, division.noisy_cut, self.clean_mask, division.subsets,
                                               detected=division.subsets.get("noisy")))
            per_model[-1].cuts = dict(division.cuts)
        mean_prob = (fits[0].clean_prob + fits[1].clean_prob) / 2
        cut = (per_model[0].noisy_cut + per_model[1].noisy_cut) / 2
        split = split_diagnostics(mean_prob, cut, self.clean_mask)
        split.models = per_model
        self.last_split = split
        return split

    def finish(self) -> dict:
        cfg = self.cfg
        state = self._load("best")
        for m, s in zip(self.models, state["models"]):
            m.load_state_dict(s)
        test_sim = self.evaluate(self.data.test)
        if not torch.isfinite(test_sim).all():
            raise distributed.agreed(
                Diverged(f"the best checkpoint's test similarities are not finite; no result for {self.run.path}"))
        k = self.data.test.captions_per_image
        results = {
            "format": FORMAT,
            "method": cfg.method,
            "preset": cfg.preset,
            "noise": self.noise_rate,
            "noise_file": cfg.data.noise_file,
            "noise_file_sha256": hashlib.sha256(Path(cfg.data.noise_file).read_bytes()).hexdigest()
            if cfg.data.noise_file else None,
            "seed": cfg.seed,
            "data": self.data.name,
            "best_epoch": state["epoch"],
            "dev_rsum": state["best_rsum"],
            "test": retrieval_metrics(test_sim, k),
            "split": None if self.last_split is None else self.last_split.to_json(),
        }
        if cfg.data.test_protocol == "coco":
            results["test_coco1k"] = fold5_metrics(test_sim, k)
        if self.main:
            self.run.write_json("results.json", results)
        if self.board is not None:
            self.board.close()
        log.info(format_results(results))
        return results


PROGRESS_SECONDS = 30.0


def _progress_lines(it, total: int, desc: str):
    """``it``, with a line on stderr every PROGRESS_SECONDS: where a run without a terminal is."""
    start = last = time.perf_counter()
    for done, item in enumerate(it, 1):
        yield item
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS:
            last = now
            print(f"{desc}: {done}/{total} steps, {now - start:.0f}s", file=sys.stderr, flush=True)


def train(cfg: Config, resume: bool = False) -> dict:
    """Train one run; under torchrun (WORLD_SIZE > 1) each process is one rank of it."""
    device = assemble.resolve_device(cfg.runtime.device)
    with distributed.launched(cfg.runtime.dist_backend, cfg.runtime.dist_timeout, device.type):
        if cfg.out is None:
            cfg.out = distributed.broadcast_object(default_out(cfg))  # one time stamp for every rank
        return Trainer(cfg, resume).fit()
