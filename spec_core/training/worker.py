"""torchrun entry point: ``python -m torch.distributed.run ... -m spec_core.training.worker --job J``.

Every rank reads the same ``TrainJob``, builds the draft (identical seeded init on every rank, then
FSDP2 shards it), its ``SampleSource`` (in-process HF target, or the streaming source), the
optimizer/schedule, restores a checkpoint if asked, and runs the ``Trainer``. User errors print one
``error: ...`` line and exit 2, which the launcher turns into a ``SpecflowError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from spec_core.config import Config
from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.plan import BatchPlan
from spec_core.errors import ConfigError, SpecflowError
from spec_core.models import get_algorithm
from spec_core.models.common.target import (
    TargetHead,
    TargetProjection,
    load_target_head,
    read_target_config,
)
from spec_core.training.checkpoint import (
    LATEST,
    Checkpointer,
    load_model_weights,
    read_pointer,
    resolve_checkpoint,
    run_identity,
)
from spec_core.training.fsdp import DistInfo, build_mesh, init_distributed, parallelize
from spec_core.training.inprocess import InProcessSource, TokenizedSplit
from spec_core.training.job import TrainJob
from spec_core.training.metrics_log import MetricsWriter
from spec_core.training.optim import build_optimizer
from spec_core.training.schedule import build_scheduler
from spec_core.training.sources import SampleSource, SampleSpec
from spec_core.training.trainer import Trainer
from spec_core.utils.files import atomic_write_json, atomic_write_text

log = logging.getLogger("spec_core.training.worker")


def draft_config_for(job: TrainJob, cfg: Config, vocab_size: Optional[int]) -> Any:
    """From the checkpoint when resuming (the weights' own geometry), else derived."""
    algo = get_algorithm(cfg.draft.algorithm)
    if job.resume_from:
        return algo.load_config(resolve_checkpoint(job.resume_from) / "config.json")
    target_json = read_target_config(job.target_dir)
    return algo.derive_config(target_json, cfg, vocab_size, Path(job.target_dir))


def build_draft(
    dcfg: Any, cfg: Config, head: TargetHead, vocab_map: Any, device: torch.device
) -> torch.nn.Module:
    """Same seeded init on every rank, so FSDP2 can shard a replicated full model."""
    return get_algorithm(cfg.draft.algorithm).build_model(dcfg, cfg, head, vocab_map, device)


def sample_spec(dcfg: Any, cfg: Config) -> SampleSpec:
    return SampleSpec(
        aux_dim=dcfg.aux_dim,
        hidden_dim=dcfg.target_hidden_size,
        with_last_hidden=get_algorithm(cfg.draft.algorithm).needs_last_hidden(cfg.draft),
        dtype=getattr(torch, cfg.inference.dtype),
    )


def _engine(job: TrainJob, cfg: Config, dcfg: Any, info: DistInfo):
    from spec_core.engines.hf import HFEngine

    spec = CaptureSpec(
        capture_indices=tuple(dcfg.capture_indices),
        with_last_hidden=get_algorithm(cfg.draft.algorithm).needs_last_hidden(cfg.draft),
        dtype=getattr(torch, cfg.inference.dtype),
    )
    return HFEngine(
        job.target_dir,
        spec,
        device=str(info.device),
        batch_size=cfg.inference.batch_size,
        model_dtype=getattr(torch, cfg.target.dtype),
    )


def build_sources(
    job: TrainJob, cfg: Config, dcfg: Any, info: DistInfo, spec: SampleSpec
) -> tuple[SampleSource, Any, int]:
    """(train source, eval source factory or None, train split size)."""
    t = cfg.training
    if not job.train_data:
        raise ConfigError("the training job has no 'train_data' (tokenized train split)")
    train_split = TokenizedSplit.load(job.train_data)
    engine = None

    def in_process(split: TokenizedSplit, split_engine: Any, **schedule: Any) -> InProcessSource:
        """A source running the target here; train and eval differ only in ``schedule``."""
        return InProcessSource(
            split,
            split_engine,
            spec,
            rank=info.rank,
            world_size=info.world_size,
            micro_batch_size=t.micro_batch_size,
            seq_bucket=t.seq_bucket,
            seed=t.seed,
            **schedule,
        )

    if job.source == "stream":
        from spec_core.training.stream_source import StreamSource

        source: SampleSource = StreamSource.from_job(
            job, rank=info.rank, world_size=info.world_size, spec=spec
        )
    else:
        engine = _engine(job, cfg, dcfg, info)
        source = in_process(
            train_split,
            engine,
            accumulation_steps=t.accumulation_steps,
            num_epochs=None if t.num_steps is not None else t.num_epochs,
        )
    eval_factory = None
    if job.eval_data:
        eval_split = TokenizedSplit.load(job.eval_data)
        eval_engine = engine or _engine(job, cfg, dcfg, info)

        def eval_factory() -> SampleSource:
            return in_process(
                eval_split, eval_engine, accumulation_steps=1, num_epochs=1, shuffle=False
            )

    return source, eval_factory, len(train_split)


def target_projection(
    head: TargetHead, cfg: Config, vocab_map: Any, device: torch.device
) -> TargetProjection:
    """The target lm_head sliced to the draft vocab; the in-vocab check runs in bf16 where the
    hardware has fast bf16 matmuls (it only feeds a metric, never the loss)."""
    dtype = torch.bfloat16 if cfg.training.dtype == "bfloat16" else torch.float32
    proj = TargetProjection.build(
        head.lm_head,
        None if vocab_map is None else vocab_map.t2d,
        head.norm_weight if cfg.draft.last_hidden_prenorm else None,
        head.norm_eps,
    ).to(device, dtype)
    if proj.rest is not None and fast_bf16(device):
        proj.rest = proj.rest.to(torch.bfloat16)
    return proj


def fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def run(job: TrainJob, info: DistInfo) -> dict[str, Any]:
    cfg = job.cfg
    if cfg.training.cpu_threads is not None and info.device.type == "cpu":
        torch.set_num_threads(cfg.training.cpu_threads)  # share the cores with co-located producers
    torch.manual_seed(cfg.training.seed)
    run_dir = Path(job.run_dir)
    head = load_target_head(job.target_dir, cfg.target)
    vocab_map = None
    if job.vocab_map:
        from spec_core.vocab import load_vocab_map

        vocab_map = load_vocab_map(Path(job.vocab_map))
        if vocab_map.target_vocab_size != head.vocab_size:
            raise ConfigError(
                f"vocab map {job.vocab_map} is for a {vocab_map.target_vocab_size}-token vocab, "
                f"the target has {head.vocab_size}; rebuild it with `specflow vocab`"
            )
        if vocab_map.draft_vocab_size == head.vocab_size:
            vocab_map = None  # a full-vocab draft has no d2t/t2d (vLLM refuses them)
    dcfg = draft_config_for(job, cfg, vocab_map.draft_vocab_size if vocab_map else None)
    draft_config_file = run_dir / "draft_config.json"
    if info.is_main:
        dcfg.save(draft_config_file)
    model = build_draft(dcfg, cfg, head, vocab_map, info.device)
    frozen = {model.embed_tokens.weight}
    parallelize(model, build_mesh(info), cfg.training, frozen)
    optimizer = build_optimizer(model, cfg.training)
    spec = sample_spec(dcfg, cfg)
    source, eval_factory, num_train = build_sources(job, cfg, dcfg, info, spec)
    total = BatchPlan.from_config(cfg, num_train, info.world_size).total_steps
    scheduler = build_scheduler(optimizer, cfg.training, total)
    checkpointer = Checkpointer(
        job.checkpoint_dir,
        info.rank,
        info.world_size,
        cfg.training.max_checkpoints,
        identity=run_identity(job.train_data, total),
        accept_mismatch=cfg.training.resume_accept_mismatch,
    )
    metrics = MetricsWriter(job.metrics_file if info.is_main else None)
    trainer = Trainer(
        cfg=cfg,
        info=info,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        source=source,
        target=target_projection(head, cfg, vocab_map, info.device),
        total_steps=total,
        checkpointer=checkpointer,
        metrics=metrics,
        eval_source_factory=eval_factory,
        draft_config_file=draft_config_file,
        vocab_map_file=Path(job.vocab_map) if vocab_map is not None else None,
        draft_config=dcfg,
    )
    dist.barrier()  # the draft config file exists before anyone copies it
    if job.resume_from:
        ckpt = resolve_checkpoint(job.resume_from)
        trainer.load_state(checkpointer.load(ckpt, model, optimizer, scheduler, source))
        log.info("resumed from %s at step %d", ckpt, trainer.step)
    elif job.continual_from:
        ckpt = resolve_checkpoint(job.continual_from)
        load_model_weights(model, ckpt)
        log.info("continual training from the weights of %s", ckpt)
    try:
        summary = trainer.run()
    finally:
        metrics.close()
        source.close()
    summary.update(metrics_file=str(job.metrics_file), run_dir=str(run_dir))
    if info.is_main:
        atomic_write_json(job.result_file, summary, sort_keys=True)
    return summary


def restart_count() -> int:
    """How often torchrun has restarted the ranks after a failure (0 on the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def after_restart(job: TrainJob) -> TrainJob:
    """The job a restarted rank runs: an exact resume from the run's latest checkpoint, or the
    job as given when none was written yet (then every rank starts over, which is as exact).
    Samples the dead incarnation trained after that checkpoint are trained again: their updates
    died with it, and the checkpoint's acked set does not count them."""
    latest = read_pointer(job.checkpoint_dir, LATEST)
    if latest is None:
        log.warning("restart %d: no checkpoint yet, starting over", restart_count())
        return job
    log.warning("restart %d after a rank failure: resuming from %s", restart_count(), latest)
    return dataclasses.replace(job, resume_from=str(latest), continual_from=None)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="spec_core.training.worker")
    parser.add_argument("--job", required=True, help="TrainJob JSON written by the launcher")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    job = None
    try:
        job = TrainJob.load(args.job)
        if restart_count():
            if job.fatal_file.is_file():  # a user error: the restart cannot fix it
                print(f"error: {job.fatal_file.read_text().strip()}", file=sys.stderr, flush=True)
                return 2
            job = after_restart(job)
        info = init_distributed(job.cfg.training)
        try:
            run(job, info)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except SpecflowError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if job is not None:
            atomic_write_text(job.fatal_file, str(exc))  # every rank: same text
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
