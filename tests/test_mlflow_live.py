"""The pipeline's MLflow run while it is live, on a real sqlite store: opened at the start with the
redacted config and the classic model-training experiment kind, curves followed from the metrics
file by a background thread (buffered while the server is away, continued on resume, never sent
twice), closed with the run's outcome."""

from __future__ import annotations

import os
import time
from pathlib import Path

from spec_core import registry
from spec_core.config import load_config
from spec_core.paths import RunPaths
from spec_core.training.metrics_log import MetricsWriter


def config(tmp_path: Path, *extra: str):
    # a credential the way the README says to pass one: read from the environment where it is used
    os.environ["SPECFLOW_TEST_LLM_ENDPOINT"] = "http://alice:s3cret@llm.internal:8000/v1"
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'out'}",
            "dataset.regenerate.endpoint=${oc.env:SPECFLOW_TEST_LLM_ENDPOINT}",
            *extra,
        ],
    )


def client_for(cfg):
    from mlflow import MlflowClient

    uri = registry.settings_for(cfg).tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def write_steps(path: Path, steps: range) -> None:
    writer = MetricsWriter(path)
    for step in steps:
        writer.write(
            {"split": "train", "step": step, "loss": 5.0 / step, "acc_k": [0.1, 0.05], "lr": 1e-3}
        )
    writer.close()


def history(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_open_run_documents_the_run_at_start_and_resume_finds_it_again(tmp_path):
    cfg = config(tmp_path)
    first = registry.open_run(cfg, "live-1", flow_run_id="flow-a")
    client = client_for(cfg)
    run = client.get_run(first["run_id"])
    assert run.info.status == "RUNNING"
    experiment = client.get_experiment(first["experiment_id"])
    assert experiment.tags[registry.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert run.data.params["training.learning_rate"] == str(cfg.training.learning_rate)
    endpoint = run.data.params["dataset.regenerate.endpoint"]
    assert "s3cret" not in endpoint and endpoint == "${oc.env:SPECFLOW_TEST_LLM_ENDPOINT}"
    text = client.download_artifacts(first["run_id"], "run/config.yaml", str(tmp_path))
    assert "s3cret" not in Path(text).read_text() and "learning_rate" in Path(text).read_text()
    state = RunPaths(Path(cfg.run.output_dir), "live-1").mlflow_run_file
    assert registry.live_run_id(cfg, "live-1") == first["run_id"] and state.is_file()

    # the pipeline fails, then a resumed pipeline (same run id) continues the same MLflow run
    assert registry.close_runs_of_flow_run(cfg, "flow-a", "FAILED") == [first["run_id"]]
    assert client.get_run(first["run_id"]).info.status == "FAILED"
    again = registry.open_run(cfg, "live-1", flow_run_id="flow-b")
    assert again["run_id"] == first["run_id"]
    assert client.get_run(first["run_id"]).info.status == "RUNNING"
    assert registry.close_runs_of_flow_run(cfg, "flow-b", "KILLED") == [first["run_id"]]
    assert client.get_run(first["run_id"]).info.status == "KILLED"
    assert registry.open_run(cfg, "live-2")["run_id"] != first["run_id"]


def test_follower_streams_curves_in_the_background_and_continues_after_resume(tmp_path):
    cfg = config(tmp_path)
    opened = registry.open_run(cfg, "live")
    client = client_for(cfg)
    metrics = RunPaths(Path(cfg.run.output_dir), "live").metrics_file
    follower = registry.follow_metrics(cfg, "live", metrics, interval_s=0.2)
    try:
        write_steps(metrics, range(1, 6))
        follower.log({"pipeline/samples_produced": 12}, 3)
        deadline = time.monotonic() + 60
        while len(history(client, opened["run_id"], "train/loss")) < 5:
            assert time.monotonic() < deadline, "the follower sent nothing"
            time.sleep(0.2)
    finally:
        follower.close()
    assert history(client, opened["run_id"], "train/acc_k_1") == [1, 2, 3, 4, 5]
    assert history(client, opened["run_id"], "pipeline/samples_produced") == [3]

    # resume: more steps in the same file, a new follower sends only those
    registry.open_run(cfg, "live")
    write_steps(metrics, range(6, 9))
    resumed = registry.MetricsFollower(cfg, "live", opened["run_id"], metrics)
    assert resumed.flush_once(strict=True) == 3 * 4  # loss, lr, acc_k_0, acc_k_1 per record
    assert resumed.flush_once(strict=True) == 0
    assert history(client, opened["run_id"], "train/loss") == list(range(1, 9))

    registry.close_run(cfg, "live", "FINISHED", {"pipeline/thru": 1.5})
    run = client.get_run(opened["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.thru"] == "1.5"
    assert "pipeline/thru" not in run.data.metrics  # one value per run: not a curve


def test_points_wait_while_the_tracking_server_is_away(tmp_path, monkeypatch):
    from spec_core.utils.net import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = config(tmp_path)
    opened = registry.open_run(cfg, "away")
    metrics = RunPaths(Path(cfg.run.output_dir), "away").metrics_file
    follower = registry.MetricsFollower(cfg, "away", opened["run_id"], metrics)
    reachable = follower.settings
    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    follower.settings = registry.TrackingSettings(dead, reachable.artifact_location, None)
    write_steps(metrics, range(1, 4))
    follower.log({"pipeline/samples_produced": 7}, 1)
    assert follower.flush_once() == 0 and follower.failures == 1  # away: nothing lost
    follower.settings, follower._client = reachable, None  # the server is back
    assert follower.flush_once() == 3 * 4 + 1
    client = client_for(cfg)
    assert history(client, opened["run_id"], "train/loss") == [1, 2, 3]
    assert history(client, opened["run_id"], "pipeline/samples_produced") == [1]
