"""DFlash: a multi-layer Qwen3-style block drafter over fused target features.

The draft proposes a whole block in one forward: slot 0 holds the last verified token (the
anchor), slots 1..S-1 a MASK token, and slot k is trained toward the token at anchor + k. Its
inputs are the target's hidden states at ``len(capture_indices)`` layers spread over the depth
(``round(1 + i (N-4)/(n-1))`` post-layer, i.e. capture index + 1; docs/architecture.md
§capture-index), fused
by ``fc`` + ``hidden_norm`` into a context. Attention is dual-source: queries come from the block
rows, keys/values from [projected context ; block rows] with shared projections, K-norm after the
concat, RoPE at context positions 0..T-1 and block positions anchor + slot. The target's embedding
and ``lm_head`` are frozen and shared (the drafter has the target's hidden size); the loss is
hard-label CE with exponential slot decay (``block_losses``).

Parameter names are the z-lab / SpecForge HF names (docs/architecture.md §export-format):
``fc.weight``,
``hidden_norm.weight``, ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``layers.{i}.self_attn.{q,k}_norm.weight``, ``layers.{i}.mlp.{gate,up,down}_proj.weight``,
``layers.{i}.{input,post_attention}_layernorm.weight``, ``norm.weight``; ``embed_tokens.weight``
is the target's and is never checkpointed or exported.

``BlockDraftConfig`` (``config.py``) is shared with DSpark (``dspark.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from spec_core.models.block.attention import Attend, BlockPlan, block_attend, block_positions
from spec_core.models.block.config import BlockDraftConfig, loss_weights
from spec_core.models.block.losses import (
    NUM_METRICS,
    BlockRows,
    block_loss,
    prefix_accept,
)
from spec_core.models.common.layers import (
    MLP,
    AttentionProjections,
    DraftModel,
    RMSNorm,
    apply_rope,
    rotary_embedding,
)
from spec_core.models.common.target import TargetProjection

# ----------------------------------------------------------------------------- modules


Rope = tuple[torch.Tensor, torch.Tensor]


class BlockAttention(AttentionProjections):
    """Dual-source attention: queries from the block rows, keys/values from [context ; block]."""

    def __init__(self, config: BlockDraftConfig) -> None:
        super().__init__(config, config.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, rope_q: Rope, rope_k: Rope, attend: Attend
    ) -> torch.Tensor:
        """x: [B, Q, H] normed block rows; context: [B, T, H] -> [B, Q, H]."""
        bsz, q_len, _ = x.shape
        kv_len = context.shape[1] + q_len
        q = self.q_norm(self.q_proj(x).view(bsz, q_len, self.num_heads, self.head_dim))
        k = torch.cat([self.k_proj(context), self.k_proj(x)], dim=1)
        k = self.k_norm(k.view(bsz, kv_len, self.num_kv_heads, self.head_dim))
        v = torch.cat([self.v_proj(context), self.v_proj(x)], dim=1)
        v = v.view(bsz, kv_len, self.num_kv_heads, self.head_dim)
        out = attend(apply_rope(q, *rope_q), apply_rope(k, *rope_k), v)
        return self.o_proj(out.reshape(bsz, q_len, -1))


class BlockDecoderLayer(nn.Module):
    def __init__(self, config: BlockDraftConfig) -> None:
        super().__init__()
        self.self_attn = BlockAttention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, context: torch.Tensor, rope_q: Rope, rope_k: Rope, attend: Attend
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), context, rope_q, rope_k, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(DraftModel):
    """The DFlash drafter; ``forward`` is one training step's loss over a ``BlockPlan``."""

    config: BlockDraftConfig

    def __init__(self, config: BlockDraftConfig, attention_backend: str = "sdpa") -> None:
        super().__init__(config, attention_backend)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(
            BlockDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary_embedding(config)
        self.loss_weights = loss_weights(config)

    # ---- backbone --------------------------------------------------------------------------

    def noise_ids(
        self, input_ids: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """[B, A, S] block inputs: the anchor token in slot 0 (MASK for padding blocks), MASK after."""
        mask_id = self.config.mask_token_id
        ids = torch.full(
            (*anchors.shape, self.config.block_size),
            mask_id,
            dtype=torch.long,
            device=anchors.device,
        )
        first = input_ids.gather(1, anchors).clamp(0, self.config.vocab_size - 1)
        ids[:, :, 0] = torch.where(keep, first, torch.full_like(first, mask_id))
        return ids

    def backbone(
        self,
        input_ids: torch.Tensor,
        aux_hidden: torch.Tensor,
        anchors: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Block hidden states after the final norm: [B, A, S, H]."""
        bsz, length = input_ids.shape
        size = self.config.block_size
        dtype = self.fc.weight.dtype
        context = self.hidden_norm(self.fc(aux_hidden.to(dtype)))
        h = self.embed_tokens(self.noise_ids(input_ids, anchors, keep).flatten(1)).to(dtype)
        positions = torch.cat(
            [
                torch.arange(length, device=anchors.device).expand(bsz, length),
                block_positions(anchors, size),
            ],
            dim=1,
        )
        cos, sin = self.rotary_emb(h, positions)
        rope_k = (cos, sin)
        rope_q = (cos[:, length:], sin[:, length:])
        attend = block_attend(self.attention_backend, anchors, keep, length, size)
        for layer in self.layers:
            h = layer(h, context, rope_q, rope_k, attend)
        return self.norm(h).view(bsz, anchors.shape[1], size, -1)

    def prediction_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, A, S, H] -> [B, A, P, H]: the slots that make predictions 0..P-1."""
        offset = self.config.slot_offset
        return hidden[:, :, offset : offset + self.config.num_predictions]

    # ---- training ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        aux_hidden: torch.Tensor,
        plan: BlockPlan,
        target: TargetProjection,
        scale: torch.Tensor,
        chunk_rows: int = 1024,
        last_hidden: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled loss, per-prediction metric sums [P, NUM_METRICS]) for one micro-batch."""
        hidden = self.backbone(input_ids, aux_hidden, plan.anchors, plan.keep)
        pred = self.prediction_hidden(hidden)
        sel = plan.mask
        if not bool(sel.any()):
            return self._untouched_loss(hidden), self._zero_metrics(hidden.device)
        labels = input_ids.gather(1, plan.label_pos.flatten(1)).view_as(plan.label_pos)
        labels = labels.clamp(0, self.config.vocab_size - 1)  # engine pad ids past the vocab
        slots = torch.arange(self.config.num_predictions, device=sel.device).expand_as(sel)
        rows = BlockRows(
            x=pred[sel],
            labels=labels[sel],
            weight=plan.weight[sel],
            slot=slots[sel],
        )
        bias_weight = self.add_head_inputs(rows, input_ids, pred, plan, target, last_hidden)
        loss, metrics, alpha = block_loss(
            rows,
            target.weight,
            self.config.num_predictions,
            scale,
            self.loss_weights,
            bias_weight=bias_weight,
            chunk_rows=chunk_rows,
        )
        if alpha is not None:
            prefix_accept(alpha, sel, metrics)
        return loss, metrics

    def add_head_inputs(
        self,
        rows: BlockRows,
        input_ids: torch.Tensor,
        pred: torch.Tensor,
        plan: BlockPlan,
        target: TargetProjection,
        last_hidden: Optional[torch.Tensor],
    ) -> Optional[torch.Tensor]:
        """DSpark hook (Markov latent, target rows, confidence); returns the Markov ``W2``."""
        return None

    def _untouched_loss(self, hidden: torch.Tensor) -> torch.Tensor:
        """Nothing supervised: a zero loss that still reaches every trainable weight."""
        touch = hidden.sum() + sum(p.sum() for p in self.parameters() if p.requires_grad)
        return touch * 0.0

    def _zero_metrics(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(
            self.config.num_predictions, NUM_METRICS, dtype=torch.float64, device=device
        )
