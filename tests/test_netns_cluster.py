"""Several hosts on one machine (network namespaces joined by a bridge, spec_core/utils/netns.py).

torchrun multi-node across two simulated trainer hosts (gloo over their veth interfaces) trains
the same loss curve as one host running both ranks with the same global batch. Nobody names the
rendezvous address: node 0 publishes it in the key queue on a third (coordinator) host and node 1,
started first, waits for it (spec_core/training/rendezvous.py). The collectives really cross the
bridge (its port counters see the bytes)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
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
QUEUE_SERVER = """
import sys, time
from spec_core.transfer.queue import start_queue_server
store, port = start_queue_server(sys.argv[1])
print(port, flush=True)
time.sleep(3600)
"""

# One node of a multi-node run: what `specflow train` does on each host, minus data preparation
# (both nodes read the same prepared splits, as they would from shared storage).
NODE_MAIN = """
import json, sys
from spec_core.config import load_config
from spec_core.training.job import TrainJob
from spec_core.training.launcher import launch_training
from spec_core.training.rendezvous import node_endpoint
spec = json.loads(sys.argv[1])
rdzv = node_endpoint(spec["queue"], "two-hosts", spec["node_rank"], 300, None)
cfg = load_config(None, spec["overrides"])
job = TrainJob.create(cfg, run_dir=spec["run_dir"], target_dir=spec["target"],
                      train_data=spec["train"], eval_data=None)
launch_training(job, 1, nnodes=2, node_rank=spec["node_rank"], rdzv_endpoint=rdzv,
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
    with netns.SimCluster(["coordinator", "trainer0", "trainer1"]) as cluster:
        coordinator = cluster.hosts["coordinator"]
        queue_server = subprocess.Popen(
            coordinator.command([sys.executable, "-c", QUEUE_SERVER, coordinator.address]),
            stdout=subprocess.PIPE,
            text=True,
        )
        queue = f"{coordinator.address}:{queue_server.stdout.readline().strip()}"
        procs = []
        for rank in (1, 0):  # node 1 first: it waits for node 0's address
            host = cluster.hosts[f"trainer{rank}"]
            spec = {
                "overrides": [*BASE, "training.nproc_per_node=1", "training.nnodes=2"],
                "run_dir": str(run_dir),
                "target": str(tiny_target_dir),
                "train": str(data / "train"),
                "node_rank": rank,
                "queue": queue,
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
            time.sleep(2 if rank == 1 else 0)
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
    rdzv_host = (run_dir / "logs" / "train.log").read_text().split("--master-addr=")[1].split()[0]
    assert rdzv_host == cluster.hosts["trainer0"].address  # node 0's own address, published
    print(f"two-host losses {got} == one-host; bridge bytes {wire}")


def test_node_waits_for_node0_then_fails_with_one_line(tmp_path: Path):
    from spec_core.errors import ServiceError
    from spec_core.training.rendezvous import node_endpoint
    from spec_core.transfer.queue import start_queue_server

    store, port = start_queue_server("127.0.0.1")
    queue = f"127.0.0.1:{port}"
    with pytest.raises(ServiceError, match="trainer node 1 waited 1s for node 0"):
        node_endpoint(queue, "r", 1, 1.0, None)
    published = node_endpoint(queue, "r", 0, 1.0, None)
    assert published.startswith("127.0.0.1:")
    assert node_endpoint(queue, "r", 1, 5.0, None) == published
    assert node_endpoint(queue, "other-run", 0, 1.0, "node0.cluster").startswith("node0.cluster:")


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
