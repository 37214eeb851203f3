"""The DFlash/DSpark draft's ``config.json`` (``BlockDraftConfig``) and its derivation.

The same JSON is the checkpoint's ``config.json`` and the exported HF ``config.json`` (the
engines' layout: ``dflash_config`` with post-layer ``target_layer_ids`` and ``mask_token_id``,
``block_size``, ``num_target_layers``; DSpark adds its head settings). The training settings the
objective reads (``num_anchors``, ``loss_decay_gamma``, the DSpark loss weights) live in
``specflow``: derived from ``draft.*`` when a run starts, read back on resume and export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from spec_core.config import Config
from spec_core.contracts.capture import (
    capture_from_post_layer_ids,
    check_capture_indices,
    post_layer_ids,
)
from spec_core.errors import ConfigError
from spec_core.models.block.losses import LossWeights
from spec_core.models.common.config import (
    DraftGeometry,
    geometry_fields,
    geometry_source,
    require_fields,
    text_config,
)

ARCHITECTURES = {"dflash": "DFlashDraftModel", "dspark": "DSparkDraftModel"}
DEFAULT_GAMMA = {"dflash": 7.0, "dspark": 4.0}
MASK_TOKEN_TEXT = "<|MASK|>"


# ----------------------------------------------------------------------------- config


@dataclass
class BlockDraftConfig(DraftGeometry):
    algorithm: str  # dflash | dspark
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    target_hidden_size: int
    target_num_hidden_layers: int
    # docs/architecture.md §capture-index convention; exported as post-layer ids (-1)
    capture_indices: list[int]
    block_size: int
    mask_token_id: int
    markov_rank: int = 0  # dspark: 0 = no Markov head
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    specflow: dict[str, Any] = field(default_factory=dict)  # target, anchors, loss settings

    @property
    def draft_vocab_size(self) -> int:
        """The drafter reuses the target's full ``lm_head``: never pruned."""
        return self.vocab_size

    @property
    def pruned(self) -> bool:
        return False

    @property
    def num_anchors(self) -> int:
        """Anchored blocks per sequence: the ONE source the objective reads (``specflow``)."""
        return int(self._training_setting("num_anchors"))

    @property
    def loss_decay_gamma(self) -> float:
        """Slot decay of the loss weights: the ONE source the objective reads (``specflow``)."""
        return float(self._training_setting("loss_decay_gamma"))

    def _training_setting(self, key: str) -> Any:
        if key not in self.specflow:
            raise ConfigError(
                f"the {self.algorithm} draft config has no specflow.{key}; it is written when a "
                "run derives the config - train from a config.json specflow wrote"
            )
        return self.specflow[key]

    @property
    def target_layer_ids(self) -> list[int]:
        """Post-layer ids (output of layer k) as z-lab / SGLang / vLLM read them."""
        return post_layer_ids(self.capture_indices)

    @property
    def slot_offset(self) -> int:
        """Block slot of the first prediction: DFlash 1 (slot 0 only carries the anchor), DSpark 0."""
        return 1 if self.algorithm == "dflash" else 0

    @property
    def num_predictions(self) -> int:
        return self.block_size - self.slot_offset

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` SGLang / vLLM read for a DFlash / DSpark draft."""
        data = asdict(self)
        for key in (
            "algorithm",
            "capture_indices",
            "specflow",
            "target_num_hidden_layers",
            "markov_rank",
            "markov_head_type",
            "enable_confidence_head",
            "confidence_head_with_markov",
        ):
            data.pop(key)
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {})}
        rope_parameters["rope_theta"] = self.rope_theta
        dflash_config: dict[str, Any] = {
            "mask_token_id": self.mask_token_id,
            "target_layer_ids": self.target_layer_ids,
            "block_size": self.block_size,
        }
        extra: dict[str, Any] = {}
        if self.algorithm == "dspark":
            dspark = {
                "projector_type": "dspark",
                "markov_rank": self.markov_rank,
                "markov_head_type": self.markov_head_type,
                "enable_confidence_head": self.enable_confidence_head,
                "confidence_head_with_markov": self.confidence_head_with_markov,
                "confidence_head_alpha": float(self.specflow.get("confidence_weight", 0.0)),
                "attention_mode": "gqa",
            }
            dflash_config.update(dspark)
            # DeepSpec's DSpark config reads the same settings as flat fields
            extra = {**dspark, "target_layer_ids": self.target_layer_ids}
            extra["mask_token_id"] = self.mask_token_id
        return {
            "architectures": [ARCHITECTURES[self.algorithm]],
            "model_type": "qwen3",
            **data,
            **extra,
            "num_target_layers": self.target_num_hidden_layers,
            "dflash_config": dflash_config,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "rope_parameters": rope_parameters,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "is_causal": False,
            "use_cache": True,
            "specflow": {
                **self.specflow,
                "algorithm": self.algorithm,
                "capture_indices": [int(k) for k in self.capture_indices],
                "target_num_hidden_layers": self.target_num_hidden_layers,
            },
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "draft config") -> BlockDraftConfig:
        specflow = dict(data.get("specflow") or {})
        dflash = dict(data.get("dflash_config") or {})
        arch = (data.get("architectures") or [""])[0]
        algorithm = specflow.pop("algorithm", None) or {v: k for k, v in ARCHITECTURES.items()}.get(
            arch
        )
        if algorithm not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: not a DFlash/DSpark draft config (architectures {arch!r}, "
                f"specflow.algorithm {specflow.get('algorithm')!r})"
            )
        require_fields(data, source, "num_hidden_layers")
        capture = specflow.pop("capture_indices", None)
        if capture is None:
            if "target_layer_ids" not in dflash:
                raise ConfigError(f"{source}: no dflash_config.target_layer_ids")
            capture = capture_from_post_layer_ids(dflash["target_layer_ids"])
        mask_id = dflash.get("mask_token_id", data.get("mask_token_id"))
        if mask_id is None:
            raise ConfigError(f"{source}: no dflash_config.mask_token_id")
        geometry = geometry_fields(data, data)
        dspark = {**data, **dflash}
        return cls(
            **geometry,
            algorithm=algorithm,
            intermediate_size=int(data["intermediate_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            vocab_size=int(data["vocab_size"]),
            target_hidden_size=int(data.get("target_hidden_size") or geometry["hidden_size"]),
            target_num_hidden_layers=int(
                specflow.pop("target_num_hidden_layers", None) or data.get("num_target_layers") or 0
            ),
            capture_indices=[int(k) for k in capture],
            block_size=int(data.get("block_size") or dflash["block_size"]),
            mask_token_id=int(mask_id),
            markov_rank=int(dspark.get("markov_rank") or 0) if algorithm == "dspark" else 0,
            markov_head_type=str(dspark.get("markov_head_type") or "vanilla"),
            enable_confidence_head=bool(dspark.get("enable_confidence_head", False))
            and algorithm == "dspark",
            confidence_head_with_markov=bool(dspark.get("confidence_head_with_markov", False))
            and algorithm == "dspark",
            specflow=specflow,
        )


def default_layer_ids(num_layers: int, count: int) -> list[int]:
    """Post-layer ids spread over the target: round(1 + i (N-4)/(n-1)), i.e. 1 .. N-3
    (Python rounding, as the DFlash reference and the engines compute their defaults)."""
    if count == 1:
        return [num_layers // 2]
    if num_layers < 4:
        raise ConfigError(
            f"the target has {num_layers} layers; the DFlash layer spread needs at least 4; "
            "set 'draft.capture_indices' explicitly"
        )
    span = num_layers - 4
    ids = [int(round(1 + i * span / (count - 1))) for i in range(count)]
    if len(set(ids)) != len(ids):
        raise ConfigError(
            f"{count} capture layers do not fit a {num_layers}-layer target without repeats; "
            "lower 'draft.num_capture_layers' or set 'draft.capture_indices'"
        )
    return ids


def default_capture_indices(num_layers: int, count: int) -> tuple[int, ...]:
    """The default spread as capture indices (input of layer k = output of layer k-1;
    docs/architecture.md §capture-index)."""
    return tuple(k + 1 for k in default_layer_ids(num_layers, count))


def resolve_mask_token_id(target_dir: str | Path, vocab_size: int) -> int:
    """The MASK token fed to the unknown block slots, when ``draft.mask_token_id`` is not set.

    The tokenizer's own mask token, else a ``<|MASK|>`` token, else the highest-id special token
    that is neither bos/eos/pad/unk nor used by the chat template (SmolLM2: ``<empty_output>``,
    id 16 - its vocab has no spare rows, and that token never occurs in chat data). Its embedding
    is the frozen target row: the draft only needs a fixed, recognizable input there.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(target_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{target_dir}: cannot load the tokenizer to pick a MASK token ({exc}); "
            "set 'draft.mask_token_id'"
        ) from None
    if tok.mask_token_id is not None:
        return _check_mask(int(tok.mask_token_id), vocab_size)
    vocab = tok.get_vocab()
    if MASK_TOKEN_TEXT in vocab:
        return _check_mask(int(vocab[MASK_TOKEN_TEXT]), vocab_size)
    reserved = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    candidates = [
        token_id
        for token_id, added in tok.added_tokens_decoder.items()
        if added.special
        and token_id not in reserved
        and added.content not in template
        and token_id < vocab_size
    ]
    if not candidates:
        raise ConfigError(
            f"{target_dir}: the tokenizer has no mask token and no unused special token; "
            "set 'draft.mask_token_id' (an embedding row never seen in the data)"
        )
    return max(candidates)


def _check_mask(token_id: int, vocab_size: int) -> int:
    if not 0 <= token_id < vocab_size:
        raise ConfigError(
            f"mask token id {token_id} is outside the target vocab [0, {vocab_size}); "
            "set 'draft.mask_token_id'"
        )
    return token_id


def derive_block_config(
    target_config_json: dict[str, Any], cfg: Config, target_dir: Optional[str | Path] = None
) -> BlockDraftConfig:
    """The DFlash/DSpark draft for a target: ``draft.num_layers`` layers of the target's geometry
    (or of ``draft.config_path``), the default layer spread, the MASK token, the loss settings."""
    d = cfg.draft
    if d.algorithm not in ARCHITECTURES:
        raise ConfigError(f"derive_block_config is for dflash/dspark, got {d.algorithm!r}")
    tgt = text_config(target_config_json)
    num_layers = int(tgt["num_hidden_layers"])
    capture = (
        check_capture_indices(d.capture_indices, num_layers)
        if d.capture_indices
        else default_capture_indices(num_layers, d.num_capture_layers)
    )
    base = geometry_source(tgt, d.config_path)
    hidden = int(base["hidden_size"])
    if hidden != int(tgt["hidden_size"]):
        raise ConfigError(
            f"{d.algorithm} shares the target's embedding and lm_head, so its hidden size must be "
            f"the target's ({tgt['hidden_size']}), got {hidden} from 'draft.config_path'"
        )
    vocab = int(tgt["vocab_size"])
    mask_id = d.mask_token_id
    if mask_id is None:
        if target_dir is None:
            raise ConfigError("set 'draft.mask_token_id' (no target dir to derive it from)")
        mask_id = resolve_mask_token_id(target_dir, vocab)
    mask_id = _check_mask(int(mask_id), vocab)
    dspark = d.algorithm == "dspark"
    gamma = d.loss_decay_gamma if d.loss_decay_gamma is not None else DEFAULT_GAMMA[d.algorithm]
    specflow: dict[str, Any] = {
        "target": cfg.target.path,
        "num_anchors": int(d.num_anchors),
        "loss_decay_gamma": float(gamma),
        "last_hidden_prenorm": bool(d.last_hidden_prenorm),
    }
    if dspark:
        specflow.update(
            ce_weight=float(d.ce_weight),
            l1_weight=float(d.l1_weight),
            confidence_weight=float(d.confidence_weight),
        )
    return BlockDraftConfig(
        **geometry_fields(base, tgt),
        algorithm=d.algorithm,
        intermediate_size=int(d.intermediate_size or base["intermediate_size"]),
        num_hidden_layers=int(d.num_layers),
        vocab_size=vocab,
        target_hidden_size=int(tgt["hidden_size"]),
        target_num_hidden_layers=num_layers,
        capture_indices=[int(k) for k in capture],
        block_size=int(d.block_size),
        mask_token_id=mask_id,
        markov_rank=int(d.markov_rank) if dspark else 0,
        markov_head_type=str(d.markov_head_type),
        enable_confidence_head=bool(d.enable_confidence_head) and dspark,
        confidence_head_with_markov=bool(d.confidence_head_with_markov and d.enable_confidence_head)
        and dspark,
        specflow=specflow,
    )


def loss_weights(config: BlockDraftConfig) -> LossWeights:
    """DFlash: CE only. DSpark: the configured weights, the confidence term only with a head."""
    if config.algorithm == "dflash":
        return LossWeights(ce=1.0)
    s = config.specflow
    return LossWeights(
        ce=float(s.get("ce_weight", 0.1)),
        l1=float(s.get("l1_weight", 0.9)),
        confidence=float(s.get("confidence_weight", 1.0)) if config.enable_confidence_head else 0.0,
    )
