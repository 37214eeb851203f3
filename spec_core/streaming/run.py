"""Stream-and-train on one machine in plain Python: services, N producer processes and the trainer.

``run_streaming`` is what tests and benchmarks drive (the Prefect pipeline's stage is
``flows/pipeline.py`` with ``flows/children.py``). Both hand their children to the same supervisor
(``spec_core.streaming.supervisor.run_concurrently``): here each producer is a process and the
trainer is ``launch`` run in a thread. Whether training succeeds, fails or is interrupted, every
process started here (producers, torchrun, services) is stopped by PID before it returns.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from spec_core.config import Config
from spec_core.contracts.plan import BatchPlan
from spec_core.streaming.producer import ProducerJob, producer_argv, producer_outcome
from spec_core.streaming.supervisor import Child, Outcome, coroutine_child, run_concurrently
from spec_core.training.job import TrainJob
from spec_core.transfer.mooncake import ManagedProcess, spawn
from spec_core.transfer.queue import KeyQueue
from spec_core.transfer.services import ServiceAddresses, start_services

log = logging.getLogger(__name__)

OnStart = Callable[[subprocess.Popen], None]
Launch = Callable[[TrainJob, OnStart], Any]  # runs training; hands its process to on_start


@dataclass
class StreamingResult:
    train_result: Any
    producer_stats: list[dict[str, Any]]  # of the producers that finished, in producer order
    counts: dict[str, int]  # skipped / dropped / reclaimed / missing / budget_waits (key queue)
    acked: list[tuple[int, str]]  # (epoch, sample_id) of every trained sample, in ack order
    wall_s: float
    producer_exit_codes: list[Optional[int]] = field(default_factory=list)
    producer_failures: list[str] = field(default_factory=list)


def stats_path(work_dir: Path, producer_id: str) -> Path:
    return work_dir / f"{producer_id}.stats.json"


def start_producers(
    cfg: Config,
    addresses: ServiceAddresses,
    train_data: str | Path,
    count: int,
    work_dir: Path,
    target_dir: Optional[str | Path] = None,
) -> list[ManagedProcess]:
    """``count`` producer processes (``python -m spec_core.streaming.producer``), logs in
    work_dir."""
    procs = []
    for i in range(count):
        job = ProducerJob.create(
            cfg,
            addresses,
            train_data=str(train_data),
            producer_id=f"producer-{i}",
            target_dir=str(target_dir) if target_dir else None,
            stats_out=str(stats_path(work_dir, f"producer-{i}")),
        )
        path = job.save(work_dir / f"producer-{i}.job.json")
        procs.append(spawn(f"producer-{i}", producer_argv(cfg, path), work_dir))
    return procs


def default_launch(job: TrainJob, on_start: OnStart) -> Any:
    from spec_core.training.launcher import launch_training

    return launch_training(job, job.cfg.training.nproc_per_node, on_start=on_start)


def producer_child(proc: ManagedProcess, work_dir: Path, poll_s: float = 0.2) -> Child:
    """A producer process as a supervised child: its stats, or its error once it exits."""

    async def watch() -> dict[str, Any]:
        while proc.alive():
            await asyncio.sleep(poll_s)
        return producer_outcome(proc, stats_path(work_dir, proc.name))

    async def stop() -> None:
        await asyncio.to_thread(proc.stop)

    return coroutine_child(proc.name, watch(), stop)


def trainer_child(
    launch: Launch, job: TrainJob, started: list[ManagedProcess], grace_s: float = 30.0
) -> Child:
    """``launch(job)`` in a thread as a supervised child. The thread cannot be cancelled, so
    cancelling stops the training process group it reported, then gives the thread ``grace_s``
    to see it exit."""
    log_path = Path(job.run_dir) / "logs" / "train.log"

    def on_start(popen: subprocess.Popen) -> None:
        started.append(ManagedProcess("trainer", popen, log_path))

    thread = asyncio.ensure_future(asyncio.to_thread(launch, job, on_start))

    async def stop() -> None:
        for proc in started:
            await asyncio.to_thread(proc.stop)
        await asyncio.wait({thread}, timeout=grace_s)

    return coroutine_child("trainer", thread, stop)


async def _supervise(
    producers: list[ManagedProcess],
    launch: Launch,
    job: TrainJob,
    queue: KeyQueue,
    work_dir: Path,
    trainer_procs: list[ManagedProcess],
    producer_timeout_s: float,
) -> Outcome:
    return await run_concurrently(
        [producer_child(p, work_dir) for p in producers],
        [trainer_child(launch, job, trainer_procs)],
        queue,
        log,
        poll_s=0.5,
        producer_grace_s=producer_timeout_s,
    )


def run_streaming(
    cfg: Config,
    train_data: str | Path,
    run_dir: str | Path,
    *,
    run_id: Optional[str] = None,
    target_dir: Optional[str | Path] = None,
    eval_data: Optional[str] = None,
    vocab_map: Optional[str] = None,
    num_producers: Optional[int] = None,
    launch: Optional[Launch] = None,
    producer_timeout_s: float = 120.0,
    on_start: Optional[Callable[[list[ManagedProcess], ServiceAddresses], None]] = None,
) -> StreamingResult:
    """Produce and train at the same time; returns the trainer's result and producer stats.

    ``launch(job, on_start)`` runs training (default: torchrun with
    ``training.nproc_per_node`` ranks) and must hand its process to ``on_start``, so it can be
    stopped by PID. ``on_start`` here sees the producer processes and service addresses once they
    are up (to record PIDs, or for a test to kill a producer)."""
    import datasets

    start = time.monotonic()
    run_dir = Path(run_dir)
    work_dir = run_dir / "streaming"
    work_dir.mkdir(parents=True, exist_ok=True)
    run_id = run_id or cfg.run.run_id or run_dir.name
    num_train = len(datasets.load_from_disk(str(train_data)))
    plan = BatchPlan.from_config(cfg, num_train).data_plan()
    resume = bool(cfg.training.resume_from)
    count = num_producers or cfg.inference.replicas
    with start_services(
        cfg.transfer, run_id, work_dir / "logs", plan=plan, open_gate=not resume
    ) as services:
        addresses = services.addresses
        queue = addresses.connect_queue()
        producers: list[ManagedProcess] = []
        trainer_procs: list[ManagedProcess] = []
        try:
            producers = start_producers(cfg, addresses, train_data, count, work_dir, target_dir)
            if on_start is not None:
                on_start(producers, addresses)
            job = TrainJob.create(
                cfg,
                run_dir=str(run_dir),
                target_dir=str(target_dir) if target_dir else "",
                train_data=str(train_data),
                eval_data=eval_data,
                vocab_map=vocab_map,
                source="stream",
                services=addresses.to_dict(),
                run_id=run_id,
            )
            outcome = asyncio.run(
                _supervise(
                    producers,
                    launch or default_launch,
                    job,
                    queue,
                    work_dir,
                    trainer_procs,
                    producer_timeout_s,
                )
            )
        finally:
            for proc in producers + trainer_procs:
                proc.stop()
        counts = queue.counts()
        acked = queue.acked()
    return StreamingResult(
        train_result=outcome.trainers[0],
        producer_stats=outcome.producers,
        counts=counts,
        acked=acked,
        wall_s=time.monotonic() - start,
        producer_exit_codes=[p.popen.returncode for p in producers],
        producer_failures=outcome.producer_failures,
    )
