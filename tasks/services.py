"""Streaming services (Mooncake master + metadata server + segment holder + key queue) as tasks.

The parent flow run owns them: ``start_services`` keeps the handle in this process (the key queue's
TCPStore master lives in it) and returns only the JSON-able addresses that children receive;
``stop_services`` stops them by PID. A start that fails because a service did not come up is
retried with backoff; a bad config is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.context import get_run_context
from prefect.tasks import exponential_backoff

from spec_core.config import config_from_dict
from spec_core.contracts.plan import BatchPlan
from spec_core.errors import ConfigError, ServiceError
from spec_core.transfer.services import ServicesHandle
from spec_core.transfer.services import start_services as start_streaming_services
from tasks.processes import OWNED

_RUNNING: dict[str, ServicesHandle] = {}  # streaming run id -> handle, in the owning process


def transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry service trouble (a port taken, a slow start, the store full), never bad input."""
    exc = state.data
    return isinstance(exc, ServiceError) and not isinstance(exc, ConfigError)


def flow_run_id() -> str:
    context = get_run_context()
    flow_run = getattr(context, "flow_run", None)
    if flow_run is None:  # task context: the run it belongs to
        return str(context.task_run.flow_run_id)
    return str(flow_run.id)


@task(
    name="start-services",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=transient_failure,
)
def start_services(config: dict[str, Any], run_dir: str, num_train: int) -> dict[str, Any]:
    """Start (or attach to) the services for this run; returns ``ServiceAddresses.to_dict()``."""
    cfg = config_from_dict(config)
    run_id = cfg.run.run_id
    assert run_id, "the parent flow fixes run.run_id before starting services"
    handle = start_streaming_services(
        cfg.transfer,
        run_id,
        Path(run_dir) / "logs" / "services",
        plan=BatchPlan.from_config(cfg, num_train).data_plan(),
        open_gate=not cfg.training.resume_from,
    )
    _RUNNING[run_id] = handle
    OWNED.add(flow_run_id(), handle)
    get_run_logger().info("streaming services up: %s", handle.addresses.to_dict())
    return handle.addresses.to_dict()


@task(name="stop-services")
def stop_services(run_id: str) -> bool:
    """Stop the services this process started for ``run_id`` (no-op when none)."""
    handle = _RUNNING.pop(run_id, None)
    if handle is None:
        return False
    handle.stop()
    return True
