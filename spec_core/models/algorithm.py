"""The seam between the rest of specflow and a draft algorithm (``draft.algorithm``).

Trainer, worker, producers, export, evaluator and registry never branch on the algorithm; they
ask its ``DraftAlgorithm`` (``spec_core.models.get_algorithm`` by name, ``algorithm_of`` for a
``config.json``) for everything that differs:

* the draft config (derived from the target, or read back from a checkpoint's ``config.json``);
  the algorithm's training settings (EAGLE-3 ``ttt_length``, DFlash/DSpark ``num_anchors`` and
  ``loss_decay_gamma``) live in that config - derived from ``draft.*`` when a run starts and read
  back on resume, export and evaluation - and the objective reads them only from there;
* what producers capture (default capture indices, whether last hidden states are sent);
* the model (same seeded init on every rank, frozen target pieces loaded) and its ``Objective``;
* the HF export: engine-layout ``config.json``, which tensors are exported and their shapes, the
  checks of an exported dir (alone and against the target), and loading an exported dir back;
* the speculative-decoding ``Proposer`` the evaluator drafts with.

``Objective`` keeps the trainer's pooling contract for every algorithm: ``plan`` fixes, from the
masks alone and before any forward, what a micro-batch supervises and returns its share of the
loss denominators; the trainer all-reduces those over micro-batches and ranks, turns them into
``scales`` and only then runs forward/backward - so the summed gradient equals one big batch's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from spec_core.config import Config, DraftConfig, EvaluationConfig
from spec_core.errors import ConfigError
from spec_core.models.common.config import DraftConfigBase
from spec_core.models.common.hf import ExportError
from spec_core.models.common.target import TargetProjection

if TYPE_CHECKING:
    from spec_core.contracts.samples import Batch
    from spec_core.models.common.target import TargetHead

# (ok, check name, message): records a passed check or raises ExportError with the message
Require = Callable[[bool, str, str], None]
TARGET_EMBEDDING_KEY = "model.embed_tokens.weight"


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


class Proposer(ABC):
    """Draft tokens for greedy verification, one prompt at a time (batch size 1).

    The evaluator owns the target, its cache and the verification; the proposer owns the draft's
    state. Each round it gets every token known so far and the target's hidden states (all layers,
    as HF's ``output_hidden_states``) of the positions verified since its last round.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget the previous prompt."""

    @abstractmethod
    def propose(
        self, seq: Sequence[int], hidden_states: Sequence[torch.Tensor], k: int
    ) -> list[int]:
        """Up to ``k`` draft tokens continuing ``seq``."""

    @staticmethod
    def fitted_capture(draft_config: Any, target_config: Any) -> list[int]:
        """The draft's capture indices, checked against the target that will verify its drafts:
        a draft trained for another target would decode lossless but uselessly."""
        from spec_core.contracts.capture import check_capture_indices

        layers = int(target_config.num_hidden_layers)
        if draft_config.vocab_size != int(target_config.vocab_size):
            raise ConfigError(
                f"draft vocab {draft_config.vocab_size} != target vocab {target_config.vocab_size}"
            )
        return list(check_capture_indices(draft_config.capture_indices, layers))


class DraftAlgorithm(ABC):
    name: str
    architectures: tuple[str, ...]  # the HF ``architectures`` its exported config.json names
    speculators_type: Optional[str] = None  # vLLM speculators-format model type, if it has one

    # ---- config -----------------------------------------------------------------------------

    @abstractmethod
    def parse_config(self, data: dict[str, Any], source: str) -> DraftConfigBase:
        """A ``config.json`` dict of this algorithm's draft -> its config (one-line ConfigError)."""

    def load_config(self, path: str | Path) -> DraftConfigBase:
        """The draft config of a checkpoint or exported dir (``config.json``)."""
        from spec_core.models.common.config import config_file, read_config_json

        path = config_file(path)
        return self.parse_config(read_config_json(path), str(path))

    @abstractmethod
    def derive_config(
        self, target_json: dict[str, Any], cfg: Config, vocab_size: Optional[int], target_dir: Path
    ) -> DraftConfigBase:
        """The draft config for a target; ``vocab_size`` is the pruned draft vocab or None."""

    # ---- capture ----------------------------------------------------------------------------

    @abstractmethod
    def default_capture_indices(self, draft: DraftConfig, num_layers: int) -> tuple[int, ...]:
        """Capture indices (docs/architecture.md §capture-index) when ``draft.capture_indices``
        is null."""

    @abstractmethod
    def needs_last_hidden(self, draft: DraftConfig) -> bool:
        """Whether the loss reads the target's last hidden states (producers send them)."""

    # ---- training ---------------------------------------------------------------------------

    @abstractmethod
    def build_model(
        self, dcfg: Any, cfg: Config, head: TargetHead, vocab_map: Any, device: torch.device
    ) -> nn.Module:
        """The draft with its seeded init (identical on every rank) and frozen target pieces."""

    @abstractmethod
    def objective(self, cfg: Config, dcfg: Any, target: TargetProjection) -> Objective:
        """The loss/metrics for this draft; algorithm settings come from ``dcfg`` only."""

    # ---- export (docs/architecture.md §export-format) ---------------------------------------

    @abstractmethod
    def export_weights(
        self,
        dcfg: Any,
        state: dict[str, torch.Tensor],
        source: Path,
        training_vocab_map: Optional[Path],
        vocab_map: Optional[Path],
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """(config, tensors) to export from a checkpoint's weights (embedding already dropped);
        ``vocab_map`` asks to post-prune the head, ``training_vocab_map`` is the checkpoint's."""

    @abstractmethod
    def export_config(self, dcfg: Any, provenance: dict[str, Any]) -> dict[str, Any]:
        """The engine-layout ``config.json`` of an export (``provenance`` goes under specflow)."""

    @abstractmethod
    def check_export_config(self, raw: dict[str, Any], where: str, require: Require) -> Any:
        """Check an exported ``config.json`` against what the engines read; returns the config."""

    @abstractmethod
    def expected_shapes(self, dcfg: Any) -> dict[str, tuple[int, ...]]:
        """Every tensor an export must hold and its shape (the optional embedding aside)."""

    def foreign_prefixes(self) -> tuple[str, ...]:
        """Tensor-name prefixes of another layout that must never reach an export."""
        return ()

    def extra_tensors(self, dcfg: Any) -> tuple[str, ...]:
        """Tensors an export may hold beyond ``expected_shapes`` and the target embedding; they
        are checked by ``check_export_tensors``."""
        return ()

    def unexpected_tensors_hint(self, dcfg: Any, names: list[str]) -> str:
        """Why ``names`` must not be in this export, appended to the validator's message."""
        return ""

    def check_export_tensors(
        self, dcfg: Any, tensors: dict[str, torch.Tensor], where: str, require: Require
    ) -> None:
        """Algorithm-specific tensors beyond ``expected_shapes`` (e.g. vocab maps)."""

    @abstractmethod
    def check_against_target(self, dcfg: Any, target: dict[str, Any], require: Require) -> None:
        """What the shared target checks (vocab, hidden size, capture range) do not cover."""

    def speculators_layout(
        self, hf_config: dict[str, Any], tensors: dict[str, torch.Tensor], verifier: str, k: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(config, tensors) of the vLLM speculators-format twin of an export."""
        raise ExportError(f"the speculators format has no {self.name} layout")

    @abstractmethod
    def load_export(
        self,
        hf_dir: str | Path,
        target_dir: Optional[str | Path] = None,
        embedding_key: str = TARGET_EMBEDDING_KEY,
        dtype: torch.dtype = torch.float32,
    ) -> nn.Module:
        """Rebuild the draft from an exported dir alone (the engines' view of it); without
        ``embed_tokens`` in the file the target's embedding is read from ``target_dir``."""

    # ---- evaluation -------------------------------------------------------------------------

    @abstractmethod
    def proposer(
        self, draft: nn.Module, target: nn.Module, evaluation: Optional[EvaluationConfig] = None
    ) -> Proposer:
        """The drafter the evaluator calls. ``target`` is the HF target model (block drafters
        share its ``lm_head``); ``evaluation`` carries the decoding settings."""
