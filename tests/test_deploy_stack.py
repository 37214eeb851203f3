"""Deployments mode for real: ``deployments/local_stack.py`` starts a Prefect server, the three
process work pools with a worker each and the deployments of ``prefect.yaml``; the parent
deployment runs ``speculative_training`` on the tiny config, creating producer and trainer runs on
their pools. They must overlap in time, the parent must complete, the artifacts must be there,
and stopping the stack must leave no process behind."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
from test_flow_local import BASE_CONFIG, wait_no_processes

pytestmark = pytest.mark.slow

ARTIFACT_KEYS = {
    "generation-progress",
    "training-progress",
    "pipeline-throughput",
    "per-position-accuracy",
    "run-summary",
}


def read_runs_and_artifacts():
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(), await client.read_artifacts()

    return asyncio.run(read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One stack for this module (starting one takes a minute): a Prefect server, a worker per
    pool, the deployments; the tests below run in file order (the last one stops a worker)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from deployments.local_stack import start_stack
    from spec_core.utils.net import free_port

    root = tmp_path_factory.mktemp("deploy-stack")
    home = root / "prefect-home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))  # the stack's processes, not ~/.prefect
        stack = start_stack(root / "stack", port=free_port("127.0.0.1"), worker_poll_s=1)
        try:
            with temporary_settings({PREFECT_API_URL: stack.api_url, PREFECT_HOME: str(home)}):
                yield stack
        finally:
            stack.stop()


def test_parent_deployment_runs_children_concurrently_on_their_pools(
    stack, tmp_path, tiny_target_dir
):
    from prefect.deployments import run_deployment

    config = tmp_path / "tiny.yaml"
    config.write_text(BASE_CONFIG.format(out=tmp_path / "out", target=tiny_target_dir))
    assert stack.pools == ["cpu", "gpu-inference", "gpu-training"]
    parent = run_deployment(
        "speculative-training/speculative-training",
        parameters={
            "config_path": str(config),
            "overrides": [
                "run.run_id=deployed",
                "training.num_steps=6",
                "inference.replicas=1",
            ],
        },
        timeout=540,
    )
    assert parent.state.is_completed(), parent.state.message
    summary = parent.state.result()
    runs, artifacts = read_runs_and_artifacts()
    assert summary["mode"] == "deployments"
    assert summary["training"]["summary"]["steps"] == 6
    by_name = {r.name: r for r in runs}
    assert {"deployed", "producer-0", "trainer-node-0"} <= set(by_name)
    producer, trainer = by_name["producer-0"], by_name["trainer-node-0"]
    for name in ("producer-0", "trainer-node-0"):
        child = by_name[name]
        assert child.state_name == "Completed"
        assert child.deployment_id is not None  # a deployment run on a pool, not a subflow
    assert producer.work_pool_name == "gpu-inference"
    assert trainer.work_pool_name == "gpu-training"
    assert by_name["deployed"].work_pool_name == "cpu"
    # generation and training ran at the same time
    assert producer.start_time < trainer.end_time and trainer.start_time < producer.end_time
    keys = {a.key for a in artifacts if a.key}
    assert ARTIFACT_KEYS <= keys
    latest = {a.key: a for a in sorted(artifacts, key=lambda a: a.created) if a.key}
    assert latest["training-progress"].data == 100.0
    accuracy = latest["per-position-accuracy"].data
    rows = json.loads(accuracy) if isinstance(accuracy, str) else accuracy
    assert [row["position"] for row in rows] == [0, 1]  # draft.ttt_length: 2
    assert wait_no_processes(tmp_path) == []


def test_child_no_worker_picks_up_fails_the_parent_by_its_deadline(
    stack, tmp_path, tiny_target_dir
):
    """The training pool's worker is stopped: the trainer run stays Scheduled, and the parent
    fails once ``orchestration.child_start_timeout_s`` has passed, with one line naming it."""
    from prefect.deployments import run_deployment

    from spec_core.utils.procs import stop_group

    config = tmp_path / "tiny.yaml"
    config.write_text(BASE_CONFIG.format(out=tmp_path / "out", target=tiny_target_dir))
    worker = next(p for p in stack.processes if p.name == "worker-gpu-training")
    assert stop_group(worker.pid, 15.0, first_signal=signal.SIGINT)
    parent = run_deployment(
        "speculative-training/speculative-training",
        parameters={
            "config_path": str(config),
            "overrides": [
                "run.run_id=no-trainer-worker",
                "training.num_steps=6",
                "inference.replicas=1",
                "orchestration.child_start_timeout_s=15",
            ],
        },
        timeout=400,
    )
    runs, _ = read_runs_and_artifacts()
    assert parent.state.is_failed(), parent.state
    message = parent.state.message
    assert "trainer-node-0 was never started" in message, message
    assert "work pool 'gpu-training'" in message and "child_start_timeout_s" in message
    assert "\n" not in message.strip()
    trainer = next(
        r for r in runs if r.name == "trainer-node-0" and "no-trainer-worker" in str(r.parameters)
    )
    assert trainer.state_name == "Cancelled"  # withdrawn: no later worker may start it
    print(f"parent failed after {(parent.end_time - parent.start_time).total_seconds():.0f}s")
    assert wait_no_processes(tmp_path, timeout_s=90) == []  # the producer run was cancelled
