"""``speculative_training`` in local mode, in this process, against a real (temporary) Prefect
server: a failing trainer fails the parent with the trainer's error and leaves no process behind;
a killed producer does not stop the run; the tokenize/vocab tasks are Cached on a re-run with the
same inputs and run again when ``max_seq_length`` changes; a service start is retried.

Three short runs on the tiny random target (Mooncake, key queue, producers and torchrun are real).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

BASE_CONFIG = """
run:
  name: flowtest
  output_dir: {out}
dataset:
  max_conversations: 40
  eval_conversations: 4
  max_seq_length: 128
target:
  path: {target}
draft:
  ttt_length: 2
  capture_indices: [1, 2, 3]  # EAGLE-3's default (2, N//2, N-3) repeats layers on 4 layers
vocab:
  draft_vocab_size: 1024
inference:
  replicas: 2
  batch_size: 2
transfer:
  global_segment_mb: 128
  byte_budget_mb: 32
  local_buffer_mb: 32
  claim_lease_s: 3
  connect_timeout_s: 20
training:
  nproc_per_node: 1
  micro_batch_size: 2
  seq_bucket: 32
  eval_interval: 0
  save_interval: 0
  eval_batches: 1
orchestration:
  poll_interval_s: 0.5
  publish: false
"""


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server + database for this module (not the user's ~/.prefect)."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=180):
            yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flow-local")


@pytest.fixture(scope="module")
def config_path(root: Path, tiny_target_dir: Path) -> Path:
    path = root / "tiny.yaml"
    path.write_text(BASE_CONFIG.format(out=root / "out", target=tiny_target_dir))
    return path


def run_flow(config_path: Path, overrides: list[str]):
    from flows.pipeline import speculative_training

    return asyncio.run(
        speculative_training(config_path=str(config_path), overrides=overrides, return_state=True)
    )


def task_runs(flow_run_id: Any) -> dict[str, Any]:
    """Task runs of one flow run by task name (``tokenize-dataset``, ...), through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )

    return {run.name.rsplit("-", 1)[0]: run for run in asyncio.run(read())}


def processes_using(root: Path) -> list[str]:
    """Live processes (not this one) whose command line, cwd or open files are under ``root``:
    everything a run starts writes its logs there or names its job file there."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            paths = [cmdline]
            for fd in (entry / "fd").iterdir():
                try:
                    paths.append(os.readlink(fd))
                except OSError:
                    continue
            paths.append(os.readlink(entry / "cwd"))
        except OSError:  # gone, or a zombie
            continue
        if any(str(root) in p for p in paths):
            found.append(f"{entry.name}: {cmdline}")
    return found


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'out' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def mlflow_run(root: Path, run_id: str):
    """The MLflow run the pipeline opened for ``run_id`` (its id is kept in the run dir)."""
    import json

    state = json.loads((root / "out" / "runs" / run_id / "mlflow_run.json").read_text())
    return mlflow_client(root).get_run(state["mlflow_run_id"])


def wait_no_processes(root: Path, timeout_s: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_using(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def failed_trainer_run(prefect_server, root: Path, config_path: Path):
    """First run (fresh data): the trainer fails at start (no checkpoint to continue from)."""
    state = run_flow(
        config_path,
        [
            "run.run_id=failing-trainer",
            "training.num_steps=4",
            "inference.replicas=1",
            f"training.continual_from={root / 'no-such-checkpoint'}",
        ],
    )
    return state


def test_failing_trainer_fails_the_parent_with_its_error_and_leaves_no_process(
    failed_trainer_run, root: Path
):
    state = failed_trainer_run
    assert state.is_failed()
    assert "trainer-node-0 failed" in state.message
    assert "no checkpoint at" in state.message  # the worker's own error line
    assert wait_no_processes(root) == []
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["tokenize-dataset"].state_name == "Completed"  # fresh inputs: computed
    assert runs["build-vocab-map"].state_name == "Completed"
    assert runs["stop-services"].state_name == "Completed"
    run = mlflow_run(root, "failing-trainer")  # opened at the start, closed by the failure hook
    assert run.info.status == "FAILED"
    assert run.data.tags["specflow.flow_run_id"] == str(state.state_details.flow_run_id)


def test_killed_producer_run_finishes_and_reuses_cached_data(
    failed_trainer_run, root: Path, config_path: Path
):
    run_id = "killed-producer"
    job_file = root / "out" / "runs" / run_id / "producers" / "producer-0.job.json"
    killed: list[int] = []

    def kill_producer_0_once_samples_flow() -> None:
        from spec_core.streaming.producer import ProducerJob
        from spec_core.transfer.services import ServiceAddresses

        deadline = time.monotonic() + 300
        while not job_file.is_file():
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        services = ServiceAddresses.from_dict(ProducerJob.load(job_file).services)
        queue = services.connect_queue(30)
        queue.plan(30)
        while queue.produced() < 4:  # production is under way: producer-0 holds claims
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        for line in processes_using(job_file.parent):
            pid, cmd = line.split(":", 1)
            if "producer-0.job.json" in cmd:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))

    errors: list[BaseException] = []

    def killer_thread() -> None:
        try:
            kill_producer_0_once_samples_flow()
        except BaseException as exc:  # surfaced in the assertion below
            errors.append(exc)

    killer = threading.Thread(target=killer_thread, daemon=True)
    killer.start()
    state = run_flow(config_path, [f"run.run_id={run_id}", "training.num_epochs=1"])
    killer.join(timeout=5)
    assert killed, f"producer-0 was not running once samples flowed: {errors}"
    assert state.is_completed(), state.message
    summary = asyncio.run(state.aresult())
    assert any("producer-0" in f and "code -9" in f for f in summary["producer_failures"])
    trainer = summary["training"]["summary"]
    assert trainer["steps"] == trainer["total_steps"] == 18  # 36 samples, batch 2, one epoch
    assert trainer["consumed_samples"] == summary["dataset"]["train_samples"] == 36
    assert Path(summary["training"]["last_checkpoint"]).is_dir()
    assert summary["perf"]["training_capacity"] > 0 and summary["perf"]["thru"] > 0
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["tokenize-dataset"].state_name == "Cached"  # same inputs as the first run
    assert runs["build-vocab-map"].state_name == "Cached"
    assert wait_no_processes(root) == []
    run = mlflow_run(root, run_id)  # live curves while training, FINISHED at the end
    assert run.info.status == "FINISHED" and summary["mlflow"]["run_id"] == run.info.run_id
    client = mlflow_client(root)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, 19))
    assert client.get_metric_history(run.info.run_id, "pipeline/samples_produced")
    assert float(run.data.tags["pipeline.thru"]) > 0


def test_changed_max_seq_length_reruns_data_tasks_and_service_start_is_retried(
    failed_trainer_run, root: Path, config_path: Path
):
    state = run_flow(
        config_path,
        [
            "run.run_id=unreachable-services",
            "dataset.max_seq_length=96",
            "transfer.master_address=127.0.0.1:9",
            "transfer.metadata_server=http://127.0.0.1:9/metadata",
            "transfer.queue_address=127.0.0.1:9",
            "transfer.connect_timeout_s=0.5",
        ],
    )
    assert state.is_failed()
    assert "mooncake_master at 127.0.0.1:9 is not reachable" in state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["tokenize-dataset"].state_name == "Completed"  # new key: tokenized again
    assert runs["build-vocab-map"].state_name == "Completed"
    assert runs["start-services"].run_count == 3  # two retries with backoff, then failed
    assert runs["start-services"].state_name == "Failed"


def test_producer_task_retries_service_trouble_but_not_bad_data(
    failed_trainer_run, root: Path, config_path: Path
):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    from flows.pipeline import resolve
    from spec_core.config import config_to_dict
    from tasks.generate import generate_hidden_states

    config = config_to_dict(resolve(str(config_path), ["transfer.connect_timeout_s=0.5"], None))
    nowhere = {
        "run_id": "nowhere",
        "master": "127.0.0.1:9",
        "metadata_url": "http://127.0.0.1:9/metadata",
        "queue": "127.0.0.1:9",
        "byte_budget": 1 << 20,
    }
    train = next((root / "out" / "work" / "tokenized").glob("*/train"))
    task = generate_hidden_states.with_options(retry_delay_seconds=0)

    def run(train_path: str):
        # A task called outside a flow: its logs stay local (no flow run to attach them to).
        with temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
            state = asyncio.run(
                task(config, nowhere, train_path, "producer-x", str(root / "p"), return_state=True)
            )

        async def run_count() -> int:
            async with get_client() as client:
                return (await client.read_task_run(state.state_details.task_run_id)).run_count

        return state, asyncio.run(run_count())

    state, attempts = run(str(train))
    assert state.is_failed() and attempts == 2  # exit 3 (ServiceError): retried once
    assert "key-queue TCPStore at 127.0.0.1:9 is not reachable" in state.message
    state, attempts = run(str(root / "no-such-data"))
    assert state.is_failed() and attempts == 1  # exit 2 (bad data): not retried
    assert "not a prepared dataset" in state.message
    assert wait_no_processes(root) == []
