"""Training checkpoint -> HF draft dir that SGLang and vLLM load (docs/architecture.md
§export-format), for every algorithm.

Exporting is: read the checkpoint (``checkpoint.read_checkpoint``), let its algorithm pick the
tensors (EAGLE-3 may post-prune a full-vocab head with a vocab map), cast, and write
``config.json`` (the algorithm's engine layout) + ``model.safetensors`` + a provenance sidecar.
Every export then runs ``validate_export`` over the files it wrote, so a bad dir never leaves
this module.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.errors import ConfigError
from spec_core.export.checkpoint import DraftCheckpoint, read_checkpoint
from spec_core.export.speculators import write_speculators_dir
from spec_core.export.validate import validate_export
from spec_core.models.common.config import CONFIG_FILE
from spec_core.models.common.hf import (
    DTYPES,
    EMBED_KEY,
    EXPORT_FORMAT,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    ExportError,
    sglang_layer_ids,
    vllm_layer_ids,
)
from spec_core.utils.files import staging_dir

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    out_dir: Path
    pruned: bool
    post_pruned: bool
    draft_vocab_size: int
    vocab_size: int
    capture_indices: list[int]
    dtype: str
    checks: list[str]
    provenance: dict[str, Any]
    speculators_dir: Optional[Path] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "hf_dir": str(self.out_dir),
            "pruned": self.pruned,
            "post_pruned": self.post_pruned,
            "draft_vocab_size": self.draft_vocab_size,
            "vocab_size": self.vocab_size,
            "capture_indices": list(self.capture_indices),
            "sglang_layer_ids": sglang_layer_ids(self.capture_indices),
            "vllm_layer_ids": vllm_layer_ids(self.capture_indices),
            "dtype": self.dtype,
            "checks": list(self.checks),
            "provenance": self.provenance,
            "speculators_dir": str(self.speculators_dir) if self.speculators_dir else None,
        }


def export_draft(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    select: str = "latest",
    target_dir: Optional[str | Path] = None,
    vocab_map: Optional[str | Path] = None,
    dtype: Optional[str] = None,
    include_embedding: bool = False,
    embedding_key: str = "model.embed_tokens.weight",
    speculators_dir: Optional[str | Path] = None,
    provenance: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the HF draft dir for ``checkpoint``; ``vocab_map`` post-prunes a full-vocab head.

    ``target_dir`` (the target's HF dir) lets the validator check vocab, hidden size and RoPE
    against the target, and is required for ``include_embedding`` (the embedding is copied from
    the target, never taken from anywhere else).
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --force to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if include_embedding and target_dir is None:
        raise ConfigError("copying embed_tokens needs the target dir (--target)")

    ckpt = read_checkpoint(checkpoint, select)
    algo = ckpt.algorithm
    if speculators_dir is not None and algo.speculators_type is None:
        raise ExportError(f"the speculators format has no {algo.name} layout")
    state = dict(ckpt.state)
    state.pop(EMBED_KEY, None)  # the frozen target embedding; copied fresh below if wanted
    vocab_path = Path(vocab_map) if vocab_map is not None else None
    config, state = algo.export_weights(
        ckpt.config, state, ckpt.path, ckpt.vocab_map_file, vocab_path
    )

    dtype_name = dtype or _dominant_dtype(state)
    cast = DTYPES[dtype_name]
    state = {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    config.torch_dtype = dtype_name
    if include_embedding:
        from spec_core.models.common.target import read_embedding

        emb = read_embedding(Path(target_dir), embedding_key)  # type: ignore[arg-type]
        state[EMBED_KEY] = emb.to(cast).contiguous()

    meta = _provenance(ckpt, target_dir, vocab_map is not None, provenance or {})
    hf_config = algo.export_config(config, meta)

    tmp = staging_dir(out_dir)
    try:
        _write_dir(tmp, hf_config, state, meta)
        checks = validate_export(tmp, target_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    spec_dir = None
    if speculators_dir is not None:
        spec_dir = write_speculators_dir(out_dir, speculators_dir, overwrite=overwrite)
    log.info("exported %s -> %s (%d checks passed)", ckpt.path, out_dir, len(checks))
    return ExportResult(
        out_dir=out_dir,
        pruned=config.pruned,
        post_pruned=vocab_map is not None,
        draft_vocab_size=config.draft_vocab_size,
        vocab_size=config.vocab_size,
        capture_indices=list(config.capture_indices),
        dtype=dtype_name,
        checks=checks,
        provenance=meta,
        speculators_dir=spec_dir,
    )


def _dominant_dtype(state: dict[str, torch.Tensor]) -> str:
    counts: dict[torch.dtype, int] = {}
    for value in state.values():
        if value.is_floating_point():
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    dtype = max(counts, key=counts.__getitem__) if counts else torch.float32
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ExportError(f"checkpoint weights are {dtype}; pass an export dtype explicitly")
    return names[dtype]


def _provenance(
    ckpt: DraftCheckpoint,
    target_dir: Optional[str | Path],
    post_pruned: bool,
    extra: dict[str, Any],
) -> dict[str, Any]:
    import spec_core

    meta: dict[str, Any] = {
        "export_format": EXPORT_FORMAT,
        "specflow_version": getattr(spec_core, "__version__", "0.1.0"),
        "algorithm": ckpt.algorithm.name,
        "capture_indices": list(ckpt.config.capture_indices),
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "post_pruned": post_pruned,
    }
    if target_dir is not None:
        from spec_core.utils.fingerprint import target_fingerprint

        meta["target_revision"] = target_fingerprint(Path(target_dir))[:16]
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


def _write_dir(
    out: Path, hf_config: dict[str, Any], state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(
        state,
        str(out / WEIGHTS_FILE),
        metadata={"format": "pt", "specflow": json.dumps(meta, sort_keys=True)},
    )
    (out / SIDECAR_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
