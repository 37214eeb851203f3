"""A SIGKILLed coordinator leaves nothing behind: real master, metadata server, segment holder.

The coordinator is a separate Python process that starts the streaming services from a worker
thread which then ends (as a Prefect task thread does), so the test also shows that the services
do *not* die with that thread, only with the process (docs/architecture.md §processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_utils_procs import running, wait_for_file

pytestmark = pytest.mark.slow

COORDINATOR = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from pathlib import Path
    from spec_core.config import TransferConfig
    from spec_core.transfer.services import start_services

    out = Path(sys.argv[1])
    handles = []

    def start():  # a short-lived thread, like a Prefect task's
        cfg = TransferConfig(global_segment_mb=64, byte_budget_mb=16, connect_timeout_s=30.0)
        handles.append(start_services(cfg, "orphan-test", out / "logs"))

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    handle = handles[0]
    info = json.loads((out / "logs" / "mooncake-holder.ready.json").read_text())
    record = {p.name: p.pid for p in handle.processes}
    record["segment"] = [info["pid"], info["fd"]]
    (out / "pids.tmp").write_text(json.dumps(record))
    os.replace(out / "pids.tmp", out / "pids.json")
    time.sleep(600)
    """
)


def segment_holders(inode: int) -> list[str]:
    """Every process that still has the segment's memfd open or mapped (its memory stays
    allocated while one does)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if "specflow-segment" in os.readlink(fd) and os.stat(fd).st_ino == inode:
                    found.append(f"{proc.name} fd {fd.name}")
            for line in (proc / "maps").read_text().splitlines():
                cols = line.split()
                if len(cols) >= 6 and "specflow-segment" in line and int(cols[4]) == inode:
                    found.append(f"{proc.name} maps it")
                    break
        except OSError:
            continue  # exited while we looked, or not ours to read
    return found


def test_sigkilled_coordinator_leaves_no_service_and_no_segment(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    coordinator = subprocess.Popen(
        [sys.executable, "-c", COORDINATOR, str(tmp_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "coordinator.err", "wb"),
        start_new_session=True,
    )
    try:
        record = json.loads(wait_for_file(tmp_path / "pids.json", timeout_s=180))
    except AssertionError:
        coordinator.kill()
        raise AssertionError((tmp_path / "coordinator.err").read_text()[-3000:]) from None
    holder_pid, segment_fd = record.pop("segment")
    inode = os.stat(f"/proc/{holder_pid}/fd/{segment_fd}").st_ino
    services = {name: pid for name, pid in record.items()}
    assert set(services) == {"mooncake-metadata", "mooncake-master", "mooncake-holder"}
    time.sleep(1.0)  # the thread that started them has ended; they must still run
    assert all(running(pid) for pid in services.values()), services
    assert segment_holders(inode)

    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait(10)
    deadline = time.monotonic() + 60.0  # generous: a contended CPU; typically well under 2 s
    while time.monotonic() < deadline:
        left = [name for name, pid in services.items() if running(pid)]
        memory = segment_holders(inode)
        if not left and not memory:
            break
        time.sleep(0.2)
    assert not left, f"services outlived their coordinator: {left}"
    assert not memory, f"the segment is still held: {memory}"
