"""The terminal of a streaming run: Mooncake's normal start-up lines filtered (real native errors
still forwarded at their level), a training line every ``training.print_interval`` steps with a
rate and ETA."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spec_core.utils.logs import RateMeter, format_duration, line_level
from tasks.processes import LogTail

NATIVE = re.compile(r"^[WEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]", re.MULTILINE)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_log_tail_drops_startup_noise_and_forwards_real_native_errors_at_their_level(tmp_path):
    log = tmp_path / "producer.log"
    log.write_text(
        "WARNING: Logging before InitGoogleLogging() is written to STDERR\n"
        "E1207 22:47:48.632809  9946 transfer_metadata_plugin.cpp:292] GET "
        "http://127.0.0.1:53545/metadata?key=mooncake%2Fram%2F127.0.0.1%3A13084 http=404 "
        "body: metadata not found\n"
        "W1207 22:47:48.632840  9946 transfer_metadata.cpp:1115] Failed to retrieve segment "
        "descriptor, name 127.0.0.1:13084\n"
        "I1207 22:47:49.000001  9946 client.cpp:10] mounted segment\n"
        "E1207 22:48:00.100000  9946 master_client.cpp:77] Failed to connect to master\n"
        "W1207 22:48:00.200000  9946 transfer_engine.cpp:55] slow transfer\n"
        "producer producer-0: 48 samples\n"
    )
    handler = Records()
    logger = logging.getLogger("test-quiet-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        sent = LogTail(log, logger, "[p0] ").pump(final=True)
    finally:
        logger.removeHandler(handler)
    got = [(r.levelno, r.getMessage()) for r in handler.records]
    assert sent == 3
    assert got[0][0] == logging.ERROR and "Failed to connect to master" in got[0][1]
    assert got[1][0] == logging.WARNING and "slow transfer" in got[1][1]
    assert got[2] == (logging.INFO, "[p0] producer producer-0: 48 samples")


def test_rate_meter_is_due_every_n_and_at_the_end_and_gives_an_eta():
    meter = RateMeter(100, every=25, unit="steps")
    due = [step for step in range(1, 101) if meter.due(step) and meter.line(step)]
    assert due == [25, 50, 75, 100]
    line = RateMeter(10, start=2).line(6)
    assert re.fullmatch(r"6/10 \(60%\) [\d.]+ it/s ETA (\d+s|\d+m\d\ds|\d+h\d\dm)", line), line
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s"
    assert line_level("") is None and line_level("plain text") == logging.INFO


@pytest.mark.slow
def test_a_real_mooncake_client_start_is_silent_after_filtering(tmp_path):
    """A store client started against real services prints the two start-up lines (raw stderr);
    nothing native is left once filtered."""
    from spec_core.config import TransferConfig
    from spec_core.transfer.services import start_services

    cfg = TransferConfig(global_segment_mb=64, byte_budget_mb=16, connect_timeout_s=10.0)
    code = (
        "import sys, json; from spec_core.config import TransferConfig; "
        "from spec_core.transfer.services import ServiceAddresses; "
        "a = ServiceAddresses.from_dict(json.loads(sys.argv[1])); "
        "a.connect_store(TransferConfig(connect_timeout_s=10.0, client_mode='tcp')).close()"
    )
    with start_services(cfg, "quiet", tmp_path) as services:
        import json

        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(services.addresses.to_dict())],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "metadata not found" in proc.stderr  # what a user saw before
    kept = [line for line in proc.stderr.splitlines() if line_level(line) not in (None,)]
    assert not [line for line in kept if NATIVE.match(line)], kept


@pytest.mark.slow
def test_streaming_run_terminal_has_no_native_lines_and_one_train_line_per_interval(
    tmp_path: Path, tiny_target_dir: Path, capfd
):
    from helpers import make_split

    from spec_core.config import load_config
    from spec_core.streaming.run import run_streaming

    steps, every = 12, 4
    cfg = load_config(
        None,
        [
            f"training.num_steps={steps}",
            f"training.print_interval={every}",
            "training.micro_batch_size=2",
            "training.seq_bucket=16",
            "training.save_interval=0",
            "training.eval_interval=0",
            "draft.ttt_length=2",
            "draft.capture_indices=[1,2,3]",
            "inference.batch_size=4",
            "inference.replicas=1",
            "transfer.global_segment_mb=128",
            "transfer.byte_budget_mb=16",
            "transfer.connect_timeout_s=20",
        ],
    )
    data = make_split(tmp_path / "train", 40)
    result = run_streaming(cfg, data, tmp_path / "run", target_dir=tiny_target_dir)
    assert result.train_result.summary["steps"] == steps
    out, err = capfd.readouterr()
    terminal = out + err
    assert not NATIVE.search(terminal), NATIVE.findall(terminal)
    assert "Logging before InitGoogleLogging" not in terminal
    train_lines = [line for line in terminal.splitlines() if line.startswith("[train] step")]
    assert len(train_lines) == steps // every + 1, train_lines  # step 1, then every N
    assert all(" ETA " in line and "steps/s" in line for line in train_lines)
    # the noise did happen: it is in the trainer's own log file, not on the terminal
    assert "metadata not found" in (tmp_path / "run" / "logs" / "train.log").read_text()
