"""Resume after a real kill: the CLI runs in a subprocess, gets SIGKILLed part-way, and a rerun
finishes the job; the result is byte-identical to an uninterrupted run and nothing finished is
generated again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_regen_core import make_cfg, write_dataset

from spec_core.data import regenerate as rg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CHATS = [
    {
        "id": f"chat-{i:03d}",
        "conversations": [
            {"from": "human", "value": f"hello {i} " + "tell me more. " * (i % 7)},
            {"from": "gpt", "value": "sure"},
            {"from": "human", "value": f"what about {i * 7}?"},
            {"from": "gpt", "value": "fine"},
        ],
    }
    for i in range(36)
]
SETTINGS = (
    "dataset.regenerate.turns=all",
    "dataset.regenerate.batch_size=2",
    "dataset.regenerate.max_new_tokens=12",
)


def cli(target_dir: Path, data: Path, output_dir: Path) -> list[str]:
    overrides = [
        f"target.path={target_dir}",
        f"dataset.path={data}",
        f"run.output_dir={output_dir}",
    ]
    overrides += ["dataset.max_seq_length=512", *SETTINGS]
    return [sys.executable, "-m", "spec_core.data.regenerate", "--quiet", *overrides]


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_dataset(tmp_path, untied_target_dir):
    data = write_dataset(tmp_path / "chats.jsonl", CHATS)
    cfg = make_cfg(untied_target_dir, data, *SETTINGS)
    whole = rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "whole" / "work")

    out_dir = tmp_path / "killed"
    entry = out_dir / "work" / "regenerated" / whole.cache_key
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cli(untied_target_dir, data, out_dir), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while lines(entry / rg.PARTIAL) < 4 and proc.poll() is None:
            assert time.monotonic() < deadline, "the regeneration never got going"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    done = lines(entry / rg.PARTIAL)
    assert 4 <= done < len(CHATS), "killed too late to test a resume"
    assert not (entry / rg.MANIFEST).exists()
    # A kill in the middle of a write leaves a torn line: it must be cut off, not trusted.
    with (entry / rg.PARTIAL).open("ab") as fh:
        fh.write(b'{"index": 35, "id": "chat-035", "conversation": {"id": "chat-0')

    resumed = subprocess.run(
        cli(untied_target_dir, data, out_dir) + ["--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout)
    assert result["cache_key"] == whole.cache_key and not result["cached"]
    assert result["manifest"]["counts"]["resumed"] == done
    assert Path(result["output_path"]).read_bytes() == whole.output_path.read_bytes()
    for name in ("turns_regenerated", "written", "hit_max_new_tokens"):
        assert result["manifest"]["counts"][name] == whole.manifest["counts"][name]
    assert result["manifest"]["tokens_generated"] == whole.manifest["tokens_generated"]
    assert not (entry / rg.PARTIAL).exists()
