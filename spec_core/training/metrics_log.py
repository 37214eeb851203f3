"""Metrics as JSON lines: one object per train/eval record, written by rank 0 only.

A plain file keeps spec_core free of tracking dependencies; Prefect artifacts and MLflow read it
afterwards. Each line is flushed as written, so a crashed run keeps everything up to the crash.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than producing an unreadable line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsWriter:
    def __init__(self, path: Optional[Path]) -> None:
        self.path = Path(path) if path is not None else None
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(_clean(record), sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: Path, split: Optional[str] = None) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if split is None or record.get("split") == split:
                records.append(record)
    return records
