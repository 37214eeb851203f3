"""Fast checks of the streaming glue that need no services: plans, jobs, validation, and the
supervisor's policy (with a stand-in for the key queue)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from spec_core.config import load_config
from spec_core.contracts.plan import BatchPlan
from spec_core.errors import ConfigError, ServiceError
from spec_core.streaming.producer import ProducerJob, producer_argv
from spec_core.streaming.supervisor import ChildFailed, coroutine_child, run_concurrently
from spec_core.training.job import TrainJob
from spec_core.training.sources import SampleSpec
from spec_core.training.stream_source import StreamSource
from spec_core.transfer.services import ServiceAddresses

ADDRESSES = ServiceAddresses(
    run_id="r",
    master="127.0.0.1:1",
    metadata_url="http://127.0.0.1:1/metadata",
    queue="127.0.0.1:1",
    byte_budget=1 << 20,
    holder="127.0.0.1:1",
)


def test_plan_covers_num_steps_and_deals_to_every_rank():
    cfg = load_config(
        None,
        [
            "training.num_steps=30",
            "training.micro_batch_size=2",
            "training.accumulation_steps=2",
            "training.nproc_per_node=2",
            "training.seed=7",
        ],
    )
    plan = BatchPlan.from_config(cfg, 100).data_plan()  # 30 x 8 = 240 samples = 3 epochs of 100
    assert (plan.num_epochs, plan.num_ranks, plan.seed, plan.num_samples) == (3, 2, 7, 100)
    epochs = BatchPlan.from_config(load_config(None, ["training.num_epochs=2"]), 100)
    assert epochs.data_plan().num_epochs == 2


@pytest.mark.parametrize(
    ("overrides", "num_samples", "expected"),
    [
        # (global batch, optimizer steps, samples the steps consume, epochs to produce)
        (
            ["training.num_steps=30", "training.accumulation_steps=2", "training.nproc_per_node=2"],
            100,
            (8, 30, 240, 3),
        ),
        (["training.num_epochs=2"], 100, (2, 100, 200, 2)),
        (
            [
                "training.num_epochs=3",
                "training.micro_batch_size=3",
                "training.nproc_per_node=2",
                "training.nnodes=2",
            ],
            50,
            (12, 15, 180, 3),
        ),  # ceil(50 / 12) = 5 steps an epoch
        (["training.num_steps=1"], 1000, (2, 1, 2, 1)),
        (["training.num_steps=5"], 0, (2, 5, 10, 10)),
    ],
)
def test_batch_plan_numbers(overrides, num_samples, expected):
    plan = BatchPlan.from_config(load_config(None, overrides), num_samples)
    assert (
        plan.global_batch,
        plan.total_steps,
        plan.samples_to_train,
        plan.data_plan().num_epochs,
    ) == expected


def test_batch_plan_takes_the_launched_world_size():
    cfg = load_config(None, ["training.nproc_per_node=4", "training.num_epochs=1"])
    assert BatchPlan.from_config(cfg, 64).total_steps == 8
    assert BatchPlan.from_config(cfg, 64, world_size=2).total_steps == 16


class FakeQueue:
    """The key-queue calls the supervisor makes."""

    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self.finished = False

    def stop_requested(self) -> bool:
        return self.stop_reason is not None

    def all_finished(self) -> bool:
        return self.finished

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason


def _supervise(producers, trainers, queue, grace_s=5.0):
    async def main():
        return await run_concurrently(
            [coroutine_child(name, work()) for name, work in producers],
            [coroutine_child(name, work()) for name, work in trainers],
            queue,
            logging.getLogger("test"),
            poll_s=0.01,
            producer_grace_s=grace_s,
        )

    return asyncio.run(main())


def test_every_producer_ending_with_samples_left_stops_the_stream_with_their_errors():
    queue = FakeQueue()

    async def broken():
        raise RuntimeError("engine out of memory")

    async def trainer():  # like StreamSource: fails once the stream is stopped
        while not queue.stop_requested():
            await asyncio.sleep(0.01)
        raise ServiceError(f"the stream stopped: {queue.stop_reason}")

    with pytest.raises(ChildFailed, match="engine out of memory"):
        _supervise([("p0", broken), ("p1", broken)], [("trainer", trainer)], queue)
    assert queue.stop_reason.startswith("every producer ended: p0 failed: engine out of memory")
    assert "p1 failed" in queue.stop_reason


def test_a_failed_producer_is_tolerated_and_late_producers_are_cancelled():
    queue = FakeQueue()
    cancelled = []

    async def broken():
        raise RuntimeError("lost its GPU")

    async def stays():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append("p1")
            raise

    async def leaves():
        while not queue.stop_requested():
            await asyncio.sleep(0.01)
        return {"producer": "p2"}

    async def trainer():
        await asyncio.sleep(0.1)
        return "trained"

    outcome = _supervise(
        [("p0", broken), ("p1", stays), ("p2", leaves)], [("trainer", trainer)], queue, 0.2
    )
    assert outcome.trainers == ["trained"] and outcome.producers == [{"producer": "p2"}]
    assert outcome.producer_failures == ["p0 failed: lost its GPU"]
    assert queue.stop_reason == "training finished" and cancelled == ["p1"]


def test_a_failed_trainer_stops_the_stream_and_cancels_every_producer():
    queue = FakeQueue()
    cancelled = []

    async def producer():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def trainer():
        raise ValueError("loss is nan")

    with pytest.raises(ChildFailed, match="trainer failed: loss is nan"):
        _supervise([("p0", producer), ("p1", producer)], [("trainer", trainer)], queue)
    assert queue.stop_reason.startswith("pipeline stopping: trainer failed: loss is nan")
    assert cancelled == [True, True]


def test_producer_job_round_trips_as_json(tmp_path):
    cfg = load_config(None, ["inference.batch_size=3"])
    job = ProducerJob.create(cfg, ADDRESSES, train_data="/data", producer_id="p0")
    back = ProducerJob.load(job.save(tmp_path / "job.json"))
    assert back == job and ServiceAddresses.from_dict(back.services) == ADDRESSES
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the producer job"):
        ProducerJob.load(tmp_path / "bad.json")


@pytest.mark.parametrize("key", ["inference.cpu_threads", "training.cpu_threads"])
def test_bad_cpu_threads_is_a_config_error_before_any_work(key):
    with pytest.raises(ConfigError, match=rf"'{key}' must be positive or null, got 0"):
        load_config(None, [f"{key}=0"])


def test_stream_job_without_services_is_one_clear_error(tmp_path):
    cfg = load_config(None, [])
    job = TrainJob.create(cfg, run_dir=str(tmp_path), target_dir="", source="stream")
    spec = SampleSpec(aux_dim=192, hidden_dim=64, with_last_hidden=True)
    with pytest.raises(ServiceError, match="no service addresses"):
        StreamSource.from_job(job, rank=0, world_size=1, spec=spec)
    quick = dataclasses.replace(job, services=ADDRESSES.to_dict())
    quick.config["transfer"]["connect_timeout_s"] = 0.5
    with pytest.raises(ServiceError, match="not reachable"):
        StreamSource.from_job(quick, rank=0, world_size=1, spec=spec)


def test_producer_interpreter_must_exist_where_the_producer_starts(tmp_path):
    import sys

    cfg = load_config(None, [])
    argv = producer_argv(cfg, tmp_path / "job.json")
    assert argv[0] == sys.executable and argv[-2:] == ["--job", str(tmp_path / "job.json")]
    missing = tmp_path / "venv-vllm" / "bin" / "python"
    cfg = load_config(None, [f"inference.python={missing}"])
    with pytest.raises(ConfigError, match=r"'inference.python' .*venv-vllm/bin/python is not an"):
        producer_argv(cfg, tmp_path / "job.json")
