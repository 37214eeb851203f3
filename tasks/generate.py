"""``generate_hidden_states``: one producer process, owned by the task that started it.

The producer is ``python -m spec_core.streaming.producer --job <json>`` in its own process group:
the task forwards its log lines to the Prefect run, stops it by PID if the task is cancelled or
fails, and returns its ``ProducerStats``. A producer that dies takes only its unpublished claims with it
(the key queue hands them to the others), so one failed producer does not fail the pipeline: the
parent decides that. A producer that stopped on service trouble (exit code ``SERVICE_EXIT``) is
retried with backoff; bad config or data is not.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Optional

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from spec_core.config import config_from_dict
from spec_core.streaming.producer import ProducerJob, producer_argv, producer_outcome
from spec_core.transfer.mooncake import spawn
from spec_core.transfer.services import ServiceAddresses
from tasks.processes import OWNED, LogTail
from tasks.services import flow_run_id, transient_failure


@task(
    name="generate-hidden-states",
    retries=1,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=transient_failure,
)
async def generate_hidden_states(
    config: dict[str, Any],
    services: dict[str, Any],
    train_path: str,
    producer_id: str,
    work_dir: str,
    target_dir: Optional[str] = None,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """Run one producer until every sample is trained (or a stop is requested); its stats."""
    logger = get_run_logger()
    cfg = config_from_dict(config)
    addresses = ServiceAddresses.from_dict(services)
    out = Path(work_dir)
    stats_path = out / f"{producer_id}.stats.json"
    stats_path.unlink(missing_ok=True)
    job = ProducerJob.create(
        cfg,
        addresses,
        train_data=train_path,
        producer_id=producer_id,
        target_dir=target_dir,
        stats_out=str(stats_path),
    )
    job_path = job.save(out / f"{producer_id}.job.json")
    argv = producer_argv(cfg, job_path)
    proc = spawn(producer_id, argv, out / "logs")
    owner = flow_run_id()
    OWNED.add(owner, proc)
    tail = LogTail(proc.log_path, logger, f"[{producer_id}] ")
    logger.info("%s started (pid %d), log %s", producer_id, proc.pid, proc.log_path)
    try:
        while proc.alive():
            tail.pump()
            await asyncio.sleep(poll_s)
    finally:
        proc.stop()
        OWNED.discard(owner, proc)
        tail.pump(final=True)
    stats = producer_outcome(proc, stats_path)
    logger.info(
        "%s: %d samples in %.1fs (engine %.1fs, put %.1fs, budget wait %.1fs)",
        producer_id,
        stats["samples"],
        stats["wall_s"],
        stats["engine_s"],
        stats["put_s"],
        stats["budget_wait_s"],
    )
    return stats
