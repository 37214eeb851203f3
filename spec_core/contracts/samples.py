"""Samples on their way from a producer to the trainer, and the one list of their tensor names.

A ``TokenizedSample`` is what a producer reads from the prepared split; a ``CapturedSample`` is what
an engine returns for it (and what a trainer's source hands to ``collate``); a ``Batch`` is the
padded stack the trainer steps on. On the wire (docs/architecture.md §wire-format) a captured sample
is the tensors ``CapturedSample.tensors`` names, each stored under its own key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from spec_core.errors import ServiceError

INPUT_IDS = "input_ids"  # [T] int64, always
LOSS_MASK = "loss_mask"  # [T] uint8, always
AUX_HIDDEN = "aux_hidden"  # [T, len(capture_indices) * H], every algorithm
LAST_HIDDEN = "last_hidden"  # [T, H] post-norm; only when the loss needs target logits
TENSOR_NAMES = (INPUT_IDS, LOSS_MASK, AUX_HIDDEN, LAST_HIDDEN)


def tensor_names(with_last_hidden: bool) -> tuple[str, ...]:
    """The tensors every sample of a run carries."""
    return TENSOR_NAMES if with_last_hidden else TENSOR_NAMES[:-1]


@dataclass(frozen=True)
class TokenizedSample:
    sample_id: str
    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class CapturedSample:
    sample_id: str
    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] uint8
    aux_hidden: torch.Tensor  # [T, len(capture_indices) * H]
    last_hidden: Optional[torch.Tensor]  # [T, H] post-norm, or None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The sample as named wire tensors, in their wire dtypes."""
        tensors = {
            INPUT_IDS: self.input_ids.to(torch.int64),
            LOSS_MASK: self.loss_mask.to(torch.uint8),
            AUX_HIDDEN: self.aux_hidden,
        }
        if self.last_hidden is not None:
            tensors[LAST_HIDDEN] = self.last_hidden
        return tensors

    @classmethod
    def from_tensors(cls, sample_id: str, tensors: dict[str, torch.Tensor]) -> CapturedSample:
        """Inverse of ``tensors``: what a trainer rebuilds from the fetched objects."""
        missing = [n for n in (INPUT_IDS, LOSS_MASK, AUX_HIDDEN) if n not in tensors]
        if missing:
            raise ServiceError(f"sample {sample_id!r} arrived without {missing}")
        return cls(
            sample_id=sample_id,
            input_ids=tensors[INPUT_IDS],
            loss_mask=tensors[LOSS_MASK],
            aux_hidden=tensors[AUX_HIDDEN],
            last_hidden=tensors.get(LAST_HIDDEN),
        )


@dataclass
class Batch:
    sample_ids: list[str]  # "" marks a padding sample
    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] bool, True for real tokens
    loss_mask: torch.Tensor  # [B, T] uint8, 1 = supervised
    aux_hidden: torch.Tensor  # [B, T, aux_dim]
    last_hidden: Optional[torch.Tensor] = None  # [B, T, hidden_dim]
    data_wait_s: float = 0.0  # time spent waiting for this batch's data

    @property
    def num_real(self) -> int:
        return sum(1 for s in self.sample_ids if s)

    def to(self, device: torch.device | str) -> Batch:
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            sample_ids=self.sample_ids,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            loss_mask=move(self.loss_mask),
            aux_hidden=move(self.aux_hidden),
            last_hidden=move(self.last_hidden),
            data_wait_s=self.data_wait_s,
        )
