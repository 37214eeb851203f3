"""DFlash / DSpark HF export parts (docs/architecture.md §export-format).

The checkpoint already stores the drafter under the z-lab / DeepSpec names (``fc.weight``,
``hidden_norm.weight``, ``layers.{i}.*``, ``norm.weight``, DSpark ``markov_head.*`` and
``confidence_head.*``), and its ``config.json`` is already the engines' layout (``dflash_config``
with post-layer ``target_layer_ids`` and ``mask_token_id``, ``block_size``, ``num_target_layers``;
DSpark adds ``projector_type``, ``markov_rank``, ``markov_head_type``, ``enable_confidence_head``,
``confidence_head_with_markov``, ``confidence_head_alpha``). The drafter shares the target's
embedding and ``lm_head``, so neither is exported (``include_embedding`` copies the target's
embedding for loaders that want it). No ``auto_map`` is written: engines build the drafter
themselves, and an ``auto_map`` without its modeling file would break ``AutoModel``. There is no
vocab pruning for these drafters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.errors import ConfigError
from spec_core.models.block.config import ARCHITECTURES, BlockDraftConfig
from spec_core.models.common.hf import EMBED_KEY, WEIGHTS_FILE, ExportError

Require = Callable[[bool, str, str], None]


def model_class(config: BlockDraftConfig) -> type[torch.nn.Module]:
    from spec_core.models.block.dflash import DFlashDraft
    from spec_core.models.block.dspark import DSparkDraft

    return DSparkDraft if config.algorithm == "dspark" else DFlashDraft


def export_weights(
    config: BlockDraftConfig, state: dict[str, torch.Tensor], vocab_map: Optional[Path]
) -> tuple[BlockDraftConfig, dict[str, torch.Tensor]]:
    if vocab_map is not None:
        raise ExportError(
            "DFlash/DSpark drafts use the target's full lm_head; vocab pruning is not supported"
        )
    return config, dict(state)


def engine_config(config: BlockDraftConfig, provenance: dict[str, Any]) -> dict[str, Any]:
    hf_config = config.to_hf_dict()
    hf_config["specflow"] = {**hf_config["specflow"], **provenance}
    return hf_config


def expected_shapes(config: BlockDraftConfig) -> dict[str, tuple[int, ...]]:
    """Every exported tensor and its shape: the drafter's own state dict, built on ``meta``."""
    with torch.device("meta"):
        model = model_class(config)(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != EMBED_KEY}


def check_config(raw: dict[str, Any], where: str, require: Require) -> BlockDraftConfig:
    try:
        config = BlockDraftConfig.from_hf_dict(raw, where)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    require(
        raw.get("architectures") == [ARCHITECTURES[config.algorithm]],
        "architecture",
        f"architectures {raw.get('architectures')} is not a {config.algorithm} draft",
    )
    dflash = raw.get("dflash_config") or {}
    require(
        dflash.get("target_layer_ids") == config.target_layer_ids,
        "target_layer_ids",
        "dflash_config.target_layer_ids do not match the captures",
    )
    require(
        0 <= config.mask_token_id < config.vocab_size and config.block_size >= 2,
        "block",
        "mask_token_id / block_size out of range",
    )
    require(
        len(raw.get("layer_types") or []) == config.num_hidden_layers,
        "layer_types",
        "layer_types must list every one of the draft's layers",
    )
    return config


def check_against_target(
    config: BlockDraftConfig, target: dict[str, Any], require: Require
) -> None:
    """The drafter reuses the target's embedding and lm_head, and names its layer count."""
    require(
        int(target["hidden_size"]) == config.hidden_size,
        "target_hidden",
        f"hidden size {config.hidden_size} != target {target['hidden_size']}",
    )
    layers = int(target["num_hidden_layers"])
    require(
        config.target_num_hidden_layers == layers,
        "target_layers",
        f"num_target_layers {config.target_num_hidden_layers} != target {layers}",
    )


def load_export(
    hf_dir: Path, target_dir: Optional[Path], embedding_key: str, dtype: torch.dtype
) -> torch.nn.Module:
    """Rebuild an exported drafter (weights strict, embedding from the target) for inference."""
    from safetensors.torch import load_file

    from spec_core.models.common.target import read_embedding

    config = BlockDraftConfig.load(hf_dir)
    model = model_class(config)(config)
    state = load_file(str(hf_dir / WEIGHTS_FILE))
    if EMBED_KEY not in state:
        if target_dir is None:
            raise ConfigError(f"{hf_dir} has no {EMBED_KEY}; pass the target dir to share its")
        state[EMBED_KEY] = read_embedding(target_dir, embedding_key)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.to(dtype).eval()
