"""Stream-and-train on one machine: services, N producer processes and the trainer, together.

``run_streaming`` is the embedded pipeline's generate+train stage (and what the tests and
benchmarks drive): start the services, start ``inference.replicas`` producer processes, launch
training with the stream source, wait, and stop everything it started, by PID, whether training
succeeded, failed or was interrupted. A watchdog stops the stream (so the trainer fails fast with
the reason) if every producer has exited while samples are still missing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from spec_core.config import Config
from spec_core.engines.producer import ProducerJob, make_plan, producer_argv
from spec_core.errors import ServiceError
from spec_core.training.job import TrainJob
from spec_core.transfer.mooncake import ManagedProcess, spawn
from spec_core.transfer.services import ServiceAddresses, start_services

log = logging.getLogger(__name__)

Launch = Callable[[TrainJob], Any]


@dataclass
class StreamingResult:
    train_result: Any
    producer_stats: list[dict[str, Any]]
    counts: dict[str, int]  # skipped / dropped / reclaimed / missing / budget_waits (key queue)
    acked: list[tuple[int, str]]  # (epoch, sample_id) of every trained sample, in ack order
    wall_s: float
    producer_exit_codes: list[Optional[int]] = field(default_factory=list)


def start_producers(
    cfg: Config,
    addresses: ServiceAddresses,
    train_data: str | Path,
    count: int,
    work_dir: Path,
    target_dir: Optional[str | Path] = None,
) -> list[ManagedProcess]:
    """``count`` producer processes (``python -m spec_core.engines.producer``), logs in work_dir."""
    procs = []
    for i in range(count):
        job = ProducerJob.create(
            cfg,
            addresses,
            train_data=str(train_data),
            producer_id=f"producer-{i}",
            target_dir=str(target_dir) if target_dir else None,
            stats_out=str(work_dir / f"producer-{i}.stats.json"),
        )
        path = job.save(work_dir / f"producer-{i}.job.json")
        procs.append(spawn(f"producer-{i}", producer_argv(cfg, path), work_dir))
    return procs


def default_launch(job: TrainJob) -> Any:
    from spec_core.training.launcher import launch_training

    return launch_training(job, job.cfg.training.nproc_per_node)


def _watch_producers(
    procs: list[ManagedProcess], addresses: ServiceAddresses, done: threading.Event
) -> None:
    queue = addresses.connect_queue()
    while not done.wait(0.5):
        if any(p.alive() for p in procs):
            continue
        if not queue.all_finished():
            codes = [p.popen.returncode for p in procs]
            tails = "; ".join(f"{p.name}: {p.log_tail(3)}" for p in procs if p.popen.returncode)
            queue.request_stop(f"all producers exited (codes {codes}) with samples left; {tails}")
        return


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

    ``on_start`` sees the producer processes and service addresses once they are up (to record
    PIDs, or for a test to kill a producer)."""
    import datasets

    start = time.monotonic()
    run_dir = Path(run_dir)
    work_dir = run_dir / "streaming"
    work_dir.mkdir(parents=True, exist_ok=True)
    run_id = run_id or cfg.run.run_id or run_dir.name
    plan = make_plan(cfg, len(datasets.load_from_disk(str(train_data))))
    resume = bool(cfg.training.resume_from)
    launch = launch or default_launch
    count = num_producers or cfg.inference.replicas
    with start_services(
        cfg.transfer, run_id, work_dir / "logs", plan=plan, open_gate=not resume
    ) as services:
        addresses = services.addresses
        queue = addresses.connect_queue()
        producers: list[ManagedProcess] = []
        done = threading.Event()
        try:
            producers = start_producers(cfg, addresses, train_data, count, work_dir, target_dir)
            watcher = threading.Thread(
                target=_watch_producers, args=(producers, addresses, done), daemon=True
            )
            watcher.start()
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
            train_result = launch(job)
            if not queue.all_finished():  # training stopped early (num_steps): producers leave
                queue.request_stop("training finished")
            deadline = time.monotonic() + producer_timeout_s
            for proc in producers:
                try:
                    proc.popen.wait(max(deadline - time.monotonic(), 0.1))
                except Exception:
                    log.warning("%s did not exit after training; stopping it", proc.name)
            failed = [p for p in producers if p.popen.returncode not in (0, None)]
            if failed and not queue.all_finished():
                raise ServiceError(f"{failed[0].name} failed: {failed[0].log_tail(5)}")
        finally:
            done.set()
            for proc in producers:
                proc.stop()
        stats = []
        for i in range(count):
            path = work_dir / f"producer-{i}.stats.json"
            if path.is_file():
                stats.append(json.loads(path.read_text()))
        counts = queue.counts()
        acked = queue.acked()
    return StreamingResult(
        train_result=train_result,
        producer_stats=stats,
        counts=counts,
        acked=acked,
        wall_s=time.monotonic() - start,
        producer_exit_codes=[p.popen.returncode for p in producers],
    )
