"""Deployments mode for real: ``deployments/local_stack.py`` starts a Prefect server, the three
process work pools with a worker each and the deployments of ``prefect.yaml``; the parent
deployment runs ``speculative_training`` on the tiny config, creating producer and trainer runs on
their pools. They must overlap in time, the parent must complete, the artifacts must be there,
and stopping the stack must leave no process behind."""

from __future__ import annotations

import asyncio
import json

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


def test_parent_deployment_runs_children_concurrently_on_their_pools(
    tmp_path, tiny_target_dir, monkeypatch
):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from deployments.local_stack import start_stack
    from spec_core.utils.net import free_port

    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))  # the stack's processes, not ~/.prefect
    config = tmp_path / "tiny.yaml"
    config.write_text(BASE_CONFIG.format(out=tmp_path / "out", target=tiny_target_dir))
    stack = start_stack(tmp_path / "stack", port=free_port("127.0.0.1"), worker_poll_s=1)
    try:
        assert stack.pools == ["cpu", "gpu-inference", "gpu-training"]
        with temporary_settings({PREFECT_API_URL: stack.api_url, PREFECT_HOME: str(home)}):
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
    finally:
        stack.stop()
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
