"""The target architectures specflow is tested on, as tiny random-weight checkpoints.

Each family is built from its own transformers config class with shrunken sizes but its
distinguishing features kept (MoE routing, MLA ranks, q/k-norm, attention sinks, sliding windows,
tied or untied heads, a scaled embedding), with SmolLM2's real tokenizer (its vocab fixes
``vocab_size``) and a chat template of the family's own shape from the template registry. One
checkpoint per (family, seed, sizes) is written once into the asset cache, so captures are
reproducible and every test that names a family reads the same files.

The family facts the rest of specflow needs (the embedding scale the engines apply before layer 0)
also live here, keyed by ``model_type``, so the trainer, the evaluator and the dry run agree.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spec_core.errors import ConfigError
from spec_core.utils.files import publish_dir, staging_dir

TINY_VOCAB = 49152  # SmolLM2's tokenizer: every tiny family shares it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_FAMILY_VERSION = "4"  # bump when a family's config below changes


@dataclass(frozen=True)
class Sizes:
    """The shrunken dimensions every family shares (its own extra dims derive from these)."""

    num_layers: int = 4
    hidden: int = 64
    heads: int = 2  # head_dim 32: vLLM's CPU attention has no kernel below 32
    kv_heads: int = 1
    window: int = 24  # sliding-window families: short enough that test sequences cross it

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # transformers' config.model_type
    template: str  # registry entry in spec_core.data.templates whose jinja the tokenizer gets
    build: Callable[[Sizes], Any]  # -> a transformers PreTrainedConfig
    features: str  # what is kept of the real family (docs, README table)


def _common(s: Sizes, tie: bool) -> dict[str, Any]:
    return {
        "vocab_size": TINY_VOCAB,
        "hidden_size": s.hidden,
        "intermediate_size": 2 * s.hidden,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def _llama3(s: Sizes) -> Any:
    from transformers import LlamaConfig

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    return LlamaConfig(**_common(s, tie=False), rope_parameters=rope)


def _qwen3(s: Sizes) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_common(s, tie=True), use_sliding_window=False)


def _qwen3_moe(s: Sizes) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_common(s, tie=False),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=s.hidden,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    )


def _layer_types(s: Sizes) -> list[str]:
    """Sliding and full attention alternating, as gpt-oss does (Gemma-3's 5:1 shrunk to 1:1)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s.num_layers)]


def _gpt_oss(s: Sizes) -> Any:
    from transformers import GptOssConfig

    common = _common(s, tie=False)
    common["intermediate_size"] = s.hidden
    return GptOssConfig(
        **common,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 64,
        },
        sliding_window=s.window,
        layer_types=_layer_types(s),
    )


def _deepseek_v3(s: Sizes) -> Any:
    from transformers import DeepseekV3Config

    common = _common(s, tie=False)
    common["head_dim"] = 64  # MLA: the rotary part of a head (qk_rope_head_dim)
    common["num_key_value_heads"] = s.heads  # MLA expands the latent to every head
    return DeepseekV3Config(
        **common,
        q_lora_rank=32,
        kv_lora_rank=512,  # MLA's cached latent + rope key = 576, V3's own (vLLM's MLA needs it)
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=s.hidden,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        # V3's router as its published config states it (sigmoid scores, bias-corrected top-k);
        # vLLM builds the e_score_correction_bias parameter only for noaux_tc
        topk_method="noaux_tc",
        scoring_func="sigmoid",
    )


def _gemma3(s: Sizes) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_common(s, tie=True),
        sliding_window=s.window,
        layer_types=_layer_types(s),
        query_pre_attn_scalar=s.head_dim,
    )


def _mistral(s: Sizes) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_common(s, tie=False), sliding_window=s.window)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama3", "llama", "llama3", _llama3, "llama3 rope scaling, untied head"),
        Family("qwen3", "qwen3", "qwen3-thinking", _qwen3, "q/k-norm, tied head"),
        Family("qwen3-moe", "qwen3_moe", "qwen3-instruct", _qwen3_moe, "q/k-norm, 4 experts top-2"),
        Family(
            "gpt-oss",
            "gpt_oss",
            "gpt-oss",
            _gpt_oss,
            "4 experts top-2, attention sinks, sliding/full layers",
        ),
        Family(
            "deepseek-v3",
            "deepseek_v3",
            "deepseek-v3",
            _deepseek_v3,
            "MLA (q/kv LoRA ranks, rope/nope split), shared + 4 routed experts, dense layer 0",
        ),
        Family(
            "gemma3",
            "gemma3_text",
            "gemma",
            _gemma3,
            "embedding scaled by sqrt(hidden), sliding/full layers, tied head",
        ),
        Family("mistral", "mistral", "mistral", _mistral, "sliding window, untied head"),
    )
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown target family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def embedding_scale(config: dict[str, Any]) -> float:
    """The factor a family's embedding layer multiplies its table rows by before layer 0 (Gemma:
    sqrt(hidden_size)); 1.0 for the others. The draft's frozen embedding must carry it, because
    capture index 0 and every engine's decoder input are the scaled rows."""
    text = config.get("text_config") or config
    if str(text.get("model_type", config.get("model_type", ""))).startswith("gemma"):
        return float(text["hidden_size"]) ** 0.5
    return 1.0


def norm_weight_offset(config: dict[str, Any]) -> float:
    """What a family's RMSNorm adds to its stored weight (Gemma computes ``x * (1 + w)``): the
    trainer's copy of the final norm is ``w + offset``, a plain ``x * w`` RMSNorm after that."""
    text = config.get("text_config") or config
    return (
        1.0
        if str(text.get("model_type", config.get("model_type", ""))).startswith("gemma")
        else 0.0
    )


def tiny_family_dir(cache_dir: Path, family: str, seed: int = 0, sizes: Sizes = Sizes()) -> Path:
    """Where the tiny ``family`` checkpoint for ``seed``/``sizes`` lives in the asset cache."""
    get_family(family)
    key = json.dumps([family, seed, sizes.__dict__, _FAMILY_VERSION], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(cache_dir) / "tiny-targets" / f"{family}-s{seed}-{digest}"


def build_family_target(
    out_dir: Path, tokenizer_dir: Path, family: str, seed: int = 0, sizes: Sizes = Sizes()
) -> Path:
    """Write the seeded random-weight ``family`` checkpoint (safetensors + config + SmolLM2's
    tokenizer with the family's chat template) to ``out_dir``; a finished dir is kept."""
    import torch
    from transformers import AutoModelForCausalLM

    from spec_core.data.templates import get_template

    fam = get_family(family)
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    config = fam.build(sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_weights(model, seed)
    tmp = staging_dir(out_dir)
    try:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir / name, tmp / name)
        (tmp / "chat_template.jinja").write_text(get_template(fam.template).jinja)
        publish_dir(tmp, out_dir)  # another process may have won the race; then theirs is kept
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _spread_weights(model: Any, seed: int) -> None:
    """Re-draw every weight from a seeded normal, so the checkpoint is a function of the seed
    alone (``from_config`` initialisers differ between families and versions, and some leave
    router or sink parameters at zero, which would hide routing and sink bugs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def tiny_family_target(
    cache_dir: Path, tokenizer_dir: Path, family: str, seed: int = 0, sizes: Sizes = Sizes()
) -> Path:
    """The cached tiny ``family`` checkpoint, built on first use."""
    return build_family_target(
        tiny_family_dir(cache_dir, family, seed, sizes), tokenizer_dir, family, seed, sizes
    )
