"""The narrow interface every hidden-state engine implements (HF, SGLang, vLLM).

An engine turns ``TokenizedSample``s into ``CapturedSample``s in specflow's capture convention
(``spec_core.contracts.capture``, docs/architecture.md §capture-index); engines translate to their
own convention internally (``spec_core.engines.conventions``).
"""

from __future__ import annotations

import logging
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import CapturedSample, TokenizedSample
from spec_core.errors import DataError

log = logging.getLogger(__name__)


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


class ServedEngine(HiddenStateEngine):
    """An engine whose target runs in a serving runtime's own workers (vLLM, SGLang): captures cross
    back through a handoff dir (``spec_core.engines.handoff``), and ``close`` releases the runtime
    and that dir once, even after a failed start."""

    runtime_name: str  # in messages: "vLLM", "SGLang"
    handoff_dir: Optional[Path] = None

    def _read_target(self, target_dir: str | Path, spec: CaptureSpec, max_model_len: int) -> dict:
        """The target's config, read once; sets what every served engine knows about it."""
        from spec_core.models.common.target import read_target_config

        self.spec = spec
        self.max_model_len = max_model_len
        config = read_target_config(target_dir)
        self.num_layers = int(config["num_hidden_layers"])
        self.vocab_size = int(config["vocab_size"])
        return config

    def _shutdown_runtime(self) -> None:
        """Detach the runtime (a second ``close`` finds none) and shut it down."""
        raise NotImplementedError

    def close(self) -> None:
        try:
            self._shutdown_runtime()
        except Exception as exc:  # shutting down a dead engine must not mask the real error
            log.warning("%s shutdown: %s", self.runtime_name, exc)
        if self.handoff_dir is not None:
            shutil.rmtree(self.handoff_dir, ignore_errors=True)


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
