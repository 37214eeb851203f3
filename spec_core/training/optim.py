"""AdamW over fp32 master weights, gradient clipping, and the non-finite-step guard.

Parameters are always stored in fp32: with ``training.dtype=bfloat16`` the forward/backward run
in bf16 (FSDP2 ``MixedPrecisionPolicy``) while AdamW updates the fp32 shards, which are the master
weights. A step whose gradient norm is NaN/inf is skipped on every rank (the norm is global, so all
ranks agree) and counted; TorchSpec applied such steps with zeroed gradients (its bug #152).
"""

from __future__ import annotations

import torch
from torch import nn

from spec_core.config import TrainingConfig


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, tcfg: TrainingConfig) -> torch.optim.AdamW:
    betas = tuple(float(b) for b in tcfg.adam_betas)
    if len(betas) != 2:
        raise ValueError(f"'training.adam_betas' needs two values, got {tcfg.adam_betas}")
    return torch.optim.AdamW(
        trainable_parameters(model),
        lr=tcfg.learning_rate,
        betas=betas,  # type: ignore[arg-type]
        eps=1e-8,
        weight_decay=tcfg.weight_decay,
        foreach=True,
    )


def _as_float(norm: torch.Tensor) -> float:
    full = getattr(norm, "full_tensor", None)  # DTensor under FSDP2
    return float((full() if full else norm).item())


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Global L2 norm of the gradients before clipping (clips only when ``max_norm`` > 0)."""
    params = [p for p in trainable_parameters(model) if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    return _as_float(norm)
