"""Captured samples -> padded ``Batch``: the one place that decides batch layout.

Sequences are right-padded to a multiple of ``seq_bucket`` so the trainer sees few distinct shapes
(fewer allocator misses on CPU, fewer recompiles on GPU). Padding samples (empty ``sample_id``,
zero loss mask) let a rank that ran out of data keep stepping in lock-step with the others: they
run forward/backward like any sample but contribute nothing to the loss.
"""

from __future__ import annotations

import torch

from spec_core.contracts.samples import Batch, CapturedSample
from spec_core.errors import DataError
from spec_core.training.sources import SampleSpec


def padding_sample(spec: SampleSpec, length: int) -> CapturedSample:
    """A sample that runs through the model but is never supervised."""
    length = max(int(length), 1)
    return CapturedSample(
        sample_id="",
        input_ids=torch.zeros(length, dtype=torch.long),
        loss_mask=torch.zeros(length, dtype=torch.uint8),
        aux_hidden=torch.zeros(length, spec.aux_dim, dtype=spec.dtype),
        last_hidden=torch.zeros(length, spec.hidden_dim, dtype=spec.dtype)
        if spec.with_last_hidden
        else None,
    )


def _check(sample: CapturedSample, spec: SampleSpec) -> int:
    name = sample.sample_id or "<padding>"
    n = int(sample.input_ids.shape[0])
    if sample.input_ids.dim() != 1 or n == 0:
        raise DataError(f"sample {name!r}: input_ids must be a non-empty 1-D tensor")
    if tuple(sample.loss_mask.shape) != (n,):
        raise DataError(
            f"sample {name!r}: loss_mask has shape {tuple(sample.loss_mask.shape)}, expected ({n},)"
        )
    if tuple(sample.aux_hidden.shape) != (n, spec.aux_dim):
        raise DataError(
            f"sample {name!r}: aux_hidden has shape {tuple(sample.aux_hidden.shape)}, expected "
            f"({n}, {spec.aux_dim}); check 'draft.capture_indices' against the producer's"
        )
    if spec.with_last_hidden:
        if sample.last_hidden is None:
            raise DataError(f"sample {name!r}: last_hidden is missing but the loss needs it")
        if tuple(sample.last_hidden.shape) != (n, spec.hidden_dim):
            raise DataError(
                f"sample {name!r}: last_hidden has shape {tuple(sample.last_hidden.shape)}, "
                f"expected ({n}, {spec.hidden_dim})"
            )
    return n


def bucket_length(length: int, seq_bucket: int) -> int:
    bucket = max(int(seq_bucket), 1)
    return -(-int(length) // bucket) * bucket


def collate(samples: list[CapturedSample], spec: SampleSpec, seq_bucket: int) -> Batch:
    """Right-pad ``samples`` into one batch whose length is a multiple of ``seq_bucket``."""
    if not samples:
        raise ValueError("collate needs at least one sample (use padding_sample for an empty slot)")
    lengths = [_check(s, spec) for s in samples]
    width = bucket_length(max(lengths), seq_bucket)
    bsz = len(samples)
    input_ids = torch.zeros(bsz, width, dtype=torch.long)
    attention_mask = torch.zeros(bsz, width, dtype=torch.bool)
    loss_mask = torch.zeros(bsz, width, dtype=torch.uint8)
    aux_hidden = torch.zeros(bsz, width, spec.aux_dim, dtype=spec.dtype)
    last_hidden = (
        torch.zeros(bsz, width, spec.hidden_dim, dtype=spec.dtype)
        if spec.with_last_hidden
        else None
    )
    for row, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        input_ids[row, :n] = s.input_ids.to(torch.long)
        attention_mask[row, :n] = True
        loss_mask[row, :n] = (s.loss_mask != 0).to(torch.uint8)
        aux_hidden[row, :n] = s.aux_hidden.to(spec.dtype)
        if last_hidden is not None:
            last_hidden[row, :n] = s.last_hidden.to(spec.dtype)  # type: ignore[union-attr]
    return Batch(
        sample_ids=[s.sample_id for s in samples],
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        aux_hidden=aux_hidden,
        last_hidden=last_hidden,
    )
