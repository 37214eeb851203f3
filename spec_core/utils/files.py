"""Atomic files and directories: a reader sees the old content or the new, never half of either.

A file is written to a temporary sibling (same directory, so the rename stays on one filesystem),
fsynced, then ``os.replace``d over the target. A directory entry of a content-addressed cache is
built in a staging sibling and renamed into place the same way; concurrent builders of the same key
each use their own staging dir, and the first rename wins.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

from spec_core.utils.procs import pid_alive


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (parent dirs are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(data, **dumps_kwargs)`` written atomically (``indent=2`` unless given)."""
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(data, **dumps_kwargs))


def staging_dir(out: Path) -> Path:
    """A fresh, empty sibling of ``out`` owned by this process. Staging dirs of the same entry left
    by dead processes on this host are removed first (other hosts' are left alone)."""
    out = Path(out)
    host = socket.gethostname()
    for stale in out.parent.glob(f".tmp-{out.name}-{host}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".tmp-{out.name}-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename a finished staging dir to ``out``; if another process got there first, keep its
    (identical, being content-addressed) entry and drop ours."""
    try:
        Path(tmp).rename(out)
    except OSError:
        if not Path(out).is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
