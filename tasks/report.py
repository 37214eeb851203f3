"""What the Prefect UI shows for a pipeline run, and the CLI prints.

Artifacts (stable keys, so each run adds a version): ``generation-progress`` and
``training-progress`` (progress bars while the run is live), ``pipeline-throughput`` (I, T, thru,
dispatch wait, data vs compute time), ``per-position-accuracy`` (TTT positions, last train step and
final eval) and ``run-summary`` (markdown: stage times, outputs, training metrics, acceptance and
the MLflow run/model version once published).
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from spec_core.metrics import markdown_table, per_position_accuracy

GENERATION_PROGRESS_KEY = "generation-progress"
THROUGHPUT_KEY = "pipeline-throughput"
ACCURACY_KEY = "per-position-accuracy"
SUMMARY_KEY = "run-summary"


def _train(summary: dict[str, Any]) -> tuple[Optional[dict], Optional[dict], dict]:
    trainer = summary["training"]["summary"] or {}
    return trainer.get("final_train"), trainer.get("final_eval"), trainer


def _metrics_line(record: Optional[dict[str, Any]]) -> str:
    if not record:
        return "n/a"
    acc = " ".join(f"{a:.3f}" for a in (record.get("acc_k") or [])[:4])
    return f"loss {record['loss']:.4f}, acc_k {acc}, tau_sim {record['tau_sim']:.3f}"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The run in a few lines: stage times, I / T / thru, final metrics, outputs."""
    perf = summary["perf"]
    final_train, final_eval, trainer = _train(summary)
    stages = " | ".join(
        f"{name} {secs:.1f}s" + (" (cached)" if summary["cache"].get(name) == "Cached" else "")
        for name, secs in summary["stages"].items()
    )
    lines = [
        f"specflow run {summary['run_id']} ({summary['mode']} mode): {summary['wall_s']:.1f}s",
        f"stages: {stages}",
        f"pipeline: I {perf['inference_capacity']:.2f} samples/s, "
        f"T {perf['training_capacity']:.2f} samples/s, thru {perf['thru']:.2f} samples/s "
        f"= {perf['efficiency']:.3f} x min(I, T) (bottleneck: {perf['bottleneck']}); "
        f"dispatch wait {perf['dispatch_wait_mean_s']:.3f}s/step; "
        f"data {perf['training']['data_wait_s']:.1f}s vs compute {perf['training']['compute_s']:.1f}s",
        f"training: {trainer.get('steps', 0)} steps; last step {_metrics_line(final_train)}",
        f"eval: {_metrics_line(final_eval)}",
    ]
    if summary["producer_failures"]:
        lines.append(f"producers failed (tolerated): {'; '.join(summary['producer_failures'])}")
    published = summary.get("publish") or {}
    if published.get("evaluation"):
        ev = published["evaluation"]
        alpha = " ".join(f"{a:.3f}" for a in ev["alpha"])
        lines.append(f"acceptance: tau {ev['tau']:.3f}, alpha_k {alpha}")
        for name, r in (ev.get("sets") or {}).items():
            lines.append(f"  {name}: tau {r['tau']:.3f} on {r['num_prompts']} prompts")
    if published.get("registry"):
        reg = published["registry"]
        lines.append(f"registered: {reg['model_name']} v{reg['version']} {reg['aliases']}")
    lines.append(f"checkpoint: {summary['training']['last_checkpoint']}")
    if published.get("export"):
        lines.append(f"draft (HF): {published['export']['hf_dir']}")
    lines.append(f"run dir: {summary['run_dir']}")
    return lines


def summary_markdown(summary: dict[str, Any], throughput: list[dict[str, Any]]) -> str:
    final_train, final_eval, trainer = _train(summary)
    stage_rows = [
        {"stage": name, "seconds": secs, "cached": summary["cache"].get(name) == "Cached"}
        for name, secs in summary["stages"].items()
    ]
    published = summary.get("publish") or {}
    outputs = [
        f"- run dir: `{summary['run_dir']}`",
        f"- last checkpoint: `{summary['training']['last_checkpoint']}`",
        f"- best checkpoint: `{summary['training']['best_checkpoint']}`",
    ]
    if published.get("export"):
        outputs.append(f"- HF draft: `{published['export']['hf_dir']}`")
    parts = [
        f"## specflow run `{summary['run_id']}` ({summary['mode']} mode)",
        f"Wall time **{summary['wall_s']:.1f}s**.",
        "### Stages",
        markdown_table(stage_rows),
        "### Outputs",
        "\n".join(outputs),
        "### Training",
        f"{trainer.get('steps', 0)} steps.",
        f"- last step: {_metrics_line(final_train)}",
        f"- final eval: {_metrics_line(final_eval)}",
        "### Pipeline throughput",
        markdown_table(throughput),
        "### Per-position accuracy",
        markdown_table(per_position_accuracy(final_train, final_eval)),
    ]
    if summary["producer_failures"]:
        parts += [
            "### Producer failures (tolerated)",
            "\n".join(f"- {f}" for f in summary["producer_failures"]),
        ]
    if published.get("evaluation"):
        ev = published["evaluation"]
        parts += [
            "### Acceptance (real speculative decoding)",
            f"weighted tau **{ev['tau']:.3f}**, alpha_k "
            + " ".join(f"{a:.3f}" for a in ev["alpha"])
            + f", lossless {ev['lossless']}, wall speedup {ev['wall_speedup']:.2f}x "
            + f"(engine {ev.get('engine', 'hf')})",
        ]
        if ev.get("sets_table"):
            parts.append(markdown_table(ev["sets_table"]))
    if published.get("registry"):
        reg = published["registry"]
        parts += [
            "### MLflow",
            f"- run `{reg['run_id']}`, model `{reg['model_name']}` version {reg['version']} "
            f"({', '.join(reg['aliases'])}): {reg['gate_reason']}",
        ]
    return "\n\n".join(parts)


@task(name="report-pipeline")
def report_pipeline(summary: dict[str, Any], throughput: list[dict[str, Any]]) -> list[str]:
    """Publish the throughput and accuracy tables and the markdown summary; returns their keys."""
    final_train, final_eval, _ = _train(summary)
    create_table_artifact(
        key=THROUGHPUT_KEY,
        table=throughput,
        description="inference capacity I, training capacity T, actual thru, waits",
    )
    create_table_artifact(
        key=ACCURACY_KEY,
        table=per_position_accuracy(final_train, final_eval) or [{"position": None}],
        description="top-1 accuracy per TTT position (last train step, final eval)",
    )
    create_markdown_artifact(
        key=SUMMARY_KEY,
        markdown=summary_markdown(summary, throughput),
        description=f"specflow run {summary['run_id']}",
    )
    return [THROUGHPUT_KEY, ACCURACY_KEY, SUMMARY_KEY]
