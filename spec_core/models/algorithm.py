"""The seam between the trainer and a draft algorithm (``draft.algorithm``: eagle3 | dflash | dspark).

The trainer, worker, producers and export never branch on the algorithm; they ask its
``DraftAlgorithm`` for:

* the draft config (derived from the target, or read back from a checkpoint's ``config.json``);
* the model (same seeded init on every rank, frozen target pieces loaded);
* what producers capture (``capture_spec_for``: layers, and whether last hidden states are sent -
  DFlash and CE-only DSpark skip them);
* an ``Objective``: how a micro-batch becomes a pooled loss and metric sums.

``Objective`` keeps the trainer's pooling contract for every algorithm: ``plan`` fixes, from the
masks alone and before any forward, what a micro-batch supervises and returns its share of the
loss denominators; the trainer all-reduces those over micro-batches and ranks, turns them into
``scales`` and only then runs forward/backward - so the summed gradient equals one big batch's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from spec_core.config import Config, DraftConfig
from spec_core.engines.base import CaptureSpec
from spec_core.errors import ConfigError
from spec_core.models.losses import TargetProjection

if TYPE_CHECKING:
    from spec_core.models.target import TargetHead
    from spec_core.training.sources import Batch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Objective(ABC):
    """How one algorithm turns a micro-batch into (pooled loss, metric sums)."""

    @abstractmethod
    def plan(
        self, batch: Batch, generator: Optional[torch.Generator] = None
    ) -> tuple[Any, torch.Tensor]:
        """(plan, local loss denominators [n] float64) from the batch's masks (CPU, no forward).

        ``generator`` makes any sampling reproducible (eval); None uses the global RNG, which
        checkpoints save, so resumed training draws the same samples."""

    @abstractmethod
    def scales(self, global_counts: torch.Tensor, world_size: int) -> torch.Tensor:
        """Loss scales from the denominators summed over micro-batches and ranks."""

    @abstractmethod
    def forward(
        self, model: nn.Module, batch: Batch, plan: Any, scales: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backward, metric sums) for one micro-batch already on the model's device."""

    @abstractmethod
    def metric_zeros(self, device: torch.device) -> torch.Tensor:
        """An accumulator shaped like ``forward``'s metric sums."""

    @abstractmethod
    def summarize(self, sums: torch.Tensor) -> dict[str, Any]:
        """Metric sums (all-reduced) -> the logged record; has loss, acc_k and tau_sim."""


class DraftAlgorithm(ABC):
    name: str

    @abstractmethod
    def default_capture_indices(self, draft: DraftConfig, num_layers: int) -> tuple[int, ...]:
        """Capture indices (DESIGN §3) when ``draft.capture_indices`` is null."""

    @abstractmethod
    def needs_last_hidden(self, draft: DraftConfig) -> bool:
        """Whether the loss reads the target's last hidden states (producers send them)."""

    @abstractmethod
    def load_config(self, path: str | Path) -> Any:
        """The draft config of a checkpoint (``config.json``)."""

    @abstractmethod
    def derive_config(
        self, target_json: dict[str, Any], cfg: Config, vocab_size: Optional[int], target_dir: Path
    ) -> Any:
        """The draft config for a target; ``vocab_size`` is the pruned draft vocab or None."""

    @abstractmethod
    def build_model(
        self, dcfg: Any, cfg: Config, head: TargetHead, vocab_map: Any, device: torch.device
    ) -> nn.Module:
        """The draft with its seeded init (identical on every rank) and frozen target pieces."""

    @abstractmethod
    def objective(self, cfg: Config, dcfg: Any, target: TargetProjection) -> Objective:
        """The loss/metrics for this draft."""


# ----------------------------------------------------------------------------- EAGLE-3


class Eagle3Objective(Objective):
    """TTT unroll with per-step denominators N_k (``losses.pooled_scales``)."""

    def __init__(self, cfg: Config, target: TargetProjection) -> None:
        self.num_steps = cfg.draft.ttt_length
        self.decay = cfg.draft.step_weight_decay
        self.chunk_rows = cfg.training.loss_chunk_size
        self.target = target

    def plan(self, batch: Batch, generator: Optional[torch.Generator] = None):
        from spec_core.models.losses import supervised_counts

        counts = supervised_counts(batch.loss_mask, batch.attention_mask, self.num_steps)
        return None, counts.double()

    def scales(self, global_counts: torch.Tensor, world_size: int) -> torch.Tensor:
        from spec_core.models.losses import pooled_scales

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
        from spec_core.models.losses import NUM_METRICS

        return torch.zeros(self.num_steps, NUM_METRICS, dtype=torch.float64, device=device)

    def summarize(self, sums: torch.Tensor) -> dict[str, Any]:
        from spec_core.models.losses import summarize

        return summarize(sums, self.decay)


class Eagle3Algorithm(DraftAlgorithm):
    name = "eagle3"

    def default_capture_indices(self, draft: DraftConfig, num_layers: int) -> tuple[int, ...]:
        from spec_core.models.draft_config import default_capture_indices

        return default_capture_indices(num_layers)

    def needs_last_hidden(self, draft: DraftConfig) -> bool:
        return True

    def load_config(self, path: str | Path):
        from spec_core.models.draft_config import Eagle3Config

        return Eagle3Config.load(path)

    def derive_config(self, target_json, cfg, vocab_size, target_dir):
        from spec_core.models.draft_config import derive_eagle3_config, text_config

        vocab = vocab_size or int(text_config(target_json)["vocab_size"])
        return derive_eagle3_config(target_json, cfg.draft, vocab, target_name=cfg.target.path)

    def build_model(self, dcfg, cfg, head, vocab_map, device):
        from spec_core.models.attention import resolve_backend
        from spec_core.models.eagle3 import Eagle3Draft

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
        return Eagle3Objective(cfg, target)


# ----------------------------------------------------------------------------- DFlash / DSpark


class BlockObjective(Objective):
    """Anchored blocks; one denominator D = sum of prediction weights (``block_losses``)."""

    def __init__(self, cfg: Config, dcfg: Any, target: TargetProjection) -> None:
        from spec_core.models.dflash import loss_weights

        self.dcfg = dcfg
        self.target = target
        self.chunk_rows = cfg.training.loss_chunk_size
        self.num_anchors = int(dcfg.specflow.get("num_anchors", cfg.draft.num_anchors))
        self.gamma = float(dcfg.specflow["loss_decay_gamma"])
        self.weights = loss_weights(dcfg)

    def plan(self, batch: Batch, generator: Optional[torch.Generator] = None):
        from spec_core.models.block_attention import make_plan, sample_anchors

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
        from spec_core.models.block_losses import pooled_scale

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
        from spec_core.models.block_losses import NUM_METRICS

        return torch.zeros(
            self.dcfg.num_predictions, NUM_METRICS, dtype=torch.float64, device=device
        )

    def summarize(self, sums: torch.Tensor) -> dict[str, Any]:
        from spec_core.models.block_losses import summarize_block

        return summarize_block(sums, self.weights, self.dcfg.slot_offset)


class BlockAlgorithm(DraftAlgorithm):
    def __init__(self, name: str) -> None:
        self.name = name

    def default_capture_indices(self, draft: DraftConfig, num_layers: int) -> tuple[int, ...]:
        from spec_core.models.dflash import default_capture_indices

        return default_capture_indices(num_layers, draft.num_capture_layers)

    def needs_last_hidden(self, draft: DraftConfig) -> bool:
        if self.name == "dflash":
            return False
        confidence = draft.enable_confidence_head and draft.confidence_weight > 0
        return draft.l1_weight > 0 or confidence

    def load_config(self, path: str | Path):
        from spec_core.models.dflash import BlockDraftConfig

        dcfg = BlockDraftConfig.load(path)
        if dcfg.algorithm != self.name:
            raise ConfigError(
                f"{path}: checkpoint is a {dcfg.algorithm} draft, the config asks for {self.name}"
            )
        return dcfg

    def derive_config(self, target_json, cfg, vocab_size, target_dir):
        from spec_core.models.dflash import derive_block_config

        if vocab_size is not None:
            raise ConfigError(
                f"vocab pruning is not supported for {self.name}; set 'vocab.draft_vocab_size: null'"
            )
        return derive_block_config(target_json, cfg, target_dir)

    def build_model(self, dcfg, cfg, head, vocab_map, device):
        from spec_core.models.attention import resolve_backend
        from spec_core.models.dflash import DFlashDraft
        from spec_core.models.dspark import DSparkDraft

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
        model_cls = DSparkDraft if self.name == "dspark" else DFlashDraft
        model = model_cls(dcfg, backend)
        model.init_weights(torch.Generator().manual_seed(cfg.training.seed))
        with torch.no_grad():
            model.embed_tokens.weight.copy_(head.load_embedding())
            if cfg.draft.init_from_target and head.norm_weight is not None:
                model.norm.weight.copy_(head.norm_weight)  # logits = target lm_head(norm(h))
        return model.to(device)

    def objective(self, cfg, dcfg, target):
        return BlockObjective(cfg, dcfg, target)


ALGORITHMS: dict[str, DraftAlgorithm] = {
    "eagle3": Eagle3Algorithm(),
    "dflash": BlockAlgorithm("dflash"),
    "dspark": BlockAlgorithm("dspark"),
}


def get_algorithm(name: str) -> DraftAlgorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(
            f"unknown 'draft.algorithm' {name!r}; valid: {', '.join(ALGORITHMS)}"
        ) from None


def capture_spec_for(cfg: Config, target_num_layers: int) -> CaptureSpec:
    """What every producer captures for this config; the trainer's batches have the same layout.

    Capture indices are ``draft.capture_indices`` or the algorithm's default for a target with
    ``target_num_layers`` layers; last hidden states only when the loss reads them (EAGLE-3, and
    DSpark with its L1 or confidence term - never DFlash or CE-only DSpark).
    """
    algo = get_algorithm(cfg.draft.algorithm)
    indices = cfg.draft.capture_indices or algo.default_capture_indices(
        cfg.draft, target_num_layers
    )
    return CaptureSpec(
        capture_indices=tuple(int(i) for i in indices),
        with_last_hidden=algo.needs_last_hidden(cfg.draft),
        dtype=DTYPES[cfg.inference.dtype],
    )
