"""The draft training loop: pooled-loss micro-batches, guarded optimizer steps, eval, checkpoints.

The algorithm (EAGLE-3, DFlash, DSpark) enters only through its ``Objective``
(``spec_core.models.algorithm``). Per optimizer step every rank:
1. takes its micro-batches from the ``SampleSource`` and lets the objective plan each one from
   the masks alone (EAGLE-3: N_k supervised pairs per TTT step; DFlash/DSpark: sampled anchors and
   the sum of their prediction weights) - the loss denominators;
2. all-reduces (denominators, real samples, tokens) - if no rank has a real sample, training is over;
3. runs forward/backward on each micro-batch with the pooled scales, syncing
   gradients only on the last one - ranks never skip a batch, empty ones contribute zero loss;
4. clips, and steps AdamW unless the global gradient norm is non-finite (then skips, counted);
5. acks the samples, all-reduces the metric sums, and logs one JSON line (rank 0).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from spec_core.config import Config
from spec_core.contracts.samples import Batch
from spec_core.models import get_algorithm
from spec_core.models.algorithm import Objective
from spec_core.models.common.target import TargetProjection
from spec_core.training.checkpoint import Checkpointer
from spec_core.training.fsdp import DistInfo, all_reduce, set_gradient_sync
from spec_core.training.metrics_log import MetricsWriter
from spec_core.training.optim import clip_gradients
from spec_core.training.sources import SampleSource, StepData
from spec_core.utils.logs import RateMeter

log = logging.getLogger(__name__)

# Fault point for the elastic-restart test, off unless set: "<rank>:<step>".
KILL_AFTER_STEP_ENV = "SPECFLOW_FAULT_KILL_AFTER_STEP"


def fault_after_step(rank: int, step: int) -> None:
    """SIGKILL this rank after optimizer step ``step`` and before its ack (weights moved, nothing
    acked: the moment a resume must get right), in torchrun's first incarnation only, so the
    restarted ranks run through (docs/architecture.md §processes)."""
    spec = os.environ.get(KILL_AFTER_STEP_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    want_rank, _, want_step = spec.partition(":")
    if int(want_rank) == rank and int(want_step) == step:
        log.warning("fault injection: SIGKILL of rank %d after step %d, before its ack", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class StepOutcome:
    record: dict[str, Any]
    skipped: bool


class Trainer:
    def __init__(
        self,
        *,
        cfg: Config,
        info: DistInfo,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        source: SampleSource,
        target: TargetProjection,
        total_steps: int,
        checkpointer: Optional[Checkpointer] = None,
        metrics: Optional[MetricsWriter] = None,
        eval_source_factory: Optional[Callable[[], SampleSource]] = None,
        draft_config_file: Optional[Path] = None,
        vocab_map_file: Optional[Path] = None,
        objective: Optional[Objective] = None,
        draft_config: Any = None,
    ) -> None:
        """``objective`` defaults to ``draft.algorithm``'s (which may need ``draft_config``)."""
        self.cfg = cfg
        self.tcfg = cfg.training
        self.meter = RateMeter(total_steps, every=max(1, self.tcfg.print_interval), unit="steps")
        self.info = info
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.source = source
        self.target = target
        self.total_steps = total_steps
        self.checkpointer = checkpointer
        self.metrics = metrics or MetricsWriter(None)
        self.eval_source_factory = eval_source_factory
        self.draft_config_file = draft_config_file
        self.vocab_map_file = vocab_map_file
        self.objective = objective or get_algorithm(cfg.draft.algorithm).objective(
            cfg, draft_config or model.config, target
        )
        self.step = 0
        self.skipped_steps = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self.best_score: Optional[float] = None
        self.last_eval: Optional[dict[str, Any]] = None
        self.last_saved_step = -1
        self.first_train: Optional[dict[str, Any]] = None
        self.last_train: Optional[dict[str, Any]] = None

    # ---- state carried in checkpoints ---------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "best_score": self.best_score,
            "last_eval": self.last_eval,
            "first_train": self.first_train,
            "total_steps": self.total_steps,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.last_saved_step = self.step
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self.consumed_tokens = int(state.get("consumed_tokens", 0))
        self.best_score = state.get("best_score")
        self.last_eval = state.get("last_eval")
        self.first_train = state.get("first_train")

    # ---- one optimizer step ---------------------------------------------------------------

    def _forward(
        self, batch: Batch, plan: Any, scales: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.objective.forward(self.model, batch.to(self.info.device), plan, scales)

    def _step_counts(
        self, data: StepData, generator: Optional[torch.Generator] = None
    ) -> tuple[list[Any], torch.Tensor]:
        """(plans, [loss denominators..., real samples, real tokens]) over this rank's
        micro-batches."""
        plans, denominators = [], None
        real_samples = real_tokens = 0.0
        for mb in data.micro_batches:
            plan, local = self.objective.plan(mb, generator)
            plans.append(plan)
            denominators = local if denominators is None else denominators + local
            real = torch.tensor([bool(s) for s in mb.sample_ids])
            real_samples += float(real.sum())
            real_tokens += float(mb.attention_mask[real].sum())
        tail = torch.tensor([real_samples, real_tokens], dtype=torch.float64)
        return plans, torch.cat([denominators.to(torch.float64), tail])

    def train_step(self, data: StepData) -> Optional[StepOutcome]:
        """Run one optimizer step; None when no rank had a real sample (end of data)."""
        started = time.perf_counter()
        plans, local_counts = self._step_counts(data)
        counts = all_reduce(local_counts.to(self.info.device)).cpu()
        num_samples, num_tokens = counts[-2], counts[-1]
        if num_samples == 0:
            return None
        scales = self.objective.scales(counts[:-2], self.info.world_size)
        sums = self.objective.metric_zeros(self.info.device)
        last = len(data.micro_batches) - 1
        for i, (batch, plan) in enumerate(zip(data.micro_batches, plans, strict=True)):
            set_gradient_sync(self.model, i == last)
            loss, metric_sums = self._forward(batch, plan, scales)
            loss.backward()
            sums += metric_sums
        grad_norm = clip_gradients(self.model, self.tcfg.max_grad_norm)
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.skipped_steps += 1
            log.warning(
                "step %d: non-finite gradient norm %s, update skipped", self.step, grad_norm
            )
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.scheduler.get_last_lr()[0])
        with warnings.catch_warnings():  # "scheduler before optimizer" on a skipped first step
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        fault_after_step(self.info.rank, self.step)
        self.source.ack(data.sample_ids)
        self.consumed_samples += int(num_samples)
        self.consumed_tokens += int(num_tokens)
        compute_s = time.perf_counter() - started
        all_reduce(sums)
        timing = torch.tensor([data.data_wait_s, compute_s], dtype=torch.float64)
        timing = all_reduce(timing.to(self.info.device), dist.ReduceOp.MAX).cpu()
        wall = float(timing.sum())
        record = {
            "split": "train",
            "step": self.step,
            **self.objective.summarize(sums),
            "lr": lr,
            "grad_norm": grad_norm,
            "samples": int(num_samples),
            "tokens": int(num_tokens),
            "tokens_per_s": float(num_tokens) / max(wall, 1e-9),
            "data_wait_s": float(timing[0]),
            "compute_s": float(timing[1]),
            "skipped": skipped,
            "skipped_steps": self.skipped_steps,
            "consumed_samples": self.consumed_samples,
        }
        return StepOutcome(record, skipped)

    # ---- eval -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> Optional[dict[str, Any]]:
        if self.eval_source_factory is None:
            return None
        source = self.eval_source_factory()
        sums = self.objective.metric_zeros(self.info.device)
        generator = torch.Generator().manual_seed(self.tcfg.seed)  # same anchors every eval
        samples = 0
        started = time.perf_counter()
        try:
            for _ in range(max(1, self.tcfg.eval_batches)):
                data = source.next_step()
                real = all_reduce(torch.tensor([float(data.num_real)], device=self.info.device))
                if real.item() == 0:
                    break
                samples += int(real.item())
                plans, local_counts = self._step_counts(data, generator)
                scales = self.objective.scales(local_counts[:-2], 1)  # only metrics are kept
                for batch, plan in zip(data.micro_batches, plans, strict=True):
                    _, metric_sums = self._forward(batch, plan, scales)
                    sums += metric_sums
        finally:
            source.close()
        all_reduce(sums)
        record = {
            "split": "eval",
            "step": self.step,
            **self.objective.summarize(sums),
            "samples": samples,
            "eval_s": time.perf_counter() - started,
        }
        self.last_eval = record
        return record

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self, is_best: bool = False) -> Optional[Path]:
        if self.checkpointer is None or self.draft_config_file is None:
            return None
        path = self.checkpointer.save(
            self.step,
            self.model,
            self.optimizer,
            self.scheduler,
            self.source,
            self.state(),
            self.draft_config_file,
            self.vocab_map_file,
            is_best=is_best,
        )
        self.last_saved_step = self.step
        return path

    def _eval_and_maybe_save(self, final: bool) -> None:
        t = self.tcfg
        due_eval = (t.eval_interval > 0 and self.step % t.eval_interval == 0) or final
        if self.last_eval is not None and self.last_eval["step"] == self.step:
            due_eval = False  # already evaluated at this step (final step on an interval)
        is_best = False
        if due_eval and self.eval_source_factory is not None:
            record = self.evaluate()
            if record is not None:
                self.metrics.write(record)
                self._print(record)
                score = record["tau_sim"]
                if self.best_score is None or score > self.best_score:
                    self.best_score, is_best = score, True
        due_save = (t.save_interval > 0 and self.step % t.save_interval == 0) or final or is_best
        if due_save and self.last_saved_step != self.step:
            self.save(is_best=is_best)

    # ---- loop -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.meter = RateMeter(
            self.total_steps, start=self.step, every=self.meter.every, unit="steps"
        )  # from here: a resumed run's rate counts only the steps it runs
        while self.step < self.total_steps:
            outcome = self.train_step(self.source.next_step())
            if outcome is None:
                break
            record = outcome.record
            self.last_train = record
            if self.first_train is None:
                self.first_train = record
            if self.step % max(1, self.tcfg.log_interval) == 0 or self.step == 1:
                self.metrics.write(record)
            if self.meter.due(self.step) or self.step == 1:
                self._print(record)
            self._eval_and_maybe_save(final=False)
        self._eval_and_maybe_save(final=True)
        ckpt = self.checkpointer
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "skipped_steps": self.skipped_steps,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "first_train": self.first_train,
            "final_train": self.last_train,
            "final_eval": self.last_eval,
            "best_score": self.best_score,
            "last_checkpoint": str(ckpt.latest) if ckpt and ckpt.latest else None,
            "best_checkpoint": str(ckpt.best) if ckpt and ckpt.best else None,
            "wall_s": time.perf_counter() - started,
        }

    def _print(self, record: dict[str, Any]) -> None:
        """One console line (rank 0): a train line every ``training.print_interval`` steps with
        the rate and ETA, and every eval; metrics.jsonl keeps every logged step."""
        if not self.info.is_main:
            return
        acc = " ".join(f"{a:.3f}" for a in record["acc_k"][:4])
        if record["split"] == "train":
            head = f"step {self.meter.line(record['step'])}"
            extra = (
                f"lr {record['lr']:.2e} gnorm {record['grad_norm']:.3f} "
                f"tok/s {record['tokens_per_s']:.0f} wait {record['data_wait_s']:.2f}s"
            )
        else:
            head = f"step {record['step']}/{self.total_steps}"
            extra = f"samples {record['samples']}"
        print(
            f"[{record['split']}] {head} loss {record['loss']:.4f} "
            f"acc_k {acc} tau_sim {record['tau_sim']:.3f} {extra}",
            flush=True,
        )
