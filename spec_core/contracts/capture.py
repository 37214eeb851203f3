"""What a producer captures, and the capture-index convention (docs/architecture.md
§capture-index).

specflow's capture index k is HF ``output_hidden_states[k]``: k = 0 is the embedding output, k in
1..N-1 is the residual stream entering decoder layer k (= the output of layer k-1). The last hidden
state is the final-norm output that ``lm_head`` sees. Capture indices are strictly increasing
because vLLM and SGLang deliver aux states in ascending layer order: a draft trained on another
order would be mis-wired when served.

Two id conventions meet this one: *post-layer* ids (output of layer i = capture index - 1), used by
SGLang's ``eagle_config`` and DFlash/DSpark's ``dflash_config.target_layer_ids``; and vLLM's ids,
which equal capture indices. The engine-specific plans (which modules to hook, which slots vLLM
returns) live in ``spec_core.engines.conventions`` and are built on this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from spec_core.errors import ConfigError

if TYPE_CHECKING:
    import torch


def _float32() -> torch.dtype:
    import torch  # here, so the config (which validates capture indices) imports without torch

    return torch.float32


@dataclass(frozen=True)
class CaptureSpec:
    """Which hidden states a producer sends for every sample; the trainer's batches match it."""

    capture_indices: tuple[int, ...]
    with_last_hidden: bool
    dtype: torch.dtype = field(default_factory=_float32)


def check_capture_indices(
    capture: Sequence[int], num_layers: Optional[int] = None
) -> tuple[int, ...]:
    """The one validator of capture indices: non-empty, strictly increasing, each in [0, N-1].

    Without ``num_layers`` (the config, before the target is read) only the upper bound is left
    unchecked."""
    indices = tuple(int(k) for k in capture)
    if not indices:
        raise ConfigError("'draft.capture_indices' is empty; list at least one layer to capture")
    top = num_layers - 1 if num_layers is not None else None
    bad = [k for k in indices if k < 0 or (top is not None and k > top)]
    if bad:
        where = f"[0, {top}] for a target with {num_layers} layers" if top is not None else ">= 0"
        raise ConfigError(
            f"'draft.capture_indices' {list(indices)} invalid: each index must be in {where} "
            "(0 = embeddings, k = input of layer k)"
        )
    if list(indices) != sorted(set(indices)):
        raise ConfigError(
            f"'draft.capture_indices' {list(indices)} must be strictly increasing: vLLM and SGLang "
            "deliver aux states in ascending layer order, so a draft trained on another order "
            "would be mis-wired when served"
        )
    return indices


def post_layer_ids(capture: Sequence[int]) -> list[int]:
    """Post-layer ids (output of layer i) = capture - 1: SGLang's ``eagle_config`` /
    ``set_eagle3_layers_to_capture`` and DFlash/DSpark ``dflash_config.target_layer_ids``."""
    indices = check_capture_indices(capture)
    if indices[0] < 1:
        raise ConfigError(
            f"capture index 0 (the embedding output) in {list(indices)} has no post-layer id; "
            "train with 'draft.capture_indices' >= 1"
        )
    return [k - 1 for k in indices]


def capture_from_post_layer_ids(layer_ids: Sequence[int]) -> list[int]:
    """Inverse of ``post_layer_ids``: reading a config written in the post-layer convention."""
    return list(check_capture_indices([int(i) + 1 for i in layer_ids]))


def capture_indices_from_hf(config: dict[str, Any]) -> list[int]:
    """Capture indices of an exported draft config: ours, else vLLM's top-level ids, else
    SGLang's ``eagle_config`` ids + 1."""
    ours = (config.get("specflow") or {}).get("capture_indices")
    if ours:
        return [int(k) for k in ours]
    if config.get("eagle_aux_hidden_state_layer_ids"):
        return [int(k) for k in config["eagle_aux_hidden_state_layer_ids"]]
    eagle = config.get("eagle_config") or {}
    if eagle.get("eagle_aux_hidden_state_layer_ids"):
        return capture_from_post_layer_ids(eagle["eagle_aux_hidden_state_layer_ids"])
    raise ConfigError("draft config has no aux-layer ids (specflow, top-level or eagle_config)")


def vllm_layer_ids(capture: Sequence[int]) -> list[int]:
    """vLLM's ``eagle_aux_hidden_state_layer_ids`` (draft config and extraction): = capture."""
    return list(check_capture_indices(capture))


def sglang_layer_ids(capture: Sequence[int]) -> list[int]:
    """SGLang's post-layer ids (``eagle_config`` / ``set_eagle3_layers_to_capture``): capture - 1."""
    return post_layer_ids(capture)
