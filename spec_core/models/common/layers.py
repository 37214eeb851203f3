"""Layers every draft shares: RMSNorm, the gated MLP, RoPE and the attention-backend choice.

EAGLE-3 and DFlash/DSpark decoder layers are Llama/Qwen3 layers with the same norm, MLP and RoPE
math; keeping them here means an engine-parity fix lands in every draft at once.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "flex")


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` = flex on CUDA, sdpa elsewhere (flex cannot train on CPU)."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    return name


def rotary_embedding(config: Any) -> nn.Module:
    """HF's Llama RoPE module (all scaling types) for a draft config's head geometry;
    ``forward(x, position_ids) -> (cos, sin)``.

    Its buffers are non-persistent, so it never shows up in a state dict.
    """
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    llama = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
    )
    return LlamaRotaryEmbedding(llama)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., N, heads, d]; cos/sin: [..., N, d] (Llama/NeoX half-rotation convention)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """Llama RMSNorm (normalize in fp32, scale in the input dtype)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(
            x.to(torch.promote_types(x.dtype, torch.float32)), (x.shape[-1],), eps=self.eps
        )
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """Llama gated MLP: ``down(act(gate(x)) * up(x))``, parameter names as the engines load them."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class AttentionProjections(nn.Module):
    """The q/k/v/o linears of a GQA attention (no bias), named as the engines load them; each
    draft's attention subclasses it and adds its own attention pattern."""

    def __init__(self, config: Any, in_dim: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(in_dim, q_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)


class DraftModel(nn.Module):
    """What every drafter starts with: the frozen target embedding and the ``fc`` that fuses the
    captured target features into one hidden state; subclasses add their layers after these."""

    def __init__(self, config: Any, attention_backend: str) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(config.aux_dim, config.hidden_size, bias=False)

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None, std: float = 0.02) -> None:
        """Llama-style init: normal(0, std) weights, norms at 1, biases at 0; the frozen embedding
        is untouched (it is loaded from the target)."""
        for name, param in self.named_parameters():
            if name == "embed_tokens.weight":
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
