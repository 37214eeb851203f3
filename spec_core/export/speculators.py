"""The vLLM speculators-format twin of a native export (same tensors, self-describing config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from spec_core.errors import ConfigError
from spec_core.models import algorithm_of
from spec_core.models.common.config import CONFIG_FILE
from spec_core.models.common.hf import WEIGHTS_FILE, ExportError


def write_speculators_dir(
    hf_dir: str | Path,
    out_dir: str | Path,
    verifier: Optional[str] = None,
    num_tokens: int = 3,
    overwrite: bool = False,
) -> Path:
    """Write the speculators-format dir of ``hf_dir``; the algorithm maps config and names."""
    from safetensors.torch import load_file, save_file

    hf_dir, out_dir = Path(hf_dir), Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --force to replace it")
    hf_config = json.loads((hf_dir / CONFIG_FILE).read_text())
    verifier = verifier or str((hf_config.get("specflow") or {}).get("target_dir") or "")
    if not verifier:
        raise ConfigError("the speculators format needs the verifier (target) path or name")
    config, tensors = algorithm_of(hf_dir).speculators_layout(
        hf_config, load_file(str(hf_dir / WEIGHTS_FILE)), verifier, num_tokens
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir
