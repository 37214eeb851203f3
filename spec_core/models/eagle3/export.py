"""EAGLE-3's HF export: engine-layout ``config.json``, tensor names, checks, vocab maps, load-back.

The DCP checkpoint already stores the draft under its export names (``fc.weight``, ``midlayer.*``,
``norm.weight``, ``lm_head.weight``, ``d2t``/``t2d`` when pruned); ``spec_core.export`` reads,
casts, writes and validates, and asks this module for what is EAGLE-3's own.

Per-engine aux-layer ids (docs/architecture.md §export-format): vLLM reads the top-level
``eagle_aux_hidden_state_layer_ids`` verbatim as capture indices; SGLang reads
``eagle_config.eagle_aux_hidden_state_layer_ids`` in the post-layer convention (capture - 1). Both
go into one ``config.json``; our own capture indices stay in ``specflow.capture_indices``.

A full-vocab draft carries no ``d2t``/``t2d`` (vLLM refuses ``d2t`` when the draft vocab equals the
target's); a pruned one carries both, ``lm_head`` rows in ascending target id.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.errors import ConfigError
from spec_core.models.common.config import read_config_json, rope_settings
from spec_core.models.common.hf import (
    EMBED_KEY,
    WEIGHTS_FILE,
    ExportError,
    capture_indices_from_hf,
    sglang_layer_ids,
    vllm_layer_ids,
)
from spec_core.models.eagle3.config import ARCHITECTURE, Eagle3Config

VOCAB_KEYS = ("d2t", "t2d")
Require = Callable[[bool, str, str], None]


def post_prune(
    config: Eagle3Config, state: dict[str, torch.Tensor], d2t: torch.Tensor, t2d: torch.Tensor
) -> tuple[Eagle3Config, dict[str, torch.Tensor]]:
    """Keep the ``lm_head`` rows of the kept target ids (``t2d``; ascending = draft id order).

    Refused for a head that is already pruned: its rows are tied to the training-time map, and
    slicing them by another map would silently scramble the vocabulary (TorchSpec's converter
    indexed rows by the ``d2t`` *offsets*, the other way to get this wrong).
    """
    if config.pruned:
        raise ExportError(
            f"the draft head is already pruned ({config.draft_vocab_size} of {config.vocab_size} "
            "tokens); re-pruning is refused because its rows follow the training-time vocab map. "
            "Export it without a vocab map, or retrain with the full vocab"
        )
    d2t, t2d = d2t.to(torch.int64), t2d.to(torch.bool)
    if t2d.numel() != config.vocab_size:
        raise ExportError(
            f"vocab map covers {t2d.numel()} target tokens but the draft's vocab is "
            f"{config.vocab_size}; build the map for this target"
        )
    check_vocab_map(d2t, t2d, config.vocab_size)
    head = state["lm_head.weight"]
    pruned_state = dict(state)
    pruned_state["lm_head.weight"] = head[t2d].clone()
    pruned_state["d2t"] = d2t.clone()
    pruned_state["t2d"] = t2d.clone()
    new_config = Eagle3Config.from_hf_dict(
        {**config.to_hf_dict(), "draft_vocab_size": int(d2t.numel())}, "post-pruned config"
    )
    return new_config, pruned_state


def check_vocab_map(d2t: torch.Tensor, t2d: torch.Tensor, vocab_size: int) -> None:
    """d2t int64 offsets with strictly ascending target ids in range, t2d bool marking exactly them."""
    if d2t.dtype != torch.int64 or t2d.dtype != torch.bool:
        raise ExportError(f"d2t must be int64 and t2d bool, got {d2t.dtype} and {t2d.dtype}")
    if d2t.dim() != 1 or t2d.shape != (vocab_size,):
        raise ExportError(
            f"d2t must be 1-D and t2d [{vocab_size}], got {tuple(d2t.shape)} / {tuple(t2d.shape)}"
        )
    target_ids = torch.arange(d2t.numel(), dtype=torch.int64) + d2t
    if target_ids.numel() and (int(target_ids.min()) < 0 or int(target_ids.max()) >= vocab_size):
        raise ExportError(f"d2t maps draft ids outside the target vocab [0, {vocab_size})")
    if not bool((target_ids[1:] > target_ids[:-1]).all()):
        raise ExportError("d2t target ids are not strictly ascending")
    if int(t2d.sum()) != d2t.numel() or not bool(t2d[target_ids].all()):
        raise ExportError(
            f"t2d marks {int(t2d.sum())} tokens but d2t has {d2t.numel()}, or they disagree"
        )


def engine_config(config: Eagle3Config, provenance: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for both engines: Llama fields, per-engine layer ids, our metadata."""
    data = config.to_hf_dict()
    capture = list(config.capture_indices)
    if not capture:
        raise ExportError("the draft config has no specflow.capture_indices")
    data.update(
        {
            "eagle_aux_hidden_state_layer_ids": vllm_layer_ids(capture),
            "eagle_config": {
                "use_aux_hidden_state": True,
                "eagle_aux_hidden_state_layer_ids": sglang_layer_ids(capture),
            },
            "norm_before_residual": False,
            "specflow": {**data.get("specflow", {}), **provenance},
        }
    )
    return data


def export_weights(
    config: Eagle3Config,
    state: dict[str, torch.Tensor],
    source: Path,
    training_vocab_map: Optional[Path],
    vocab_map: Optional[Path],
) -> tuple[Eagle3Config, dict[str, torch.Tensor]]:
    """The tensors to export: post-pruned by ``vocab_map``, or the checkpoint's own vocab map
    attached to a pre-pruned head, or no ``d2t``/``t2d`` at all for a full-vocab head."""
    state = dict(state)
    if vocab_map is not None:
        from spec_core.vocab import load_vocab_map

        vmap = load_vocab_map(Path(vocab_map))
        return post_prune(config, state, vmap.d2t, vmap.t2d)
    if config.pruned:
        _attach_training_vocab(source, config, state, training_vocab_map)
    else:
        for key in VOCAB_KEYS:  # vLLM refuses d2t on a full-vocab draft
            state.pop(key, None)
    return config, state


def _attach_training_vocab(
    source: Path,
    config: Eagle3Config,
    state: dict[str, torch.Tensor],
    vocab_map_file: Optional[Path],
) -> None:
    """A pre-pruned checkpoint converts as it is; its d2t/t2d must agree with its vocab map file."""
    missing = [k for k in VOCAB_KEYS if k not in state]
    if missing and vocab_map_file is None:
        raise ExportError(
            f"{source}: pruned draft ({config.draft_vocab_size} tokens) without {missing} "
            "and without vocab_map.safetensors; the checkpoint is incomplete"
        )
    if vocab_map_file is not None:
        from spec_core.vocab import load_vocab_map

        vmap = load_vocab_map(vocab_map_file)
        for key, value in (("d2t", vmap.d2t), ("t2d", vmap.t2d)):
            if key in state and not torch.equal(state[key].to(value.dtype), value):
                raise ExportError(
                    f"{source}: {key} in the weights differs from vocab_map.safetensors"
                )
            state.setdefault(key, value)
    state["d2t"] = state["d2t"].to(torch.int64)
    state["t2d"] = state["t2d"].to(torch.bool)


def expected_shapes(config: Eagle3Config) -> dict[str, tuple[int, ...]]:
    """Every weight of a one-layer EAGLE-3 draft and its shape (docs/architecture.md
    §export-format)."""
    h, inter = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    return {
        "fc.weight": (h, config.aux_dim),
        "midlayer.self_attn.q_proj.weight": (q_dim, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv_dim, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv_dim, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, q_dim),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (config.draft_vocab_size, h),
    }


def speculators_config(hf_config: dict[str, Any], verifier: str, num_tokens: int = 3) -> dict:
    """vLLM's self-describing speculators config for a native EAGLE-3 config
    (docs/architecture.md §export-format)."""
    layer = {
        k: v
        for k, v in hf_config.items()
        if k
        not in (
            "architectures",
            "eagle_config",
            "eagle_aux_hidden_state_layer_ids",
            "draft_vocab_size",
            "target_hidden_size",
            "norm_before_residual",
            "specflow",
        )
    }
    layer["num_hidden_layers"] = 1
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "transformer_layer_config": layer,
        "draft_vocab_size": hf_config["draft_vocab_size"],
        "target_hidden_size": hf_config["target_hidden_size"],
        "norm_before_residual": False,  # the adapter defaults a missing value to true
        "eagle_aux_hidden_state_layer_ids": hf_config["eagle_aux_hidden_state_layer_ids"],
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": num_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
        },
        "specflow": hf_config.get("specflow", {}),
    }


def check_config(raw: dict[str, Any], where: str, require: Require) -> Eagle3Config:
    """The engine-facing fields of an exported ``config.json``; returns the parsed config."""
    require(
        raw.get("architectures") == [ARCHITECTURE],
        "architecture",
        f"architectures must be [{ARCHITECTURE!r}], got {raw.get('architectures')}",
    )
    require(
        raw.get("tie_word_embeddings") is False,
        "untied",
        "tie_word_embeddings must be false (SGLang would tie lm_head to the embedding)",
    )
    require(int(raw.get("num_hidden_layers", 0)) == 1, "one_layer", "num_hidden_layers must be 1")
    require("draft_vocab_size" in raw, "draft_vocab_size", "config has no draft_vocab_size")
    config = Eagle3Config.from_hf_dict(raw, where)
    capture = capture_indices_from_hf(raw)
    require(
        raw.get("eagle_aux_hidden_state_layer_ids") == vllm_layer_ids(capture),
        "vllm_layer_ids",
        f"top-level eagle_aux_hidden_state_layer_ids must equal the capture indices {capture}",
    )
    eagle = raw.get("eagle_config") or {}
    require(
        eagle.get("eagle_aux_hidden_state_layer_ids") == sglang_layer_ids(capture),
        "sglang_layer_ids",
        f"eagle_config.eagle_aux_hidden_state_layer_ids must be capture - 1 = "
        f"{sglang_layer_ids(capture)}",
    )
    require(
        len(capture) * config.target_hidden_size == config.aux_dim,
        "capture_count",
        "specflow.capture_indices disagrees with the config",
    )
    return config


def check_tensors(
    config: Eagle3Config, tensors: dict[str, torch.Tensor], where: str, require: Require
) -> None:
    """d2t/t2d of a pruned draft: present, one entry per draft token, a valid map."""
    if not config.pruned:
        return
    require(
        all(k in tensors for k in VOCAB_KEYS),
        "vocab_map_present",
        "a pruned draft needs d2t and t2d",
    )
    require(
        tuple(tensors["d2t"].shape) == (config.draft_vocab_size,),
        "d2t_shape",
        f"d2t must have draft_vocab_size={config.draft_vocab_size} entries",
    )
    try:
        check_vocab_map(tensors["d2t"], tensors["t2d"], config.vocab_size)
    except ExportError as exc:
        raise ExportError(f"{where}: {exc}") from None
    for name in ("d2t_int64_monotone", "t2d_sum"):
        require(True, name, "")


def check_against_target(config: Eagle3Config, target: dict[str, Any], require: Require) -> None:
    """RoPE must be the target's: the draft attends at the target's positions."""
    theta, scaling = rope_settings(target)
    require(
        theta == config.rope_theta and scaling == config.rope_scaling,
        "rope_from_target",
        f"RoPE (theta {config.rope_theta}, scaling {config.rope_scaling}) differs from the "
        f"target's (theta {theta}, scaling {scaling})",
    )


def speculators_layout(
    hf_config: dict[str, Any], tensors: dict[str, torch.Tensor], verifier: str, num_tokens: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The speculators-format twin: ``midlayer.`` -> ``layers.0.``, same tensors, vLLM's config."""
    renamed = {
        (("layers.0." + k[len("midlayer.") :]) if k.startswith("midlayer.") else k): v
        for k, v in tensors.items()
    }
    return speculators_config(hf_config, verifier, num_tokens), renamed


def load_export(
    hf_dir: Path, target_dir: Optional[Path], embedding_key: str, dtype: torch.dtype
) -> torch.nn.Module:
    """Rebuild an ``Eagle3Draft`` from an exported dir alone (the engines' view of it).

    Without ``embed_tokens`` in the file, the target's embedding is read from ``target_dir``, as
    SGLang and vLLM share it.
    """
    from safetensors.torch import load_file

    from spec_core.models.common.target import read_embedding
    from spec_core.models.eagle3.model import Eagle3Draft

    raw = read_config_json(hf_dir)
    raw["specflow"] = {
        **(raw.get("specflow") or {}),
        "capture_indices": capture_indices_from_hf(raw),
    }
    config = Eagle3Config.from_hf_dict(raw, str(hf_dir))
    tensors = load_file(str(hf_dir / WEIGHTS_FILE))
    if EMBED_KEY not in tensors:
        if target_dir is None:
            raise ConfigError(f"{hf_dir} has no {EMBED_KEY}; pass the target dir to share its")
        tensors[EMBED_KEY] = read_embedding(target_dir, embedding_key)
    model = Eagle3Draft(config)
    model.load_state_dict(tensors, strict=True)
    return model.to(dtype).eval()
