"""A real streaming run with the vLLM producer: vLLM (its own venv) -> Mooncake -> our trainer.

``run_streaming`` starts the services and a producer process with ``inference.python`` set to the
vLLM venv's interpreter, so the producer runs vLLM's ``extract_hidden_states`` with our connector
on the real SmolLM2 target and puts every capture into Mooncake; the real torchrun trainer (this
venv) trains EAGLE-3 on them. Needs the vLLM venv, so it runs only when ``SPECFLOW_VLLM_PYTHON``
names its interpreter (``make vllm-test`` sets it); vLLM's start-up alone takes a minute or two
on these CPUs.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from spec_core.config import load_config

pytestmark = pytest.mark.slow

VLLM_PYTHON = os.environ.get("SPECFLOW_VLLM_PYTHON", "")
NUM_SAMPLES = 24


def make_split(path: Path, n: int, seed: int = 0) -> Path:
    import datasets

    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("sample_id", "input_ids", "loss_mask", "num_tokens")}
    for i in range(n):
        length = rng.randint(16, 60)
        rows["sample_id"].append(f"conv-{i:04d}")
        rows["input_ids"].append([rng.randrange(3, 49152) for _ in range(length)])
        rows["loss_mask"].append([0] * 4 + [1] * (length - 4))
        rows["num_tokens"].append(length)
    rows["num_loss_tokens"] = [t - 4 for t in rows["num_tokens"]]
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


@pytest.mark.skipif(not VLLM_PYTHON, reason="set SPECFLOW_VLLM_PYTHON (make vllm-test)")
def test_streaming_run_with_the_vllm_producer(tmp_path, smollm2_dir):
    from spec_core.streaming.run import run_streaming

    cfg = load_config(
        None,
        [
            "inference.engine=vllm",
            f"inference.python={VLLM_PYTHON}",
            "inference.device=cpu",
            "inference.mem_fraction=0.25",  # vLLM CPU: share of the NUMA node for its KV cache
            "inference.batch_size=8",
            "inference.dtype=bfloat16",  # on the wire; the engine runs the target in fp32
            "target.dtype=float32",
            "dataset.max_seq_length=64",
            "training.micro_batch_size=2",
            "training.seq_bucket=16",
            "training.save_interval=0",
            "training.eval_interval=0",
            "training.warmup_ratio=0",
            "draft.ttt_length=2",
            "transfer.global_segment_mb=256",
            "transfer.byte_budget_mb=32",
            "transfer.pop_timeout_s=900",  # the trainer waits while vLLM starts
        ],
    )
    split = make_split(tmp_path / "train", NUM_SAMPLES)
    result = run_streaming(cfg, split, tmp_path / "run", target_dir=smollm2_dir, run_id="vllm")
    assert result.producer_exit_codes == [0]
    assert Counter(result.acked) == Counter((0, f"conv-{i:04d}") for i in range(NUM_SAMPLES))
    lost = {k: result.counts[k] for k in ("skipped", "dropped", "reclaimed", "missing")}
    assert lost == {
        "skipped": 0,
        "dropped": 0,
        "reclaimed": 0,
        "missing": 0,
    }  # budget waits may occur
    (stats,) = result.producer_stats
    assert stats["samples"] == NUM_SAMPLES and stats["engine_s"] > 0
    summary = result.train_result.summary
    assert summary["consumed_samples"] == NUM_SAMPLES and summary["steps"] == NUM_SAMPLES // 2
    log = (tmp_path / "run" / "streaming" / "producer-0.log").read_text(errors="replace")
    assert "SpecflowHiddenStatesConnector" in log  # vLLM loaded our connector by module path
    final = summary["final_train"]
    losses = [v for k, v in final.items() if "loss" in k and isinstance(v, float)]
    assert losses and all(math.isfinite(v) for v in losses)
    print(
        f"vLLM producer: {stats['samples']} samples, {stats['samples_per_s']:.2f} samples/s, "
        f"{stats['tokens_per_s']:.0f} tokens/s (wall incl. start-up {stats['wall_s']:.0f}s, "
        f"engine {stats['engine_s']:.1f}s, put {stats['put_s']:.2f}s); run wall {result.wall_s:.0f}s"
    )
