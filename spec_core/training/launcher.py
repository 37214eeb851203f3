"""Start ``torchrun`` for a ``TrainJob`` and return its result; ``specflow train`` CLI.

torchrun runs in its own process group, so on failure, timeout or Ctrl-C the whole tree (agent and
every rank) is stopped by that group id - never by name. Its output goes to ``<run>/logs/train.log``
(and, optionally, to our stdout as it happens); a failure raises ``SpecflowError`` quoting the
worker's last error line. Single node: static rendezvous on 127.0.0.1 with a free port. Multi-node:
``training.rdzv_endpoint`` (host:port of node 0), ``nnodes`` and ``node_rank``.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from spec_core.errors import ConfigError, SpecflowError
from spec_core.training.job import TrainJob
from spec_core.utils.logs import child_env, line_level
from spec_core.utils.net import free_port
from spec_core.utils.procs import ProcessGroup

_ERROR_LINE = re.compile(r"^(error: .+|[\w.]*(Error|Exception)(: .*)?)$")


@dataclass
class TrainResult:
    returncode: int
    run_dir: Path
    metrics_path: Path
    log_path: Path
    last_checkpoint: Optional[str] = None
    best_checkpoint: Optional[str] = None
    summary: dict[str, Any] = field(default_factory=dict)


def torchrun_command(
    job_path: Path,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: Optional[str] = None,
    max_restarts: int = 0,
) -> list[str]:
    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError(
            "'training.rdzv_endpoint' (host:port of node 0) is required when training.nnodes > 1"
        )
    host, port = "127.0.0.1", free_port()
    if rdzv_endpoint:
        host, _, port_text = rdzv_endpoint.rpartition(":")
        if not host or not port_text.isdigit():
            raise ConfigError(f"'training.rdzv_endpoint' must be host:port, got {rdzv_endpoint!r}")
        port = int(port_text)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--nproc-per-node={nproc_per_node}",
        f"--master-addr={host}",
        f"--master-port={port}",
        # The agent's default 0.1 s health poll costs ~5 % of a core, taken from the co-located
        # producer or trainer; a second is quick enough to notice a dead rank.
        "--monitor-interval=1",
        f"--max-restarts={max_restarts}",
        "-m",
        "spec_core.training.worker",
        "--job",
        str(job_path),
    ]


def last_error_line(log_path: Path) -> str:
    """The worker's own ``error: ...`` line if any, else the last exception line in the log."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    candidates = []
    for line in lines:
        text = re.sub(r"^\[(default)?\d*\]:?", "", line).strip()  # torchrun's rank prefixes
        if _ERROR_LINE.match(text):
            candidates.append(text)
    own = [c for c in candidates if c.startswith("error: ")]
    if own:
        return own[-1][len("error: ") :]
    useful = [
        c for c in candidates if not c.startswith(("torch.distributed.elastic", "ChildFailedError"))
    ]
    return (useful or candidates or [""])[-1]


def node_file(run_dir: Path, name: str, node_rank: int) -> Path:
    """``name`` for node 0 (``logs/train.log``, ``train_job.json``), ``<stem>-node<i><suffix>``
    for the others: every node of a multi-node run shares the run dir (checkpoints are written by
    all ranks into one directory) but each keeps its own log and job file."""
    path = Path(run_dir) / name
    if node_rank == 0:
        return path
    return path.with_name(f"{path.stem}-node{node_rank}{path.suffix}")


def _pump(stream: Any, log_fh: Any, echo: bool) -> None:
    for line in iter(stream.readline, ""):
        log_fh.write(line)
        log_fh.flush()
        if echo and line_level(line) is not None:  # native start-up noise: log file only
            sys.stdout.write(line)
            sys.stdout.flush()


def launch_training(
    job: TrainJob,
    nproc_per_node: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: Optional[str] = None,
    env: Optional[dict[str, str]] = None,
    echo: bool = True,
    timeout_s: Optional[float] = None,
    on_start: Optional[Callable[[ProcessGroup], None]] = None,
) -> TrainResult:
    """Run the job under torchrun; raise ``SpecflowError`` with the worker's error on failure.

    torchrun restarts every rank up to ``training.max_restarts`` times when one dies; they resume
    from the run's latest checkpoint (``worker.after_restart``). Streamed runs get none (the refs
    a dead rank had popped are not handed out again: its flow resumes the run instead), nor do
    multi-node runs (each node's agent counts its own restarts: ``fsdp._restart_store``).
    ``timeout_s`` (default ``training.timeout_s``) bounds the whole run: past it torchrun and its
    ranks are stopped and this raises naming the deadline. torchrun dies with this process.
    ``on_start`` receives torchrun's process group as soon as it exists, so a caller running this
    in a thread (a Prefect task) can stop it from outside on cancellation.
    """
    if nproc_per_node <= 0:
        raise ConfigError(f"'training.nproc_per_node' must be positive, got {nproc_per_node}")
    run_dir = Path(job.run_dir)
    log_path = node_file(run_dir, "logs/train.log", node_rank)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    job_path = job.save(node_file(run_dir, "train_job.json", node_rank))
    if node_rank == 0:  # only rank 0 writes the result
        job.result_file.unlink(missing_ok=True)
        job.fatal_file.unlink(missing_ok=True)
    tcfg = job.cfg.training
    if timeout_s is None:
        timeout_s = tcfg.timeout_s
    restarts = 0 if job.source == "stream" or nnodes > 1 else tcfg.max_restarts
    cmd = torchrun_command(job_path, nproc_per_node, nnodes, node_rank, rdzv_endpoint, restarts)
    proc_env = child_env(env)
    proc_env.setdefault("PYTHONUNBUFFERED", "1")
    with log_path.open("a", encoding="utf-8") as log_fh:
        log_fh.write(f"$ {' '.join(cmd)}\n")
        log_fh.flush()
        group = ProcessGroup.start(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=proc_env,
            die_with_owner=True,
            death_signal=signal.SIGTERM,  # torchrun then stops its ranks
        )
        proc = group.popen
        pump = threading.Thread(target=_pump, args=(proc.stdout, log_fh, echo), daemon=True)
        pump.start()
        if on_start is not None:
            on_start(group)
        deadline = time.monotonic() + timeout_s
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError
                time.sleep(0.2)
        except TimeoutError:
            group.stop()
            pump.join(timeout=5)
            raise SpecflowError(
                f"training did not finish within {timeout_s:.0f}s and was stopped "
                f"('training.timeout_s'); log: {log_path}"
            ) from None
        except BaseException:
            group.stop()
            raise
        group.stop()  # nothing left when torchrun exits cleanly; else the ranks it left behind
        pump.join(timeout=10)
    if proc.returncode != 0:
        reason = last_error_line(log_path) or "no error line in the log"
        raise SpecflowError(
            f"training failed (torchrun exit {proc.returncode}): {reason}; full log: {log_path}"
        )
    summary = {}
    if job.result_file.is_file():
        summary = json.loads(job.result_file.read_text())
    return TrainResult(
        returncode=proc.returncode,
        run_dir=run_dir,
        metrics_path=job.metrics_file,
        log_path=log_path,
        last_checkpoint=summary.get("last_checkpoint"),
        best_checkpoint=summary.get("best_checkpoint"),
        summary=summary,
    )


def prepare_job(cfg: Any, run_dir: Path, progress: bool = True) -> TrainJob:
    """Tokenize (cached), build the vocab map (cached) and describe the run as a TrainJob."""
    from spec_core.assets import resolve_target
    from spec_core.config import save_config
    from spec_core.data.tokenize import prepare_dataset
    from spec_core.paths import RunPaths, cache_dir
    from spec_core.vocab import build_vocab_map, target_vocab_size

    paths = RunPaths.from_config(cfg)
    target_dir = resolve_target(cfg)
    prepared = prepare_dataset(
        cfg.dataset, target_dir, paths.work_dir, cache_dir(cfg), progress=progress
    )
    vocab_map = None
    if cfg.vocab.draft_vocab_size is not None:
        result = build_vocab_map(
            prepared.train_path,
            target_vocab_size(target_dir),
            cfg.vocab.draft_vocab_size,
            paths.vocab_dir,
            cfg.vocab.coverage_sizes,
        )
        vocab_map = str(result.vocab_map_path)
    save_config(cfg, run_dir / "config.yaml")
    return TrainJob.create(
        cfg,
        run_dir=str(run_dir),
        target_dir=str(target_dir),
        train_data=str(prepared.train_path),
        eval_data=str(prepared.eval_path),
        vocab_map=vocab_map,
        source="inprocess",
        run_id=run_dir.name,
    )


def main(argv: Optional[list[str]] = None) -> int:
    """``specflow train --config C [section.key=value ...]``: in-process source, torchrun."""
    from spec_core.config import load_config
    from spec_core.paths import RunPaths

    parser = argparse.ArgumentParser(prog="specflow train", description=main.__doc__)
    parser.add_argument("--config", help="YAML preset (e.g. configs/smollm2-chitchat.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.num_steps=60")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    paths = RunPaths.from_config(cfg)
    job = prepare_job(cfg, paths.run_dir)
    t = cfg.training
    result = launch_training(
        job,
        t.nproc_per_node,
        nnodes=t.nnodes,
        node_rank=t.node_rank,
        rdzv_endpoint=t.rdzv_endpoint,
    )
    summary = result.summary
    print(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                "metrics": str(result.metrics_path),
                "last_checkpoint": result.last_checkpoint,
                "best_checkpoint": result.best_checkpoint,
                "steps": summary.get("steps"),
                "final_eval": summary.get("final_eval"),
            },
            indent=2,
        )
    )
    return 0
