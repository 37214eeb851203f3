"""The processes of the chaos test (test_chaos.py): a producer and a trainer rank, each started by
a fork server that has already imported torch, datasets, Mooncake and specflow, so a process
that a fault kills is replaced in milliseconds. Each runs the real code (``run_producer``,
``StreamSource``) against the real services; only the target model is a fake
(``SyntheticEngine``: tensors derived from the token ids, so any mix-up would show).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import datasets  # noqa: F401  (imported here so the fork server has it loaded)
import torch

from spec_core.config import config_from_dict
from spec_core.contracts.samples import CapturedSample, TokenizedSample
from spec_core.engines.base import HiddenStateEngine
from spec_core.errors import ServiceError
from spec_core.streaming.producer import SERVICE_EXIT, run_producer
from spec_core.training.sources import SampleSpec
from spec_core.training.stream_source import StreamSource
from spec_core.transfer.services import ServiceAddresses
from spec_core.utils import faults

HIDDEN = 8
NUM_AUX = 3


class SyntheticEngine(HiddenStateEngine):
    """A fake target (no model can run thousands of times in a test): hidden states computed
    from the token ids."""

    vocab_size = 49152

    def capture(self, samples: Sequence[TokenizedSample]) -> list[CapturedSample]:
        out = []
        for s in samples:
            ids = torch.tensor(s.input_ids, dtype=torch.int64)
            base = ids.to(torch.float32).unsqueeze(1) / 1000.0
            out.append(
                CapturedSample(
                    sample_id=s.sample_id,
                    input_ids=ids,
                    loss_mask=torch.tensor(s.loss_mask, dtype=torch.uint8),
                    aux_hidden=base.expand(-1, NUM_AUX * HIDDEN).contiguous(),
                    last_hidden=base.expand(-1, HIDDEN).contiguous() + 1.0,
                )
            )
        return out


def _start(log_path: str, spec: str, fault_log: str) -> None:
    """Own log file (the fork server's stdio is not ours) and this process's fault rule."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    torch.set_num_threads(1)
    faults.configure(spec or None, fault_log)
    print(f"chaos: pid {os.getpid()} starts at {time.time():.3f} with rule {spec!r}", flush=True)


def produce(job: dict[str, Any], producer_id: str, log_path: str, spec: str, fault_log: str):
    _start(log_path, spec, fault_log)
    try:
        run_producer(
            config_from_dict(job["config"]),
            ServiceAddresses.from_dict(job["services"]),
            job["data"],
            producer_id,
            engine=SyntheticEngine(),
        )
    except ServiceError as exc:  # reaped by peers, or a deadline: the harness retries it
        print(f"error: {exc}", file=sys.stderr, flush=True)
        _exit(SERVICE_EXIT)
    _exit(0)


def _exit(code: int) -> None:
    """Leave without interpreter shutdown: a process here once printed its error and then did
    not exit (cause not found); the harness counts exits, not shutdowns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train(job: dict[str, Any], rank: int, log_path: str, spec: str, fault_log: str):
    """A trainer rank without a model: every step is acked as trained."""
    _start(log_path, spec, fault_log)
    cfg = config_from_dict(job["config"])
    spec_ = SampleSpec(aux_dim=NUM_AUX * HIDDEN, hidden_dim=HIDDEN, with_last_hidden=True)
    source = StreamSource(
        ServiceAddresses.from_dict(job["services"]),
        cfg.transfer,
        spec_,
        rank=rank,
        world_size=int(job["ranks"]),
        micro_batch_size=2,
        accumulation_steps=1,
        seq_bucket=8,
    )
    while (step := source.next_step()).num_real:
        for batch in step.micro_batches:  # the bytes are the ones produced for this sample
            real = batch.attention_mask & (batch.input_ids > 0)
            want = batch.input_ids.to(torch.float32) / 1000.0
            if not torch.equal(batch.aux_hidden[..., 0][real], want[real]):
                print(f"error: wrong tensors for {batch.sample_ids}", file=sys.stderr, flush=True)
                sys.exit(5)
        source.ack(step.sample_ids)
    source.close()
    _exit(0)
