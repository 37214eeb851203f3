"""MLflow registry on a real sqlite store: one run per pipeline run, a registered version with
tags, the candidate/champion gate on real evaluations, and fetching by alias.

The evaluations are real speculative decoding on the bigram target of ``test_evaluate`` (see its
docstring): a random-weight draft gets tau ~1, the hand-built draft tau = 2, so the gate decides
on measured numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluate import cycle, draft_for, export_model, lens_draft, make_bigram_target
from test_evaluate import random_prompts as prompts_for

from spec_core.config import load_config
from spec_core.errors import ConfigError
from spec_core.evaluate import evaluate_prompts
from spec_core.registry import fetch, parse_model_spec, publish_run, settings_for
from spec_core.training.metrics_log import MetricsWriter

NAME = "bigram-eagle3"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def published(tmp_path_factory, smollm2_dir):
    """Target, drafts, evaluations and a config whose MLflow store lives in a temp dir."""
    root = tmp_path_factory.mktemp("registry")
    perm = cycle()
    target = make_bigram_target(root / "target", smollm2_dir, perm)
    drafts = {
        "random": export_model(draft_for(target), root / "random"),
        "trained": export_model(lens_draft(target, perm[perm]), root / "trained"),
    }
    cfg = load_config(
        None,
        [
            f"run.output_dir={root / 'out'}",
            f"registry.model_name={NAME}",
            f"target.path={target}",
            "evaluation.max_new_tokens=8",
        ],
    )
    prompts = prompts_for(2)
    evals = {
        name: evaluate_prompts(cfg.evaluation, hf, target, prompts) for name, hf in drafts.items()
    }
    other = load_config(None, ["evaluation.max_new_tokens=6"]).evaluation
    evals["trained-other-set"] = evaluate_prompts(other, drafts["trained"], target, prompts)
    return {"root": root, "cfg": cfg, "drafts": drafts, "evals": evals}


def client_for(cfg):
    from mlflow import MlflowClient

    uri = settings_for(cfg).tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_champion_gate_on_measured_tau(published, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # MLflow must not write ./mlruns or ./mlflow.db
    cfg, drafts, evals = published["cfg"], published["drafts"], published["evals"]
    assert evals["random"]["tau"] < 1.1 and evals["trained"]["tau"] == pytest.approx(2.0)
    assert evals["trained"]["eval_set_hash"] == evals["random"]["eval_set_hash"]
    assert evals["trained-other-set"]["eval_set_hash"] != evals["trained"]["eval_set_hash"]

    first = publish_run(cfg, "run-weak", hf_dir=drafts["random"], evaluation=evals["random"])
    assert first["version"] == "1" and first["champion"] and "no champion" in first["gate_reason"]
    better = publish_run(cfg, "run-strong", hf_dir=drafts["trained"], evaluation=evals["trained"])
    assert better["version"] == "2" and better["champion"]
    assert better["previous_champion"] == "1" and "beats" in better["gate_reason"]
    worse = publish_run(cfg, "run-weak-again", hf_dir=drafts["random"], evaluation=evals["random"])
    assert worse["version"] == "3" and not worse["champion"]
    assert worse["aliases"] == ["candidate"] and "does not beat" in worse["gate_reason"]
    elsewhere = publish_run(
        cfg, "run-other-set", hf_dir=drafts["trained"], evaluation=evals["trained-other-set"]
    )
    assert not elsewhere["champion"] and "not comparable" in elsewhere["gate_reason"]
    broken = dict(evals["trained"], lossless=False, tau=3.5)
    lossy = publish_run(cfg, "run-lossy", hf_dir=drafts["trained"], evaluation=broken)
    assert not lossy["champion"] and "not lossless" in lossy["gate_reason"]

    client = client_for(cfg)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "5"
    v3 = client.get_model_version(NAME, "3")
    assert v3.tags["gate_promoted"] == "false" and "does not beat" in v3.tags["gate"]
    # A retried publish of the same pipeline run reuses its MLflow run and version.
    again = publish_run(cfg, "run-strong", hf_dir=drafts["trained"], evaluation=evals["trained"])
    assert again["version"] == "2" and again["run_id"] == better["run_id"]
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 5
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_gate_says_what_it_compared(published, monkeypatch, tmp_path):
    """Same sets and engine: the reason names them; other sets or another engine: the champion
    keeps its alias and the reason says which of the two differs."""
    from spec_core.evaluate import PromptSet

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'out'}",
            "registry.model_name=gated",
            f"target.path={published['cfg'].target.path}",
            "evaluation.max_new_tokens=8",
        ],
    )
    target, drafts = published["cfg"].target.path, published["drafts"]
    sets = [
        PromptSet(prompts_for(2, seed=3), {}, 2, name="chat"),
        PromptSet(prompts_for(1, seed=4), {}, 1, name="code", weight=0.5),
    ]
    two = {
        name: evaluate_prompts(cfg.evaluation, drafts[name], target, sets)
        for name in ("random", "trained")
    }
    assert set(two["trained"]["sets"]) == {"chat", "code"}
    first = publish_run(cfg, "g-random", hf_dir=drafts["random"], evaluation=two["random"])
    assert (
        first["champion"]
        and "chat(2 prompts, weight 1), code(1 prompts, weight 0.5)" in (first["gate_reason"])
    )
    better = publish_run(cfg, "g-trained", hf_dir=drafts["trained"], evaluation=two["trained"])
    assert better["champion"] and better["gate_reason"].startswith("weighted tau 2.0000 beats")
    assert (
        "both on sets [chat(2 prompts" in better["gate_reason"]
        and "engine hf" in (better["gate_reason"])
    )
    one_set = publish_run(
        cfg, "g-one-set", hf_dir=drafts["trained"], evaluation=published["evals"]["trained"]
    )
    assert not one_set["champion"] and "cannot compare with champion v2" in one_set["gate_reason"]
    assert "the prompt sets differ" in one_set["gate_reason"]
    assert "engines differ" not in one_set["gate_reason"]
    # The champion's tags name its sets and engine; one measured by another engine is refused.
    client = client_for(cfg)
    tags = client.get_model_version("gated", "2").tags
    assert tags["eval_engine"] == "hf" and tags["prompt_sets"].startswith("chat(2 prompts")
    assert json.loads(tags["tau_per_set"]) == {"chat": 2.0, "code": 2.0}
    client.set_model_version_tag("gated", "2", "eval_engine", "vllm")
    client.set_model_version_tag("gated", "2", "eval_set_hash", "measured-by-vllm")
    again = publish_run(cfg, "g-again", hf_dir=drafts["trained"], evaluation=two["trained"])
    assert not again["champion"] and "the engines differ" in again["gate_reason"]
    assert "prompt sets differ" not in again["gate_reason"]
    assert str(client.get_model_version_by_alias("gated", "champion").version) == "2"
    # one value per run: tags, not single-point charts (the per-set table is an artifact)
    tags = client.get_run(better["run_id"]).data.tags
    assert float(tags["acceptance.code.tau"]) == pytest.approx(2.0)
    assert float(tags["acceptance.chat.alpha_1"]) == pytest.approx(1.0)
    depth = client.get_metric_history(better["run_id"], "acceptance/tau_by_depth")
    assert [m.step for m in depth] == list(range(1, cfg.evaluation.sweep_depth + 1))


def test_run_holds_params_curves_perf_artifacts_and_tags(published, tmp_path):
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'out'}",
            "registry.model_name=curves",
            f"target.path={published['cfg'].target.path}",
        ],
    )
    metrics = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(metrics)
    for step in (1, 2, 3):
        writer.write(
            {
                "split": "train",
                "step": step,
                "loss": 3.0 / step,
                "lr": 1e-3,
                "acc_k": [0.1 * step, 0.05 * step],
                "tau_sim": 0.2 * step,
                "skipped": False,
            }
        )
    writer.write({"split": "eval", "step": 3, "loss": 1.5, "acc_k": [0.4, 0.2], "tau_sim": 0.6})
    writer.close()
    config_file = tmp_path / "config.yaml"
    config_file.write_text("run: {name: curves}\n")
    evaluation = published["evals"]["trained"]
    out = publish_run(
        cfg,
        "curves-run",
        hf_dir=published["drafts"]["trained"],
        evaluation=evaluation,
        config_file=config_file,
        metrics_file=metrics,
        perf={"train_tokens_per_s": 123.0, "pipeline_efficiency": 0.97},
    )
    client = client_for(cfg)
    run = client.get_run(out["run_id"])
    assert run.data.params["training.learning_rate"] == str(cfg.training.learning_rate)
    assert run.data.params["draft.capture_indices"] == "null"
    assert run.data.tags["specflow.run_id"] == "curves-run" and run.info.status == "FINISHED"
    history = client.get_metric_history(out["run_id"], "train/acc_k_1")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.05), (2, 0.1), (3, 0.15)]
    assert [m.step for m in client.get_metric_history(out["run_id"], "train/loss")] == [1, 2, 3]
    assert run.data.metrics["val/tau_sim"] == pytest.approx(0.6)
    # one value per run: tags, not single-point curves
    assert float(run.data.tags["acceptance.tau"]) == pytest.approx(evaluation["tau"], rel=1e-5)
    assert float(run.data.tags["acceptance.alpha_1"]) == pytest.approx(evaluation["alpha"][0])
    assert float(run.data.tags["perf.pipeline_efficiency"]) == pytest.approx(0.97)
    single = [k for k in run.data.metrics if k.startswith(("acceptance/", "perf/"))]
    assert all(k.endswith("/tau_by_depth") for k in single)  # the depth sweep is a curve (step=k)
    assert {a.path for a in client.list_artifacts(out["run_id"], "plots")} == {
        "plots/loss_curves.png",
        "plots/per_position_accuracy.png",
    }
    version = client.get_model_version("curves", out["version"])
    assert version.run_id == out["run_id"] and version.source.startswith(f"runs:/{out['run_id']}")
    # a second publish of the same run (a retried task) adds no duplicate points
    publish_run(
        cfg,
        "curves-run",
        hf_dir=published["drafts"]["trained"],
        evaluation=evaluation,
        metrics_file=metrics,
    )
    assert [m.step for m in client.get_metric_history(out["run_id"], "train/loss")] == [1, 2, 3]
    names = {a.path for a in client.list_artifacts(out["run_id"], "draft")}
    assert {"draft/config.json", "draft/model.safetensors"} <= names
    assert {a.path for a in client.list_artifacts(out["run_id"], "run")} == {
        "run/config.yaml",
        "run/metrics.jsonl",
    }
    assert "eval/acceptance.json" in {a.path for a in client.list_artifacts(out["run_id"], "eval")}

    tags = client.get_model_version("curves", out["version"]).tags
    assert tags["target_model"] == cfg.target.path and tags["algorithm"] == "eagle3"
    assert json.loads(tags["capture_indices"]) == [1, 2, 3]
    assert tags["draft_vocab_size"] == "49152" and float(tags["tau"]) == pytest.approx(2.0)
    assert tags["eval_set_hash"] == evaluation["eval_set_hash"] and "dataset_hash" in tags
    assert out["model_uri"] == f"models:/curves/{out['version']}"


def test_fetch_by_alias_returns_the_exported_dir(published, tmp_path):
    import mlflow

    cfg, trained = published["cfg"], published["drafts"]["trained"]
    publish_run(cfg, "run-strong", hf_dir=trained, evaluation=published["evals"]["trained"])
    local = fetch(f"{NAME}@champion", tmp_path / "a", config=cfg)
    for name in ("config.json", "model.safetensors"):
        assert (local / name).read_bytes() == (trained / name).read_bytes()
    uri = settings_for(cfg).tracking_uri
    by_version = fetch(f"{NAME}/1", tmp_path / "b", tracking_uri=uri)
    assert (by_version / "config.json").is_file()
    # The plain MLflow path from the README.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        plain = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{NAME}@champion", dst_path=str(tmp_path / "c")
            )
        )
    finally:
        mlflow.set_tracking_uri(previous)
    assert (plain / "model.safetensors").read_bytes() == (
        trained / "model.safetensors"
    ).read_bytes()

    with pytest.raises(ConfigError, match="cannot fetch") as err:
        fetch(f"{NAME}@nobody", tmp_path / "d", config=cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="NAME@ALIAS"):
        parse_model_spec("just-a-name")
    assert parse_model_spec("models:/m@champion") == ("m", "champion", None)
    assert parse_model_spec("m/3") == ("m", None, "3")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server + database for this module (not the user's ~/.prefect)."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=180):
            yield


@pytest.mark.slow
def test_publish_tasks_in_the_publish_flow(published, prefect_server, asset_cache, tmp_path):
    """convert_to_hf -> evaluate_acceptance -> register_model as Prefect tasks, on the trained
    draft's checkpoint and held-out chitchat prompts (tau = 2 by construction, see module doc)."""
    from prefect.artifacts import Artifact

    from flows.publish import publish
    from spec_core.config import config_to_dict
    from spec_core.data.tokenize import prepare_dataset

    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'out'}",
            "registry.model_name=flowed",
            f"target.path={published['cfg'].target.path}",
            "evaluation.num_prompts=2",
            "evaluation.max_new_tokens=8",
            "evaluation.prompts=[{source: held_out}, {source: humaneval, num_prompts: 1}]",
            "dataset.max_conversations=16",
            "dataset.eval_conversations=3",
            "dataset.num_proc=1",
            "dataset.max_seq_length=256",
        ],
    )
    data = prepare_dataset(
        cfg.dataset, Path(cfg.target.path), tmp_path / "work", asset_cache, progress=False
    )
    run_dir = tmp_path / "out" / "runs" / "flow-run"
    checkpoint = published["root"] / "trained" / "checkpoints"
    out = publish(
        config_to_dict(cfg),
        run_dir=str(run_dir),
        checkpoint=str(checkpoint),
        eval_data=str(data.eval_path),
        dataset_hash=data.cache_key,
    )

    assert (
        out["export"]["hf_dir"] == str(run_dir / "hf")
        and (run_dir / "hf" / "config.json").is_file()
    )
    assert out["export"]["provenance"]["dataset_hash"] == data.cache_key
    evaluation = out["evaluation"]
    assert evaluation["lossless"] and evaluation["tau"] == pytest.approx(2.0)
    assert evaluation["dataset_hash"] == data.cache_key and "prompts" not in evaluation
    assert set(evaluation["sets"]) == {"held_out", "humaneval"}
    assert all("prompts" not in r for r in evaluation["sets"].values())
    assert evaluation["sets"]["humaneval"]["tau"] == pytest.approx(2.0)
    for name in ("acceptance.json", "acceptance.png", "depth_sweep.png", "acceptance_sets.json"):
        assert (run_dir / "eval" / name).is_file(), name
    sets_table = Artifact.get("acceptance-sets")
    assert sets_table is not None and "humaneval" in sets_table.data
    registry = out["registry"]
    assert (
        registry["version"] == "1"
        and registry["champion"]
        and registry["tau"] == pytest.approx(2.0)
    )
    tags = client_for(cfg).get_model_version("flowed", "1").tags
    assert tags["dataset_hash"] == data.cache_key and tags["specflow.run_id"] == "flow-run"
    logged = {a.path for a in client_for(cfg).list_artifacts(registry["run_id"], "eval")}
    assert {"eval/acceptance_sets.json", "eval/depth_sweep.png"} <= logged
    artifact = Artifact.get("mlflow-registration")
    assert artifact is not None and "flowed v1" in artifact.data and "champion" in artifact.data
