"""``publish``: checkpoint -> HF draft dir -> measured acceptance -> MLflow registration.

Deployed on the ``cpu`` pool (evaluation wants ``gpu-training`` on a cluster: override the work
pool of the deployment). Each step is a task in ``tasks/publish.py``; evaluation and registration
follow ``evaluation.enabled`` and ``registry.enabled`` (registration needs an evaluation: the
champion gate compares acceptance).
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow, get_run_logger

from spec_core.config import config_from_dict
from tasks.publish import convert_to_hf, evaluate_acceptance, register_model


@flow(name="publish", flow_run_name="publish", persist_result=True, result_serializer="json")
def publish(
    config: dict[str, Any],
    run_dir: str,
    checkpoint: str,
    eval_data: Optional[str] = None,
    dataset_hash: Optional[str] = None,
    perf: Optional[dict[str, float]] = None,
) -> dict[str, Any]:
    """Convert, evaluate and register the draft; returns what each step returned (or None)."""
    logger = get_run_logger()
    cfg = config_from_dict(config)
    export = convert_to_hf(config, checkpoint, run_dir, dataset_hash=dataset_hash)
    evaluation = None
    if cfg.evaluation.enabled:
        evaluation = evaluate_acceptance(config, export["hf_dir"], run_dir, eval_data)
    registry = None
    if cfg.registry.enabled:
        if evaluation is None:
            logger.warning("registry.enabled needs evaluation.enabled: not registering")
        else:
            registry = register_model(config, run_dir, export["hf_dir"], evaluation, perf)
    return {"export": export, "evaluation": evaluation, "registry": registry}
