"""A deliberately naive EAGLE-3 TTT forward + loss: the test oracle and the benchmark baseline.

It does what TorchSpec's SDPA path does: every step runs on every position,
attention is an explicit score matrix over the concatenated per-step caches, and the target and
draft logits are materialized over the whole [B, T, V]. It shares the draft's parameters and must
agree with ``Eagle3Draft.forward`` on loss, gradients and metrics; it is never used for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spec_core.models.common.layers import apply_rope
from spec_core.models.eagle3.losses import NUM_METRICS, label_rows, step_valid
from spec_core.models.eagle3.model import Eagle3Draft


def _dense_ttt_attention(q: torch.Tensor, keys: list, values: list) -> torch.Tensor:
    """q [B, T, Hq, d]; keys/values: per step [B, T, Hkv, d]. Block 0 causal, later blocks diagonal."""
    bsz, length, hq, d = q.shape
    group = hq // keys[0].shape[2]
    k_all = torch.cat(keys, dim=1).repeat_interleave(group, dim=2)  # [B, S*T, Hq, d]
    v_all = torch.cat(values, dim=1).repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_all) * d**-0.5
    qi = torch.arange(length)[:, None]
    kv = torch.arange(len(keys) * length)[None, :]
    allowed = torch.where(kv < length, kv <= qi, (kv % length) == qi)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    probs = probs.to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v_all)


def reference_ttt_hidden(
    model: Eagle3Draft, input_ids: torch.Tensor, aux_hidden: torch.Tensor, num_steps: int
) -> list[torch.Tensor]:
    """Pre-norm draft hidden states [B, T, H] of every TTT step, computed densely."""
    bsz, length = input_ids.shape
    layer = model.midlayer
    attn = layer.self_attn
    ids = F.pad(input_ids, (0, num_steps + 1))
    hidden = model.fc(aux_hidden.to(model.fc.weight.dtype))
    keys, values, outputs = [], [], []
    for k in range(num_steps):
        embeds = model.embed_tokens(ids[:, 1 + k : 1 + k + length]).to(hidden.dtype)
        cos, sin = model.rotary_emb(hidden, torch.arange(length) + k)
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        q = apply_rope(attn.q_proj(x).view(bsz, length, attn.num_heads, -1), cos, sin)
        keys.append(apply_rope(attn.k_proj(x).view(bsz, length, attn.num_kv_heads, -1), cos, sin))
        values.append(attn.v_proj(x).view(bsz, length, attn.num_kv_heads, -1))
        h = hidden + attn.o_proj(_dense_ttt_attention(q, keys, values).reshape(bsz, length, -1))
        hidden = h + layer.mlp(layer.post_attention_layernorm(h))
        outputs.append(hidden)
    return outputs


def reference_loss(
    model: Eagle3Draft,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    aux_hidden: torch.Tensor,
    last_hidden: torch.Tensor,
    target_lm_head: torch.Tensor,
    step_scales: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``Eagle3Draft.forward`` with the full target lm_head [V, Ht]."""
    num_steps = int(step_scales.numel())
    bsz, length = input_ids.shape
    valid = step_valid(label_rows(loss_mask, attention_mask), num_steps)

    target_logits = last_hidden.to(target_lm_head.dtype) @ target_lm_head.T  # [B, T, V]
    t2d = model.vocab_t2d
    in_vocab = torch.ones(bsz, length, dtype=torch.bool)
    draft_target_logits = target_logits
    if t2d is not None:
        in_vocab = t2d[target_logits.argmax(-1)]
        draft_target_logits = target_logits[..., t2d]
    target_probs = torch.softmax(draft_target_logits, dim=-1)  # [B, T, Vd]
    target_arg = draft_target_logits.argmax(-1)

    loss = torch.zeros((), dtype=model.fc.weight.dtype)
    metrics = torch.zeros(num_steps, NUM_METRICS, dtype=torch.float64)
    for k, hidden in enumerate(reference_ttt_hidden(model, input_ids, aux_hidden, num_steps)):
        logq = torch.log_softmax(model.lm_head(model.norm(hidden)), dim=-1)  # [B, T, Vd]
        shift = 1 + k
        p = F.pad(target_probs[:, shift:], (0, 0, 0, shift))
        ce = -(p * logq).sum(-1)
        mask = valid[k]
        loss = loss + step_scales[k].to(ce.dtype) * ce[mask].sum()
        arg = F.pad(target_arg[:, shift:], (0, shift))
        inv = F.pad(in_vocab[:, shift:], (0, shift))
        correct = (logq.argmax(-1) == arg) & inv
        metrics[k] = torch.stack(
            [
                mask.sum().double(),
                ce[mask].sum().double().detach(),
                correct[mask].sum().double(),
                inv[mask].sum().double(),
            ]
        )
    return loss, metrics
