"""Pieces of the Prefect layer that need no server: pipeline perf arithmetic, the run summary,
log forwarding, and owned-process teardown (real processes, stopped by process group)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spec_core.metrics import (
    inference_perf,
    markdown_table,
    per_position_accuracy,
    pipeline_perf,
    trainer_perf,
)


def step(n: int, samples: int, wait: float, compute: float, acc=None) -> dict:
    return {
        "split": "train",
        "step": n,
        "samples": samples,
        "tokens": samples * 100,
        "data_wait_s": wait,
        "compute_s": compute,
        "acc_k": acc or [0.5, 0.25],
    }


def test_trainer_perf_leaves_the_pipeline_fill_out_of_the_steady_state():
    records = [step(1, 4, 30.0, 3.0), step(2, 4, 1.0, 2.0), step(3, 4, 0.0, 2.0)]
    records.insert(1, {"split": "eval", "step": 1, "acc_k": [0.1]})
    perf = trainer_perf(records)
    assert (perf.steps, perf.samples, perf.total_steps, perf.total_samples) == (2, 8, 3, 12)
    assert perf.fill_s == 30.0
    assert perf.capacity == pytest.approx(8 / 4.0)  # T: samples per compute second
    assert perf.thru == pytest.approx(8 / 5.0)  # samples per (wait + compute) second
    assert perf.dispatch_wait_mean_s == pytest.approx(0.5)


def test_trainer_perf_keeps_the_last_record_of_a_step_logged_twice_and_handles_one_step():
    resumed = [step(1, 4, 0.0, 1.0), step(2, 4, 9.0, 9.0), step(2, 4, 0.0, 1.0)]
    assert trainer_perf(resumed).compute_s == pytest.approx(1.0)
    single = trainer_perf([step(1, 2, 5.0, 1.0)])
    assert (single.steps, single.samples, single.fill_s) == (1, 2, 5.0)  # nothing left out
    empty = trainer_perf([])
    assert (empty.capacity, empty.thru) == (0.0, 0.0)


def test_inference_capacity_sums_each_producers_rate_over_its_busy_time():
    stats = [
        {"samples": 10, "tokens": 1000, "engine_s": 4.0, "put_s": 1.0, "budget_wait_s": 7.0},
        {"samples": 2, "tokens": 200, "engine_s": 1.0, "put_s": 0.0, "idle_s": 3.0},
        {"samples": 0, "engine_s": 0.0, "put_s": 0.0},  # joined late, did nothing
    ]
    perf = inference_perf(stats)
    assert perf.capacity == pytest.approx(10 / 5.0 + 2 / 1.0)  # waits and idle excluded
    assert (perf.producers, perf.samples, perf.budget_wait_s, perf.idle_s) == (3, 12, 7.0, 3.0)


def test_pipeline_efficiency_and_bottleneck():
    training = trainer_perf([step(1, 2, 9.0, 1.0), step(2, 4, 0.2, 1.8), step(3, 4, 0.0, 2.0)])
    slow_producer = [{"samples": 8, "engine_s": 8.0, "put_s": 0.0}]  # I = 1.0 < T = 2.0
    perf = pipeline_perf(slow_producer, training)
    assert perf.bottleneck == "inference"
    assert perf.bound == pytest.approx(1.0)
    assert perf.efficiency == pytest.approx((8 / 4.0) / 1.0)
    fast_producer = [{"samples": 40, "engine_s": 4.0, "put_s": 0.0}]  # I = 10 > T
    perf = pipeline_perf(fast_producer, training.__dict__)  # as a child flow returns it
    assert perf.bottleneck == "training"
    assert perf.efficiency == pytest.approx(training.thru / training.capacity)
    rows = {r["metric"]: r["value"] for r in perf.rows()}
    assert rows["thru / min(I, T)"] == pytest.approx(perf.efficiency, abs=1e-4)
    assert perf.to_dict()["inference_capacity"] == pytest.approx(10.0)


def test_per_position_accuracy_table_and_markdown():
    rows = per_position_accuracy({"acc_k": [0.5, 0.25, None]}, {"acc_k": [0.4]})
    assert rows == [
        {"position": 0, "train_acc": 0.5, "eval_acc": 0.4},
        {"position": 1, "train_acc": 0.25, "eval_acc": None},
        {"position": 2, "train_acc": None, "eval_acc": None},
    ]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| position | train_acc | eval_acc |"
    assert table[3] == "| 1 | 0.25 |  |"
    assert per_position_accuracy(None, None) == []


def summary(**extra) -> dict:
    training = trainer_perf([step(1, 2, 3.0, 1.0), step(2, 2, 0.1, 1.0)])
    perf = pipeline_perf([{"samples": 4, "engine_s": 1.0, "put_s": 0.0}], training)
    record = {"loss": 2.5, "acc_k": [0.5, 0.25], "tau_sim": 1.625}
    base = {
        "run_id": "r1",
        "run_dir": "/out/runs/r1",
        "mode": "local",
        "stages": {"tokenize": 0.1, "vocab": 0.1, "generate+train": 12.0},
        "wall_s": 14.0,
        "cache": {"tokenize": "Cached", "vocab": "Completed"},
        "producer_failures": [],
        "training": {
            "last_checkpoint": "/out/runs/r1/checkpoints/iter_0000002",
            "best_checkpoint": None,
            "summary": {"steps": 2, "final_train": record, "final_eval": record},
        },
        "perf": perf.to_dict(),
        "publish": None,
    }
    base.update(extra)
    return base, perf


def test_summary_lines_and_markdown_show_stages_perf_metrics_and_publish_results():
    from tasks.report import summary_lines, summary_markdown

    plain, perf = summary()
    lines = summary_lines(plain)
    assert lines[1] == "stages: tokenize 0.1s (cached) | vocab 0.1s | generate+train 12.0s"
    assert "I 4.00 samples/s, T 2.00 samples/s" in lines[2]
    assert "loss 2.5000, acc_k 0.500 0.250, tau_sim 1.625" in lines[3]
    published, _ = summary(
        publish={
            "export": {"hf_dir": "/out/runs/r1/hf"},
            "evaluation": {
                "tau": 1.8,
                "alpha": [0.6, 0.3],
                "lossless": True,
                "wall_speedup": 1.2,
                "sets": {
                    "first_turns": {"tau": 2.1, "num_prompts": 40},
                    "humaneval": {"tau": 1.5, "num_prompts": 40},
                },
                "sets_table": [
                    {"set": "first_turns", "tau": 2.1},
                    {"set": "humaneval", "tau": 1.5},
                    {"set": "summary (weighted)", "tau": 1.8},
                ],
            },
            "registry": {
                "model_name": "m",
                "version": "3",
                "aliases": ["candidate"],
                "run_id": "abc",
                "gate_reason": "first version",
            },
        },
        producer_failures=["producer-1 failed: exited with code -9"],
    )
    text = "\n".join(summary_lines(published))
    assert "acceptance: tau 1.800, alpha_k 0.600 0.300" in text
    assert "  humaneval: tau 1.500 on 40 prompts" in text
    assert "registered: m v3 ['candidate']" in text
    assert "draft (HF): /out/runs/r1/hf" in text
    assert "producers failed (tolerated): producer-1" in text
    md = summary_markdown(published, perf.rows())
    for heading in (
        "### Stages",
        "### Pipeline throughput",
        "### Per-position accuracy",
        "### Acceptance",
        "### MLflow",
        "### Producer failures",
    ):
        assert heading in md
    assert "| first_turns | 2.1 |" in md and "| summary (weighted) | 1.8 |" in md


def test_log_tail_forwards_complete_lines_last_redraw_and_drops_glog_info(tmp_path: Path):
    from tasks.processes import LogTail

    log = tmp_path / "p.log"
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test-log-tail")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    tail = LogTail(log, logger, "[p0] ")
    assert tail.pump() == 0  # no file yet
    log.write_text("I1123 14:02:02.124712 14829 x.cpp:604] noise\nhello\nbar 10%\rbar 100%\npart")
    assert tail.pump() == 2
    with log.open("a") as fh:
        fh.write("ial\nE1123 14:02:03.000000 1 x.cpp:1] real error\n")
    tail.pump(final=True)
    assert records == [
        "[p0] hello",
        "[p0] bar 100%",
        "[p0] partial",
        "[p0] E1123 14:02:03.000000 1 x.cpp:1] real error",
    ]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_owned_process_groups_are_stopped_by_their_run_newest_first(tmp_path: Path):
    from spec_core.utils.procs import ProcessGroup
    from tasks.processes import OwnedProcesses

    # A parent that ignores SIGTERM with a child: the whole group must go, SIGKILL after grace.
    script = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"with open({str(tmp_path / 'tmp.pid')!r}, 'w') as fh: fh.write(str(child.pid))\n"
        f"os.replace({str(tmp_path / 'tmp.pid')!r}, {str(tmp_path / 'child.pid')!r})\n"
        "time.sleep(60)\n"
    )
    popen = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "child.pid").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int((tmp_path / "child.pid").read_text())
    order: list[str] = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def stop(self) -> None:
            order.append(self.name)

    owned = OwnedProcesses()
    owned.add("run-a", Named("services"))
    owned.add("run-a", ProcessGroup(popen, grace_s=0.5))
    owned.add("run-a", Named("producer"))
    owned.add("run-b", Named("other run"))
    assert owned.stop_run("run-a") == 3
    assert order == ["producer", "services"]
    assert popen.returncode == -9  # ignored SIGTERM, killed
    deadline = time.monotonic() + 5
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)
    assert owned.count() == 1 and owned.stop_all() == 1 and order[-1] == "other run"
    assert os.getpgid(os.getpid()) != popen.pid  # we never signalled our own group
