"""Prefect tasks of the publish stage: thin adapters over ``spec_core.export``, ``evaluate`` and
``registry``. Each takes the resolved config as a dict (``config_to_dict``) plus paths as strings,
and returns a JSON-able dict, so the ``publish`` flow can run them locally or on another pool.

Files land in the run dir: ``<run_dir>/hf`` (the draft), ``<run_dir>/eval`` (acceptance JSON and
plot); MLflow gets the rest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from spec_core.config import config_from_dict
from spec_core.errors import ConfigError
from spec_core.paths import RunPaths

ACCEPTANCE_SETS_KEY = "acceptance-sets"


def _run_paths(cfg: Any, run_dir: str) -> RunPaths:
    """The run's file layout: ``run.output_dir`` from the config, the run id from ``run_dir``
    (the flows pass the run dir, which must sit where ``RunPaths`` puts it)."""
    paths = dataclasses.replace(RunPaths.from_config(cfg), run_id=Path(run_dir).name)
    if paths.run_dir != Path(run_dir).expanduser().resolve():
        raise ConfigError(
            f"run dir {run_dir} is not a run of 'run.output_dir' {paths.output_dir} "
            f"(expected {paths.run_dir})"
        )
    return paths


def _target_dir(cfg: Any) -> Path:
    from spec_core.assets import resolve_target

    return resolve_target(cfg)


@task(name="convert_to_hf", task_run_name="convert-to-hf")
def convert_to_hf(
    config: dict[str, Any],
    checkpoint: str,
    run_dir: str,
    select: str = "latest",
    dataset_hash: Optional[str] = None,
) -> dict[str, Any]:
    """Checkpoint (iter dir, or a run/checkpoints dir -> ``select``) -> ``<run_dir>/hf``."""
    from spec_core.export import export_draft

    cfg = config_from_dict(config)
    paths = _run_paths(cfg, run_dir)
    target_dir = _target_dir(cfg)
    result = export_draft(
        checkpoint,
        paths.hf_dir,
        select=select,
        target_dir=target_dir,
        embedding_key=cfg.target.embedding_key,
        overwrite=True,
        provenance={
            "target_model": cfg.target.path,
            "target_dir": str(target_dir),
            "chat_template": cfg.dataset.chat_template or "tokenizer",
            "dataset_hash": dataset_hash,
            "run_id": paths.run_id,
        },
    )
    get_run_logger().info(
        "exported %s (draft vocab %d, capture %s, %d checks passed)",
        result.out_dir,
        result.draft_vocab_size,
        result.capture_indices,
        len(result.checks),
    )
    return result.to_dict()


@task(name="evaluate_acceptance", task_run_name="evaluate-acceptance")
def evaluate_acceptance(
    config: dict[str, Any],
    hf_dir: str,
    run_dir: str,
    eval_data: Optional[str] = None,
) -> dict[str, Any]:
    """Real speculative decoding of the exported draft on held-out prompts -> ``<run_dir>/eval``.

    ``eval_data`` is the tokenized eval split; None = the cached split of the configured dataset.
    The per-prompt records stay in the JSON file; the returned dict is the summary.
    """
    from spec_core.evaluate import evaluate_draft, summary_line, summary_only

    cfg = config_from_dict(config)
    paths = _run_paths(cfg, run_dir)
    target_dir = _target_dir(cfg)
    if eval_data is None:
        from spec_core.data.tokenize import prepare_run_dataset

        eval_data = str(prepare_run_dataset(cfg, target_dir).eval_path)
    result = evaluate_draft(cfg, hf_dir, target_dir, eval_data, paths.eval_dir)
    get_run_logger().info("acceptance: %s", summary_line(result))
    create_table_artifact(
        key=ACCEPTANCE_SETS_KEY,
        table=result["sets_table"],
        description="tau and alpha_k per prompt set, and their weighted summary",
    )
    return summary_only(result)


@task(name="register_model", task_run_name="register-model")
def register_model(
    config: dict[str, Any],
    run_dir: str,
    hf_dir: str,
    evaluation: dict[str, Any],
    perf: Optional[dict[str, float]] = None,
) -> dict[str, Any]:
    """One MLflow run for the pipeline run, a registered version, the candidate/champion gate."""
    from spec_core.registry import publish_run

    cfg = config_from_dict(config)
    paths = _run_paths(cfg, run_dir)
    result = publish_run(
        cfg,
        paths.run_id,
        hf_dir=hf_dir,
        evaluation=evaluation,
        config_file=paths.config_file,
        metrics_file=paths.metrics_file,
        perf=perf,
    )
    get_run_logger().info(
        "registered %s v%s %s: %s",
        result["model_name"],
        result["version"],
        result["aliases"],
        result["gate_reason"],
    )
    create_markdown_artifact(
        key="mlflow-registration",
        markdown=registration_markdown(result),
        description=f"{result['model_name']} v{result['version']}",
    )
    return result


def registration_markdown(result: dict[str, Any]) -> str:
    """The MLflow run and model version as markdown (links when a UI URL is known)."""

    def link(text: str, url: Optional[str]) -> str:
        return f"[{text}]({url})" if url else f"`{text}`"

    return "\n".join(
        [
            f"### {result['model_name']} v{result['version']}",
            "",
            "| | |",
            "|---|---|",
            f"| MLflow run | {link(result['run_id'], result['run_url'])} |",
            f"| model version | {link(result['model_uri'], result['version_url'])} |",
            f"| aliases | {', '.join(result['aliases'])} |",
            f"| tau | {result['tau']:.3f} |",
            f"| gate | {result['gate_reason']} |",
            f"| tracking URI | `{result['tracking_uri']}` |",
            "",
            f"Browse: `{result['ui_command']}`",
        ]
    )
