"""The narrow interface every hidden-state producer implements (HF, SGLang, vLLM).

An engine turns tokenized samples into the tensors a draft trains on, in specflow's capture
convention (DESIGN §3): capture index k is HF ``output_hidden_states[k]`` (k=0 embedding output,
k in 1..N-1 the hidden state entering layer k), and the last hidden state is the final-norm output
that ``lm_head`` sees. Engines translate to their own convention internally.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from spec_core.errors import DataError


@dataclass(frozen=True)
class TokenizedSample:
    sample_id: str
    input_ids: list[int]
    loss_mask: list[int]


@dataclass(frozen=True)
class CaptureSpec:
    capture_indices: tuple[int, ...]
    with_last_hidden: bool
    dtype: torch.dtype = torch.float32


@dataclass
class CapturedSample:
    sample_id: str
    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] uint8
    aux_hidden: torch.Tensor  # [T, len(capture_indices) * H]
    last_hidden: Optional[torch.Tensor]  # [T, H] post-norm, or None


class HiddenStateEngine(ABC):
    """Runs the target and returns captures; owns whatever it loads until ``close``."""

    spec: CaptureSpec

    @abstractmethod
    def capture(self, samples: Sequence[TokenizedSample]) -> list[CapturedSample]:
        """Capture hidden states for a batch; output order matches input order."""

    def close(self) -> None:
        """Release the model and any processes; idempotent."""

    def __enter__(self) -> HiddenStateEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_prefill_batch(
    samples: Sequence[TokenizedSample], max_model_len: int, engine: str, limit_name: str
) -> None:
    """One clear ``DataError`` for a sample a serving engine cannot prefill, before it is sent:
    the engines fail on these deep inside a worker, or silently truncate."""
    for s in samples:
        if not s.input_ids or len(s.input_ids) != len(s.loss_mask):
            raise DataError(
                f"sample {s.sample_id!r}: input_ids ({len(s.input_ids)}) and loss_mask "
                f"({len(s.loss_mask)}) must be non-empty and the same length"
            )
        if len(s.input_ids) >= max_model_len:
            raise DataError(
                f"sample {s.sample_id!r} has {len(s.input_ids)} tokens; the {engine} producer's "
                f"{limit_name} is {max_model_len} (dataset.max_seq_length + 1)"
            )
