"""Fast checks of the streaming glue that need no services: plans, jobs, validation."""

from __future__ import annotations

import dataclasses

import pytest

from spec_core.config import load_config
from spec_core.engines.producer import ProducerJob, make_plan, producer_argv
from spec_core.errors import ConfigError, ServiceError
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
    plan = make_plan(cfg, 100)  # 30 steps x 8 samples = 240 samples = 3 epochs of 100
    assert (plan.num_epochs, plan.num_ranks, plan.seed, plan.num_samples) == (3, 2, 7, 100)
    assert make_plan(load_config(None, ["training.num_epochs=2"]), 100).num_epochs == 2


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
