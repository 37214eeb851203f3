"""Block drafting for the evaluator: DFlash and DSpark propose one whole block per round.

Each round the last known token is the *anchor*: it is not yet in the target's cache, and every
position before it has target features (docs/architecture.md §training-alignment). The drafter
runs its training-time backbone with exactly one kept anchor there, so the block attends to the
same context rows and uses the same positions as in training; the prediction slots then give the
draft tokens for anchor + 1, anchor + 2, ... by greedy argmax over the target's ``lm_head``.

DSpark adds its Markov bias from the previous token (the anchor for the first draft, then each
draft token in turn: what was teacher-forced in training is the draft's own choice here), and its
confidence head may end the block early: drafting stops after the first slot whose predicted
acceptance falls below ``min_confidence`` (0 keeps the whole block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from spec_core.models.algorithm import Proposer
from spec_core.models.block.dflash import DFlashDraft


class BlockProposer(Proposer):
    def __init__(self, draft: DFlashDraft, target: Any, min_confidence: float = 0.0) -> None:
        self.capture = self.fitted_capture(draft.config, target.config)
        self.draft = draft
        self.lm_head = target.get_output_embeddings().weight  # shared with the drafter
        self.min_confidence = float(min_confidence)
        self.reset()

    def reset(self) -> None:
        self.context: list[torch.Tensor] = []  # fused target features of verified positions

    @torch.inference_mode()
    def propose(
        self, seq: Sequence[int], hidden_states: Sequence[torch.Tensor], k: int
    ) -> list[int]:
        self.context.append(torch.cat([hidden_states[i] for i in self.capture], dim=-1))
        pred = self.block_hidden(seq)[: min(k, self.draft.config.num_predictions)]
        return self.greedy(pred, int(seq[-1]))

    def block_hidden(self, seq: Sequence[int]) -> torch.Tensor:
        """[P, H] prediction-slot states of the block anchored at the last token of ``seq``."""
        context = torch.cat(self.context, dim=1)
        anchor = len(seq) - 1
        if context.shape[1] != anchor:
            raise ValueError(f"{context.shape[1]} feature rows for an anchor at {anchor}")
        # The anchor's own row is never attended (a block sees context strictly before it).
        aux = torch.cat([context, context.new_zeros(1, 1, context.shape[-1])], dim=1)
        ids = torch.tensor([list(seq)], device=aux.device)
        anchors = torch.tensor([[anchor]], device=aux.device)
        keep = torch.ones_like(anchors, dtype=torch.bool)
        hidden = self.draft.backbone(ids, aux.to(self.draft.fc.weight.dtype), anchors, keep)
        return self.draft.prediction_hidden(hidden)[0, 0]

    def greedy(self, pred: torch.Tensor, anchor_token: int) -> list[int]:
        """Draft tokens from the slot states: independent argmaxes for DFlash; for DSpark one
        slot at a time, each biased by the previous token and cut by the confidence head."""
        logits = pred @ self.lm_head.to(pred.dtype).T
        markov = getattr(self.draft, "markov_head", None)
        confidence = getattr(self.draft, "confidence_head", None)
        if markov is None and confidence is None:
            return logits.argmax(-1).tolist()
        drafts: list[int] = []
        prev = [anchor_token]
        for j in range(pred.shape[0]):
            prev_ids = torch.tensor(prev, device=pred.device)
            z = logits[j]
            if markov is not None:
                z = z + markov.bias(prev_ids, pred[: j + 1])[j]
            drafts.append(int(z.argmax()))
            if confidence is not None and self._confidence(pred, prev_ids, j) < self.min_confidence:
                break
            prev.append(drafts[-1])
        return drafts

    def _confidence(self, pred: torch.Tensor, prev_ids: torch.Tensor, j: int) -> float:
        """Predicted acceptance of draft ``j`` (the head is trained on it as a probability)."""
        features = pred[j]
        if self.draft.config.confidence_head_with_markov:
            emb = self.draft.markov_head.prev_embeddings(prev_ids[j])  # type: ignore[union-attr]
            features = torch.cat([features, emb.to(pred.dtype)], dim=-1)
        return float(torch.sigmoid(self.draft.confidence_head(features)))  # type: ignore[misc]
