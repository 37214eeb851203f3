"""Process-group stop (spec_core.utils.procs) on real process trees, checked by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spec_core.utils.procs import ProcessGroup, group_alive, signal_group


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait for a non-reaping init to collect it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_for_file(path: Path, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def spawn_tree(tmp_path: Path, leader_body: str, grace_s: float = 5.0) -> tuple[ProcessGroup, int]:
    """A leader in its own group that starts a child (same group, ignores nothing) and records
    its PID; then ``leader_body`` runs in the leader."""
    pid_file = tmp_path / "child.pid"
    script = (
        "import os, signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"tmp = {str(pid_file)!r} + '.tmp'\n"
        "open(tmp, 'w').write(str(child.pid))\n"
        f"os.replace(tmp, {str(pid_file)!r})\n" + leader_body
    )
    group = ProcessGroup.start([sys.executable, "-c", script], grace_s=grace_s)
    child = int(wait_for_file(pid_file))
    return group, child


def test_stop_kills_the_children_of_a_leader_that_already_exited(tmp_path):
    group, child = spawn_tree(tmp_path, "sys.exit(0)\n")
    group.popen.wait(20)
    assert group.returncode == 0 and running(child)
    assert os.getpgid(child) == group.pgid
    started = time.monotonic()
    group.stop()
    assert not running(child)
    assert not group_alive(group.pgid)
    assert time.monotonic() - started < 4.0  # SIGTERM was enough: no grace period spent


def test_stop_escalates_to_sigkill_for_a_leader_that_ignores_sigterm(tmp_path):
    body = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(120)\n"
    group, child = spawn_tree(tmp_path, body, grace_s=0.5)
    time.sleep(0.2)  # let the leader install its handler
    group.stop()
    assert group.returncode == -signal.SIGKILL
    assert not running(child) and not running(group.pid)
    group.stop()  # idempotent: the group is gone, nothing is signalled


def test_refuses_a_process_that_does_not_lead_its_own_group():
    import subprocess

    popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(ValueError, match="start_new_session"):
            ProcessGroup(popen)
    finally:
        popen.kill()
        popen.wait()


def test_never_signals_our_own_group():
    with pytest.raises(ValueError):
        signal_group(os.getpgrp(), 0)
    with pytest.raises(ValueError):
        signal_group(1, 0)


OWNER = """
import sys, threading, time
from spec_core.utils.procs import ProcessGroup
kids = []
def start(die):  # from a thread that then ends, as a Prefect task thread does
    kids.append(ProcessGroup.start([sys.executable, '-c', 'import time; time.sleep(120)'],
                                   die_with_owner=die))
for die in (True, False):
    t = threading.Thread(target=start, args=(die,)); t.start(); t.join()
print(kids[0].pid, kids[1].pid, flush=True)
time.sleep(120)
"""


def test_owned_children_outlive_their_starting_thread_and_die_with_the_process():
    owner = ProcessGroup.start(
        [sys.executable, "-c", OWNER],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    owned, free = (int(pid) for pid in owner.popen.stdout.readline().split())
    try:
        time.sleep(0.5)
        assert running(owned) and running(free)  # the thread that forked them has ended
        os.kill(owner.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while running(owned) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(owned)
        assert running(free)  # not owned: nothing stops it but a group stop
    finally:
        owner.stop()
        signal_group(free, signal.SIGKILL)  # leads its own group (start_new_session)
