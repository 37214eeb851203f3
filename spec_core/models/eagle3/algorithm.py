"""EAGLE-3 as a ``DraftAlgorithm``: one midlayer, TTT unroll, soft-label loss, chain drafting."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from spec_core.config import Config, DraftConfig
from spec_core.models.algorithm import TARGET_EMBEDDING_KEY, DraftAlgorithm, Objective, Require
from spec_core.models.common.layers import resolve_backend
from spec_core.models.common.target import TargetProjection
from spec_core.models.eagle3 import export
from spec_core.models.eagle3.config import (
    ARCHITECTURE,
    Eagle3Config,
    default_capture_indices,
    derive_eagle3_config,
)
from spec_core.models.eagle3.losses import (
    NUM_METRICS,
    pooled_scales,
    summarize,
    supervised_counts,
)

if TYPE_CHECKING:
    from spec_core.contracts.samples import Batch


class Eagle3Objective(Objective):
    """TTT unroll with per-step denominators N_k (``losses.pooled_scales``).

    The unroll depth is the draft config's ``ttt_length`` (its one source of truth); the step
    weight decay and loss chunking are run settings.
    """

    def __init__(self, cfg: Config, dcfg: Eagle3Config, target: TargetProjection) -> None:
        self.num_steps = dcfg.ttt_length
        self.decay = cfg.draft.step_weight_decay
        self.chunk_rows = cfg.training.loss_chunk_size
        self.target = target

    def plan(self, batch: Batch, generator: Optional[torch.Generator] = None):
        counts = supervised_counts(batch.loss_mask, batch.attention_mask, self.num_steps)
        return None, counts.double()

    def scales(self, global_counts: torch.Tensor, world_size: int) -> torch.Tensor:
        return pooled_scales(global_counts, self.num_steps, self.decay, world_size)

    def forward(self, model: nn.Module, batch: Batch, plan: Any, scales: torch.Tensor):
        if batch.last_hidden is None:
            raise ValueError("EAGLE-3 training needs last hidden states in every batch")
        return model(
            batch.input_ids,
            batch.attention_mask,
            batch.loss_mask,
            batch.aux_hidden,
            batch.last_hidden,
            self.target,
            scales,
            self.chunk_rows,
        )

    def metric_zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.num_steps, NUM_METRICS, dtype=torch.float64, device=device)

    def summarize(self, sums: torch.Tensor) -> dict[str, Any]:
        return summarize(sums, self.decay)


class Eagle3Algorithm(DraftAlgorithm):
    name = "eagle3"
    architectures = (ARCHITECTURE,)
    speculators_type = "eagle3"

    def parse_config(self, data: dict[str, Any], source: str) -> Eagle3Config:
        return Eagle3Config.from_hf_dict(data, source)

    def derive_config(self, target_json, cfg, vocab_size, target_dir):
        from spec_core.models.common.config import text_config

        vocab = vocab_size or int(text_config(target_json)["vocab_size"])
        return derive_eagle3_config(target_json, cfg.draft, vocab, target_name=cfg.target.path)

    def default_capture_indices(self, draft: DraftConfig, num_layers: int) -> tuple[int, ...]:
        return default_capture_indices(num_layers)

    def needs_last_hidden(self, draft: DraftConfig) -> bool:
        return True

    def build_model(self, dcfg, cfg, head, vocab_map, device):
        from spec_core.models.eagle3.model import Eagle3Draft

        model = Eagle3Draft(dcfg, resolve_backend(cfg.draft.attention_backend, device))
        model.init_weights(torch.Generator().manual_seed(cfg.training.seed))
        with torch.no_grad():
            model.embed_tokens.weight.copy_(head.load_embedding())
            if vocab_map is not None:
                model.set_vocab_map(vocab_map.d2t, vocab_map.t2d)
            if cfg.draft.init_from_target and dcfg.hidden_size == head.hidden_size:
                rows = head.lm_head if vocab_map is None else head.lm_head[vocab_map.t2d]
                model.lm_head.weight.copy_(rows)
                if head.norm_weight is not None:
                    model.norm.weight.copy_(head.norm_weight)
        return model.to(device)

    def objective(self, cfg, dcfg, target):
        return Eagle3Objective(cfg, dcfg, target)

    def export_weights(self, dcfg, state, source, training_vocab_map, vocab_map):
        return export.export_weights(dcfg, state, source, training_vocab_map, vocab_map)

    def export_config(self, dcfg, provenance):
        return export.engine_config(dcfg, provenance)

    def check_export_config(self, raw, where, require: Require):
        return export.check_config(raw, where, require)

    def expected_shapes(self, dcfg):
        return export.expected_shapes(dcfg)

    def foreign_prefixes(self) -> tuple[str, ...]:
        return ("layers.",)  # vLLM speculators names: they belong in the speculators twin only

    def extra_tensors(self, dcfg) -> tuple[str, ...]:
        return export.VOCAB_KEYS if dcfg.pruned else ()

    def unexpected_tensors_hint(self, dcfg, names: list[str]) -> str:
        if set(names) & set(export.VOCAB_KEYS):
            return " (a full-vocab draft must not carry d2t/t2d: vLLM refuses it)"
        return ""

    def check_export_tensors(self, dcfg, tensors, where, require: Require) -> None:
        export.check_tensors(dcfg, tensors, where, require)

    def check_against_target(self, dcfg, target, require: Require) -> None:
        export.check_against_target(dcfg, target, require)

    def speculators_layout(self, hf_config, tensors, verifier, k):
        return export.speculators_layout(hf_config, tensors, verifier, k)

    def load_export(
        self, hf_dir, target_dir=None, embedding_key=TARGET_EMBEDDING_KEY, dtype=torch.float32
    ):
        return export.load_export(
            Path(hf_dir), Path(target_dir) if target_dir else None, embedding_key, dtype
        )

    def proposer(self, draft, target, evaluation=None):
        from spec_core.models.eagle3.proposer import Eagle3Proposer

        return Eagle3Proposer(draft, target.config)
