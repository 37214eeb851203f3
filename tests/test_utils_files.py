"""Atomic writes and staged cache directories (spec_core.utils.files)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from spec_core.utils import files
from spec_core.utils.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    publish_dir,
    staging_dir,
)


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "deep" / "er" / "f.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().startswith('{\n  "a"')  # indent=2 by default
    atomic_write_text(path, "ünïcode\n")
    assert path.read_text(encoding="utf-8") == "ünïcode\n"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "state.txt"
    atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]


def test_staging_cleans_dead_builders_and_publish_keeps_the_winner(tmp_path):
    out = tmp_path / "entry"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".tmp-entry-{host}-{dead.pid}"
    (stale / "train").mkdir(parents=True)
    other_host = tmp_path / ".tmp-entry-elsewhere-1"
    other_host.mkdir()
    mine = staging_dir(out)
    assert not stale.exists() and other_host.exists()
    assert mine.name == f".tmp-entry-{host}-{os.getpid()}" and mine.is_dir()
    (mine / "a").write_text("first")
    publish_dir(mine, out)
    assert (out / "a").read_text() == "first" and not mine.exists()
    second = staging_dir(out)
    (second / "a").write_text("second")
    publish_dir(second, out)  # another builder already published: keep the winner
    assert (out / "a").read_text() == "first" and not second.exists()
