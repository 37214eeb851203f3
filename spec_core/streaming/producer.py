"""A hidden-state producer: claim -> engine -> put -> publish, until every sample is trained.

One producer per process (``python -m spec_core.streaming.producer --job job.json``), started by
``run_streaming`` or a Prefect ``hidden_state_generation`` run. Any number of them, on any machines, share one run through the key
queue; each claims a batch of samples, runs the target, puts the tensors into Mooncake and
publishes a ``SampleRef``. It waits (counted as ``budget_wait_s``) whenever the byte budget is used
up, and stays until every epoch is *finished* (trained, skipped or dropped), re-producing samples
whose data went missing or whose producer died, then leaves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.config import Config, config_from_dict, config_to_dict
from spec_core.contracts.plan import BatchPlan
from spec_core.contracts.samples import TENSOR_NAMES, TokenizedSample
from spec_core.engines.base import HiddenStateEngine
from spec_core.errors import ConfigError, DataError, ServiceError, SpecflowError
from spec_core.models import capture_spec_for
from spec_core.transfer.mooncake import ManagedProcess
from spec_core.transfer.queue import Claim, KeyQueue, ProducerReaped, StopRequested
from spec_core.transfer.records import SampleRef, TensorMeta, tensor_key
from spec_core.transfer.services import ServiceAddresses
from spec_core.utils import faults
from spec_core.utils.files import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class ProducerStats:
    producer: str
    incarnation: str = ""  # <producer>#<n> in the key queue (a retry is a new incarnation)
    samples: int = 0
    tokens: int = 0
    skipped: int = 0  # already trained (resume)
    dropped: int = 0  # bad data, counted and logged
    duplicates: int = 0  # produced but another attempt published first
    wall_s: float = 0.0
    engine_s: float = 0.0
    put_s: float = 0.0
    budget_wait_s: float = 0.0
    idle_s: float = 0.0  # nothing claimable (waiting for the gate or the end)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(samples_per_s=self.samples_per_s, tokens_per_s=self.tokens_per_s)
        return data

    def summary(self) -> str:
        return (
            f"producer {self.producer}: {self.samples} samples, {self.tokens} tokens in "
            f"{self.wall_s:.1f}s ({self.samples_per_s:.2f} samples/s, {self.tokens_per_s:.0f} tok/s); "
            f"engine {self.engine_s:.1f}s, put {self.put_s:.1f}s, budget wait "
            f"{self.budget_wait_s:.1f}s, idle {self.idle_s:.1f}s; skipped {self.skipped}, "
            f"dropped {self.dropped}, duplicates {self.duplicates}"
        )


class _Dataset:
    """The prepared (tokenized) split: sample ids in row order, rows fetched on demand."""

    def __init__(self, path: Path) -> None:
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(
                f"{path}: not a prepared dataset ({exc}); run the data stage first"
            ) from None
        missing = {"sample_id", "input_ids", "loss_mask"} - set(ds.column_names)
        if missing:
            raise DataError(f"{path}: prepared dataset lacks columns {sorted(missing)}")
        self.ds = ds.select_columns(["sample_id", "input_ids", "loss_mask"])
        self.ids: list[str] = [str(s) for s in self.ds["sample_id"]]
        self.row_of = {sid: i for i, sid in enumerate(self.ids)}
        if len(self.row_of) != len(self.ids):
            raise DataError(f"{path}: sample_id values are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, sample_id: str) -> TokenizedSample:
        row = self.ds[self.row_of[sample_id]]
        return TokenizedSample(sample_id, list(row["input_ids"]), list(row["loss_mask"]))


def _bad_sample_reason(s: TokenizedSample, vocab_size: Optional[int]) -> Optional[str]:
    if not s.input_ids:
        return "empty input_ids"
    if len(s.input_ids) != len(s.loss_mask):
        return f"input_ids ({len(s.input_ids)}) and loss_mask ({len(s.loss_mask)}) differ in length"
    if vocab_size is not None and not all(0 <= t < vocab_size for t in s.input_ids):
        return f"token ids outside the target vocab [0, {vocab_size})"
    return None


def make_ref(run: str, claim: Claim, producer: str, tensors: dict[str, torch.Tensor]) -> SampleRef:
    metas = {
        name: TensorMeta(
            key=tensor_key(run, claim.epoch, claim.sample_id, name, claim.attempt),
            shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
        )
        for name, t in tensors.items()
    }
    return SampleRef(run, claim.epoch, claim.sample_id, metas, producer, claim.attempt, claim.pos)


def attempt_keys(run: str, claim: Claim) -> list[str]:
    return [tensor_key(run, claim.epoch, claim.sample_id, n, claim.attempt) for n in TENSOR_NAMES]


def build_engine(cfg: Config, target_dir: Path) -> HiddenStateEngine:
    """The engine ``inference.engine`` names (hf | vllm | sglang), see ``spec_core.engines``."""
    from transformers import AutoConfig

    from spec_core.engines import build_engine as build

    num_layers = int(AutoConfig.from_pretrained(str(target_dir)).num_hidden_layers)
    return build(cfg, target_dir, capture_spec_for(cfg, num_layers))


def run_producer(
    cfg: Config,
    addresses: ServiceAddresses,
    train_data: str | Path,
    producer_id: str,
    *,
    target_dir: Optional[str | Path] = None,
    engine: Optional[HiddenStateEngine] = None,
    log_interval_s: float = 30.0,
) -> ProducerStats:
    """Produce until every sample of every planned epoch is finished (or a stop is requested)."""
    t = cfg.transfer
    if cfg.inference.cpu_threads is not None:  # validated with the config
        torch.set_num_threads(cfg.inference.cpu_threads)  # leave cores to a co-located trainer
    start = time.monotonic()
    stats = ProducerStats(producer=producer_id)
    data = _Dataset(Path(train_data))
    queue = addresses.connect_queue(t.connect_timeout_s)
    plan = queue.set_plan(BatchPlan.from_config(cfg, len(data)).data_plan())
    orders: dict[int, list[int]] = {}

    def sample_id_of(epoch: int, pos: int) -> str:
        if epoch not in orders:
            orders[epoch] = plan.order(epoch)
        return data.ids[orders[epoch][pos]]

    me = stats.incarnation = queue.register_producer(producer_id)  # a retry gets a fresh one
    heartbeat = queue.start_heartbeat(max(t.claim_lease_s / 6, 0.2))
    store = None
    try:
        store = addresses.connect_store(t)
        if engine is None:
            from spec_core.assets import resolve_target

            target = Path(target_dir) if target_dir else resolve_target(cfg)
            engine = build_engine(cfg, target)
        vocab_size = _vocab_size(engine)

        def remove_attempt(claim: Claim) -> None:
            store.remove(attempt_keys(addresses.run_id, claim))

        stats.idle_s += _wait_gate(queue, t.pop_timeout_s)
        last_log = time.monotonic()
        idle = _Linger(queue, t.linger_timeout_s)
        while not queue.stop_requested():
            queue.progress()
            claims = queue.claim(cfg.inference.batch_size, sample_id_of)
            if not claims:
                if queue.all_finished():
                    break
                queue.reap(remove_attempt, t.claim_lease_s, t.progress_timeout_s)
                queue.refresh_bytes()
                stats.idle_s += idle.wait(me)
                continue
            idle.reset()
            try:
                _produce(
                    claims,
                    data,
                    engine,
                    store,
                    queue,
                    addresses.run_id,
                    vocab_size,
                    stats,
                    t.budget_wait_timeout_s,
                )
            except StopRequested:
                break
            if time.monotonic() - last_log > log_interval_s:
                stats.wall_s = time.monotonic() - start
                log.info(stats.summary())
                last_log = time.monotonic()
        # Leave the byte count true: ours, and in a finished run everyone's (the killed too).
        queue.refresh_bytes(force=True, everyone=queue.all_finished())
    except ProducerReaped as exc:  # peers took over; touching the queue now could only hurt
        log.warning("%s", exc)
        raise
    finally:
        heartbeat.set()
        try:
            # Hand back whatever this producer claimed but did not publish (failure or stop).
            if store is not None:
                queue.retire(lambda c: store.remove(attempt_keys(addresses.run_id, c)))
        finally:
            if store is not None:
                store.close()
            if engine is not None:
                engine.close()
    stats.wall_s = time.monotonic() - start
    log.info(stats.summary())
    return stats


class _Linger:
    """The producer's wait while nothing is claimable (others still produce, or trainers still
    train): backs off, and fails once the finished count has not moved for ``timeout_s``
    (``transfer.linger_timeout_s``), e.g. because every trainer died."""

    def __init__(self, queue: KeyQueue, timeout_s: float) -> None:
        self.queue, self.timeout_s = queue, timeout_s
        self.reset()

    def reset(self) -> None:
        self.delay = 0.01
        self.finished = -1
        self.since = time.monotonic()

    def wait(self, me: str) -> float:
        finished = self.queue.finished_count()
        if finished != self.finished:
            self.finished, self.since = finished, time.monotonic()
        elif time.monotonic() - self.since > self.timeout_s:
            raise ServiceError(
                f"producer {me} waited {self.timeout_s:.0f}s for the trainers to finish the "
                f"remaining samples ({finished} finished, none since); are the trainers running? "
                "(transfer.linger_timeout_s)"
            )
        t0 = time.monotonic()
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 0.25)
        return time.monotonic() - t0


def _vocab_size(engine: HiddenStateEngine) -> Optional[int]:
    if getattr(engine, "vocab_size", None) is not None:  # engines that hold no HF model
        return int(engine.vocab_size)  # type: ignore[attr-defined]
    model = getattr(engine, "model", None)
    return int(model.config.vocab_size) if model is not None else None


def _wait_gate(queue: KeyQueue, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not queue.gate_open():
        if queue.stop_requested():
            break
        if time.monotonic() - t0 > timeout_s:
            raise SpecflowError(f"no trainer opened the key queue within {timeout_s:.0f}s")
        time.sleep(0.05)
    return time.monotonic() - t0


def _produce(
    claims: Sequence[Claim],
    data: _Dataset,
    engine: HiddenStateEngine,
    store: Any,
    queue: KeyQueue,
    run: str,
    vocab_size: Optional[int],
    stats: ProducerStats,
    budget_timeout_s: float,
) -> None:
    todo: list[tuple[Claim, TokenizedSample]] = []
    for claim in claims:
        if queue.is_resolved(claim):  # a re-queued sample another attempt already published
            continue
        if queue.is_acked(claim.epoch, claim.sample_id):
            if queue.resolve(claim, "skipped"):
                stats.skipped += 1
            continue
        sample = data.sample(claim.sample_id)
        reason = _bad_sample_reason(sample, vocab_size)
        if reason is not None:
            log.warning("dropping sample %s: %s", claim.sample_id, reason)
            if queue.resolve(claim, "dropped"):
                stats.dropped += 1
            continue
        todo.append((claim, sample))
    if not todo:
        return
    t0 = time.monotonic()
    captured = engine.capture([s for _, s in todo])
    stats.engine_s += time.monotonic() - t0
    for (claim, sample), cap in zip(todo, captured, strict=True):
        tensors = cap.tensors()
        ref = make_ref(run, claim, queue.producer or "", tensors)
        stats.budget_wait_s += queue.reserve(
            claim, ref.nbytes, queue.stop_requested, budget_timeout_s
        )
        t0 = time.monotonic()
        try:
            faults.point("producer.put")
            store.put([(ref.tensors[name].key, t) for name, t in tensors.items()])
            faults.point("producer.put_done")
            published = queue.publish(claim, ref)
        except ProducerReaped:  # fenced before publishing: a peer re-queued this claim, and its
            queue.release(claim)  # replay may have run before this put, so remove it here
            store.remove(ref.keys)
            raise
        except BaseException:
            queue.release(claim)
            raise
        stats.put_s += time.monotonic() - t0
        if published:
            stats.samples += 1
            stats.tokens += len(sample.input_ids)
        else:
            store.remove(ref.keys)
            stats.duplicates += 1


# ---------------------------------------------------------------------------------------------
# Process entry point


def producer_argv(cfg: Config, job_path: str | Path) -> list[str]:
    """The producer command line: ``inference.python`` (a vLLM/SGLang venv) or our interpreter.

    Checked where the producer starts (in deployments mode that is the worker's host)."""
    python = cfg.inference.python or sys.executable
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ConfigError(
            f"'inference.python' {python} is not an executable file on this host; point it at the "
            "python of the venv that has the engine installed (e.g. .venv-vllm/bin/python)"
        )
    return [python, "-m", "spec_core.streaming.producer", "--job", str(job_path)]


@dataclass
class ProducerJob:
    """Everything ``python -m spec_core.streaming.producer`` needs, as JSON (no pickle)."""

    config: dict[str, Any]
    services: dict[str, Any]
    train_data: str
    producer_id: str
    target_dir: Optional[str] = None
    stats_out: Optional[str] = None

    @classmethod
    def create(cls, cfg: Config, addresses: ServiceAddresses, **fields: Any) -> ProducerJob:
        return cls(config=config_to_dict(cfg), services=addresses.to_dict(), **fields)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> ProducerJob:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot read the producer job: {exc}") from None


SERVICE_EXIT = 3  # exit code for ServiceError; 2 = bad config or data (not worth a retry)
_ERROR_LINE = re.compile(r"^error: (.+)$")


class ProducerError(SpecflowError):
    """A producer process ended with a non-zero exit code (other than ``SERVICE_EXIT``)."""


def producer_outcome(proc: ManagedProcess, stats_path: Path) -> dict[str, Any]:
    """The stats of a producer process that has exited, or its error: ``ServiceError`` (worth a
    retry) for ``SERVICE_EXIT``, ``ProducerError`` for any other failure."""
    code = proc.popen.returncode
    if code != 0:
        errors = [
            m.group(1)
            for ln in proc.log_tail(50).splitlines()
            if (m := _ERROR_LINE.match(ln.strip()))
        ]
        reason = (errors[-1] if errors else proc.log_tail(3)) or "no output"
        message = f"{proc.name} exited with code {code}: {reason} (log {proc.log_path})"
        raise (ServiceError if code == SERVICE_EXIT else ProducerError)(message)
    return json.loads(stats_path.read_text())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="specflow produce", description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="producer job JSON (ProducerJob)")
    args = parser.parse_args(argv)
    try:
        job = ProducerJob.load(args.job)
        cfg = config_from_dict(job.config)
        logging.basicConfig(
            level=cfg.run.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        stats = run_producer(
            cfg,
            ServiceAddresses.from_dict(job.services),
            job.train_data,
            job.producer_id,
            target_dir=job.target_dir,
        )
    except ServiceError as exc:  # store full, a service gone: worth a retry (Prefect task)
        print(f"error: {exc}", file=sys.stderr)
        return SERVICE_EXIT
    except SpecflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if job.stats_out:
        Path(job.stats_out).write_text(json.dumps(stats.to_dict(), indent=2))
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
