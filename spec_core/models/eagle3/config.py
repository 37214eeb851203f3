"""The EAGLE-3 draft's ``config.json``: a ``LlamaForCausalLMEagle3`` config plus our metadata.

The same JSON is written into every checkpoint and into the HF export, so SGLang/vLLM, the export
step and a resumed trainer all read one file. Geometry that must match the target (head_dim, RoPE
theta and scaling, norm eps) is copied from the target's own config rather than recomputed:
TorchSpec derives head_dim as hidden/heads, which is wrong for targets where they differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from spec_core.config import DraftConfig
from spec_core.contracts.capture import check_capture_indices
from spec_core.errors import ConfigError
from spec_core.models.common.config import (
    DraftGeometry,
    geometry_fields,
    geometry_source,
    require_fields,
    text_config,
)

ARCHITECTURE = "LlamaForCausalLMEagle3"


@dataclass
class Eagle3Config(DraftGeometry):
    intermediate_size: int
    vocab_size: int  # the target's vocab: embedding rows and d2t/t2d space
    draft_vocab_size: int  # lm_head rows
    target_hidden_size: int  # fc input is len(capture_indices) * target_hidden_size
    specflow: dict[str, Any] = field(default_factory=dict)  # capture_indices, ttt_length, ...

    @property
    def capture_indices(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.specflow.get("capture_indices", ()))

    @property
    def ttt_length(self) -> int:
        """TTT unroll depth: the ONE source the objective reads (``specflow.ttt_length``).

        Derived from ``draft.ttt_length`` when a run starts; read back from ``config.json`` on
        resume, export and evaluation, so a resumed run keeps the depth its weights trained with.
        """
        return int(self.specflow.get("ttt_length", 7))

    @property
    def pruned(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` SGLang and vLLM load (``LlamaConfig`` fields + EAGLE-3 extras)."""
        data = asdict(self)
        specflow = data.pop("specflow")
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {})}
        rope_parameters["rope_theta"] = self.rope_theta
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            **data,
            "rope_parameters": rope_parameters,
            "num_hidden_layers": 1,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "use_cache": True,
            "specflow": specflow,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "draft config") -> Eagle3Config:
        if int(data.get("num_hidden_layers", 1)) != 1:
            raise ConfigError(
                f"{source}: num_hidden_layers must be 1 for an EAGLE-3 draft "
                f"(got {data.get('num_hidden_layers')})"
            )
        require_fields(data, source)
        geometry = geometry_fields(data, data)
        return cls(
            **geometry,
            intermediate_size=int(data["intermediate_size"]),
            vocab_size=int(data["vocab_size"]),
            draft_vocab_size=int(data.get("draft_vocab_size") or data["vocab_size"]),
            target_hidden_size=int(data.get("target_hidden_size") or geometry["hidden_size"]),
            specflow=dict(data.get("specflow") or {}),
        )


def default_capture_indices(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's default capture indices (2, N//2, N-3); capture index k = HF
    ``output_hidden_states[k]`` (docs/architecture.md §capture-index).

    Below 7 layers that triple repeats an index (N=4 gives 2, 2, 1), which engines cannot serve
    (they deliver aux states in ascending, distinct layer order), so small targets - the tiny test
    targets - spread the three captures as (1, N//2, N-1) instead."""
    if num_layers < 4:
        raise ConfigError(
            f"the target has {num_layers} layers; EAGLE-3's default capture indices (2, N//2, N-3) "
            "need at least 4; set 'draft.capture_indices' explicitly"
        )
    if num_layers < 7:
        return (1, num_layers // 2, num_layers - 1)
    return (2, num_layers // 2, num_layers - 3)


def derive_eagle3_config(
    target_config_json: dict[str, Any],
    draft_cfg: DraftConfig,
    draft_vocab_size: int,
    target_name: str = "",
) -> Eagle3Config:
    """The draft config for a target: its geometry, one layer, our capture indices and TTT depth.

    A ``draft.config_path`` JSON, when given, supplies the geometry instead (a smaller or larger
    drafter than the target); the target still decides vocab and hidden size of the features.
    """
    tgt = text_config(target_config_json)
    num_layers = int(tgt["num_hidden_layers"])
    capture = (
        check_capture_indices(draft_cfg.capture_indices, num_layers)
        if draft_cfg.capture_indices
        else default_capture_indices(num_layers)
    )
    vocab = int(tgt["vocab_size"])
    if not 0 < draft_vocab_size <= vocab:
        raise ConfigError(
            f"draft vocab size {draft_vocab_size} must be in [1, {vocab}] (the target vocab)"
        )
    base = geometry_source(tgt, draft_cfg.config_path)
    specflow = {
        "algorithm": "eagle3",
        "capture_indices": [int(k) for k in capture],
        "ttt_length": int(draft_cfg.ttt_length),
        "target": target_name,
        "target_num_hidden_layers": num_layers,
        "last_hidden_prenorm": bool(draft_cfg.last_hidden_prenorm),
    }
    return Eagle3Config(
        **geometry_fields(base, tgt),
        intermediate_size=int(draft_cfg.intermediate_size or base["intermediate_size"]),
        vocab_size=vocab,
        draft_vocab_size=int(draft_vocab_size),
        target_hidden_size=int(tgt["hidden_size"]),
        specflow=specflow,
    )
