"""The HF draft dir every algorithm exports: file names, dtypes, the export error, layer ids.

Floor-1 vocabulary shared by the algorithms' export parts (``models/*/export.py``) and the
``spec_core.export`` package, which sits above them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from spec_core.contracts.capture import capture_indices_from_hf as hf_capture_indices
from spec_core.contracts.capture import sglang_layer_ids as sglang_ids
from spec_core.contracts.capture import vllm_layer_ids as vllm_ids
from spec_core.errors import ConfigError, SpecflowError

WEIGHTS_FILE = "model.safetensors"
SIDECAR_FILE = "specflow_export.json"
EXPORT_FORMAT = "1"  # bump when the files written by an export change meaning
EMBED_KEY = "embed_tokens.weight"  # the frozen target embedding, in the draft's own names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(SpecflowError):
    """The checkpoint cannot become a servable draft dir (or an exported dir is broken)."""


def vllm_layer_ids(capture_indices: Sequence[int]) -> list[int]:
    """vLLM reads ``eagle_aux_hidden_state_layer_ids`` as capture indices (the input of layer k)."""
    with _as_export_error():
        return vllm_ids(capture_indices)


def sglang_layer_ids(capture_indices: Sequence[int]) -> list[int]:
    """SGLang's ``eagle_config`` ids are post-layer (output of layer k): capture index - 1."""
    with _as_export_error():
        return sglang_ids(capture_indices)


def capture_indices_from_hf(config: dict[str, Any]) -> list[int]:
    """Capture indices of an exported config: ours, else vLLM's top-level ids, else SGLang's + 1."""
    with _as_export_error():
        return hf_capture_indices(config)


@contextmanager
def _as_export_error() -> Iterator[None]:
    """The translations live in ``spec_core.contracts.capture`` (docs/architecture.md §capture-index)."""
    try:
        yield
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
