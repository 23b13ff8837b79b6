"""The co-teaching loop: warm-up, then per epoch the split phase (split_phase.py) -> subset steps
-> dev evaluation -> records and checkpoints; finally the test evaluation of the best checkpoint.

Two models A and B are trained side by side (every method, vanilla included, so that results
are the two-model ensembles the papers report); in a co-training epoch each trains on its
*peer's* split. Under torchrun each process is one rank of the run (fastncl.distributed): every
rank steps through the same global batches, rank 0 fits the mixtures and writes the run folder.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from fastncl import Diverged, FastnclError, assemble, distributed
from fastncl.board import Board
from fastncl.checkpoint import Checkpoint
from fastncl.config import Config, dump_yaml
from fastncl.data.batches import PairBatches
from fastncl.data.sources import sha256_of
from fastncl.evaluation import fold5_metrics, format_results, retrieval_metrics, similarity_matrix
from fastncl.profiling import nvtx_range
from fastncl.progress import Bars
from fastncl.records import EpochRecord, RunResult
from fastncl.run import RunDir, default_out, setup_logging
from fastncl.split_phase import EpochSplit, SplitPhase
from fastncl.step import run_step

log = logging.getLogger("fastncl")


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        rt = assemble.runtime(cfg)
        self.device, self.precision, self.graphs = rt.device, rt.precision, rt.graphs
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.main = distributed.is_main()  # under torchrun only rank 0 writes the run folder and logs
        self.bar = Bars(cfg.runtime.progress, self.main)
        inputs = assemble.inputs(cfg, self.device)  # before the run folder is touched
        self.data, self.pairs, self.method = inputs.data, inputs.pairs, inputs.method
        self.run, fresh = distributed.on_main(lambda: RunDir.start(cfg.out, resume, dump_yaml(cfg)))
        setup_logging(self.run, self.main)
        self.board = Board(self.run.file("tb")) if cfg.runtime.tensorboard and self.main else None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.models = [assemble.backbone(cfg.model, self.data, self.device) for _ in range(2)]
        for m in self.models:  # identical initial weights on every rank
            distributed.broadcast_module(m)
        self.optims = assemble.optimizers(self.models, cfg, self.device)
        self.schedule = assemble.schedule(cfg, self.optims)
        # what the methods call: the modules, or their compiled forms (step.py); evaluation has its own
        self.fast, self.eval_views = assemble.views(self.models, rt)
        self.rng = np.random.default_rng(cfg.seed)
        self.splitter = SplitPhase(self.method, cfg.split.signal, self.pairs.clean, self.data.train.num_captions,
                                   self._batches, self.bar, self.precision, self.graphs, cfg.split.clean_side,
                                   self._structure())
        self.state, self.start_epoch = self.schedule.start(), 0
        if not fresh:
            self._resume()
        elif self.main:  # a new run, or a resumed one whose first epoch never finished: from the start
            if resume:
                self.run.truncate_metrics(-1)
                log.info(f"{self.run.path} holds no checkpoint yet: the run starts over")
            self.run.write_env(self.device, self.precision.name, self.pairs.caption_to_image,
                               self.data.fingerprint())

    def _structure(self) -> np.ndarray | None:
        """The training pairs' structure scores (split.structure=knn), or None (off, a split by the
        ground truth, or a method that does not split). Computed on rank 0 when the run starts and
        kept in the run folder (``structure.npy``): a resumed run reads them back, the same bit for
        bit on any device."""
        cfg = self.cfg.split
        if cfg.structure == "off" or cfg.signal == "truth" or not self.method.uses_split:
            return None
        from fastncl.data.structure import pair_structure

        def scores():
            path = self.run.file("structure.npy")
            if path.exists():
                out = np.load(path)
                if out.shape == (self.data.train.num_captions,):
                    return out
            t0 = time.perf_counter()
            out = pair_structure(self.data.train, self.pairs.caption_to_image, cfg.structure_k, seed=self.cfg.seed,
                                 device=self.device)
            self.run.write_npy("structure.npy", out)
            said = f"structure (knn, k {cfg.structure_k}): mean overlap {out.mean():.3f}"
            clean = self.pairs.clean
            if clean is not None and 0 < clean.sum() < len(clean):
                from sklearn.metrics import roc_auc_score

                said += f", auc {roc_auc_score(clean, out):.3f}"
            log.info(f"{said} | {time.perf_counter() - t0:.1f}s")
            return out

        return distributed.on_main(scores)

    def _load(self, name: str) -> Checkpoint:
        """A checkpoint of the run folder, read by rank 0 and sent to every rank."""
        return distributed.on_main(lambda: Checkpoint.load(self.run.checkpoint(name)))

    def _resume(self) -> None:
        last = self._load("last")
        last.check_trained_with(self.cfg.to_dict(), self.models[0], f"--resume: {self.run.checkpoint('last')} "
                                f"was not trained with {self.run.file('config.yaml')}")
        self.state = last.resume(self.models, self.optims, self.rng, self.precision)
        self.start_epoch = last.epoch + 1
        if self.main:
            self.run.truncate_metrics(last.epoch)
        log.info(f"resumed {self.run.path} after epoch {last.epoch}")

    def fit(self) -> RunResult:
        cfg = self.cfg
        noise = f"noise {self.pairs.noise_rate:g}" + (f" (measured, {cfg.data.noise_file})" if cfg.data.noise_file else "")
        log.info(f"fastncl {cfg.method}: {self.data.name} data, {self.data.train.num_captions} training pairs, {noise}, "
                 f"seed {cfg.seed}, device {self.device}, {self.precision.name}; run folder {self.run.path}")
        epoch = self.start_epoch
        # the collapse guard may stop the run (optim.collapse); a plateau warm-up fixes the total as it ends
        while not self.state.stopped and epoch < self.schedule.total(self.state):
            with nvtx_range(f"epoch {epoch}"):
                self._epoch(epoch, self.schedule.total(self.state))
            epoch += 1
        return self.finish()

    def _epoch(self, epoch: int, total: int) -> None:
        t0 = time.perf_counter()
        distributed.seed_epoch(self.cfg.seed, epoch)
        co_epoch = self.schedule.co_epoch(epoch, self.state)
        record = EpochRecord(epoch, "warmup" if co_epoch is None else "train", self.schedule.set_lr(epoch, self.state))
        if co_epoch == 0 and self.cfg.optim.warmup_best == "reload" and 0 <= self.state.warmup_kept < epoch - 1:
            kept = self._load("warmup")
            if kept.epoch != self.state.warmup_kept:  # a resumed warm-up epoch that trained otherwise than the killed one
                raise FastnclError(f"{self.run.checkpoint('warmup')}: holds warm-up epoch {kept.epoch + 1}, but the run "
                                   f"kept epoch {self.state.warmup_kept + 1} (a resumed epoch trained differently); "
                                   "start the run again without --resume")
            kept.load_weights(self.models)  # before the first split reads the models
            record.notes.append(f"co-training starts from warm-up epoch {self.state.warmup_kept + 1}'s weights "
                                "(optim.warmup_best=reload)")
        split = None
        if co_epoch is not None and self.method.uses_split:
            split = self.splitter.run(self.fast, co_epoch, self.state, lambda what: self._diverged(epoch, what))
            self.state.last_split = split.quality
            split.record(record)
            if self.main:  # the split file: written (and shown on TensorBoard) by rank 0 only
                self.run.write_split(epoch, split.file)
        record.losses = self._train(epoch, co_epoch, split, record.warnings)
        t_train = time.perf_counter()
        record.dev, record.dev_models, spreads = self._evaluate_dev(epoch)
        record.time_eval = time.perf_counter() - t_train
        improved = self._judge(epoch, split, record, spreads)
        self._commit(epoch, record, improved, t0, self._keep_warmup(record))
        if self.board is not None:
            self.board.log(record, split.file if split is not None else None)
        log.info(record.line(total))

    def _train(self, epoch: int, co_epoch: int | None, split: EpochSplit | None, warnings: list[str]) -> dict:
        """Model k's steps on its peer's split, or (warm-up, no split) on every pair; mean loss terms."""
        losses = {}
        for k, name in enumerate("AB"):
            if split is None:
                subsets, peer_prob = {self.method.all_subset: np.arange(self.data.train.num_captions)}, None
            else:
                subsets, peer_prob = split.trains(k, self.device)
            with nvtx_range(f"train model {name}"):
                losses[name] = self._train_model(k, subsets, peer_prob, co_epoch, f"epoch {epoch} {name}", warnings)
        # rank 0's epoch means (a batch smaller than the ranks, encoded whole on each with its own
        # dropout draws, may give each rank its own), so that every rank takes the same decision
        losses = distributed.broadcast_object(losses)
        bad = [f"model {m}: " + ", ".join(f"{name} {v}" for name, v in terms.items() if not np.isfinite(v))
               for m, terms in losses.items() if not all(np.isfinite(v) for v in terms.values())]
        if bad:
            self._diverged(epoch, f"non-finite loss ({'; '.join(bad)})")
        return losses

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
        # the secondary subsets keep pace by cycling, but those the method passes over once
        # (Method.once_subsets; SPS's code: the quasi-clean loader) drop out of the steps when spent
        once = self.method.once_subsets
        streams = {name: iter(loader) if name in once else loader.cycle() for name, loader in loaders.items()}
        model.train()
        peer.eval()
        sums, counts = {}, {}
        for _ in self.bar(range(n_steps), n_steps, desc):
            batches = {}
            for name, it in list(streams.items()):
                batch = next(it, None)
                if batch is None:
                    del streams[name]
                else:
                    batches[name] = batch
            groups = (self.method.warmup_groups(model, batches) if co_epoch is None
                      else self.method.train_groups(model, peer, batches, peer_prob, co_epoch))
            with nvtx_range("step"):
                for name, value in self._step(k, groups).items():
                    sums[name] = sums.get(name, 0.0) + value.detach()
                    counts[name] = counts.get(name, 0) + 1
        peer.train()
        return {name: float(v) / counts[name] for name, v in sums.items()}  # sync: once per epoch; each term's
        # mean over the steps it ran in

    def _step(self, k: int, groups) -> dict:
        """One iteration of model ``k``: all loss groups in one optimizer step, or one step per group
        (step.run_step); under torchrun the ranks' gradients are summed before each step."""
        return run_step(self.optims[k], groups, self.method.separate_steps, self.cfg.optim.grad_clip, self.precision,
                        self.graphs, [self.models[k]])

    def _batches(self, subset: np.ndarray) -> PairBatches:
        return PairBatches(self.data.train, self.pairs.caption_to_image, subset, self.cfg.optim.batch_size, self.rng,
                           self.device, length_multiple=self.cfg.runtime.length_multiple)

    def _similarity(self, split, views) -> torch.Tensor:
        return similarity_matrix(views, split, self.device, self.cfg.runtime.eval_batch, self.precision)

    def _evaluate_dev(self, epoch: int) -> tuple[dict, dict, list[tuple[float, float]]]:
        """The dev recalls of the ensemble (the average of the models' matrices) and of each model, and
        each model's similarity spread (std, mean): what the collapse guard reads."""
        with nvtx_range("evaluation"):
            k = self.data.dev.captions_per_image
            sims = [self._similarity(self.data.dev, [view]) for view in self.eval_views]
            for name, sim in zip("AB", sims):
                if not torch.isfinite(sim).all():
                    self._diverged(epoch, f"model {name}'s dev similarities are not finite")
            dev = retrieval_metrics((sims[0] + sims[1]) / 2, k)
        spreads = [(float(x.std()), float(x.mean())) for x in (sim.double() for sim in sims)]
        return dev, {"AB"[i]: retrieval_metrics(s, k) for i, s in enumerate(sims)}, spreads

    def _judge(self, epoch: int, split: EpochSplit | None, record: EpochRecord, spreads) -> bool:
        """The collapse guard, the best epoch, a plateau warm-up's end; whether the epoch is the best."""
        rsum = record.dev["rsum"]
        if split is not None and self.cfg.optim.collapse != "off":
            record.collapse = self.schedule.guard(rsum, split.primary(), self.data.train.num_captions, self.state,
                                                  record.warnings, spreads)
            if record.collapse is not None and record.collapse["action"] == "recovered":
                best = self._load("best")  # the next epoch splits again from the best epoch's models
                best.load_weights(self.models, self.optims)
                # split.signal=mean: the running losses as they were at the best epoch
                self.state.signal_sum, self.state.signal_epochs = best.state.signal_sum, best.state.signal_epochs
        # an epoch the guard undid or stopped at never becomes the best (under "warn" it may), nor
        # does a warm-up epoch under optim.warmup_best=skip (NCR's and ESC's codes judge co-training epochs only)
        improved = (rsum > self.state.best_rsum and (record.collapse or {}).get("action", "none") == "none"
                    and not (record.phase == "warmup" and self.cfg.optim.warmup_best == "skip"))
        if improved:
            self.state.best_rsum, self.state.best_epoch = rsum, epoch
        note = self.schedule.end_warmup(epoch, improved, self.state)
        if note:
            record.notes.append(note)
        return improved

    def _keep_warmup(self, record: EpochRecord) -> bool:
        """optim.warmup_best=reload (SPS's code, CREAM's rule): whether the epoch of ``record`` is a
        warm-up epoch kept, its dev RSum and six recalls each at least those of the one kept before it."""
        s, dev = self.state, record.dev
        if (self.cfg.optim.warmup_best != "reload" or record.phase != "warmup"
                or (s.warmup_dev is not None and any(dev[k] < s.warmup_dev[k] for k in s.warmup_dev))):
            return False
        s.warmup_kept, s.warmup_dev = record.epoch, dict(dev)
        return True

    def _commit(self, epoch: int, record: EpochRecord, improved: bool, t0: float, warmup_kept: bool = False) -> None:
        """best.pt (and warmup.pt, a warm-up epoch kept), then the metrics line, then last.pt: an
        order that a kill at any point resumes correctly (a resume restarts from last.pt, drops
        later metrics lines and redoes the epoch, writing the same best.pt again). Rank 0 only."""
        if not self.main:
            record.time = time.perf_counter() - t0
            return
        with nvtx_range("checkpoint"):
            checkpoint = Checkpoint.capture(epoch, self.models, self.optims, self.state, self.cfg.to_dict(), self.rng,
                                            self.precision)
            if improved:
                checkpoint.save(self.run.checkpoint("best"))
            if warmup_kept:
                checkpoint.save(self.run.checkpoint("warmup"))
        record.time = time.perf_counter() - t0
        self.run.append_metrics(record)
        with nvtx_range("checkpoint"):
            checkpoint.save(self.run.checkpoint("last"))

    def _diverged(self, epoch: int, what: str):
        kept = f"checkpoints/last.pt holds epoch {epoch}" if epoch > 0 else "no checkpoint was written"
        # every rank meets it alike: the checks read values every rank holds the same
        raise distributed.agreed(Diverged(f"epoch {epoch + 1}: {what}; the run stopped ({kept}) in {self.run.path}"))

    def finish(self) -> RunResult:
        cfg = self.cfg
        best = self._load("best")
        best.load_weights(self.models)
        test_sim = self._similarity(self.data.test, self.eval_views)
        if not torch.isfinite(test_sim).all():
            raise distributed.agreed(
                Diverged(f"the best checkpoint's test similarities are not finite; no result for {self.run.path}"))
        k, noise_file = self.data.test.captions_per_image, cfg.data.noise_file
        result = RunResult(
            method=cfg.method, preset=cfg.preset, noise=self.pairs.noise_rate, noise_file=noise_file,
            noise_file_sha256=sha256_of(Path(noise_file)) if noise_file else None, seed=cfg.seed,
            data=self.data.name, best_epoch=best.epoch, dev_rsum=best.state.best_rsum,
            test=retrieval_metrics(test_sim, k), split=self.state.last_split,
            test_coco1k=fold5_metrics(test_sim, k) if cfg.data.test_protocol == "coco" else None)
        if self.main:
            self.run.write_result(result)
        if self.board is not None:
            self.board.close()
        log.info(format_results(result))
        return result


def train(cfg: Config, resume: bool = False) -> RunResult:
    """Train one run; under torchrun (WORLD_SIZE > 1) each process is one rank of it."""
    device = assemble.resolve_device(cfg.runtime.device)
    with distributed.launched(cfg.runtime.dist_backend, cfg.runtime.dist_timeout, device.type):
        if cfg.out is None:
            cfg.out = distributed.broadcast_object(default_out(cfg))  # one time stamp for every rank
        return Trainer(cfg, resume).fit()
