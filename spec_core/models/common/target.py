"""The frozen pieces of the target the trainer needs, read from safetensors without building it.

Every draft's loss only needs the target's ``lm_head`` (to turn captured last hidden states into
target distributions; ``TargetProjection`` is that head as the losses see it), its final norm (only when an engine delivers pre-norm states), and its
embedding (the draft's frozen input embedding). Loading just those tensors keeps trainer memory at
a few hundred MB even for large targets, and works for single-file and sharded
(``model.safetensors.index.json``) checkpoints alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open

from spec_core.config import TargetConfig
from spec_core.errors import ConfigError
from spec_core.families import embedding_scale, norm_weight_offset

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_target_config(target_dir: str | Path) -> dict:
    path = Path(target_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the target config: {exc}") from None


def _weight_map(target_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name."""
    index = target_dir / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{index}: unreadable safetensors index: {exc}") from None
    single = target_dir / SINGLE_FILE
    if not single.is_file():
        raise ConfigError(
            f"{target_dir}: no {SINGLE_FILE} or {INDEX_FILE}; the target must be saved as safetensors"
        )
    with safe_open(str(single), framework="pt") as fh:
        return {name: SINGLE_FILE for name in fh.keys()}  # noqa: SIM118 (safe_open has no iter)


def read_tensors(target_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Load only ``names`` from a target's safetensors (missing names -> ConfigError)."""
    target_dir = Path(target_dir)
    weight_map = _weight_map(target_dir)
    missing = [n for n in names if n not in weight_map]
    if missing:
        raise ConfigError(
            f"{target_dir}: tensors {missing} not found in the checkpoint; set the key in the "
            "'target' config section (embedding_key / lm_head_key / norm_key)"
        )
    out: dict[str, torch.Tensor] = {}
    for file_name in sorted({weight_map[n] for n in names}):
        with safe_open(str(target_dir / file_name), framework="pt") as fh:
            for n in names:
                if weight_map[n] == file_name:
                    out[n] = fh.get_tensor(n)
    return out


def find_key(target_dir: str | Path, key: str, default: str) -> Optional[str]:
    """``key`` if the checkpoint has it; for a key left at its default, the one tensor outside the
    decoder layers with the same last two name parts (VLM and wrapper checkpoints nest the text
    model: ``model.language_model.embed_tokens.weight``); else None."""
    weight_map = _weight_map(Path(target_dir))
    if key in weight_map or key != default:
        return key if key in weight_map else None
    tail = ".".join(default.split(".")[-2:])
    found = [
        n for n in weight_map if n.endswith(tail) and ".layers." not in n and "vision" not in n
    ]
    return found[0] if len(found) == 1 else None


def read_embedding(target_dir: str | Path, key: str) -> torch.Tensor:
    """The target's input embedding [V, H] as its decoder layers receive it: the table times the
    family's embedding scale (Gemma: sqrt(hidden)), in the table's dtype, as HF's scaled
    embedding computes it. Capture index 0 is these rows, so the draft's frozen embedding is too
    (docs/architecture.md §target-families)."""
    key = find_key(target_dir, key, TargetConfig.embedding_key) or key
    emb = read_tensors(target_dir, [key])[key]
    scale = embedding_scale(read_target_config(target_dir))
    if scale == 1.0:
        return emb
    return emb * torch.tensor(scale, dtype=torch.float32).to(emb.dtype)


def has_tensor(target_dir: str | Path, name: str) -> bool:
    return name in _weight_map(Path(target_dir))


@dataclass
class TargetHead:
    lm_head: torch.Tensor  # [V, H] rows = target vocab ids
    norm_weight: Optional[torch.Tensor]  # [H] final norm, None when the checkpoint has none
    norm_eps: float
    target_dir: Path
    embedding_key: str
    config: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.lm_head.shape[1])

    def load_embedding(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The target's input embedding [V, H] (the draft's frozen ``embed_tokens``)."""
        return read_embedding(self.target_dir, self.embedding_key).to(dtype)


def lm_head_key(target_dir: str | Path, target_cfg: TargetConfig, config: dict) -> str:
    """``lm_head.weight`` unless configured; the embedding when the target ties them."""
    if target_cfg.lm_head_key:
        return target_cfg.lm_head_key
    text = config.get("text_config") or config
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    if has_tensor(target_dir, "lm_head.weight"):
        return "lm_head.weight"
    if tied:
        return find_key(target_dir, target_cfg.embedding_key, TargetConfig.embedding_key) or (
            target_cfg.embedding_key
        )
    raise ConfigError(
        f"{target_dir}: no 'lm_head.weight' and tie_word_embeddings is false; "
        "set 'target.lm_head_key' to the output projection's tensor name"
    )


def load_target_head(
    target_dir: str | Path, target_cfg: TargetConfig, dtype: torch.dtype = torch.float32
) -> TargetHead:
    """Read the target's lm_head (and final norm if present) from its safetensors alone."""
    target_dir = Path(target_dir)
    config = read_target_config(target_dir)
    head_key = lm_head_key(target_dir, target_cfg, config)
    norm_key = find_key(target_dir, target_cfg.norm_key, TargetConfig.norm_key)
    tensors = read_tensors(target_dir, [head_key] + ([norm_key] if norm_key else []))
    text = config.get("text_config") or config
    return TargetHead(
        lm_head=tensors[head_key].to(dtype),
        norm_weight=(tensors[norm_key].to(dtype) + norm_weight_offset(config))
        if norm_key
        else None,
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        target_dir=target_dir,
        embedding_key=target_cfg.embedding_key,
        config=config,
    )


@dataclass
class TargetProjection:
    """The target lm_head restricted to the draft vocab (rows in ascending target id).

    ``rest`` holds the remaining rows and is used only to tell whether the target's argmax lies in
    the draft vocab (for accuracy over all supervised positions); it is None without pruning.
    """

    weight: torch.Tensor  # [Vd, Ht]
    rest: Optional[torch.Tensor]  # [V - Vd, Ht]
    norm_weight: Optional[torch.Tensor] = None  # applied to last hidden states when pre-norm
    norm_eps: float = 1e-6

    @classmethod
    def build(
        cls,
        lm_head: torch.Tensor,
        t2d: Optional[torch.Tensor],
        norm_weight: Optional[torch.Tensor] = None,
        norm_eps: float = 1e-6,
        oov_metrics: bool = True,
    ) -> TargetProjection:
        if t2d is None:
            return cls(lm_head, None, norm_weight, norm_eps)
        keep = t2d.to(device=lm_head.device, dtype=torch.bool)
        rest = lm_head[~keep].contiguous() if oov_metrics else None
        return cls(lm_head[keep].contiguous(), rest, norm_weight, norm_eps)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TargetProjection:
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device=device, dtype=dtype)

        return TargetProjection(
            move(self.weight), move(self.rest), move(self.norm_weight), self.norm_eps
        )

    def prepare(self, last_hidden: torch.Tensor) -> torch.Tensor:
        if self.norm_weight is None:
            return last_hidden
        math = torch.promote_types(last_hidden.dtype, torch.float32)
        normed = F.rms_norm(last_hidden.to(math), (last_hidden.shape[-1],), eps=self.norm_eps)
        return self.norm_weight * normed.to(last_hidden.dtype)
