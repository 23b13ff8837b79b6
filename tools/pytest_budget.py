"""pytest plugin for tools/gpu_report.py: a time budget, and outcomes written as they happen.

Loaded with ``-p pytest_budget`` (tools/ on PYTHONPATH). Two environment variables drive it:

- ``FASTNCL_DEADLINE``: a Unix time; a test that would start after it is skipped with the reason
  "time budget used up", so that a run cut short still ends normally (JSON and reports written);
- ``FASTNCL_OUTCOMES``: a file to which every test's outcome is appended as one JSON line
  (nodeid and the rootdir it is relative to, outcome, seconds, reason for skips, first lines of the
  failure), so that nothing is lost if the run is killed.
"""
from __future__ import annotations

import json
import os
import time

import pytest

BUDGET_REASON = "time budget used up (tools/gpu_report.py --budget)"
_rootdir = ""  # node ids are relative to it: written with each outcome, so that a test can be run again


def pytest_configure(config):
    global _rootdir
    _rootdir = str(config.rootpath)


def pytest_runtest_setup(item):
    deadline = os.environ.get("FASTNCL_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(BUDGET_REASON)


def _reason(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = getattr(report, "longreprtext", "") or ""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.lstrip().startswith("E ")]
    return "\n".join((errors or lines)[:8])[:2000]


def pytest_runtest_logreport(report):
    path = os.environ.get("FASTNCL_OUTCOMES")
    if not path:
        return
    # one line per test: its call, or the setup/teardown phase that failed or skipped
    if report.when == "call" or report.outcome != "passed":
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        line = {"nodeid": report.nodeid, "rootdir": _rootdir, "when": report.when, "outcome": outcome,
                "seconds": round(report.duration, 3)}
        if outcome != "passed":
            line["reason"] = _reason(report)
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
