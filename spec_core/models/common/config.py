"""What every draft config shares: one ``config.json`` format, one save and one load.

A draft config is both the checkpoint's ``config.json`` and the exported HF ``config.json`` (the
engines' layout), so each algorithm's config class only says how it maps to and from that dict
(``to_hf_dict`` / ``from_hf_dict``); writing and reading the file live here once.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from spec_core.errors import ConfigError
from spec_core.utils.files import atomic_write_text

CONFIG_FILE = "config.json"
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")

Self = TypeVar("Self", bound="DraftConfigBase")


class DraftConfigBase:
    """Base of the draft config dataclasses: ``save``/``load`` over ``to_hf_dict`` and
    ``from_hf_dict``."""

    capture_indices: Any
    vocab_size: int
    target_hidden_size: int
    torch_dtype: str
    specflow: dict[str, Any]

    def to_hf_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_hf_dict(cls: type[Self], data: dict[str, Any], source: str = "draft config") -> Self:
        raise NotImplementedError

    @property
    def aux_dim(self) -> int:
        """Width of the fused target features: one ``target_hidden_size`` slice per capture."""
        return len(self.capture_indices) * self.target_hidden_size

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(
            path, json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n"
        )

    @classmethod
    def load(cls: type[Self], path: str | Path) -> Self:
        """A ``config.json`` (or the dir holding one) -> this config class."""
        path = config_file(path)
        return cls.from_hf_dict(read_config_json(path), source=str(path))


@dataclass(kw_only=True)
class DraftGeometry(DraftConfigBase):
    """The Llama/Qwen3 layer geometry every draft config holds; keyword-only, so each algorithm's
    own fields keep their order. ``geometry_fields`` derives it from a target or saved config."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    pad_token_id: Optional[int] = None
    torch_dtype: str = "float32"


def config_file(path: str | Path) -> Path:
    """``path`` itself, or its ``config.json`` when ``path`` is a dir."""
    path = Path(path)
    return path / CONFIG_FILE if path.is_dir() else path


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON of a draft ``config.json`` (or of the dir holding one), errors as one line."""
    path = config_file(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the draft config: {exc}") from None


def rope_settings(cfg: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling) from a transformers 4 (``rope_theta``/``rope_scaling``) or 5
    (``rope_parameters``) config; scaling is None for plain RoPE."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = float(params["rope_theta"])
    else:
        scaling = copy.deepcopy(cfg.get("rope_scaling"))
        theta = float(cfg.get("rope_theta", 10000.0))
    if scaling:
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
            scaling = None
    return theta, scaling or None


def text_config(target: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a target config (VLM configs nest it under text_config)."""
    return target.get("text_config") or target


def geometry_source(target: dict[str, Any], config_path: Optional[str]) -> dict[str, Any]:
    """The config a derived draft copies its layer geometry from: ``draft.config_path``'s JSON
    when set (a smaller or larger drafter than the target), else the target's own."""
    if not config_path:
        return target
    path = Path(config_path).expanduser()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"'draft.config_path' {path}: cannot read JSON: {exc}") from None


def geometry_fields(geometry: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """The ``DraftGeometry`` fields as constructor keywords: shapes, norm, activation and RoPE
    from ``geometry``; special token ids and dtype from ``target``
    (the same dict when a saved draft config is read back)."""
    heads = int(geometry["num_attention_heads"])
    hidden = int(geometry["hidden_size"])
    theta, scaling = rope_settings(geometry)
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": int(geometry.get("num_key_value_heads") or heads),
        "head_dim": int(geometry.get("head_dim") or hidden // heads),
        "rms_norm_eps": float(geometry.get("rms_norm_eps", 1e-6)),
        "hidden_act": str(geometry.get("hidden_act", "silu")),
        "max_position_embeddings": int(geometry.get("max_position_embeddings", 2048)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "bos_token_id": target.get("bos_token_id"),
        "eos_token_id": target.get("eos_token_id"),
        "pad_token_id": target.get("pad_token_id"),
        "torch_dtype": str(target.get("torch_dtype") or target.get("dtype") or "float32"),
    }


def require_fields(data: dict[str, Any], source: str, *extra: str) -> None:
    """A saved draft config must name the geometry no default can stand in for."""
    for key in (*REQUIRED_FIELDS, *extra):
        if key not in data:
            raise ConfigError(f"{source}: missing required field '{key}'")
