"""``train_draft``: one trainer node = one ``torchrun`` (its ranks read the stream source).

torchrun runs in its own process group, started by ``launch_training`` in a worker thread; the task
registers that group so cancellation or a flow hook can stop it by PID, forwards the rank-0 log to
the Prefect run, and (on node 0, where rank 0 writes the metrics) keeps a progress artifact of the
training steps. It returns the trainer's summary plus the trainer-side performance figures
(``spec_core.metrics.TrainerPerf``) so a parent on another machine needs no shared files.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any, Optional

from prefect import get_run_logger, task
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from spec_core.config import config_from_dict
from spec_core.contracts.plan import BatchPlan
from spec_core.metrics import read_records, train_records, trainer_perf
from spec_core.registry import follow_metrics
from spec_core.training.job import TrainJob
from spec_core.training.launcher import launch_training, node_file
from spec_core.training.rendezvous import node_endpoint
from spec_core.utils.procs import ProcessGroup
from tasks.processes import OWNED, LogTail
from tasks.services import flow_run_id

TRAINING_PROGRESS_KEY = "training-progress"
TRAINING_METRICS_KEY = "training-metrics"
TABLE_ROWS = 10


def metrics_rows(records: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """The last train records and the last eval, one row each, newest first (the live table)."""
    rows = []
    for r in records:
        if r.get("split") not in ("train", "eval") or r.get("loss") is None:
            continue
        row = {
            "split": r["split"],
            "step": f"{r['step']}/{total}",
            "loss": round(r["loss"], 4),
            "tau_sim": round(r.get("tau_sim") or 0.0, 3),
        }
        for k, acc in enumerate((r.get("acc_k") or [])[:4]):
            row[f"acc_{k}"] = None if acc is None else round(acc, 3)
        row["tokens/s"] = round(r.get("tokens_per_s") or 0.0)
        rows.append(row)
    train = [r for r in rows if r["split"] == "train"][-TABLE_ROWS:]
    evals = [r for r in rows if r["split"] == "eval"][-1:]
    return list(reversed(train)) + evals


async def publish_metrics_table(records: list[dict[str, Any]], total: int) -> None:
    """A new version of the ``training-metrics`` table artifact (the UI shows the latest)."""
    rows = metrics_rows(records, total)
    if rows:
        await acreate_table_artifact(
            key=TRAINING_METRICS_KEY,
            table=rows,
            description=f"latest training metrics (step {rows[0]['step']})",
        )


@task(name="train-draft")
async def train_draft(
    config: dict[str, Any],
    run_dir: str,
    target_dir: str,
    data: dict[str, Any],
    services: dict[str, Any],
    vocab_map: Optional[str] = None,
    node_rank: int = 0,
    rdzv_endpoint: Optional[str] = None,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Train on the stream until the configured steps/epochs are done; summary + perf."""
    logger = get_run_logger()
    cfg = config_from_dict(config)
    t = cfg.training
    job = TrainJob.create(
        cfg,
        run_dir=run_dir,
        target_dir=target_dir,
        train_data=data["train_path"],
        eval_data=data.get("eval_path"),
        vocab_map=vocab_map,
        source="stream",
        services=services,
        run_id=cfg.run.run_id or Path(run_dir).name,
    )
    if t.nnodes > 1 and not rdzv_endpoint:
        rdzv_endpoint = await asyncio.to_thread(
            node_endpoint, services["queue"], services["run_id"], node_rank, t.rdzv_timeout_s,
            t.rdzv_advertise,
        )  # fmt: skip
        logger.info("node %d: torchrun rendezvous at %s", node_rank, rdzv_endpoint)
    total = BatchPlan.from_config(cfg, int(data["report"]["train_samples"])).total_steps
    owner = flow_run_id()
    groups: list[ProcessGroup] = []

    def started(group: ProcessGroup) -> None:
        groups.append(group)
        OWNED.add(owner, group)

    launch = asyncio.ensure_future(
        asyncio.to_thread(
            launch_training,
            job,
            t.nproc_per_node,
            nnodes=t.nnodes,
            node_rank=node_rank,
            rdzv_endpoint=rdzv_endpoint,
            echo=False,
            on_start=started,
        )
    )
    tail = LogTail(
        node_file(Path(run_dir), "logs/train.log", node_rank), logger, f"[node {node_rank}] "
    )
    progress = None
    if node_rank == 0:
        progress = await acreate_progress_artifact(
            progress=0.0,
            key=TRAINING_PROGRESS_KEY,
            description=f"training steps done of {total}",
        )
    steps_done, table_step = 0, 0
    # node 0 sends rank 0's metrics to the pipeline's live MLflow run (a background thread)
    live = follow_metrics(cfg, job.run_id, job.metrics_file) if node_rank == 0 else None
    try:
        while not launch.done():
            await asyncio.wait({launch}, timeout=poll_s)
            tail.pump()
            if progress is not None:
                records = read_records(job.metrics_file)
                steps = train_records(records)
                if steps and steps[-1]["step"] != steps_done:
                    steps_done = steps[-1]["step"]
                    await aupdate_progress_artifact(
                        artifact_id=progress, progress=min(100.0, 100.0 * steps_done / total)
                    )
                if steps_done - table_step >= max(1, t.print_interval):
                    table_step = steps_done
                    await publish_metrics_table(records, total)
        result = launch.result()
    finally:
        if live is not None:
            live.close()
        for group in groups:
            group.stop()
            OWNED.discard(owner, group)
        if not launch.done():  # cancelled: the group is stopped, let the thread see it exit
            await asyncio.wait({launch}, timeout=30)
        tail.pump(final=True)
    if progress is not None:
        await aupdate_progress_artifact(artifact_id=progress, progress=100.0)
        await publish_metrics_table(read_records(result.metrics_path), total)
    perf = trainer_perf(read_records(result.metrics_path)) if node_rank == 0 else None
    return {
        "node_rank": node_rank,
        "run_dir": str(result.run_dir),
        "metrics_path": str(result.metrics_path),
        "log_path": str(result.log_path),
        "last_checkpoint": result.last_checkpoint,
        "best_checkpoint": result.best_checkpoint,
        "summary": result.summary,
        "perf": dataclasses.asdict(perf) if perf is not None else None,
    }
