"""Several hosts on one machine (network namespaces joined by a bridge, spec_core/utils/netns.py).

torchrun multi-node across two simulated trainer hosts (gloo over their veth interfaces) trains
the same loss curve as one host running both ranks with the same global batch; the rendezvous and
the collectives really cross the bridge (its port counters see the bytes)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import launch_job, make_train_eval

from spec_core.training.metrics_log import read_metrics
from spec_core.utils import netns

pytestmark = pytest.mark.slow

CAN_NETNS, WHY_NOT = netns.available()
needs_netns = pytest.mark.skipif(not CAN_NETNS, reason=f"network namespaces: {WHY_NOT}")

BASE = [
    "training.micro_batch_size=1",
    "training.accumulation_steps=2",
    "training.seq_bucket=16",
    "training.learning_rate=3e-3",
    "training.warmup_ratio=0",
    "training.save_interval=0",
    "draft.ttt_length=2",
    "inference.batch_size=2",
    "training.num_steps=4",
]
RDZV_PORT = 29611

# One node of a multi-node run: what `specflow train` does on each host, minus data preparation
# (both nodes read the same prepared splits, as they would from shared storage).
NODE_MAIN = """
import json, sys
from spec_core.config import load_config
from spec_core.training.job import TrainJob
from spec_core.training.launcher import launch_training
spec = json.loads(sys.argv[1])
cfg = load_config(None, spec["overrides"])
job = TrainJob.create(cfg, run_dir=spec["run_dir"], target_dir=spec["target"],
                      train_data=spec["train"], eval_data=None)
launch_training(job, 1, nnodes=2, node_rank=spec["node_rank"], rdzv_endpoint=spec["rdzv"],
                echo=False, timeout_s=400)
"""


def losses(run_dir: Path) -> list[float]:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "train"]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"])]


@needs_netns
def test_two_host_torchrun_matches_one_host(tmp_path: Path, tiny_target_dir: Path):
    data = make_train_eval(tmp_path / "data", 16, 2)
    one_host = functools.partial(launch_job, BASE, eval_data=False)
    one_host(tmp_path, "one-host", tiny_target_dir, data, 2, [])

    run_dir = tmp_path / "two-hosts"
    with netns.SimCluster(["trainer0", "trainer1"]) as cluster:
        node0 = cluster.hosts["trainer0"]
        procs = []
        for rank, host in enumerate(cluster.hosts.values()):
            spec = {
                "overrides": [*BASE, "training.nproc_per_node=1", "training.nnodes=2"],
                "run_dir": str(run_dir),
                "target": str(tiny_target_dir),
                "train": str(data / "train"),
                "node_rank": rank,
                "rdzv": f"{node0.address}:{RDZV_PORT}",
            }
            argv = [sys.executable, "-c", NODE_MAIN, json.dumps(spec)]
            procs.append(
                subprocess.Popen(
                    host.command(argv),
                    env=netns.host_env(host),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=480)[0] for p in procs]
        wire = cluster.port_bytes()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]

    expected, got = losses(tmp_path / "one-host"), losses(run_dir)
    assert len(expected) == 4 and len(got) == 4
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Both hosts talked over the bridge (rendezvous store + gloo all-reduces and all-gathers).
    assert wire["trainer1"]["tx"] > 10_000 and wire["trainer1"]["rx"] > 10_000
    assert (run_dir / "logs" / "train-node1.log").is_file()
    print(f"two-host losses {got} == one-host; bridge bytes {wire}")


ECHO_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.sendall(conn.recv(64))
"""
ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
    s.sendall(b"across the bridge")
    print(s.recv(64).decode())
"""


@needs_netns
def test_hosts_reach_each_other_and_teardown_leaves_nothing():
    with netns.SimCluster(["a", "b"]) as cluster:
        a, b = cluster.hosts["a"], cluster.hosts["b"]
        server = subprocess.Popen(
            b.command([sys.executable, "-c", ECHO_SERVER, b.address]),
            stdout=subprocess.PIPE,
            text=True,
        )
        port = server.stdout.readline().strip()
        reply = subprocess.run(
            a.command([sys.executable, "-c", ECHO_CLIENT, b.address, port]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        sleeper = subprocess.Popen(b.command(["sleep", "300"]))
        wire = cluster.port_bytes()
        names = [h.netns for h in cluster.hosts.values()] + [cluster.switch]
    assert reply.stdout.strip() == "across the bridge", reply.stderr
    assert wire["a"]["tx"] > 0 and wire["b"]["rx"] > 0
    # Teardown killed what still ran inside the hosts and deleted every namespace.
    assert sleeper.wait(timeout=10) == -9
    server.wait(timeout=10)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
