"""DSpark: the DFlash backbone plus a Markov head and a confidence head.

Differences from DFlash (``dflash.py``):

* every block slot predicts - slot j is trained toward the token at anchor + j + 1 (the anchor
  slot predicts the first draft token), so a block of S slots drafts S tokens;
* the **Markov head** adds a low-rank bigram bias from the previous token to the logits,
  ``z_j = W_lm h_j + W2 u_j``, restoring dependence inside the block. ``u_j`` is
  ``W1[prev_j]`` (vanilla), ``sigmoid(W_g [h_j ; W1[prev_j]]) * W1[prev_j]`` (gated), or the
  output of a GRU-like recurrence over the block (rnn). Training is teacher-forced: prev_0 is the
  anchor token, prev_j the label of slot j-1 (the data token at anchor + j);
* the **confidence head** ``Linear([h_j (; W1[prev_j])] -> 1)`` predicts the probability that draft
  j is accepted, trained by BCE against alpha_j = sum_v min(p_j, q_j) (detached), where q_j is the
  target's distribution from its last hidden state at anchor + j;
* the loss is ``(a_ce sum w CE + a_l1 sum w ||p - q||_1 + a_conf sum w BCE) / sum w``; a term with
  weight 0 is never computed, and a configuration without the L1/confidence terms never reads
  last hidden states (so producers need not send them). Pre-norm last hidden states (vLLM) get the
  target's final norm through ``TargetProjection.prepare``.

Parameter names follow DeepSpec: ``markov_head.markov_w1.weight`` [V, r],
``markov_head.markov_w2.weight`` [V, r], ``markov_head.gate_proj.*`` (gated),
``markov_head.joint_proj.*`` (rnn), ``confidence_head.proj.{weight,bias}``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from spec_core.models.block.attention import BlockPlan
from spec_core.models.block.config import BlockDraftConfig
from spec_core.models.block.dflash import DFlashDraft
from spec_core.models.block.losses import BlockRows
from spec_core.models.common.target import TargetProjection

MARKOV_HEADS = ("vanilla", "gated", "rnn")


class MarkovHead(nn.Module):
    """Low-rank bias from the previous token: ``bias = W2 latent(prev, h)``."""

    def __init__(self, kind: str, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__()
        if kind not in MARKOV_HEADS:
            raise ValueError(f"unknown markov head {kind!r}; valid: {', '.join(MARKOV_HEADS)}")
        self.kind = kind
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)
        if kind == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        elif kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def prev_embeddings(self, prev_ids: torch.Tensor) -> torch.Tensor:
        return self.markov_w1(prev_ids)

    def latent(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """prev_ids [B, A, P], hidden [B, A, P, H] -> u [B, A, P, r] (teacher-forced)."""
        emb = self.prev_embeddings(prev_ids).to(hidden.dtype)
        if self.kind == "vanilla":
            return emb
        if self.kind == "gated":
            gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, emb], dim=-1)))
            return gate * emb
        state = torch.zeros_like(emb[..., 0, :])
        outs = []
        for j in range(emb.shape[-2]):  # the state carries the block prefix x_{<j} forward
            z = self.joint_proj(torch.cat([state, emb[..., j, :], hidden[..., j, :]], dim=-1))
            gate_raw, candidate_raw, out_raw = z.chunk(3, dim=-1)
            gate = torch.sigmoid(gate_raw)
            state = gate * state + (1.0 - gate) * torch.tanh(candidate_raw)
            outs.append(torch.tanh(out_raw))
        return torch.stack(outs, dim=-2)

    def bias(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The logit bias [B, A, P, V] (materialized; for tests and decoding, not training)."""
        return self.markov_w2(self.latent(prev_ids, hidden))


class ConfidenceHead(nn.Module):
    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


class DSparkDraft(DFlashDraft):
    def __init__(self, config: BlockDraftConfig, attention_backend: str = "sdpa") -> None:
        super().__init__(config, attention_backend)
        self.markov_head = (
            MarkovHead(
                config.markov_head_type, config.vocab_size, config.markov_rank, config.hidden_size
            )
            if config.markov_rank > 0
            else None
        )
        self.confidence_head = None
        if config.enable_confidence_head:
            extra = config.markov_rank if config.confidence_head_with_markov else 0
            self.confidence_head = ConfidenceHead(config.hidden_size + extra)

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None, std: float = 0.02) -> None:
        """As DFlash, with ``W2 = 0``: the Markov bias starts at zero, so training starts from
        the plain block drafter and the bias grows only where it lowers the loss."""
        super().init_weights(generator, std)
        if self.markov_head is not None:
            self.markov_head.markov_w2.weight.zero_()

    @property
    def needs_last_hidden(self) -> bool:
        w = self.loss_weights
        return w.l1 > 0 or (self.confidence_head is not None and w.confidence > 0)

    def prev_ids(self, input_ids: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        """[B, A, P] teacher-forced previous token of prediction i: the data token at anchor + i."""
        return input_ids.gather(1, (plan.label_pos - 1).flatten(1)).view_as(plan.label_pos)

    def add_head_inputs(
        self,
        rows: BlockRows,
        input_ids: torch.Tensor,
        pred: torch.Tensor,
        plan: BlockPlan,
        target: TargetProjection,
        last_hidden: Optional[torch.Tensor],
    ) -> Optional[torch.Tensor]:
        sel = plan.mask
        prev = self.prev_ids(input_ids, plan).clamp(0, self.config.vocab_size - 1)
        if self.needs_last_hidden:
            if last_hidden is None:
                raise ValueError(
                    "DSpark with l1_weight > 0 or a confidence head needs the target's last "
                    "hidden states in every batch; the producer did not send them"
                )
            idx = (plan.label_pos - 1).flatten(1)  # q_i comes from the target at anchor + i
            gathered = last_hidden.gather(1, idx[..., None].expand(-1, -1, last_hidden.shape[-1]))
            gathered = gathered.view(*plan.label_pos.shape, -1)[sel]
            rows.target_hidden = target.prepare(gathered.to(target.weight.dtype))
        bias_weight = None
        if self.markov_head is not None:
            rows.latent = self.markov_head.latent(prev, pred)[sel]
            bias_weight = self.markov_head.markov_w2.weight
        if self.confidence_head is not None:
            features = pred
            if self.config.confidence_head_with_markov:
                emb = self.markov_head.prev_embeddings(prev).to(pred.dtype)  # type: ignore[union-attr]
                features = torch.cat([pred, emb], dim=-1)
            rows.confidence = self.confidence_head(features[sel])
        return bias_weight
