"""Capture-index translation from specflow's convention to each engine's: where the ±1s live.

specflow's convention and its one validator are in ``spec_core.contracts.capture``
(docs/architecture.md §capture-index). The engines:

- vLLM: ``eagle_aux_hidden_state_layer_ids`` are capture indices verbatim (the model records the
  stream "before layer idx", and idx = N, after the last layer, is the pre-norm final state). vLLM
  sorts and de-duplicates the ids, so its captures arrive in ascending layer order. Measured on
  SmolLM2 with vLLM's CPU build: id L matches HF ``output_hidden_states[L]`` to 3e-7 (fp32) while
  L +- 1 is off by 5e-3 or more.
- SGLang: the draft config's ``eagle_config.eagle_aux_hidden_state_layer_ids`` and
  ``set_eagle3_layers_to_capture`` take *post-layer* ids (output of layer i) and add 1 internally,
  so they are capture index - 1 and the embedding output (k = 0) has no id. Our SGLang producer
  hooks module outputs instead: capture k is the output of ``layers.{k-1}`` (``embed_tokens`` for
  k = 0).

TorchSpec shipped a vLLM off-by-one here (its #87/#89); tests pin every function below against
HF's own hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from spec_core.contracts.capture import check_capture_indices


@dataclass(frozen=True)
class VllmExtractPlan:
    """What to ask vLLM's ``extract_hidden_states`` for, and where our tensors sit in its output.

    vLLM returns ``[T, len(layer_ids), H]`` with slots in ``layer_ids`` order; ``aux_slots[j]`` is
    the slot of our j-th capture index and ``last_slot`` the pre-norm final state (id N)."""

    layer_ids: tuple[int, ...]
    aux_slots: tuple[int, ...]
    last_slot: Optional[int]


def vllm_extract_plan(
    capture: Sequence[int], num_layers: int, with_last_hidden: bool
) -> VllmExtractPlan:
    indices = check_capture_indices(capture, num_layers)
    wanted = set(indices) | ({num_layers} if with_last_hidden else set())
    layer_ids = tuple(sorted(wanted))  # what vLLM itself does with the list
    return VllmExtractPlan(
        layer_ids=layer_ids,
        aux_slots=tuple(layer_ids.index(k) for k in indices),
        last_slot=layer_ids.index(num_layers) if with_last_hidden else None,
    )


@dataclass(frozen=True)
class HookTarget:
    module: str  # a name in the SGLang model's ``named_modules()``
    role: str  # "ids" (input = token ids), "aux" (output = stream), "last"/"end" (closes a forward)
    slot: int = 0  # aux: position among the capture indices


def sglang_hook_targets(
    capture: Sequence[int], num_layers: int, with_last_hidden: bool, prefix: str = "model"
) -> list[HookTarget]:
    """Module outputs that carry our captures in an SGLang decoder model.

    Capture k >= 1 is the output of ``{prefix}.layers.{k-1}`` (SGLang layers return
    ``(hidden, residual)`` whose sum is the stream entering layer k); k = 0 is the output of
    ``{prefix}.embed_tokens``, which is hooked anyway because its input is the batch's flat token
    ids. The final norm's output is the post-norm last hidden state and closes each forward."""
    indices = check_capture_indices(capture, num_layers)
    targets = [HookTarget(f"{prefix}.embed_tokens", "ids")]
    for slot, k in enumerate(indices):
        module = f"{prefix}.embed_tokens" if k == 0 else f"{prefix}.layers.{k - 1}"
        targets.append(HookTarget(module, "aux", slot))
    # The norm always runs last and closes the forward, even when its output is not wanted.
    targets.append(HookTarget(f"{prefix}.norm", "last" if with_last_hidden else "end"))
    return targets
