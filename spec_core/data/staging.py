"""Content-addressed cache entries are built in a staging directory and renamed into place, so a
crash never leaves a half-written entry and concurrent builders of the same key do not collide."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


def staging_dir(out: Path) -> Path:
    """A fresh, empty sibling of ``out`` owned by this process. Staging dirs of the same entry left
    by dead processes on this host are removed first (other hosts' are left alone)."""
    host = socket.gethostname()
    for stale in out.parent.glob(f".tmp-{out.name}-{host}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".tmp-{out.name}-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Rename a finished staging dir to ``out``; if another process got there first, keep its
    (identical) entry and drop ours."""
    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
