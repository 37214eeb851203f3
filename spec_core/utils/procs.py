"""Processes we start and stop: each in its own process group, stopped by that group's id.

Every long-lived child (torchrun, Mooncake servers, producers, the Prefect stack) is started with
``start_new_session=True``, so it leads a new group whose id is its PID, and everything it forks
stays in that group. Stopping signals the group, never a name: SIGTERM, a grace period, SIGKILL.
The group is signalled even when its leader has already exited - torchrun dying first must not
leave its ranks running - and we wait for the whole group, not only the leader. Linux does not hand
out a PID while it is still in use as a group id, so the recorded id keeps naming our group for as
long as any member lives; once the group is empty the signal fails with ``ProcessLookupError``
and the stop is done.

Owned processes (``die_with_owner=True``: the streaming services, torchrun) also die when the
process that started them dies, SIGKILL included, so a killed coordinator leaves no master,
metadata server or segment holder behind. The kernel does it: ``PR_SET_PDEATHSIG`` is set in the
child between fork and exec. That signal fires when the *thread* that forked the child exits, not
the process, and our callers run in Prefect task threads that end long before the run does; so
owned children are forked by one daemon thread (``_Spawner``) that lives as long as the process.
A child whose owner died before ``prctl`` took effect sees a new parent pid and exits at once.
docs/architecture.md §processes has the table of who owns what.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

_POLL_S = 0.05
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when no process is left in it."""
    if pgid <= 1 or pgid == os.getpgrp():
        raise ValueError(f"refusing to signal process group {pgid} (ours or init's)")
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one we may not signal counts: it is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """Whether any member of group ``pgid`` is still running (zombies do not count: they are dead
    and only wait for a parent, possibly a container init that never reaps, to collect them)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def stop_group(
    pgid: int,
    grace_s: float = 10.0,
    kill_wait_s: float = 5.0,
    reap: Optional[Callable[[], Any]] = None,
    first_signal: int = signal.SIGTERM,
) -> bool:
    """``first_signal`` to the whole group, SIGKILL to what is left after ``grace_s``; True once
    no member runs. ``reap`` (the leader's ``Popen.poll``) collects our own child so it does not
    linger as a zombie member."""
    for sig, wait_s in ((first_signal, grace_s), (signal.SIGKILL, kill_wait_s)):
        if not signal_group(pgid, sig):
            return True
        deadline = time.monotonic() + wait_s
        while True:
            if reap is not None:
                reap()
            if not group_alive(pgid):
                return True
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
    return False


def _die_with(owner_pid: int, sig: int) -> Callable[[], None]:
    """A ``preexec_fn``: ask the kernel for ``sig`` when our parent dies; exit if it already has.
    Runs between fork and exec, so it only calls into libc (loaded before the fork)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != owner_pid:  # the owner died before prctl: nobody will stop us
            os._exit(125)

    return arm


class _Spawner:
    """The one thread that forks owned children (see the module docstring): a daemon, so it lives
    exactly as long as the process, and its death is the process's death."""

    _lock = threading.Lock()
    _jobs: Optional[queue.Queue] = None

    @classmethod
    def popen(cls, argv: list[str], death_signal: int, **kwargs: Any) -> subprocess.Popen:
        with cls._lock:
            if cls._jobs is None:
                cls._jobs = queue.Queue()
                threading.Thread(target=cls._serve, name="specflow-spawner", daemon=True).start()
        done: queue.Queue = queue.Queue(maxsize=1)
        cls._jobs.put((argv, death_signal, kwargs, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    @classmethod
    def _serve(cls) -> None:
        assert cls._jobs is not None
        while True:
            argv, death_signal, kwargs, done = cls._jobs.get()
            try:
                kwargs["preexec_fn"] = _die_with(os.getpid(), death_signal)
                done.put((True, subprocess.Popen(argv, start_new_session=True, **kwargs)))
            except BaseException as exc:  # handed to the caller's thread
                done.put((False, exc))


@dataclass(eq=False)
class ProcessGroup:
    """A child that leads its own process group; ``stop()`` ends the whole group.

    ``pgid`` is recorded when the handle is made, right after spawning, while the leader is
    certainly alive (it is the leader's PID: ``start_new_session`` makes it so).
    """

    popen: subprocess.Popen
    grace_s: float = 10.0
    pgid: int = 0
    stop_signal: int = signal.SIGTERM  # the polite one; some servers only drain on SIGINT

    def __post_init__(self) -> None:
        if not self.pgid:
            self.pgid = self.popen.pid
        try:
            leads = os.getpgid(self.popen.pid) == self.pgid
        except ProcessLookupError:
            leads = True  # already reaped: nothing to check, stop() finds an empty group
        if not leads or self.pgid == os.getpgrp():
            raise ValueError(
                f"pid {self.popen.pid} does not lead group {self.pgid}: start it with "
                "start_new_session=True"
            )

    @classmethod
    def start(
        cls,
        argv: list[str],
        grace_s: float = 10.0,
        stop_signal: int = signal.SIGTERM,
        die_with_owner: bool = False,
        death_signal: int = signal.SIGKILL,
        **popen_kwargs: Any,
    ) -> ProcessGroup:
        """``subprocess.Popen(argv, **popen_kwargs)`` as the leader of a new session and group.
        ``die_with_owner``: the kernel sends the leader ``death_signal`` when this process dies
        (SIGKILL by default: nobody is left to wait for a graceful stop; a leader with children
        of its own, like torchrun, gets SIGTERM so it can take them along)."""
        if die_with_owner:
            popen = _Spawner.popen(argv, death_signal, **popen_kwargs)
        else:
            popen = subprocess.Popen(argv, start_new_session=True, **popen_kwargs)
        return cls(popen, grace_s, popen.pid, stop_signal)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.returncode

    def alive(self) -> bool:
        """Whether the leader still runs (its group may outlive it; ``stop()`` handles that)."""
        return self.popen.poll() is None

    def stop(self, grace_s: Optional[float] = None) -> None:
        """Stop every process of the group (idempotent) and reap the leader."""
        grace = self.grace_s if grace_s is None else grace_s
        if not stop_group(self.pgid, grace, reap=self.popen.poll, first_signal=self.stop_signal):
            log.warning("process group %d survived SIGKILL", self.pgid)
        try:
            self.popen.wait(1.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL did not land
            log.warning("pid %d did not exit", self.popen.pid)
