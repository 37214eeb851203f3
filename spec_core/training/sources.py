"""Where the trainer's samples come from: ``SampleSource``.

The trainer never knows whether hidden states were streamed through Mooncake or computed next to
it. A source yields, per optimizer step, this rank's micro-batches. When a rank runs out before the
others it yields *padding* samples (empty ``sample_id``, zero loss mask) so every rank runs the same
number of forward/backward passes; the trainer stops when no rank has a real sample left.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from spec_core.contracts.samples import Batch


@dataclass(frozen=True)
class SampleSpec:
    """Shapes a source needs to build padding samples without having seen data."""

    aux_dim: int  # len(capture_indices) * target hidden size
    hidden_dim: int  # target hidden size
    with_last_hidden: bool
    dtype: torch.dtype = torch.float32


@dataclass
class StepData:
    """One optimizer step's worth of micro-batches for this rank."""

    micro_batches: list[Batch] = field(default_factory=list)

    @property
    def num_real(self) -> int:
        return sum(b.num_real for b in self.micro_batches)

    @property
    def sample_ids(self) -> list[str]:
        return [s for b in self.micro_batches for s in b.sample_ids if s]

    @property
    def data_wait_s(self) -> float:
        return sum(b.data_wait_s for b in self.micro_batches)


class SampleSource(ABC):
    @abstractmethod
    def next_step(self) -> StepData:
        """This rank's micro-batches for the next optimizer step (padding once exhausted)."""

    @abstractmethod
    def ack(self, sample_ids: list[str]) -> None:
        """Mark samples as trained (called after the optimizer step) so they are never re-sent."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Data cursor and acked ids, saved in every checkpoint."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor so training continues on exactly the same data."""

    def close(self) -> None:
        """Stop prefetch threads and release clients; idempotent."""
