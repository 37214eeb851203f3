"""The one checkpoint reader: a training checkpoint's draft weights without a process group.

Resolves a run / checkpoints dir to its ``latest`` or ``best`` ``iter_*`` dir, verifies its files
against the checkpoint's manifest, reads the DCP shards into plain tensors, strips wrapper
prefixes, and tells the algorithm from ``config.json`` (docs/architecture.md §checkpoint-layout).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.errors import ConfigError
from spec_core.models import algorithm_of
from spec_core.models.algorithm import DraftAlgorithm
from spec_core.models.common.config import CONFIG_FILE
from spec_core.models.common.hf import ExportError
from spec_core.vocab import VOCAB_MAP_FILE

# Wrapper prefixes trainers leave in state-dict keys (SpecForge/TorchSpec, FSDP1, DDP, compile).
LEADING_PREFIXES = ("draft_model.", "module.")
INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class DraftCheckpoint:
    """The draft weights of one training checkpoint, read without a process group."""

    path: Path
    algorithm: DraftAlgorithm
    config: Any
    state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any] = field(default_factory=dict)
    vocab_map_file: Optional[Path] = None

    @property
    def step(self) -> Optional[int]:
        step = self.trainer_state.get("step")
        return int(step) if step is not None else None


def resolve_export_source(path: str | Path, select: str = "latest") -> Path:
    """An ``iter_*`` dir as is; a run or checkpoints dir -> its ``latest`` or ``best`` pointer."""
    from spec_core.training.checkpoint import BEST, read_pointer, resolve_checkpoint

    if select not in ("latest", "best"):
        raise ConfigError(f"checkpoint selection must be 'latest' or 'best', got {select!r}")
    path = Path(path).expanduser()
    if select == "best":
        for root in (path, path / "checkpoints"):
            target = read_pointer(root, BEST)
            if target is not None:
                return resolve_checkpoint(target)
    return resolve_checkpoint(path)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``draft_model.``, ``module.``, FSDP1/compile wrappers) from keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        clean = key
        for wrapper in INNER_WRAPPERS:
            clean = clean.replace(wrapper, "")
        for prefix in LEADING_PREFIXES:
            if clean.startswith(prefix):
                clean = clean[len(prefix) :]
        if clean in out:
            raise ExportError(f"two checkpoint tensors map to the same name {clean!r}")
        out[clean] = value
    return out


def read_checkpoint(path: str | Path, select: str = "latest") -> DraftCheckpoint:
    """Load a DCP checkpoint's draft weights into plain tensors (no process group needed)."""
    from spec_core.training.checkpoint import STATE_FILE, verify_manifest

    ckpt = resolve_export_source(path, select)
    verify_manifest(ckpt)  # before DCP unpickles anything in it
    model_dir = ckpt / "model"
    if not (model_dir / ".metadata").is_file():
        raise ExportError(f"{model_dir}: no DCP metadata; is {ckpt} a complete checkpoint?")
    algorithm = algorithm_of(ckpt / CONFIG_FILE)
    vocab_file = ckpt / VOCAB_MAP_FILE
    return DraftCheckpoint(
        path=ckpt,
        algorithm=algorithm,
        config=algorithm.load_config(ckpt / CONFIG_FILE),
        state=strip_prefixes(_read_dcp(model_dir)),
        trainer_state=json.loads((ckpt / STATE_FILE).read_text()),
        vocab_map_file=vocab_file if vocab_file.is_file() else None,
    )


def _read_dcp(model_dir: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(model_dir))
    state: dict[str, torch.Tensor] = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            raise ExportError(f"{model_dir}: entry {key!r} is not a tensor; not a draft checkpoint")
        state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # "torch.distributed is disabled": intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state
