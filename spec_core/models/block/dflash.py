"""DFlash: a multi-layer Qwen3-style block drafter over fused target features (torchspec.md §7.1).

The draft proposes a whole block in one forward: slot 0 holds the last verified token (the
anchor), slots 1..S-1 a MASK token, and slot k is trained toward the token at anchor + k. Its
inputs are the target's hidden states at ``len(capture_indices)`` layers spread over the depth
(``round(1 + i (N-4)/(n-1))`` post-layer, i.e. capture index + 1 in DESIGN §3's convention), fused
by ``fc`` + ``hidden_norm`` into a context. Attention is dual-source: queries come from the block
rows, keys/values from [projected context ; block rows] with shared projections, K-norm after the
concat, RoPE at context positions 0..T-1 and block positions anchor + slot. The target's embedding
and ``lm_head`` are frozen and shared (the drafter has the target's hidden size); the loss is
hard-label CE with exponential slot decay (``block_losses``).

Parameter names are the z-lab / SpecForge HF names (anchors.md §5.5): ``fc.weight``,
``hidden_norm.weight``, ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``layers.{i}.self_attn.{q,k}_norm.weight``, ``layers.{i}.mlp.{gate,up,down}_proj.weight``,
``layers.{i}.{input,post_attention}_layernorm.weight``, ``norm.weight``; ``embed_tokens.weight``
is the target's and is never checkpointed or exported.

``BlockDraftConfig`` is shared with DSpark (``dspark.py``): the same JSON is the checkpoint's
``config.json`` and the exported HF ``config.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from spec_core.config import Config
from spec_core.engines.conventions import capture_from_post_layer_ids, post_layer_ids
from spec_core.errors import ConfigError
from spec_core.models.attention import apply_rope, rotary_embedding
from spec_core.models.block_attention import Attend, BlockPlan, block_attend, block_positions
from spec_core.models.block_losses import (
    NUM_METRICS,
    BlockRows,
    LossWeights,
    block_loss,
    prefix_accept,
)
from spec_core.models.draft_config import rope_settings, text_config
from spec_core.models.eagle3 import RMSNorm
from spec_core.models.losses import TargetProjection

ARCHITECTURES = {"dflash": "DFlashDraftModel", "dspark": "DSparkDraftModel"}
DEFAULT_GAMMA = {"dflash": 7.0, "dspark": 4.0}
MASK_TOKEN_TEXT = "<|MASK|>"


# ----------------------------------------------------------------------------- config


@dataclass
class BlockDraftConfig:
    algorithm: str  # dflash | dspark
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    target_hidden_size: int
    target_num_hidden_layers: int
    capture_indices: list[int]  # DESIGN §3 convention; exported as post-layer ids (-1)
    block_size: int
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    pad_token_id: Optional[int] = None
    torch_dtype: str = "float32"
    markov_rank: int = 0  # dspark: 0 = no Markov head
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    specflow: dict[str, Any] = field(default_factory=dict)  # target, anchors, loss settings

    @property
    def aux_dim(self) -> int:
        return len(self.capture_indices) * self.target_hidden_size

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
        required = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
        for key in (*required, "num_hidden_layers"):
            if key not in data:
                raise ConfigError(f"{source}: missing required field '{key}'")
        capture = specflow.pop("capture_indices", None)
        if capture is None:
            if "target_layer_ids" not in dflash:
                raise ConfigError(f"{source}: no dflash_config.target_layer_ids")
            capture = capture_from_post_layer_ids(dflash["target_layer_ids"])
        mask_id = dflash.get("mask_token_id", data.get("mask_token_id"))
        if mask_id is None:
            raise ConfigError(f"{source}: no dflash_config.mask_token_id")
        heads = int(data["num_attention_heads"])
        hidden = int(data["hidden_size"])
        theta, scaling = rope_settings(data)
        dspark = {**data, **dflash}
        return cls(
            algorithm=algorithm,
            hidden_size=hidden,
            intermediate_size=int(data["intermediate_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=int(data.get("head_dim") or hidden // heads),
            vocab_size=int(data["vocab_size"]),
            target_hidden_size=int(data.get("target_hidden_size") or hidden),
            target_num_hidden_layers=int(
                specflow.pop("target_num_hidden_layers", None) or data.get("num_target_layers") or 0
            ),
            capture_indices=[int(k) for k in capture],
            block_size=int(data.get("block_size") or dflash["block_size"]),
            mask_token_id=int(mask_id),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            hidden_act=str(data.get("hidden_act", "silu")),
            max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_scaling=scaling,
            bos_token_id=data.get("bos_token_id"),
            eos_token_id=data.get("eos_token_id"),
            pad_token_id=data.get("pad_token_id"),
            torch_dtype=str(data.get("torch_dtype") or data.get("dtype") or "float32"),
            markov_rank=int(dspark.get("markov_rank") or 0) if algorithm == "dspark" else 0,
            markov_head_type=str(dspark.get("markov_head_type") or "vanilla"),
            enable_confidence_head=bool(dspark.get("enable_confidence_head", False))
            and algorithm == "dspark",
            confidence_head_with_markov=bool(dspark.get("confidence_head_with_markov", False))
            and algorithm == "dspark",
            specflow=specflow,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BlockDraftConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the draft config: {exc}") from None
        return cls.from_hf_dict(data, source=str(path))


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
    """DESIGN §3 capture indices (input of layer k = output of layer k-1) of the default spread."""
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
    capture = list(d.capture_indices or default_capture_indices(num_layers, d.num_capture_layers))
    bad = [k for k in capture if not 0 <= int(k) < num_layers]
    if bad or len(set(capture)) != len(capture):
        raise ConfigError(
            f"'draft.capture_indices' {capture} invalid for a {num_layers}-layer target: distinct "
            f"indices in [0, {num_layers - 1}] (0 = embeddings, k = input of layer k)"
        )
    base = tgt
    if d.config_path:
        path = Path(d.config_path).expanduser()
        try:
            base = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"'draft.config_path' {path}: cannot read JSON: {exc}") from None
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
    heads = int(base["num_attention_heads"])
    theta, scaling = rope_settings(base)
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
        algorithm=d.algorithm,
        hidden_size=hidden,
        intermediate_size=int(d.intermediate_size or base["intermediate_size"]),
        num_hidden_layers=int(d.num_layers),
        num_attention_heads=heads,
        num_key_value_heads=int(base.get("num_key_value_heads") or heads),
        head_dim=int(base.get("head_dim") or hidden // heads),
        vocab_size=vocab,
        target_hidden_size=int(tgt["hidden_size"]),
        target_num_hidden_layers=num_layers,
        capture_indices=[int(k) for k in capture],
        block_size=int(d.block_size),
        mask_token_id=mask_id,
        rms_norm_eps=float(base.get("rms_norm_eps", 1e-6)),
        hidden_act=str(base.get("hidden_act", "silu")),
        max_position_embeddings=int(base.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        bos_token_id=tgt.get("bos_token_id"),
        eos_token_id=tgt.get("eos_token_id"),
        pad_token_id=tgt.get("pad_token_id"),
        torch_dtype=str(tgt.get("torch_dtype") or tgt.get("dtype") or "float32"),
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


# ----------------------------------------------------------------------------- modules


class BlockMLP(nn.Module):
    def __init__(self, config: BlockDraftConfig) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


Rope = tuple[torch.Tensor, torch.Tensor]


class BlockAttention(nn.Module):
    """Dual-source attention: queries from the block rows, keys/values from [context ; block]."""

    def __init__(self, config: BlockDraftConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, rope_q: Rope, rope_k: Rope, attend: Attend
    ) -> torch.Tensor:
        """x: [B, Q, H] normed block rows; context: [B, T, H] -> [B, Q, H]."""
        bsz, q_len, _ = x.shape
        kv_len = context.shape[1] + q_len
        q = self.q_norm(self.q_proj(x).view(bsz, q_len, self.num_heads, self.head_dim))
        k = torch.cat([self.k_proj(context), self.k_proj(x)], dim=1)
        k = self.k_norm(k.view(bsz, kv_len, self.num_kv_heads, self.head_dim))
        v = torch.cat([self.v_proj(context), self.v_proj(x)], dim=1)
        v = v.view(bsz, kv_len, self.num_kv_heads, self.head_dim)
        out = attend(apply_rope(q, *rope_q), apply_rope(k, *rope_k), v)
        return self.o_proj(out.reshape(bsz, q_len, -1))


class BlockDecoderLayer(nn.Module):
    def __init__(self, config: BlockDraftConfig) -> None:
        super().__init__()
        self.self_attn = BlockAttention(config)
        self.mlp = BlockMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, context: torch.Tensor, rope_q: Rope, rope_k: Rope, attend: Attend
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), context, rope_q, rope_k, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(nn.Module):
    """The DFlash drafter; ``forward`` is one training step's loss over a ``BlockPlan``."""

    def __init__(self, config: BlockDraftConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(config.aux_dim, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(
            BlockDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary_embedding(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.max_position_embeddings,
            config.hidden_size,
            config.num_attention_heads,
        )
        self.loss_weights = loss_weights(config)

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None, std: float = 0.02) -> None:
        """normal(0, std) weights, norms at 1, biases at 0; the frozen embedding is untouched."""
        for name, param in self.named_parameters():
            if name == "embed_tokens.weight":
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)

    # ---- backbone --------------------------------------------------------------------------

    def noise_ids(
        self, input_ids: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """[B, A, S] block inputs: the anchor token in slot 0 (MASK for padding blocks), MASK after."""
        mask_id = self.config.mask_token_id
        ids = torch.full(
            (*anchors.shape, self.config.block_size),
            mask_id,
            dtype=torch.long,
            device=anchors.device,
        )
        first = input_ids.gather(1, anchors).clamp(0, self.config.vocab_size - 1)
        ids[:, :, 0] = torch.where(keep, first, torch.full_like(first, mask_id))
        return ids

    def backbone(
        self,
        input_ids: torch.Tensor,
        aux_hidden: torch.Tensor,
        anchors: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Block hidden states after the final norm: [B, A, S, H]."""
        bsz, length = input_ids.shape
        size = self.config.block_size
        dtype = self.fc.weight.dtype
        context = self.hidden_norm(self.fc(aux_hidden.to(dtype)))
        h = self.embed_tokens(self.noise_ids(input_ids, anchors, keep).flatten(1)).to(dtype)
        positions = torch.cat(
            [
                torch.arange(length, device=anchors.device).expand(bsz, length),
                block_positions(anchors, size),
            ],
            dim=1,
        )
        cos, sin = self.rotary_emb(h, positions)
        rope_k = (cos, sin)
        rope_q = (cos[:, length:], sin[:, length:])
        attend = block_attend(self.attention_backend, anchors, keep, length, size)
        for layer in self.layers:
            h = layer(h, context, rope_q, rope_k, attend)
        return self.norm(h).view(bsz, anchors.shape[1], size, -1)

    def prediction_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, A, S, H] -> [B, A, P, H]: the slots that make predictions 0..P-1."""
        offset = self.config.slot_offset
        return hidden[:, :, offset : offset + self.config.num_predictions]

    # ---- training ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        aux_hidden: torch.Tensor,
        plan: BlockPlan,
        target: TargetProjection,
        scale: torch.Tensor,
        chunk_rows: int = 1024,
        last_hidden: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled loss, per-prediction metric sums [P, NUM_METRICS]) for one micro-batch."""
        hidden = self.backbone(input_ids, aux_hidden, plan.anchors, plan.keep)
        pred = self.prediction_hidden(hidden)
        sel = plan.mask
        if not bool(sel.any()):
            return self._untouched_loss(hidden), self._zero_metrics(hidden.device)
        labels = input_ids.gather(1, plan.label_pos.flatten(1)).view_as(plan.label_pos)
        labels = labels.clamp(0, self.config.vocab_size - 1)  # engine pad ids past the vocab
        slots = torch.arange(self.config.num_predictions, device=sel.device).expand_as(sel)
        rows = BlockRows(
            x=pred[sel],
            labels=labels[sel],
            weight=plan.weight[sel],
            slot=slots[sel],
        )
        bias_weight = self.add_head_inputs(rows, input_ids, pred, plan, target, last_hidden)
        loss, metrics, alpha = block_loss(
            rows,
            target.weight,
            self.config.num_predictions,
            scale,
            self.loss_weights,
            bias_weight=bias_weight,
            chunk_rows=chunk_rows,
        )
        if alpha is not None:
            prefix_accept(alpha, sel, metrics)
        return loss, metrics

    def add_head_inputs(
        self,
        rows: BlockRows,
        input_ids: torch.Tensor,
        pred: torch.Tensor,
        plan: BlockPlan,
        target: TargetProjection,
        last_hidden: Optional[torch.Tensor],
    ) -> Optional[torch.Tensor]:
        """DSpark hook (Markov latent, target rows, confidence); returns the Markov ``W2``."""
        return None

    def _untouched_loss(self, hidden: torch.Tensor) -> torch.Tensor:
        """Nothing supervised: a zero loss that still reaches every trainable weight."""
        touch = hidden.sum() + sum(p.sum() for p in self.parameters() if p.requires_grad)
        return touch * 0.0

    def _zero_metrics(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(
            self.config.num_predictions, NUM_METRICS, dtype=torch.float64, device=device
        )
