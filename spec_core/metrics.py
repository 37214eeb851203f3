"""Pipeline performance: how fast inference and training could go, and how fast they went together.

The figures follow TorchSpec's definitions (``docs/performance_metrics.md``), computed after a run
from what the stages already record: each producer's ``ProducerStats`` and the trainer's metrics
JSONL (one ``split: train`` record per optimizer step with ``samples``, ``data_wait_s`` and
``compute_s``).

- **T**, training capacity: samples/s the trainer would sustain if data were always ready,
  ``trained samples / compute time``.
- **I**, inference capacity: samples/s the producers would sustain if never held back, the sum over
  producers of ``samples / busy time`` (engine forward + store put; waits for the byte budget and
  idle time are excluded).
- **thru**: samples/s actually trained, ``trained samples / (data wait + compute)``.
- **dispatch wait**: time the trainer waited for its next batch. High means inference is the
  bottleneck; data time much larger than compute means the store or loading is.

The first step also waits for the pipeline to fill (producers loading the target, first batch
through the engine): that wait is reported as ``fill_s`` and, when there are at least two steps,
the step is left out of T and thru, which describe the steady state. Samples produced while the
trainer was still starting are a backlog it drains in the window, so when inference is the
bottleneck thru can exceed I by backlog / window (a few percent on short runs).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

STEADY_FROM_STEP = 2  # step 1 carries the pipeline fill


@dataclass(frozen=True)
class TrainerPerf:
    steps: int  # steps in the steady-state window
    samples: int  # samples trained in that window
    tokens: int
    compute_s: float
    data_wait_s: float
    fill_s: float  # data wait of the first step (pipeline fill)
    total_steps: int  # all logged steps
    total_samples: int

    @property
    def capacity(self) -> float:
        """T: samples/s with data always ready."""
        return self.samples / self.compute_s if self.compute_s > 0 else 0.0

    @property
    def thru(self) -> float:
        """Samples/s actually trained in the steady state."""
        wall = self.compute_s + self.data_wait_s
        return self.samples / wall if wall > 0 else 0.0

    @property
    def dispatch_wait_mean_s(self) -> float:
        return self.data_wait_s / self.steps if self.steps else 0.0


@dataclass(frozen=True)
class InferencePerf:
    producers: int
    samples: int
    tokens: int
    busy_s: float  # engine + put, summed over producers
    budget_wait_s: float
    idle_s: float
    capacity: float  # I: sum over producers of samples / busy time


@dataclass(frozen=True)
class PipelinePerf:
    inference: InferencePerf
    training: TrainerPerf

    @property
    def bound(self) -> float:
        """min(I, T): the best the pipeline could do."""
        return min(self.inference.capacity, self.training.capacity)

    @property
    def efficiency(self) -> float:
        """thru / min(I, T) (target >= 0.95)."""
        return self.training.thru / self.bound if self.bound > 0 else 0.0

    @property
    def bottleneck(self) -> str:
        return "inference" if self.inference.capacity < self.training.capacity else "training"

    def to_dict(self) -> dict[str, Any]:
        return {
            "inference_capacity": self.inference.capacity,
            "training_capacity": self.training.capacity,
            "thru": self.training.thru,
            "efficiency": self.efficiency,
            "bottleneck": self.bottleneck,
            "dispatch_wait_mean_s": self.training.dispatch_wait_mean_s,
            "inference": dataclasses.asdict(self.inference),
            "training": dataclasses.asdict(self.training),
        }

    def rows(self) -> list[dict[str, Any]]:
        """The throughput table shown in the Prefect UI and printed by the CLI."""
        t, i = self.training, self.inference
        return [
            _row("I  inference capacity", i.capacity, "samples/s", f"{i.producers} producer(s)"),
            _row("T  training capacity", t.capacity, "samples/s", f"{t.steps} steady steps"),
            _row("thru  actual", t.thru, "samples/s", f"bottleneck: {self.bottleneck}"),
            _row("thru / min(I, T)", self.efficiency, "", "target >= 0.95"),
            _row("dispatch wait / step", t.dispatch_wait_mean_s, "s", "trainer waiting for data"),
            _row("data time", t.data_wait_s, "s", "steady state, total"),
            _row("compute time", t.compute_s, "s", "steady state, total"),
            _row("pipeline fill", t.fill_s, "s", "first step's wait"),
            _row("producer busy", i.busy_s, "s", "engine + put"),
            _row("producer budget wait", i.budget_wait_s, "s", "store budget full"),
        ]


def _row(metric: str, value: float, unit: str, note: str) -> dict[str, Any]:
    return {"metric": metric, "value": round(float(value), 4), "unit": unit, "note": note}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All JSON lines of a metrics file (missing file = no records)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def train_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train records, one per step; a resumed run's re-logged steps keep their last record."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        if record.get("split") == "train":
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def trainer_perf(records: Iterable[dict[str, Any]]) -> TrainerPerf:
    steps = train_records(records)
    if not steps:
        return TrainerPerf(0, 0, 0, 0.0, 0.0, 0.0, 0, 0)
    fill_s = float(steps[0].get("data_wait_s") or 0.0)
    steady = [r for r in steps if r["step"] >= STEADY_FROM_STEP] if len(steps) > 1 else steps
    return TrainerPerf(
        steps=len(steady),
        samples=sum(int(r.get("samples") or 0) for r in steady),
        tokens=sum(int(r.get("tokens") or 0) for r in steady),
        compute_s=sum(float(r.get("compute_s") or 0.0) for r in steady),
        data_wait_s=sum(float(r.get("data_wait_s") or 0.0) for r in steady),
        fill_s=fill_s,
        total_steps=len(steps),
        total_samples=sum(int(r.get("samples") or 0) for r in steps),
    )


def inference_perf(stats: Sequence[dict[str, Any]]) -> InferencePerf:
    """From ``ProducerStats.to_dict()`` of every producer that reported."""
    capacity = 0.0
    for s in stats:
        busy = float(s.get("engine_s", 0.0)) + float(s.get("put_s", 0.0))
        if busy > 0:
            capacity += int(s.get("samples", 0)) / busy
    return InferencePerf(
        producers=len(stats),
        samples=sum(int(s.get("samples", 0)) for s in stats),
        tokens=sum(int(s.get("tokens", 0)) for s in stats),
        busy_s=sum(float(s.get("engine_s", 0.0)) + float(s.get("put_s", 0.0)) for s in stats),
        budget_wait_s=sum(float(s.get("budget_wait_s", 0.0)) for s in stats),
        idle_s=sum(float(s.get("idle_s", 0.0)) for s in stats),
        capacity=capacity,
    )


def pipeline_perf(
    producer_stats: Sequence[dict[str, Any]], training: TrainerPerf | dict[str, Any]
) -> PipelinePerf:
    """Combine producer stats with the trainer's figures (a ``TrainerPerf`` or its dict, as a
    training flow run on another machine returns it)."""
    if isinstance(training, dict):
        training = TrainerPerf(**training)
    return PipelinePerf(inference_perf(producer_stats), training)


def per_position_accuracy(
    final_train: Optional[dict[str, Any]], final_eval: Optional[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per TTT position k: the last train step's and the final eval's top-1 accuracy."""
    train_acc = list((final_train or {}).get("acc_k") or [])
    eval_acc = list((final_eval or {}).get("acc_k") or [])
    rows = []
    for k in range(max(len(train_acc), len(eval_acc))):
        rows.append(
            {
                "position": k,
                "train_acc": _rounded(train_acc, k),
                "eval_acc": _rounded(eval_acc, k),
            }
        )
    return rows


def _rounded(values: list[Any], k: int) -> Optional[float]:
    if k >= len(values) or values[k] is None:
        return None
    return round(float(values[k]), 4)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "_none_"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join("" if row[k] is None else str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def plot_training(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """The curves as PNGs for a run's artifacts: ``loss_curves.png`` (train and eval loss, eval
    tau_sim) and ``per_position_accuracy.png`` (last train step vs final eval, per position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("split") == "eval" and r.get("loss") is not None]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    left.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    left.set(xlabel="step", ylabel="loss", title="loss")
    left.legend(fontsize=8)
    right.plot([r["step"] for r in train], [r.get("tau_sim") for r in train], label="train")
    right.plot([r["step"] for r in evals], [r.get("tau_sim") for r in evals], "o-", label="eval")
    right.set(xlabel="step", ylabel="simulated tau", title="tau_sim")
    right.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "loss_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    rows = per_position_accuracy(train[-1] if train else None, evals[-1] if evals else None)
    if rows:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        xs = [r["position"] for r in rows]
        for offset, key in ((-0.2, "train_acc"), (0.2, "eval_acc")):
            values = [r[key] or 0.0 for r in rows]
            ax.bar([x + offset for x in xs], values, width=0.4, label=key.replace("_", " "))
        ax.set(xlabel="draft position k", ylabel="top-1 accuracy", ylim=(0, 1), xticks=xs)
        ax.set_title("per-position accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "per_position_accuracy.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
