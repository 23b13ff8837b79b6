"""The run's schedule (``optim.*``): which epochs warm up, the learning rate of every epoch, and
the collapse guard that may lower it or end the run.

Built by fastncl.assemble with the optimizers it sets. What changes as the run goes (a plateau
warm-up's end, the guard's learning-rate scale, recoveries and stop) is in the trainer's
``checkpoint.LoopState``, which every call takes, so that a resume goes on as the run would have.
"""
from __future__ import annotations

from fastncl.checkpoint import LoopState
from fastncl.config import OptimConfig


class Schedule:
    def __init__(self, optim: OptimConfig, optimizers: list):
        self.o = optim
        self.optimizers = optimizers

    def start(self) -> LoopState:
        """A new run's state: a fixed warm-up's end known, a plateau warm-up's not yet."""
        return LoopState(warmup_end=self.o.warmup_epochs if self.o.warmup == "fixed" else None)

    def total(self, s: LoopState) -> int:
        """Warm-up and co-training epochs (while a plateau warm-up runs: with its longest warm-up)."""
        o = self.o
        return (s.warmup_end if s.warmup_end is not None else max(o.warmup_max_epochs, o.warmup_epochs)) + o.epochs

    def co_epoch(self, epoch: int, s: LoopState) -> int | None:
        """Which co-training epoch ``epoch`` is (0: the first), or None: a warm-up epoch."""
        return None if s.warmup_end is None or epoch < s.warmup_end else epoch - s.warmup_end

    def set_lr(self, epoch: int, s: LoopState) -> float:
        """Set and return the learning rate of ``epoch``: optim.lr, x0.1 every optim.lr_step
        co-training epochs, x the collapse guard's scale."""
        o = self.o
        co_epoch = max(epoch - (epoch if s.warmup_end is None else s.warmup_end), 0)
        lr = o.lr * (0.1 ** (co_epoch // o.lr_step) if o.lr_step else 1.0) * s.lr_scale
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        return lr

    def end_warmup(self, epoch: int, improved: bool, s: LoopState) -> str | None:
        """optim.warmup=plateau: after warm-up epoch ``epoch`` (at least optim.warmup_epochs), the
        warm-up ends when dev RSum did not improve, or at optim.warmup_max_epochs; the epoch
        line's note when it ends."""
        o = self.o
        if s.warmup_end is not None or epoch + 1 < o.warmup_epochs or (improved and epoch + 1 < o.warmup_max_epochs):
            return None
        s.warmup_end = epoch + 1
        return f"warm-up ends after epoch {epoch + 1} " + ("(the cap, optim.warmup_max_epochs)" if improved
                                                           else "(dev rsum stopped rising)")

    def guard(self, rsum: float, primary: list[tuple[str, int]], n: int, s: LoopState,
              warnings: list[str], spreads: list[tuple[float, float]]) -> dict | None:
        """The collapse guard (optim.collapse), after a co-training epoch's evaluation, from its dev
        RSum, the size of each model's primary subset (name, pairs of ``n``) and the spread of each
        model's dev similarities (std, mean; a std below optim.collapse_min_spread is the
        hardest-negative collapse, every caption scored alike with every image): what collapsed and
        what is done (the epoch record's ``collapse``), or None. "recovered": the caller restores
        the best epoch's weights and optimizer states (the next epoch splits again from them); the
        learning rate is lowered here."""
        o = self.o
        reasons = []
        if s.best_rsum > 0 and rsum < o.collapse_rsum_ratio * s.best_rsum:
            reasons.append(f"dev rsum {rsum:.1f} below {o.collapse_rsum_ratio:g} x the best {s.best_rsum:.1f} "
                           f"(epoch {s.best_epoch + 1})")
        for k, (name, size) in enumerate(primary):
            if size < o.collapse_min_fraction * n:
                reasons.append(f"split {'AB'[k]}'s {name} subset holds {size} of {n} pairs "
                               f"(< {o.collapse_min_fraction:.0%})")
        for k, (std, mean) in enumerate(spreads):
            if std < o.collapse_min_spread:
                reasons.append(f"model {'AB'[k]}'s dev similarities all alike "
                               f"(std {std:.4f} < {o.collapse_min_spread:g}, mean {mean:.3f})")
        if not reasons:
            return None
        found = {"reasons": reasons, "action": "none"}
        if s.best_epoch < 0:  # warm-up 0 and the first epoch: no best epoch to go back to yet
            said = "no earlier epoch to go back to; training goes on"
        elif o.collapse == "recover" and s.recoveries < o.collapse_max_recoveries:
            s.recoveries += 1
            s.lr_scale *= o.collapse_lr_factor
            found.update(action="recovered", restored_epoch=s.best_epoch, lr_scale=s.lr_scale, recoveries=s.recoveries)
            said = (f"restored epoch {s.best_epoch + 1}'s weights, learning rate x{s.lr_scale:g} from now on "
                    f"(recovery {s.recoveries} of {o.collapse_max_recoveries})")
        elif o.collapse in ("recover", "stop"):
            s.stopped = True
            found.update(action="stopped")
            said = f"training stopped; the result is the best checkpoint's (epoch {s.best_epoch + 1})"
        else:
            said = "training goes on (optim.collapse=warn)"
        warnings.append(f"collapse: {'; '.join(reasons)}: {said}")
        return found
