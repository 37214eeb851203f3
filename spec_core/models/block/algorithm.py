"""DFlash and DSpark as ``DraftAlgorithm``s: anchored blocks drafted in one forward."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from spec_core.config import Config, DraftConfig
from spec_core.errors import ConfigError
from spec_core.models.algorithm import TARGET_EMBEDDING_KEY, DraftAlgorithm, Objective, Require
from spec_core.models.block import export
from spec_core.models.block.attention import make_plan, sample_anchors
from spec_core.models.block.config import (
    ARCHITECTURES,
    BlockDraftConfig,
    default_capture_indices,
    derive_block_config,
    loss_weights,
)
from spec_core.models.block.losses import NUM_METRICS, pooled_scale, summarize_block
from spec_core.models.common.layers import resolve_backend
from spec_core.models.common.target import TargetProjection

if TYPE_CHECKING:
    from spec_core.contracts.samples import Batch


class BlockObjective(Objective):
    """Anchored blocks; one denominator D = sum of prediction weights (``block.losses``).

    ``num_anchors``, the slot decay gamma and the loss weights come from the draft config (their
    one source of truth); loss chunking is a run setting.
    """

    def __init__(self, cfg: Config, dcfg: BlockDraftConfig, target: TargetProjection) -> None:
        self.dcfg = dcfg
        self.target = target
        self.chunk_rows = cfg.training.loss_chunk_size
        self.num_anchors = dcfg.num_anchors
        self.gamma = dcfg.loss_decay_gamma
        self.weights = loss_weights(dcfg)

    def plan(self, batch: Batch, generator: Optional[torch.Generator] = None):
        anchors, keep = sample_anchors(
            batch.loss_mask, batch.attention_mask, self.num_anchors, generator
        )
        plan = make_plan(
            batch.input_ids.shape[1],
            batch.loss_mask,
            batch.attention_mask,
            anchors,
            keep,
            self.dcfg.num_predictions,
            self.gamma,
        )
        return plan, torch.tensor([plan.total_weight], dtype=torch.float64)

    def scales(self, global_counts: torch.Tensor, world_size: int) -> torch.Tensor:
        return pooled_scale(float(global_counts[0]), world_size)

    def forward(self, model: nn.Module, batch: Batch, plan: Any, scales: torch.Tensor):
        return model(
            batch.input_ids,
            batch.aux_hidden,
            plan.to(batch.input_ids.device),
            self.target,
            scales,
            self.chunk_rows,
            last_hidden=batch.last_hidden,
        )

    def metric_zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(
            self.dcfg.num_predictions, NUM_METRICS, dtype=torch.float64, device=device
        )

    def summarize(self, sums: torch.Tensor) -> dict[str, Any]:
        return summarize_block(sums, self.weights, self.dcfg.slot_offset)


class BlockAlgorithm(DraftAlgorithm):
    """DFlash (``name`` dflash) or DSpark (dspark): one config class, one model family."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.architectures = (ARCHITECTURES[name],)

    def parse_config(self, data: dict[str, Any], source: str) -> BlockDraftConfig:
        dcfg = BlockDraftConfig.from_hf_dict(data, source)
        if dcfg.algorithm != self.name:
            raise ConfigError(
                f"{source}: checkpoint is a {dcfg.algorithm} draft, the config asks for {self.name}"
            )
        return dcfg

    def derive_config(self, target_json, cfg, vocab_size, target_dir):
        if vocab_size is not None:
            raise ConfigError(
                f"vocab pruning is not supported for {self.name}; set 'vocab.draft_vocab_size: null'"
            )
        return derive_block_config(target_json, cfg, target_dir)

    def default_capture_indices(self, draft: DraftConfig, num_layers: int) -> tuple[int, ...]:
        return default_capture_indices(num_layers, draft.num_capture_layers)

    def needs_last_hidden(self, draft: DraftConfig) -> bool:
        if self.name == "dflash":
            return False
        confidence = draft.enable_confidence_head and draft.confidence_weight > 0
        return draft.l1_weight > 0 or confidence

    def build_model(self, dcfg, cfg, head, vocab_map, device):
        backend = resolve_backend(cfg.draft.attention_backend, device)
        if backend == "flex" and device.type != "cuda":
            raise ConfigError(
                "'draft.attention_backend: flex' cannot train on CPU (flex_attention has no CPU "
                "backward); use auto or sdpa"
            )
        if head.hidden_size != dcfg.hidden_size or head.vocab_size != dcfg.vocab_size:
            raise ConfigError(
                f"the {self.name} draft ({dcfg.hidden_size} hidden, {dcfg.vocab_size} vocab) must "
                f"match the target's lm_head ({head.hidden_size}, {head.vocab_size})"
            )
        model = export.model_class(dcfg)(dcfg, backend)
        model.init_weights(torch.Generator().manual_seed(cfg.training.seed))
        with torch.no_grad():
            model.embed_tokens.weight.copy_(head.load_embedding())
            if cfg.draft.init_from_target and head.norm_weight is not None:
                model.norm.weight.copy_(head.norm_weight)  # logits = target lm_head(norm(h))
        return model.to(device)

    def objective(self, cfg, dcfg, target):
        return BlockObjective(cfg, dcfg, target)

    def export_weights(self, dcfg, state, source, training_vocab_map, vocab_map):
        return export.export_weights(dcfg, state, vocab_map)

    def export_config(self, dcfg, provenance):
        return export.engine_config(dcfg, provenance)

    def check_export_config(self, raw, where, require: Require):
        return export.check_config(raw, where, require)

    def expected_shapes(self, dcfg):
        return export.expected_shapes(dcfg)

    def check_against_target(self, dcfg, target, require: Require) -> None:
        export.check_against_target(dcfg, target, require)

    def load_export(
        self, hf_dir, target_dir=None, embedding_key=TARGET_EMBEDDING_KEY, dtype=torch.float32
    ):
        return export.load_export(
            Path(hf_dir), Path(target_dir) if target_dir else None, embedding_key, dtype
        )

    def proposer(self, draft, target, evaluation=None):
        from spec_core.models.block.proposer import BlockProposer

        return BlockProposer(draft, target, evaluation.min_confidence if evaluation else 0.0)
