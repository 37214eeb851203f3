"""``speculative_training``: the whole DAG, and ``specflow demo`` (``main``).

    [regenerate] -> tokenize (cached) -> vocab map (cached) -> services
        -> N x hidden_state_generation  ┐ at the same time, streaming through Mooncake
        -> M x draft_training           ┘
        -> publish (convert, evaluate, register) -> report (artifacts)

``orchestration.mode`` picks where the children run: ``local`` makes them subflows of this run,
their processes started on this machine (the embedded default; Prefect's ephemeral server, nothing
to start by hand); ``deployments`` creates runs of the generation and training deployments on
their work pools. Either way the children are supervised by the one streaming supervisor
(``spec_core.streaming.supervisor.run_concurrently``), and this run owns the streaming services
and stops them, and every process it started, on success, failure and cancellation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Optional

from prefect import get_run_logger
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.settings import (
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from flows.children import await_deployment_run, deployment_child
from flows.generate import hidden_state_generation
from flows.params import (
    PRESET,
    ConfigForm,
    Mode,
    Override,
    config_for_parameters,
    pipeline_overrides,
)
from flows.publish import publish
from flows.train import draft_training
from spec_core.config import Config, config_to_dict, load_config, save_config
from spec_core.contracts.plan import BatchPlan
from spec_core.data.regenerate import RegenResult
from spec_core.errors import SpecflowError
from spec_core.metrics import pipeline_perf
from spec_core.paths import RunPaths
from spec_core.registry import follow_metrics
from spec_core.streaming.supervisor import Child, coroutine_child, run_concurrently
from spec_core.transfer.services import ServiceAddresses
from spec_core.utils.cli import run_main
from spec_core.utils.net import free_port
from tasks.data import (
    build_vocab_map,
    missing_outputs,
    resolve_target,
    result_dir,
    tokenize_dataset,
)
from tasks.processes import process_owning_flow, stop_all_owned
from tasks.regenerate import regenerate_responses
from tasks.report import GENERATION_PROGRESS_KEY, report_pipeline, summary_lines
from tasks.services import start_services, stop_services
from tasks.tracking import close_mlflow_run, close_on_failure, open_mlflow_run


class StageClock:
    """Wall time of each stage, in order, for the summary; one log line per stage that succeeds."""

    def __init__(self, logger: Any = None) -> None:
        self.seconds: dict[str, float] = {}
        self.logger = logger

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - start, 2)
        if self.logger is not None:
            self.logger.info("stage %s done in %.1fs", name, self.seconds[name])


async def cached(task: Any, config: dict[str, Any], *args: Any, outputs: tuple[str, ...]):
    """Run a cached data task; returns (result, state name). If a cached result names files that
    are gone (work dir cleaned by hand), run it again with the cache refreshed."""
    task = task.with_options(result_storage=result_dir(config))
    state = task(config, *args, return_state=True)
    result = await state.aresult()
    if missing_outputs(result, *outputs):
        state = task.with_options(refresh_cache=True)(config, *args, return_state=True)
        result = await state.aresult()
    return result, state.name


def resolve(
    config_path: Optional[str],
    overrides: list[str],
    mode: Optional[str],
    settings: Optional[Any] = None,
) -> Config:
    """The run's config with its run id and absolute output dir fixed, so children agree."""
    cfg = load_config(config_path, pipeline_overrides(overrides, mode, settings))
    paths = RunPaths.from_config(cfg)
    cfg.run.run_id, cfg.run.output_dir = paths.run_id, str(paths.output_dir)
    return cfg


async def name_this_run(run_id: str) -> None:
    """Show the specflow run id as the flow run's name in the UI."""
    async with get_client() as client:
        await client.update_flow_run(get_run_context().flow_run.id, name=run_id)


def rendezvous(cfg: Config) -> Optional[str]:
    """torchrun's rendezvous for multi-node training: configured; in local mode a free port on
    this host (every node runs here); in deployments mode None, so node 0 publishes its own
    address through the key queue wherever a worker runs it (docs/architecture.md §rendezvous)."""
    if cfg.training.nnodes == 1:
        return None
    if cfg.training.rdzv_endpoint or cfg.orchestration.mode != "local":
        return cfg.training.rdzv_endpoint
    return f"{cfg.transfer.host}:{free_port(cfg.transfer.host)}"


async def start_children(
    cfg: Config,
    config: dict[str, Any],
    services: dict[str, Any],
    data: dict[str, Any],
    vocab_map: Optional[str],
    target_dir: str,
) -> tuple[list[Child], list[Child]]:
    paths = RunPaths.from_config(cfg)
    producer_dir = str(paths.run_dir / "producers")
    rdzv = rendezvous(cfg)
    producer_args = [
        dict(
            config=config,
            services=services,
            train_path=data["train_path"],
            producer_id=f"producer-{i}",
            work_dir=producer_dir,
        )
        for i in range(cfg.inference.replicas)
    ]
    trainer_args = [
        dict(
            config=config,
            services=services,
            data=data,
            run_dir=str(paths.run_dir),
            vocab_map=vocab_map,
            node_rank=rank,
            rdzv_endpoint=rdzv,
        )
        for rank in range(cfg.training.nnodes)
    ]
    if cfg.orchestration.mode == "local":
        producers = [
            coroutine_child(a["producer_id"], hidden_state_generation(**a, target_dir=target_dir))
            for a in producer_args
        ]
        trainers = [
            coroutine_child(
                f"trainer-node-{a['node_rank']}", draft_training(**a, target_dir=target_dir)
            )
            for a in trainer_args
        ]
        return producers, trainers
    # Deployments: children on other machines resolve the target from the config themselves.
    # Idempotency keys name this parent run: a retry of it finds its children instead of
    # starting duplicates, a new run (even with the same run.run_id) starts its own.
    o, parent = cfg.orchestration, idempotency_prefix()
    deadlines = dict(start_timeout_s=o.child_start_timeout_s, timeout_s=o.child_timeout_s)
    producers = [
        await deployment_child(
            a["producer_id"],
            o.generation_deployment,
            a,
            f"{parent}/{a['producer_id']}",
            **deadlines,
        )
        for a in producer_args
    ]
    trainers = [
        await deployment_child(
            f"trainer-node-{a['node_rank']}",
            o.training_deployment,
            a,
            f"{parent}/trainer-node-{a['node_rank']}",
            **deadlines,
        )
        for a in trainer_args
    ]
    return producers, trainers


def idempotency_prefix() -> str:
    return f"specflow/{get_run_context().flow_run.id}"


async def run_publish(cfg: Config, config: dict[str, Any], **params: Any) -> dict[str, Any]:
    if cfg.orchestration.mode == "local":
        return publish(config, **params)
    from prefect.deployments import arun_deployment

    o = cfg.orchestration
    flow_run = await arun_deployment(
        o.publish_deployment,
        parameters=dict(config=config, **params),
        timeout=0,
        flow_run_name="publish",
        idempotency_key=f"{idempotency_prefix()}/publish",
        as_subflow=True,
    )
    flow_run = await await_deployment_run(
        flow_run.id, "publish", o.publish_deployment, o.child_start_timeout_s, o.child_timeout_s
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        raise SpecflowError(f"publish failed: {state.message if state else 'no state'}")
    return await state.aresult()


def close_tracking(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (failure, cancellation, crash): the MLflow run ends FAILED or KILLED."""
    close_on_failure(config_for_parameters, flow_run, state)


@process_owning_flow(
    stop_all_owned,
    name="speculative-training",
    extra_hooks=[close_tracking],
)
async def speculative_training(
    config_path: str = PRESET,
    overrides: Optional[list[Override]] = None,
    mode: Optional[Mode] = None,
    settings: ConfigForm = ConfigForm(),  # noqa: B008 - a pydantic model, never mutated
) -> dict[str, Any]:
    """Train a draft end to end. ``config_path`` is a YAML preset; ``settings`` (the form's
    config sections; empty fields keep the preset's values), then ``overrides``
    (``section.key=value``), then ``mode`` (local | deployments) change it. Returns the run
    summary."""
    logger = get_run_logger()
    started = time.monotonic()
    stage = StageClock(logger)
    cfg = resolve(config_path, list(overrides or []), mode, settings)
    paths = RunPaths.from_config(cfg)
    save_config(cfg, paths.config_file)
    logger.info("run %s (%s mode): %s", paths.run_id, cfg.orchestration.mode, paths.run_dir)
    await name_this_run(paths.run_id)
    config = config_to_dict(cfg)
    tracking = open_mlflow_run(config, paths.run_id, str(get_run_context().flow_run.id))
    with stage("target"):
        target_dir = resolve_target(config)
    cache_states = {}
    if cfg.dataset.regenerate.enabled:  # on-policy data: the target's own replies
        with stage("regenerate"):
            regen, cache_states["regenerate"] = await cached(
                regenerate_responses, config, target_dir, outputs=("output_path",)
            )
            # the regenerated file is in OpenAI ``messages`` form: path and format key together
            cfg.dataset = RegenResult.from_dict(regen).dataset_config(cfg.dataset)
            config = config_to_dict(cfg)
            save_config(cfg, paths.config_file)
    with stage("tokenize"):
        data, cache_states["tokenize"] = await cached(
            tokenize_dataset, config, target_dir, outputs=("train_path", "eval_path")
        )
    vocab = None
    if cfg.vocab.draft_vocab_size is not None:
        with stage("vocab"):
            vocab, cache_states["vocab"] = await cached(
                build_vocab_map, config, data["train_path"], target_dir, outputs=("vocab_map_path",)
            )
    vocab_map = vocab["vocab_map_path"] if vocab else None
    num_train = int(data["report"]["train_samples"])
    with stage("services"):
        services = start_services(config, str(paths.run_dir), num_train)
    live = None
    try:
        queue = ServiceAddresses.from_dict(services).connect_queue(cfg.transfer.connect_timeout_s)
        plan = queue.plan(cfg.transfer.connect_timeout_s)
        needed = min(
            plan.num_samples * plan.num_epochs,
            BatchPlan.from_config(cfg, num_train).samples_to_train,
        )
        progress = await acreate_progress_artifact(
            progress=0.0,
            key=GENERATION_PROGRESS_KEY,
            description=f"samples generated of the {needed} training needs",
        )

        live = follow_metrics(cfg, paths.run_id) if tracking else None

        async def update_progress() -> None:
            done = queue.produced()
            await aupdate_progress_artifact(
                artifact_id=progress, progress=min(100.0, 100.0 * done / max(needed, 1))
            )
            if live is not None:  # x axis: seconds since the pipeline started
                live.log({"pipeline/samples_produced": done}, int(time.monotonic() - started))

        with stage("generate+train"):
            producers, trainers = await start_children(
                cfg, config, services, data, vocab_map, target_dir
            )
            outcome = await run_concurrently(
                producers,
                trainers,
                queue,
                logger,
                poll_s=cfg.orchestration.poll_interval_s,
                on_poll=update_progress,
            )
        await update_progress()
    finally:
        stop_services(cfg.run.run_id)
        if live is not None:
            live.close()
    node0 = outcome.trainers[0]
    perf = pipeline_perf(outcome.producers, node0["perf"])
    published = None
    checkpoint = node0["last_checkpoint"]
    if cfg.orchestration.publish and checkpoint:
        with stage("publish"):
            published = await run_publish(
                cfg,
                config,
                run_dir=str(paths.run_dir),
                checkpoint=checkpoint,
                eval_data=data["eval_path"],
                dataset_hash=data["cache_key"],
                perf={k: v for k, v in perf.to_dict().items() if isinstance(v, (int, float))},
            )
    summary = {
        "run_id": paths.run_id,
        "mlflow": tracking,
        "run_dir": str(paths.run_dir),
        "mode": cfg.orchestration.mode,
        "flow_run_id": str(get_run_context().flow_run.id),
        "stages": stage.seconds,
        "wall_s": round(time.monotonic() - started, 2),
        "cache": cache_states,
        # (no top-level "data" key: Prefect reads one in a persisted flow result as a legacy blob)
        "dataset": {
            k: data["report"][k] for k in ("train_samples", "eval_samples", "train_tokens")
        },
        "vocab": {k: vocab[k] for k in ("draft_vocab_size", "coverage")} if vocab else None,
        "producers": outcome.producers,
        "producer_failures": outcome.producer_failures,
        "training": {k: node0[k] for k in ("last_checkpoint", "best_checkpoint", "summary")},
        "perf": perf.to_dict(),
        "publish": published,
    }
    report_pipeline(summary, perf.rows())
    close_mlflow_run(cfg, paths.run_id, perf.to_dict())
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    """``specflow demo --config C [section.key=value ...]``: run the pipeline, print a summary."""
    parser = argparse.ArgumentParser(prog="specflow demo", description=main.__doc__)
    parser.add_argument("--config", default="configs/smollm2-chitchat.yaml", help="YAML preset")
    parser.add_argument("--mode", choices=("local", "deployments"), help="orchestration.mode")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.num_steps=20")
    args = parser.parse_args(argv)
    resolve(args.config, args.overrides, args.mode)  # bad config: one line, before Prefect starts
    # Prefect's ephemeral server starts slowly on a busy 2-core machine; no telemetry offline.
    startup_s = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), 180)
    settings = {
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: startup_s,
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    try:
        with temporary_settings(settings):
            summary = asyncio.run(
                speculative_training(
                    config_path=args.config, overrides=args.overrides, mode=args.mode
                )
            )
    except SpecflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
