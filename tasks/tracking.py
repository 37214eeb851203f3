"""The pipeline's MLflow run, live: opened when the pipeline starts, followed while it runs, closed
with the run's outcome (``spec_core.registry``: open_run, follow_metrics, close_run).

The parent opens it (params and the redacted config first), the training task on node 0 follows
the trainer's metrics file into it from a background thread, the parent adds the pipeline's own
figures and closes it FINISHED; the flow's failure, cancellation and crash hooks close it FAILED or
KILLED. A tracking server that is down when the pipeline starts is a warning, not a failure: the
run trains untracked and publish registers it as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

from prefect import get_run_logger, task

from spec_core import registry
from spec_core.config import Config, config_from_dict
from spec_core.errors import ServiceError

log = logging.getLogger(__name__)


@task(name="open-mlflow-run")
def open_mlflow_run(
    config: dict[str, Any], run_id: str, flow_run_id: Optional[str] = None
) -> Optional[dict[str, Any]]:
    """The live MLflow run of this pipeline run (found again on resume); None if not tracked."""
    cfg = config_from_dict(config)
    if not cfg.registry.enabled:
        return None
    logger = get_run_logger()
    try:
        opened = registry.open_run(cfg, run_id, flow_run_id)
    except ServiceError as exc:
        logger.warning("MLflow run not opened, training untracked until publish: %s", exc)
        return None
    logger.info("MLflow run %s: %s", opened["run_id"], opened["run_url"] or opened["tracking_uri"])
    return opened


def close_mlflow_run(cfg: Config, run_id: str, scalars: dict[str, Any]) -> Optional[str]:
    """FINISHED, with the pipeline's one-value figures (throughput, waits) as tags."""
    if not cfg.registry.enabled:
        return None
    numbers = {f"pipeline/{k}": float(v) for k, v in scalars.items() if isinstance(v, (int, float))}
    return registry.close_run(cfg, run_id, "FINISHED", numbers)


def close_on_failure(
    resolve: Callable[[dict[str, Any]], Config], flow_run: Any, state: Any
) -> None:
    """For a flow's failure, cancellation and crash hooks: the MLflow runs this flow run opened
    end FAILED, or KILLED when it was cancelled. A hook has the flow run's parameters, not the
    resolved config (``resolve`` turns them into one), so the runs are found by the flow run id
    they were tagged with."""
    try:
        cfg = resolve(dict(flow_run.parameters or {}))
        if not cfg.registry.enabled:
            return
        status = "KILLED" if state.is_cancelled() or state.is_cancelling() else "FAILED"
        closed = registry.close_runs_of_flow_run(cfg, str(flow_run.id), status)
        log.info("MLflow runs %s ended %s", closed, status)
    except Exception as exc:  # a hook must not hide the run's own failure
        log.warning("could not close the MLflow run: %s", exc)
