"""Pipeline efficiency: actual throughput against the slower stage's capacity, thru / min(I, T).

Runs ``speculative_training`` (local mode, the embedded Prefect) on the demo config for a short
training run and reads the figures ``spec_core.metrics`` computes from the run itself: inference
capacity I (producer samples per busy second), training capacity T (trained samples per compute
second) and thru (trained samples per second of the trainer's steady-state wall time). All three
come from the same run, so the ratio needs no external baseline.

    .venv/bin/python benchmarks/pipeline.py            # demo config, 40 steps (a few minutes)
    .venv/bin/python benchmarks/pipeline.py --steps 80 --config configs/other.yaml
"""

from __future__ import annotations

import os
import sys

# Before any other import: the repo root replaces this script's dir on sys.path, so the project
# is imported from the repo and no sibling script can shadow a module.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(sys.path[0])

TARGET = 0.95


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2-chitchat.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="training.num_steps")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = parser.parse_args()

    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from flows.pipeline import speculative_training

    overrides = [
        f"training.num_steps={args.steps}",
        "training.eval_interval=0",
        "training.save_interval=0",
        "orchestration.publish=false",
        f"run.run_id=bench-pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
        *args.overrides,
    ]
    settings = {
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180,
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    with temporary_settings(settings):
        summary = asyncio.run(speculative_training(config_path=args.config, overrides=overrides))
    perf = summary["perf"]
    train, infer = perf["training"], perf["inference"]
    print(f"config: {args.config} {' '.join(overrides)}")
    print(f"stages: {summary['stages']}")
    print(
        f"inference: {infer['producers']} producer(s), {infer['samples']} samples, busy "
        f"{infer['busy_s']:.1f}s, budget wait {infer['budget_wait_s']:.1f}s -> "
        f"I = {perf['inference_capacity']:.3f} samples/s"
    )
    print(
        f"training: {train['steps']} steady steps ({train['total_steps']} in all), "
        f"{train['samples']} samples, compute {train['compute_s']:.1f}s, data wait "
        f"{train['data_wait_s']:.1f}s, fill {train['fill_s']:.1f}s -> "
        f"T = {perf['training_capacity']:.3f} samples/s, thru = {perf['thru']:.3f} samples/s"
    )
    print(
        f"bottleneck: {perf['bottleneck']}; dispatch wait "
        f"{perf['dispatch_wait_mean_s']:.3f}s/step; min(I, T) = "
        f"{min(perf['inference_capacity'], perf['training_capacity']):.3f} samples/s"
    )
    ratio = perf["efficiency"]
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"RESULT pipeline_efficiency={ratio:.3f} target>={TARGET} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
