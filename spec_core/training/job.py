"""``TrainJob``: everything one torchrun training run needs, as a JSON file.

The launcher (or a Prefect task) resolves paths and config once and writes the job; every worker
rank reads the same file via ``--job``. Keeping it a flat JSON record means a job can be inspected,
re-run by hand (``torchrun -m spec_core.training.worker --job job.json``), and passed between
machines without pickling anything.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from spec_core.config import Config, config_from_dict, config_to_dict
from spec_core.errors import ConfigError
from spec_core.utils.files import atomic_write_json

SOURCES = ("inprocess", "stream")


@dataclass
class TrainJob:
    config: dict[str, Any]  # resolved Config as a plain dict (config_to_dict)
    run_dir: str  # metrics.jsonl and checkpoints/ live here
    target_dir: str  # resolved HF target dir (config.json + safetensors)
    train_data: Optional[str] = None  # tokenized train split (datasets.save_to_disk dir)
    eval_data: Optional[str] = None  # tokenized eval split, or None for no eval
    vocab_map: Optional[str] = None  # vocab_map.safetensors, or None for the full vocab
    source: str = "inprocess"  # inprocess | stream
    services: Optional[dict[str, Any]] = None  # streaming service addresses (stream source)
    resume_from: Optional[str] = None  # checkpoint or run dir: restore everything
    continual_from: Optional[str] = None  # checkpoint or run dir: weights only
    run_id: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(
                f"TrainJob.source must be one of {', '.join(SOURCES)}, got {self.source!r}"
            )
        if self.resume_from and self.continual_from:
            raise ConfigError(
                "set only one of 'training.resume_from' (exact resume) and "
                "'training.continual_from' (weights only)"
            )

    @classmethod
    def create(cls, cfg: Config, **fields: Any) -> TrainJob:
        """A job from a typed config; resume/continual default to the config's values."""
        fields.setdefault("resume_from", cfg.training.resume_from)
        fields.setdefault("continual_from", cfg.training.continual_from)
        return cls(config=config_to_dict(cfg), **fields)

    @property
    def cfg(self) -> Config:
        return config_from_dict(self.config)

    @property
    def metrics_file(self) -> Path:
        return Path(self.run_dir) / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    @property
    def result_file(self) -> Path:
        """Rank 0 writes the final summary here so the launcher can return it."""
        return Path(self.run_dir) / "train_result.json"

    @property
    def fatal_file(self) -> Path:
        """A rank that fails with a user error writes it here: torchrun's restarts then end at
        once with the same error instead of retrying what cannot succeed."""
        return Path(self.run_dir) / "logs" / "train_fatal.txt"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict(), sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> TrainJob:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the training job: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown TrainJob fields {unknown}; valid: {sorted(known)}")
        return cls(**data)
