"""Where a run's files live, in one place, so every stage agrees on the layout.

``output_dir/work`` is content-addressed (tokenized data, vocab maps, regenerated data): it is shared
by runs and keyed by hashes of everything that affects it (``spec_core.utils.fingerprint``).
``output_dir/runs/<run_id>`` holds one run's config, metrics, checkpoints and exports. The MLflow
store sits at ``output_dir`` so the champion gate compares runs against each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from spec_core.config import Config


@dataclass(frozen=True)
class RunPaths:
    output_dir: Path
    run_id: str

    @classmethod
    def from_config(cls, cfg: Config) -> RunPaths:
        run_id = cfg.run.run_id or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return cls(Path(cfg.run.output_dir).expanduser().resolve(), run_id)

    @property
    def work_dir(self) -> Path:
        return self.output_dir / "work"

    @property
    def vocab_dir(self) -> Path:
        return self.work_dir / "vocab"

    @property
    def run_dir(self) -> Path:
        return self.output_dir / "runs" / self.run_id

    @property
    def config_file(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def mlflow_run_file(self) -> Path:
        """The run's MLflow run id and how much of metrics.jsonl MLflow has (a resume reuses it)."""
        return self.run_dir / "mlflow_run.json"

    @property
    def plot_dir(self) -> Path:
        return self.run_dir / "plots"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def hf_dir(self) -> Path:
        return self.run_dir / "hf"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def mlflow_db(self) -> Path:
        return self.output_dir / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.output_dir / "mlartifacts"


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.run.cache_dir).expanduser().resolve()
