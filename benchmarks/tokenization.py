"""Tokenization throughput: specflow's data pipeline vs a plain ``apply_chat_template`` loop.

Both read the built-in chitchat JSONL (4,017 conversations) with the real SmolLM2 tokenizer,
tokenizer load included (library imports are warmed up first and not timed). The pipeline does
strictly more work (normalization, assistant-only masks, an eval split, Arrow files on disk) with
``num_proc=2``; the baseline only produces token ids, one conversation at a time. Truncation is off
in both. The machine is shared, so the two alternate ROUNDS times and the best time of each counts;
each round prints the load average, because the worker processes only speed things up when cores
are free (with the kernel's autogroup scheduling, other sessions' load caps this run's CPU share).

    .venv/bin/python benchmarks/tokenize.py
"""

from __future__ import annotations

import sys

# This script shares its name with the stdlib ``tokenize`` (which pandas, inspect, ... import):
# put the repo root, not this directory, at the front of the import path.
sys.path[0] = str(__import__("pathlib").Path(__file__).resolve().parents[1])

import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = 1.0
NUM_PROC = 2
ROUNDS = 3


def baseline(data_path: Path, tokenizer_dir: Path) -> tuple[int, float]:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    roles = {"human": "user", "gpt": "assistant"}
    count = 0
    with data_path.open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            messages = [
                {"role": roles[m["from"]], "content": m["value"]} for m in record["conversations"]
            ]
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            count += 1
    return count, time.perf_counter() - start


def pipeline(tokenizer_dir: Path, cache: Path, work: Path) -> tuple[int, float]:
    from spec_core.config import DatasetConfig
    from spec_core.data.tokenize import prepare_dataset

    cfg = DatasetConfig(
        path="builtin:chitchat",
        max_seq_length=1_000_000,
        eval_conversations=32,
        num_proc=NUM_PROC,
    )
    start = time.perf_counter()
    prepared = prepare_dataset(cfg, tokenizer_dir, work, cache, progress=False)
    elapsed = time.perf_counter() - start
    assert not prepared.cached
    report = prepared.report
    return report.train_samples + report.eval_samples, elapsed


def main() -> int:
    from transformers import AutoTokenizer

    from spec_core.assets import resolve_dataset_path, resolve_target_path

    cache = Path(os.environ.get("SPECFLOW_CACHE", "~/.cache/specflow")).expanduser()
    tokenizer_dir = resolve_target_path("builtin:smollm2-135m-instruct", cache)
    data_path = resolve_dataset_path("builtin:chitchat", cache)
    AutoTokenizer.from_pretrained(tokenizer_dir)  # warm up imports for both sides
    base_times, pipe_times = [], []
    with tempfile.TemporaryDirectory(prefix="specflow-bench-") as tmp:
        for round_ in range(ROUNDS):
            n_base, t_base = baseline(data_path, tokenizer_dir)
            n_pipe, t_pipe = pipeline(tokenizer_dir, cache, Path(tmp) / f"work{round_}")
            base_times.append(t_base)
            pipe_times.append(t_pipe)
            print(
                f"round {round_}: plain loop {t_base:.2f}s, pipeline {t_pipe:.2f}s "
                f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus)",
                flush=True,
            )
    base_rate, pipe_rate = n_base / min(base_times), n_pipe / min(pipe_times)
    print(
        f"plain apply_chat_template loop: {n_base} conversations, best {min(base_times):.2f}s = {base_rate:.0f}/s"
    )
    print(
        f"specflow prepare_dataset (num_proc={NUM_PROC}, masks + Arrow): {n_pipe} conversations, "
        f"best {min(pipe_times):.2f}s = {pipe_rate:.0f}/s"
    )
    ratio = pipe_rate / base_rate
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"RESULT tokenize_speedup={ratio:.2f} target>={TARGET} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
