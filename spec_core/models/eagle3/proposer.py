"""EAGLE-3 chain drafting for the evaluator: k tokens per round from the draft's own outputs.

Each round the draft runs its step 0 on every position whose target features it has not consumed
yet (feature f_t with embed(x_{t+1}), docs/architecture.md §training-alignment) and chains k-1
more steps on its own outputs, proposing d_1..d_k. The draft cache keeps the step-0 entries of the
verified positions only, so the next round sees exactly what TTT step 0 sees in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from spec_core.models.algorithm import Proposer
from spec_core.models.eagle3.model import Eagle3Draft, KVCache


class Eagle3Proposer(Proposer):
    def __init__(self, draft: Eagle3Draft, target_config: Any) -> None:
        self.capture = self.fitted_capture(draft.config, target_config)
        self.draft = draft
        self.reset()

    def reset(self) -> None:
        self.cache: Optional[KVCache] = None
        self.consumed = 0  # positions whose step-0 entries are in the draft cache

    def _draft_token(self, hidden: torch.Tensor) -> int:
        draft_id = self.draft.logits(hidden[:, -1]).argmax(-1)
        return int(self.draft.draft_to_target(draft_id)[0])

    @torch.inference_mode()
    def propose(
        self, seq: Sequence[int], hidden_states: Sequence[torch.Tensor], k: int
    ) -> list[int]:
        features = torch.cat([hidden_states[i] for i in self.capture], dim=-1)
        n_new = features.shape[1]
        start = self.consumed
        positions = torch.arange(start, start + n_new)[None]
        ids = torch.tensor([list(seq[start + 1 : start + 1 + n_new])])
        hidden, self.cache = self.draft.decode(
            ids, self.draft.project_features(features), positions, self.cache
        )
        self.consumed += n_new
        drafts = [self._draft_token(hidden)]
        chain_cache = self.cache
        for j in range(1, k):  # step j at position consumed - 1 + j
            hidden, chain_cache = self.draft.decode(
                torch.tensor([[drafts[-1]]]),
                hidden[:, -1:],
                torch.tensor([[self.consumed - 1 + j]]),
                chain_cache,
            )
            drafts.append(self._draft_token(hidden))
        return drafts
