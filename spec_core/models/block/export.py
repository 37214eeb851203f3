"""Training checkpoint -> DFlash / DSpark HF draft dir (anchors.md §5.5), via ``export_draft``.

The checkpoint already stores the drafter under the z-lab / DeepSpec names (``fc.weight``,
``hidden_norm.weight``, ``layers.{i}.*``, ``norm.weight``, DSpark ``markov_head.*`` and
``confidence_head.*``), and its ``config.json`` is already the engines' layout (``dflash_config``
with post-layer ``target_layer_ids`` and ``mask_token_id``, ``block_size``, ``num_target_layers``;
DSpark adds ``projector_type``, ``markov_rank``, ``markov_head_type``, ``enable_confidence_head``,
``confidence_head_with_markov``, ``confidence_head_alpha``). Exporting is: read the DCP shards
without a process group, cast, write ``config.json`` + ``model.safetensors`` + the provenance
sidecar, and validate the written dir. The drafter shares the target's embedding and ``lm_head``,
so neither is exported (``include_embedding`` copies the target's embedding for loaders that want
it). No ``auto_map`` is written: engines build the drafter themselves, and an ``auto_map`` without
its modeling file would break ``AutoModel``. There is no vocab pruning for these drafters.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.errors import ConfigError
from spec_core.export import (
    CONFIG_FILE,
    DTYPES,
    EMBED_KEY,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    ExportError,
    ExportResult,
    _dominant_dtype,
    _write_dir,
    resolve_export_source,
    strip_prefixes,
)
from spec_core.models.dflash import ARCHITECTURES, BlockDraftConfig, DFlashDraft


def is_block_checkpoint(path: str | Path, select: str = "latest") -> bool:
    """Whether a checkpoint (or exported dir) holds a DFlash/DSpark draft."""
    path = Path(path).expanduser()
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        try:
            config_file = resolve_export_source(path, select) / CONFIG_FILE
        except ConfigError:
            return False
    try:
        data = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    algorithm = (data.get("specflow") or {}).get("algorithm")
    arch = (data.get("architectures") or [""])[0]
    return algorithm in ARCHITECTURES or arch in ARCHITECTURES.values()


def read_block_checkpoint(
    path: str | Path, select: str = "latest"
) -> tuple[Path, BlockDraftConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(checkpoint dir, draft config, weights, trainer state) without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from spec_core.training.checkpoint import STATE_FILE

    ckpt = resolve_export_source(path, select)
    model_dir = ckpt / "model"
    if not (model_dir / ".metadata").is_file():
        raise ExportError(f"{model_dir}: no DCP metadata; is {ckpt} a complete checkpoint?")
    config = BlockDraftConfig.load(ckpt / CONFIG_FILE)
    reader = FileSystemReader(str(model_dir))
    state: dict[str, torch.Tensor] = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            raise ExportError(f"{model_dir}: entry {key!r} is not a tensor; not a draft checkpoint")
        state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # "torch.distributed is disabled": intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    trainer_state = json.loads((ckpt / STATE_FILE).read_text())
    return ckpt, config, strip_prefixes(state), trainer_state


def expected_shapes(config: BlockDraftConfig) -> dict[str, tuple[int, ...]]:
    """Every exported tensor and its shape: the drafter's own state dict, built on ``meta``."""
    from spec_core.models.dspark import DSparkDraft

    model_cls = DSparkDraft if config.algorithm == "dspark" else DFlashDraft
    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != EMBED_KEY}


def export_block_draft(
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
    """Write the DFlash/DSpark HF dir for ``checkpoint`` (same arguments as ``export_draft``)."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --force to replace it")
    if vocab_map is not None:
        raise ExportError(
            "DFlash/DSpark drafts use the target's full lm_head; vocab pruning is not supported"
        )
    if speculators_dir is not None:
        raise ExportError("the speculators format is written for EAGLE-3 drafts only")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if include_embedding and target_dir is None:
        raise ConfigError("copying embed_tokens needs the target dir (--target)")

    ckpt, config, state, trainer_state = read_block_checkpoint(checkpoint, select)
    state.pop(EMBED_KEY, None)
    dtype_name = dtype or _dominant_dtype(state)
    cast = DTYPES[dtype_name]
    state = {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    config.torch_dtype = dtype_name
    if include_embedding:
        from spec_core.models.target import read_tensors

        emb = read_tensors(Path(target_dir), [embedding_key])[embedding_key]  # type: ignore[arg-type]
        state[EMBED_KEY] = emb.to(cast).contiguous()

    meta = _block_provenance(ckpt, config, trainer_state, target_dir, provenance or {})
    hf_config = config.to_hf_dict()
    hf_config["specflow"] = {**hf_config["specflow"], **meta}

    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_dir(tmp, hf_config, state, meta)
        checks = validate_block_export(tmp, target_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(
        out_dir=out_dir,
        pruned=False,
        post_pruned=False,
        draft_vocab_size=config.vocab_size,
        vocab_size=config.vocab_size,
        capture_indices=list(config.capture_indices),
        dtype=dtype_name,
        checks=checks,
        provenance=meta,
    )


def _block_provenance(
    ckpt: Path,
    config: BlockDraftConfig,
    trainer_state: dict[str, Any],
    target_dir: Optional[str | Path],
    extra: dict[str, Any],
) -> dict[str, Any]:
    import spec_core
    from spec_core.export import EXPORT_FORMAT

    meta: dict[str, Any] = {
        "export_format": EXPORT_FORMAT,
        "specflow_version": getattr(spec_core, "__version__", "0.1.0"),
        "algorithm": config.algorithm,
        "capture_indices": list(config.capture_indices),
        "checkpoint": str(ckpt),
        "step": trainer_state.get("step"),
        "post_pruned": False,
    }
    if target_dir is not None:
        from spec_core.data.regenerate import target_fingerprint

        meta["target_revision"] = target_fingerprint(Path(target_dir))[:16]
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


def validate_block_export(hf_dir: str | Path, target_dir: Optional[str | Path] = None) -> list[str]:
    """Check an exported DFlash/DSpark dir; raise ExportError on the first failure."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    checks: list[str] = []
    try:
        data = json.loads((hf_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{hf_dir / CONFIG_FILE}: unreadable: {exc}") from None
    try:
        config = BlockDraftConfig.from_hf_dict(data, str(hf_dir / CONFIG_FILE))
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    if data.get("architectures") != [ARCHITECTURES[config.algorithm]]:
        raise ExportError(
            f"{hf_dir}: architectures {data.get('architectures')} is not a block draft"
        )
    dflash = data.get("dflash_config") or {}
    if dflash.get("target_layer_ids") != [k - 1 for k in config.capture_indices]:
        raise ExportError(f"{hf_dir}: dflash_config.target_layer_ids do not match the captures")
    if not 0 <= config.mask_token_id < config.vocab_size or config.block_size < 2:
        raise ExportError(f"{hf_dir}: mask_token_id / block_size out of range")
    if len(data.get("layer_types") or []) != config.num_hidden_layers:
        raise ExportError(f"{hf_dir}: layer_types must list every one of the draft's layers")
    checks.append("config")
    with safe_open(str(hf_dir / WEIGHTS_FILE), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118
    expected = expected_shapes(config)
    shapes.pop(EMBED_KEY, None)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ExportError(f"{hf_dir}: missing tensors {missing[:5]}, unexpected {extra[:5]}")
    wrong = [k for k, s in expected.items() if shapes[k] != s]
    if wrong:
        raise ExportError(f"{hf_dir}: wrong shapes for {wrong[:5]}")
    checks.append("tensor_names_and_shapes")
    safetensors_names = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
    if dtypes != {safetensors_names.get(config.torch_dtype, config.torch_dtype)}:
        raise ExportError(f"{hf_dir}: tensor dtypes {sorted(dtypes)} != torch_dtype")
    checks.append("dtype")
    if not (hf_dir / SIDECAR_FILE).is_file():
        raise ExportError(f"{hf_dir}: no {SIDECAR_FILE}")
    if target_dir is not None:
        _check_against_target(config, Path(target_dir))
        checks.append("matches_target")
    return checks


def _check_against_target(config: BlockDraftConfig, target_dir: Path) -> None:
    from spec_core.models.draft_config import text_config
    from spec_core.models.target import read_target_config

    tgt = text_config(read_target_config(target_dir))
    problems = []
    if int(tgt["hidden_size"]) != config.hidden_size:
        problems.append(f"hidden size {config.hidden_size} != target {tgt['hidden_size']}")
    if int(tgt["vocab_size"]) != config.vocab_size:
        problems.append(f"vocab {config.vocab_size} != target {tgt['vocab_size']}")
    layers = int(tgt["num_hidden_layers"])
    if config.target_num_hidden_layers != layers:
        problems.append(f"num_target_layers {config.target_num_hidden_layers} != target {layers}")
    if any(not 0 <= k < layers for k in config.capture_indices):
        problems.append(f"capture indices {config.capture_indices} outside the target's layers")
    if problems:
        raise ExportError(f"draft does not fit the target {target_dir}: " + "; ".join(problems))


def load_block_draft(
    hf_dir: str | Path, target_dir: str | Path, device: str = "cpu", embedding_key: str = ""
) -> DFlashDraft:
    """Rebuild an exported drafter (weights strict, embedding from the target) for inference."""
    from safetensors.torch import load_file

    from spec_core.models.dspark import DSparkDraft
    from spec_core.models.target import read_tensors

    hf_dir = Path(hf_dir)
    config = BlockDraftConfig.load(hf_dir / CONFIG_FILE)
    model_cls = DSparkDraft if config.algorithm == "dspark" else DFlashDraft
    model = model_cls(config)
    state = load_file(str(hf_dir / WEIGHTS_FILE))
    key = embedding_key or "model.embed_tokens.weight"
    state.setdefault(EMBED_KEY, read_tensors(Path(target_dir), [key])[key])
    dtype = DTYPES.get(config.torch_dtype, torch.float32)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval()
