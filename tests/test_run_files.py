"""Run-folder files are written atomically and get the mode a plain write would (0666 less the
umask), not mkstemp's private 0600: colleagues can read a shared run folder."""
from __future__ import annotations

import os
import stat

import pytest

from fastncl.run import write_atomic


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_write_atomic_follows_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "sub" / "results.json"
    write_atomic(path, "{}\n")
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    write_atomic(path, b"[]\n")  # replacing keeps the rule
    assert path.read_bytes() == b"[]\n" and stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left
