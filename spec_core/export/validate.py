"""The validator every export runs over the files it wrote (docs/architecture.md §export-format).

The shared checklist (readable config, no trainer prefixes, exactly the expected tensors with
their shapes, one dtype, finite weights, provenance, the target's vocab / hidden size / layers /
embedding) runs here; the algorithm adds what is its own (engine fields of ``config.json``, vocab
maps, RoPE or layer count against the target). Returns the names of the checks that passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from spec_core.errors import ConfigError
from spec_core.export.checkpoint import INNER_WRAPPERS, LEADING_PREFIXES
from spec_core.models import algorithm_of_config
from spec_core.models.common.config import CONFIG_FILE, text_config
from spec_core.models.common.hf import (
    DTYPES,
    EMBED_KEY,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    ExportError,
)


def validate_export(hf_dir: str | Path, target_dir: Optional[str | Path] = None) -> list[str]:
    """Run the converter checklist on an exported dir; raise ExportError on the first failure."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    where = str(hf_dir)
    try:
        raw = json.loads((hf_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{hf_dir / CONFIG_FILE}: unreadable: {exc}") from None
    checks: list[str] = []

    def require(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ExportError(f"{where}: {message}")
        if name not in checks:
            checks.append(name)

    try:
        algo = algorithm_of_config(raw, where)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    config = algo.check_export_config(raw, where, require)

    with safe_open(str(hf_dir / WEIGHTS_FILE), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (no iter on safe_open)
    foreign = LEADING_PREFIXES + algo.foreign_prefixes()
    bad_prefix = [
        k for k in tensors if k.startswith(foreign) or any(w in k for w in INNER_WRAPPERS)
    ]
    require(
        not bad_prefix,
        "no_trainer_prefixes",
        f"tensor names carry trainer/wrapper prefixes or another layout's names: {bad_prefix[:4]}",
    )
    shapes = algo.expected_shapes(config)
    missing = sorted(set(shapes) - set(tensors))
    require(not missing, "required_keys", f"missing tensors {missing}")
    allowed = set(shapes) | {EMBED_KEY} | set(algo.extra_tensors(config))
    unexpected = sorted(set(tensors) - allowed)
    require(
        not unexpected,
        "no_unexpected_keys",
        f"unexpected tensors {unexpected}{algo.unexpected_tensors_hint(config, unexpected)}",
    )
    for name, shape in shapes.items():
        require(
            tuple(tensors[name].shape) == shape,
            "shapes",
            f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}",
        )
    dtype = DTYPES.get(config.torch_dtype)
    require(dtype is not None, "torch_dtype", f"torch_dtype {config.torch_dtype!r} unknown")
    floats = {k: v for k, v in tensors.items() if k in shapes or k == EMBED_KEY}
    wrong = [k for k, v in floats.items() if v.dtype != dtype]
    require(not wrong, "dtypes", f"tensors {wrong[:4]} are not {config.torch_dtype} (torch_dtype)")
    nonfinite = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]
    require(not nonfinite, "finite", f"tensors {nonfinite} hold NaN/inf")
    if EMBED_KEY in tensors:
        require(
            tuple(tensors[EMBED_KEY].shape) == (config.vocab_size, config.hidden_size),
            "embedding_shape",
            f"{EMBED_KEY} must be [{config.vocab_size}, {config.hidden_size}]",
        )
    algo.check_export_tensors(config, tensors, where, require)
    require((hf_dir / SIDECAR_FILE).is_file(), "provenance", f"no {SIDECAR_FILE}")
    if target_dir is not None:
        _check_against_target(algo, config, tensors, Path(target_dir), require)
    return checks


def _check_against_target(algo, config, tensors, target_dir: Path, require) -> None:
    from spec_core.models.common.target import read_embedding, read_target_config

    target = text_config(read_target_config(target_dir))
    require(
        int(target["vocab_size"]) == config.vocab_size,
        "target_vocab",
        f"vocab_size {config.vocab_size} != target's {target['vocab_size']}",
    )
    require(
        int(target["hidden_size"]) == config.target_hidden_size,
        "target_hidden",
        f"target_hidden_size {config.target_hidden_size} != target's {target['hidden_size']}",
    )
    layers = int(target["num_hidden_layers"])
    capture = list(config.capture_indices)
    require(
        all(0 <= k < layers for k in capture),
        "capture_in_range",
        f"capture indices {capture} out of range for a {layers}-layer target",
    )
    algo.check_against_target(config, target, require)
    if EMBED_KEY in tensors:
        key = "model.embed_tokens.weight"
        try:
            emb = read_embedding(target_dir, key)
        except ConfigError:
            return
        same = torch.equal(tensors[EMBED_KEY].float(), emb.to(tensors[EMBED_KEY].dtype).float())
        require(same, "embedding_is_target", f"{EMBED_KEY} is not the target's embedding")
