"""Draft algorithms and their registry: ``get_algorithm`` by name, ``algorithm_of`` for a
``config.json``, ``capture_spec_for`` for producers. The interface is ``models.algorithm``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spec_core.config import Config
from spec_core.contracts.capture import CaptureSpec
from spec_core.errors import ConfigError
from spec_core.models.algorithm import DraftAlgorithm
from spec_core.models.block.algorithm import BlockAlgorithm
from spec_core.models.common.config import config_file, read_config_json
from spec_core.models.eagle3.algorithm import Eagle3Algorithm

ALGORITHMS: dict[str, DraftAlgorithm] = {
    algo.name: algo
    for algo in (Eagle3Algorithm(), BlockAlgorithm("dflash"), BlockAlgorithm("dspark"))
}


def get_algorithm(name: str) -> DraftAlgorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(
            f"unknown 'draft.algorithm' {name!r}; valid: {', '.join(ALGORITHMS)}"
        ) from None


def algorithm_of(path: str | Path) -> DraftAlgorithm:
    """The algorithm of a checkpoint's or exported dir's ``config.json`` (or of the file itself).

    ``specflow.algorithm`` when specflow wrote it, else the HF ``architectures`` (an export from
    another trainer). The one place that tells a draft's algorithm from its files.
    """
    path = config_file(path)
    return algorithm_of_config(read_config_json(path), str(path))


def algorithm_of_config(data: dict[str, Any], source: str) -> DraftAlgorithm:
    name = (data.get("specflow") or {}).get("algorithm")
    if name is not None:
        return get_algorithm(str(name))
    architectures = data.get("architectures") or []
    for algo in ALGORITHMS.values():
        if set(architectures) & set(algo.architectures):
            return algo
    raise ConfigError(
        f"{source}: not a draft config specflow knows (architectures {architectures}, no "
        "specflow.algorithm)"
    )


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
        dtype=getattr(torch, cfg.inference.dtype),
    )
