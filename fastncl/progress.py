"""How a run shows where it is within an epoch: progress bars on a terminal; without one
(runtime.progress unset: a log file, a batch job), a plain line on stderr every PROGRESS_SECONDS;
runtime.progress=false, or a rank other than 0 under torchrun: nothing."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

PROGRESS_SECONDS = 30.0


class Bars:
    def __init__(self, setting: bool | None, main: bool):
        self.main = main
        self.bars = sys.stderr.isatty() if setting is None else setting
        self.lines = setting is None and not self.bars

    def __call__(self, it, total: int, desc: str):
        """``it``, shown as it is consumed."""
        if not self.main:
            return it
        if self.lines:
            return _progress_lines(it, total, desc)
        return tqdm(it, total=total, desc=desc, leave=False, disable=not self.bars, dynamic_ncols=True)


def _progress_lines(it, total: int, desc: str):
    """``it``, with a line on stderr every PROGRESS_SECONDS: where a run without a terminal is."""
    start = last = time.perf_counter()
    for done, item in enumerate(it, 1):
        yield item
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS:
            last = now
            print(f"{desc}: {done}/{total} steps, {now - start:.0f}s", file=sys.stderr, flush=True)
