"""The narrow interface every hidden-state engine implements (HF, SGLang, vLLM).

An engine turns ``TokenizedSample``s into ``CapturedSample``s in specflow's capture convention
(``spec_core.contracts.capture``, docs/architecture.md §capture-index); engines translate to their
own convention internally (``spec_core.engines.conventions``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import CapturedSample, TokenizedSample
from spec_core.errors import DataError


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
