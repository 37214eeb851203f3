"""The EAGLE-3 draft: one Llama decoder layer over [norm(embedding) ‖ norm(hidden)].

Module and parameter names are the HF export names (docs/architecture.md §export-format), so
exporting is a plain
state-dict save: ``embed_tokens.weight`` (frozen target embedding), ``fc.weight``,
``midlayer.self_attn.{q,k,v,o}_proj.weight``, ``midlayer.mlp.{gate,up,down}_proj.weight``,
``midlayer.{hidden_norm,input_layernorm,post_attention_layernorm}.weight``, ``norm.weight``,
``lm_head.weight`` [draft_vocab, H], and buffers ``d2t`` (int64 offsets) / ``t2d`` (bool) only when
the draft vocab is pruned.

Two ways to run it:
* ``forward(...)`` - training: the test-time-training (TTT) unroll with the chunked loss, returning
  (loss, metric sums). Step 0 runs densely over every position (its keys form the prefix cache);
  steps >= 1 run only on the positions that still lead to a supervised label, packed into rows.
* ``decode(...)`` / ``logits(...)`` - incremental drafting with explicit position ids and a plain
  KV cache, for the evaluator and engines' reference behaviour.
The TTT cache bookkeeping lives in ``forward``; the layer itself only sees q/k/v and an attention
callback, so both paths share exactly the same layer math.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from spec_core.models.common.layers import (
    MLP,
    AttentionProjections,
    DraftModel,
    RMSNorm,
    apply_rope,
    rotary_embedding,
)
from spec_core.models.common.target import TargetProjection
from spec_core.models.eagle3.attention import (
    cached_attention,
    causal_attention,
    row_segments,
    ttt_attention_flex,
    ttt_attention_sdpa,
)
from spec_core.models.eagle3.config import Eagle3Config
from spec_core.models.eagle3.losses import (
    NUM_METRICS,
    chunked_soft_ce,
    label_rows,
    step_valid,
)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
KVCache = tuple[torch.Tensor, torch.Tensor]


class Eagle3Attention(AttentionProjections):
    """Attention over ``[norm_in(e) ‖ norm_hidden(hidden)]``: its input is twice the hidden size."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__(config, 2 * config.hidden_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [..., N, 2H] -> (out [..., N, H], k, v [..., N, Hkv, d] with RoPE applied)."""
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v)
        return self.o_proj(out.reshape(*lead, -1)), k, v


class Eagle3DecoderLayer(nn.Module):
    """``h = hidden + Attn([norm_in(e) ‖ norm_hidden(hidden)]); h = h + MLP(norm_post(h))``."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.self_attn = Eagle3Attention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        attn_out, k, v = self.self_attn(x, cos, sin, attend)
        h = hidden + attn_out
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class Eagle3Draft(DraftModel):
    config: Eagle3Config

    def __init__(self, config: Eagle3Config, attention_backend: str = "sdpa") -> None:
        super().__init__(config, attention_backend)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        if config.pruned:
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.rotary_emb = rotary_embedding(config)

    @torch.no_grad()
    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        if not self.config.pruned:
            raise ValueError("a full-vocab draft has no d2t/t2d buffers")
        self.d2t.copy_(d2t.to(torch.long))
        self.t2d.copy_(t2d.to(torch.bool))

    @property
    def vocab_t2d(self) -> Optional[torch.Tensor]:
        return self.t2d if self.config.pruned else None

    # ---- training: TTT unroll + chunked loss ----------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        aux_hidden: torch.Tensor,
        last_hidden: torch.Tensor,
        target: TargetProjection,
        step_scales: torch.Tensor,
        chunk_rows: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """TTT unroll over ``len(step_scales)`` steps; returns (loss, metric sums [K, 4]).

        ``step_scales[k]`` = w_k / N_k with N_k pooled over the whole optimizer step (see
        ``losses.pooled_scales``), so micro-batches and ranks add up to one big batch's loss.
        """
        num_steps = int(step_scales.numel())
        bsz, full_len = input_ids.shape
        device = input_ids.device
        target_used = label_rows(loss_mask, attention_mask)  # [B, T] target rows
        valid = step_valid(target_used, num_steps)  # [K, B, T] supervised (step, position)
        need = valid.flip(0).cumsum(0).flip(0) > 0  # step k runs at t if any step >= k counts
        needed_pos = need[0].any(dim=0).nonzero()
        length = int(needed_pos.max()) + 1 if needed_pos.numel() else 1
        rows, outs = self._unroll(input_ids, aux_hidden, need[:, :, :length])

        target_rows = target_used.reshape(-1).nonzero().squeeze(1)  # flat b*T + u
        draft_x, row_target, row_scale, row_step = [], [], [], []
        for k, (rows_k, out_k) in enumerate(zip(rows, outs, strict=True)):
            sup = valid[k, :, :length].reshape(-1).nonzero().squeeze(1)
            if sup.numel() == 0:
                continue
            draft_x.append(out_k[torch.searchsorted(rows_k, sup)])
            flat_target = (sup // length) * full_len + sup % length + 1 + k  # u = t + 1 + k
            row_target.append(torch.searchsorted(target_rows, flat_target))
            row_scale.append(step_scales[k].to(device).expand(sup.numel()))
            row_step.append(torch.full_like(sup, k))

        if not draft_x:  # nothing supervised: a zero loss that still reaches every weight
            touch = outs[0].sum() + self.lm_head.weight.sum() + self.norm.weight.sum()
            metrics = torch.zeros(num_steps, NUM_METRICS, dtype=torch.float64, device=device)
            return touch * 0.0, metrics

        order = torch.argsort(torch.cat(row_target), stable=True)  # group rows by target row
        x = self.norm(torch.cat(draft_x)[order])
        target_hidden = target.prepare(
            last_hidden.reshape(bsz * full_len, -1)[target_rows].to(target.weight.dtype)
        )
        return chunked_soft_ce(
            x,
            self.lm_head.weight,
            target_hidden,
            target,
            torch.cat(row_target)[order],
            torch.cat(row_scale)[order],
            torch.cat(row_step)[order],
            num_steps,
            chunk_rows,
        )

    def _unroll(
        self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, need: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the TTT steps; ``need`` [K, B, L] says where each step is needed.

        Returns per step the flat rows (b * L + t) it ran on and its pre-norm outputs there.
        Step 0 runs densely on [B, L] (its keys/values are every later step's prefix cache);
        step k >= 1 runs on its needed rows only, fed the previous step's output at those rows.
        """
        num_steps, bsz, length = need.shape
        dtype = self.fc.weight.dtype
        device = input_ids.device
        ids = F.pad(input_ids.clamp(0, self.config.vocab_size - 1), (0, num_steps + 1))
        cos, sin = self.rotary_emb(self.fc.weight, torch.arange(length, device=device))
        hidden = self.fc(aux_hidden[:, :length].to(dtype))
        embeds = self.embed_tokens(ids[:, 1 : 1 + length]).to(dtype)
        out0, k0, v0 = self.midlayer(embeds, hidden, cos, sin, causal_attention)
        outs = [out0.reshape(bsz * length, -1)]
        rows = [torch.arange(bsz * length, device=device)]
        diag_keys: list[torch.Tensor] = []  # step j >= 1 keys/values, on rows[j]
        diag_values: list[torch.Tensor] = []
        for k in range(1, num_steps):
            rows_k = need[k].reshape(-1).nonzero().squeeze(1)
            if rows_k.numel() == 0:
                break
            batch_idx, pos_idx = rows_k // length, rows_k % length
            embeds = self.embed_tokens(ids[batch_idx, pos_idx + 1 + k]).to(dtype)
            cos, sin = self.rotary_emb(self.fc.weight, pos_idx + k)
            earlier = []
            for j in range(k - 1):
                idx = torch.searchsorted(rows[j + 1], rows_k)
                earlier.append((diag_keys[j][idx], diag_values[j][idx]))
            attend = self._ttt_attend(k0, v0, earlier, pos_idx, batch_idx, bsz)
            prev = outs[k - 1][torch.searchsorted(rows[k - 1], rows_k)]
            out_k, key_k, value_k = self.midlayer(embeds, prev, cos, sin, attend)
            outs.append(out_k)
            rows.append(rows_k)
            diag_keys.append(key_k)
            diag_values.append(value_k)
        return rows, outs

    def _ttt_attend(
        self,
        k0: torch.Tensor,
        v0: torch.Tensor,
        earlier: list[KVCache],
        pos_idx: torch.Tensor,
        batch_idx: torch.Tensor,
        bsz: int,
    ) -> Attend:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            diag_k = torch.stack([ek for ek, _ in earlier] + [k], dim=1)
            diag_v = torch.stack([ev for _, ev in earlier] + [v], dim=1)
            if self.attention_backend == "flex":
                return ttt_attention_flex(q, k0, v0, diag_k, diag_v, pos_idx, batch_idx)
            segments = row_segments(batch_idx, bsz)
            return ttt_attention_sdpa(q, k0, v0, diag_k, diag_v, pos_idx, segments)

        return attend

    # ---- decoding ---------------------------------------------------------------------------

    def project_features(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """Target features [..., aux_dim] -> draft hidden [..., H] (the first step's input)."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def decode(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_value: Optional[KVCache] = None,
        key_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run n new positions: ``input_ids`` [B, n] are the tokens x_{t+1} fed at positions
        ``position_ids`` [B, n]; ``hidden`` [B, n, H] is ``project_features`` of the target
        features at t, or the draft's own previous output. Returns (pre-norm hidden [B, n, H],
        cache [B, L, Hkv, d] x 2); feed the hidden back in for the next draft token.
        """
        ids = input_ids.clamp(0, self.config.vocab_size - 1)
        embeds = self.embed_tokens(ids).to(hidden.dtype)
        cos, sin = self.rotary_emb(hidden, position_ids)
        cache: list[torch.Tensor] = []

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if past_key_value is not None:
                k = torch.cat([past_key_value[0], k], dim=1)
                v = torch.cat([past_key_value[1], v], dim=1)
            cache.extend([k, v])
            return cached_attention(q, k, v, key_mask)

        out, _, _ = self.midlayer(embeds, hidden, cos, sin, attend)
        return out, (cache[0], cache[1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits from pre-norm hidden states."""
        return self.lm_head(self.norm(hidden))

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        if not self.config.pruned:
            return draft_ids
        return draft_ids + self.d2t[draft_ids]
