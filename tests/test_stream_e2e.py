"""Streaming end to end with real processes: a real master/holder/TCPStore, producer processes
running the HF engine on the tiny target, and either the real torchrun trainer or small consumer
processes that use ``StreamSource`` directly over a gloo process group.

Run as a script, this module is also those helper processes (``produce`` / ``consume``)."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from spec_core.config import Config, config_from_dict, config_to_dict, load_config
from spec_core.transfer.mooncake import master_metrics
from spec_core.transfer.services import ServiceAddresses, start_services

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def make_split(path: Path, n: int, seed: int = 0, lo: int = 4, hi: int = 40) -> Path:
    import datasets

    rng = random.Random(seed)
    rows = {
        "sample_id": [],
        "input_ids": [],
        "loss_mask": [],
        "num_tokens": [],
        "num_loss_tokens": [],
    }
    for i in range(n):
        length = rng.randint(lo, hi)
        mask = [0] * (length // 3) + [1] * (length - length // 3)
        rows["sample_id"].append(f"conv-{i:04d}")
        rows["input_ids"].append([rng.randrange(3, 49152) for _ in range(length)])
        rows["loss_mask"].append(mask)
        rows["num_tokens"].append(length)
        rows["num_loss_tokens"].append(sum(mask))
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


def base_config(extra: list[str] = ()) -> Config:
    return load_config(
        None,
        [
            "training.micro_batch_size=2",
            "training.accumulation_steps=1",
            "training.seq_bucket=16",
            "training.save_interval=0",
            "training.eval_interval=0",
            "training.warmup_ratio=0",
            "draft.ttt_length=2",
            "draft.capture_indices=[1,2,3]",
            "inference.batch_size=8",
            "transfer.global_segment_mb=128",
            "transfer.byte_budget_mb=16",
            "transfer.connect_timeout_s=10",
            "transfer.pop_timeout_s=120",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def split_200(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("stream-data") / "train", 200)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 - closed by the OS when the child exits
    return subprocess.Popen(
        [sys.executable, str(HERE), *args], stdout=fh, stderr=subprocess.STDOUT, env=_env()
    )


def _reap(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(max(deadline - time.monotonic(), 0.1)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


def _start_consumers(
    tmp: Path,
    cfg: Config,
    addresses: ServiceAddresses,
    world: int,
    sleep_s: float,
    hidden: int = 64,
):
    from spec_core.utils.net import free_port

    port = free_port("127.0.0.1")
    job = tmp / "consumer.json"
    job.write_text(
        json.dumps(
            {"config": config_to_dict(cfg), "services": addresses.to_dict(), "hidden": hidden}
        )
    )
    return [
        _spawn(
            [
                "consume",
                str(job),
                str(rank),
                str(world),
                str(port),
                str(tmp / f"consumer{rank}"),
                str(sleep_s),
            ],
            tmp / f"consumer{rank}.log",
        )
        for rank in range(world)
    ]


def _start_producers(
    tmp: Path,
    cfg: Config,
    addresses: ServiceAddresses,
    data: Path,
    target: Path,
    n: int,
    record: bool,
):
    from spec_core.streaming.producer import ProducerJob

    procs = []
    for i in range(n):
        job = ProducerJob.create(
            cfg,
            addresses,
            train_data=str(data),
            producer_id=f"p{i}",
            target_dir=str(target),
            stats_out=str(tmp / f"p{i}.stats.json"),
        ).save(tmp / f"p{i}.job.json")
        procs.append(
            _spawn(["produce", str(job), str(tmp / f"p{i}") if record else ""], tmp / f"p{i}.log")
        )
    return procs


def _logs(tmp: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp.glob("*.log"))
    )


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_identical_across_processes(tmp_path, tiny_target_dir, dtype):
    data = make_split(tmp_path / "train", 24, seed=5, lo=3, hi=70)
    cfg = base_config(
        [f"inference.dtype={dtype}", "inference.batch_size=5", "training.micro_batch_size=3"]
    )
    fetched: dict[str, torch.Tensor] = {}
    with start_services(cfg.transfer, f"rt-{dtype}", tmp_path / "svc") as services:
        a = services.addresses
        procs = _start_producers(tmp_path, cfg, a, data, tiny_target_dir, 1, record=True)
        try:  # this test process is the trainer
            source = _stream_source(a, cfg, hidden=64, rank=0, world=1)
            while (step := source.next_step()).num_real:
                _record(step, fetched)
                source.ack(step.sample_ids)
            source.close()
        finally:
            codes = _reap(procs, 150)
    assert codes == [0], _logs(tmp_path)
    from safetensors.torch import load_file

    produced = load_file(tmp_path / "p0.safetensors")
    assert len(fetched) == 24 * 4 and set(fetched) == set(produced)
    shapes = set()
    for key, want in produced.items():
        got = fetched[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), key  # bitwise
        shapes.add(tuple(got.shape))
    assert produced["conv-0000/aux_hidden"].dtype == getattr(torch, dtype)
    assert len({s for s in shapes if len(s) == 2}) >= 20  # many [T, n*H] / [T, H] shapes


@pytest.fixture(scope="module")
def wide_target_dir(tmp_path_factory, smollm2_dir) -> Path:
    """Hidden 256: ~90 KB per sample, so a 1 MB budget holds only about a dozen samples."""
    from spec_core.assets import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("wide-target"), smollm2_dir, hidden=256)


def test_slow_trainer_stays_within_byte_budget_and_nothing_is_evicted(
    tmp_path, wide_target_dir, split_200
):
    cfg = base_config(
        ["transfer.byte_budget_mb=1", "transfer.global_segment_mb=64", "training.nproc_per_node=2"]
    )
    budget = cfg.transfer.byte_budget_mb << 20
    with start_services(cfg.transfer, "slow", tmp_path / "svc") as services:
        a = services.addresses
        queue = a.connect_queue()
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                m = master_metrics(a.metrics_url)
                samples.append((m["master_allocated_bytes"], queue.resident_bytes()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        procs = _start_producers(tmp_path, cfg, a, split_200, wide_target_dir, 2, record=False)
        procs += _start_consumers(tmp_path, cfg, a, 2, 0.1, hidden=256)
        try:
            codes = _reap(procs, 200)
        finally:
            stop.set()
            sampler.join()
        final = master_metrics(a.metrics_url)
        acked = queue.acked()
        counts = queue.counts()
    assert codes == [0, 0, 0, 0], _logs(tmp_path)
    assert len(samples) > 50
    assert max(store for store, _ in samples) <= budget
    assert max(counter for _, counter in samples) <= budget
    assert final.get("master_evicted_key_count", 0) == 0 and final["master_allocated_bytes"] == 0
    assert counts["missing"] == 0  # every pop found its data
    assert Counter(acked) == Counter((0, f"conv-{i:04d}") for i in range(200))
    stats = [json.loads((tmp_path / f"p{i}.stats.json").read_text()) for i in range(2)]
    assert counts["budget_waits"] >= 2  # producers really were held back ...
    assert sum(s["budget_wait_s"] for s in stats) > 0.5  # ... for a while
    largest = (40 * 4 * 256) * 4 + 40 * 9  # longest sample: aux + last hidden fp32, ids, mask
    assert max(counter for _, counter in samples) >= budget - largest  # the budget was the limit
    assert sum(s["samples"] for s in stats) == 200


def _stream_config(extra: list[str] = ()) -> Config:
    return base_config(
        ["training.nproc_per_node=2", "inference.replicas=2", "training.num_epochs=1", *extra]
    )


def test_exactly_once_two_producers_two_trainer_ranks(tmp_path, tiny_target_dir, split_200):
    from spec_core.streaming.run import run_streaming

    cfg = _stream_config()
    result = run_streaming(
        cfg, split_200, tmp_path / "run", target_dir=tiny_target_dir, run_id="once"
    )
    assert Counter(result.acked) == Counter((0, f"conv-{i:04d}") for i in range(200))
    assert result.train_result.summary["consumed_samples"] == 200
    assert result.train_result.summary["steps"] == 50  # 200 samples / (2 ranks x 2)
    assert sum(s["samples"] for s in result.producer_stats) == 200
    assert all(s["samples"] > 0 for s in result.producer_stats)  # both producers worked
    assert result.producer_exit_codes == [0, 0]
    assert result.counts == {
        "skipped": 0,
        "dropped": 0,
        "reclaimed": 0,
        "missing": 0,
        "budget_waits": 0,
    }
    # The hidden states never touched the disk: the run dir holds no tensor files.
    big = [
        p
        for p in (tmp_path / "run").rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".pt", ".bin")
    ]
    assert all("checkpoints" in str(p) for p in big)


def test_producer_sigkill_mid_run_still_trains_every_sample_once(
    tmp_path, tiny_target_dir, split_200
):
    from spec_core.streaming.run import run_streaming

    cfg = _stream_config(["transfer.claim_lease_s=2", "transfer.byte_budget_mb=2"])
    killed = {}

    def kill_one(producers, addresses: ServiceAddresses) -> None:
        queue = addresses.connect_queue()

        def killer() -> None:
            # Kill mid-run, once it has published part of its share: it holds a claimed chunk.
            while queue.produced() < 30:
                time.sleep(0.005)
            os.kill(producers[0].pid, 9)
            killed["at_done"] = queue.produced()

        threading.Thread(target=killer, daemon=True).start()

    result = run_streaming(
        cfg,
        split_200,
        tmp_path / "run",
        target_dir=tiny_target_dir,
        run_id="kill",
        on_start=kill_one,
    )
    assert killed and result.producer_exit_codes[0] == -9
    assert result.counts["reclaimed"] >= 1  # its in-flight claims were re-produced by the other
    assert Counter(result.acked) == Counter((0, f"conv-{i:04d}") for i in range(200))
    assert result.train_result.summary["consumed_samples"] == 200
    survivor = [s for s in result.producer_stats if s["producer"] == "producer-1"]
    assert survivor and survivor[0]["samples"] + killed["at_done"] >= 200 - 8  # it took over


def test_resume_skips_acked_samples_and_loses_none(tmp_path, tiny_target_dir, split_200):
    """Stop after 10 steps (checkpoints at 5 and 10), resume from step 5 on fresh services: the
    samples acked in that checkpoint plus those the resumed run trains are the dataset, once."""
    from spec_core.streaming.run import run_streaming

    first = run_streaming(
        _stream_config(["training.num_steps=10", "training.save_interval=5"]),
        split_200,
        tmp_path / "first",
        target_dir=tiny_target_dir,
        run_id="first",
    )
    assert len(first.acked) == 40
    ckpt = tmp_path / "first" / "checkpoints" / "iter_0000005"
    saved = json.loads((ckpt / "data_state_rank1.json").read_text())["acked"]
    assert len(saved) == 20  # every rank's state holds the run's global acked set
    assert saved == json.loads((ckpt / "data_state_rank0.json").read_text())["acked"]
    # The first run planned 10 steps, the resumed one the whole epoch (50): a deliberate change
    # of plan, so it is accepted explicitly (the refusal is tested in test_checkpoint_safety.py).
    resumed = run_streaming(
        _stream_config([f"training.resume_from={ckpt}", "training.resume_accept_mismatch=true"]),
        split_200,
        tmp_path / "resumed",
        target_dir=tiny_target_dir,
        run_id="resumed",
    )
    assert resumed.counts["skipped"] == 20
    trained_after = [pair for pair in resumed.acked if list(pair) not in saved]
    assert len(trained_after) == 180 and resumed.train_result.summary["steps"] == 50
    assert Counter([tuple(p) for p in saved] + trained_after) == Counter(
        (0, f"conv-{i:04d}") for i in range(200)
    )


# ---------------------------------------------------------------------------------------------
# helper processes


class _Recording:
    """Wraps a real engine and keeps what it produced, to compare with what trainers fetched."""

    def __init__(self, engine) -> None:
        self.engine, self.spec, self.records = engine, engine.spec, {}

    def capture(self, samples):
        out = self.engine.capture(samples)
        for cap in out:
            for name, t in cap.tensors().items():
                self.records[f"{cap.sample_id}/{name}"] = t.clone()
        return out

    def close(self) -> None:
        self.engine.close()


def _produce(job_path: str, record: str) -> int:
    from safetensors.torch import save_file

    from spec_core.streaming.producer import ProducerJob, build_engine, run_producer

    job = ProducerJob.load(job_path)
    cfg = config_from_dict(job.config)
    engine = _Recording(build_engine(cfg, Path(job.target_dir)))
    stats = run_producer(
        cfg,
        ServiceAddresses.from_dict(job.services),
        job.train_data,
        job.producer_id,
        engine=engine,
    )
    Path(job.stats_out).write_text(json.dumps(stats.to_dict()))
    if record:
        save_file(engine.records, f"{record}.safetensors")
    return 0


def _stream_source(addresses: ServiceAddresses, cfg: Config, hidden: int, rank: int, world: int):
    from spec_core.training.sources import SampleSpec
    from spec_core.training.stream_source import StreamSource

    spec = SampleSpec(
        aux_dim=len(cfg.draft.capture_indices) * hidden,
        hidden_dim=hidden,
        with_last_hidden=True,
        dtype=getattr(torch, cfg.inference.dtype),
    )
    t = cfg.training
    return StreamSource(
        addresses,
        cfg.transfer,
        spec,
        rank=rank,
        world_size=world,
        micro_batch_size=t.micro_batch_size,
        accumulation_steps=t.accumulation_steps,
        seq_bucket=t.seq_bucket,
    )


def _record(step, out: dict[str, torch.Tensor]) -> None:
    """The real samples of a step, cut back to their length from the padded batch."""
    for batch in step.micro_batches:
        for row, sid in enumerate(batch.sample_ids):
            if sid:
                n = int(batch.attention_mask[row].sum())
                out[f"{sid}/input_ids"] = batch.input_ids[row, :n].clone()
                out[f"{sid}/loss_mask"] = batch.loss_mask[row, :n].clone()
                out[f"{sid}/aux_hidden"] = batch.aux_hidden[row, :n].clone()
                out[f"{sid}/last_hidden"] = batch.last_hidden[row, :n].clone()


def _consume(job_path: str, rank: int, world: int, port: int, out: str, sleep_s: float) -> int:
    """A slow trainer rank: waits until the producers hit the byte budget, then 'trains'
    (sleeps) every step, stepping in lock-step with the other ranks over gloo."""
    import torch.distributed as dist

    from spec_core.transfer.queue import start_queue_server

    job = json.loads(Path(job_path).read_text())
    cfg = config_from_dict(job["config"])
    addresses = ServiceAddresses.from_dict(job["services"])
    if rank == 0:
        store, _ = start_queue_server("127.0.0.1", port)
    else:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    source = _stream_source(addresses, cfg, int(job["hidden"]), rank, world)
    queue = addresses.connect_queue()
    deadline = time.monotonic() + 90
    while queue.counts()["budget_waits"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the producers have run into the budget
    time.sleep(1.0)  # and keep them waiting a moment
    acked = []
    while True:
        step = source.next_step()
        real = torch.tensor([step.num_real])
        dist.all_reduce(real)
        if int(real) == 0:
            break
        time.sleep(sleep_s)  # "training"
        acked += step.sample_ids
        source.ack(step.sample_ids)
    state = source.state_dict()
    source.close()
    Path(f"{out}.json").write_text(json.dumps({"acked": acked, "state": state}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("produce")
    p.add_argument("job")
    p.add_argument("record")
    c = sub.add_parser("consume")
    for name in ("job", "rank", "world", "port", "out", "sleep"):
        c.add_argument(name)
    args = parser.parse_args()
    if args.cmd == "produce":
        sys.exit(_produce(args.job, args.record))
    sys.exit(
        _consume(
            args.job, int(args.rank), int(args.world), int(args.port), args.out, float(args.sleep)
        )
    )
