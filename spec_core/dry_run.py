"""``specflow dry-run``: check a whole config against the real target before any GPU is used.

Reads only the target's ``config.json``, its safetensors index (for the weight bytes) and its
tokenizer, never the weights, so a 235B target is checked in seconds on a laptop with the HF
cache copied over. It checks what would otherwise fail an hour into a run: capture indices
against ``num_hidden_layers``, the draft vocab against the target vocab, the chat template
against the tokenizer's own, and prints a memory estimate per producer and per trainer rank.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from spec_core.assets import resolve_target
from spec_core.config import Config, load_config
from spec_core.contracts.capture import check_capture_indices
from spec_core.errors import ConfigError
from spec_core.models import get_algorithm
from spec_core.models.common.config import text_config
from spec_core.models.common.target import INDEX_FILE, read_target_config

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class DryRunReport:
    target_dir: Path
    lines: list[str]
    producer_gib: float
    trainer_gib: float


def target_params(target: dict[str, Any]) -> int:
    """Parameter count of a decoder-only target from its config (dense or MoE; MLA counted as
    its low-rank projections), for when the checkpoint carries no index with byte totals."""
    t = text_config(target)
    h, layers, vocab = int(t["hidden_size"]), int(t["num_hidden_layers"]), int(t["vocab_size"])
    heads = int(t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or h // heads)
    kv = int(t.get("num_key_value_heads") or heads)
    if t.get("kv_lora_rank"):
        qk = int(t["qk_nope_head_dim"]) + int(t["qk_rope_head_dim"])
        q_rank = int(t.get("q_lora_rank") or 0)
        q = h * q_rank + q_rank * heads * qk if q_rank else h * heads * qk
        kv_rank = int(t["kv_lora_rank"])
        attn = q + h * (kv_rank + int(t["qk_rope_head_dim"]))
        attn += kv_rank * heads * (int(t["qk_nope_head_dim"]) + int(t["v_head_dim"]))
        attn += heads * int(t["v_head_dim"]) * h
    else:
        attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    experts = int(
        t.get("num_experts") or t.get("n_routed_experts") or t.get("num_local_experts") or 0
    )
    if experts:
        moe_inter = int(t.get("moe_intermediate_size") or t["intermediate_size"])
        shared = int(t.get("n_shared_experts") or 0)
        mlp = (experts + shared) * 3 * h * moe_inter + experts * h
    else:
        mlp = 3 * h * int(t["intermediate_size"])
    tied = bool(t.get("tie_word_embeddings", target.get("tie_word_embeddings", False)))
    return layers * (attn + mlp) + vocab * h * (1 if tied else 2)


def _weight_bytes(target_dir: Path, target: dict[str, Any], dtype: str) -> int:
    index = target_dir / INDEX_FILE
    if index.is_file():
        total = (json.loads(index.read_text()).get("metadata") or {}).get("total_size")
        if total:
            return int(total)
    return target_params(target) * BYTES.get(dtype, 2)


def check_template(cfg: Config, target_dir: Path) -> str:
    """The tokenizer has a chat template, and the registry entry the dataset names (if any)
    finds its assistant turns in the tokenizer's own rendering."""
    from spec_core.data.render import load_tokenizer
    from spec_core.data.templates import detect_template, get_template, template_fits

    tok = load_tokenizer(target_dir)
    own = getattr(tok, "chat_template", None)
    if not own:
        if cfg.dataset.chat_template is None:
            raise ConfigError(
                f"{target_dir}: the tokenizer has no chat template and 'dataset.chat_template' "
                "is null; name a registry template"
            )
        return f"chat template: {cfg.dataset.chat_template} (the tokenizer has none of its own)"

    def render(messages: list[dict]) -> str:
        return tok.apply_chat_template(messages, tokenize=False)

    if cfg.dataset.chat_template is None:
        detected = detect_template(render)
        if detected is None:
            raise ConfigError(
                f"{target_dir}: cannot find the assistant-turn markers of the tokenizer's chat "
                "template; set 'dataset.chat_template' to the matching registry entry"
            )
        return f"chat template: the tokenizer's own ({detected.name} markers)"
    named = get_template(cfg.dataset.chat_template)
    if not template_fits(render, named):
        found = detect_template(render)
        raise ConfigError(
            f"'dataset.chat_template' {named.name!r} does not fit the target's tokenizer "
            f"template (its assistant turns look like {found.name if found else 'none we know'!r}); "
            "set it to that entry or to null"
        )
    return f"chat template: {named.name} fits the tokenizer's own"


def memory_estimate(cfg: Config, target_dir: Path, target: dict[str, Any], dcfg: Any) -> list[str]:
    """GiB per producer replica (per GPU) and per trainer rank: an estimate from shapes alone."""
    t = text_config(target)
    h, layers, vocab = int(t["hidden_size"]), int(t["num_hidden_layers"]), int(t["vocab_size"])
    heads = int(t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or h // heads)
    kv = int(t.get("num_key_value_heads") or heads)
    inf, tr, seq = cfg.inference, cfg.training, cfg.dataset.max_seq_length
    wire, model_b = BYTES.get(inf.dtype, 2), BYTES.get(cfg.target.dtype, 2)
    weights = _weight_bytes(target_dir, target, cfg.target.dtype) / max(inf.tp_size, 1)
    kv_cache = inf.batch_size * seq * 2 * layers * kv * head_dim * model_b / max(inf.tp_size, 1)
    captures = inf.batch_size * seq * (dcfg.aux_dim + h) * wire
    producer = weights + kv_cache + captures + inf.batch_size * seq * h * model_b * 4
    draft = sum(
        math.prod(s) for s in get_algorithm(cfg.draft.algorithm).expected_shapes(dcfg).values()
    )
    param_b = BYTES.get(tr.dtype, 4)
    optimizer = draft * (param_b + 4 + 8 + (4 if param_b < 4 else 0))  # grads, Adam, fp32 master
    frozen = 2 * vocab * h * 4  # target lm_head + embedding, fp32
    vocab_d = int(getattr(dcfg, "draft_vocab_size", None) or vocab)
    steps = int(getattr(dcfg, "ttt_length", 1) or 1)
    acts = tr.micro_batch_size * seq * (dcfg.aux_dim * 4 + steps * (vocab_d * 4 * 3 + h * 4 * 16))
    trainer = optimizer + frozen + acts
    return (
        [
            f"estimate, producer (per replica/GPU): {producer / GIB:.1f} GiB = weights "
            f"{weights / GIB:.1f} + KV cache {kv_cache / GIB:.1f} + captures {captures / GIB:.1f} "
            f"at batch {inf.batch_size} x {seq} tokens",
            f"estimate, trainer (per rank): {trainer / GIB:.1f} GiB = draft {draft / 1e6:.0f}M "
            f"params with grads/Adam {optimizer / GIB:.1f} + frozen target head/embedding "
            f"{frozen / GIB:.1f} + activations {acts / GIB:.1f} at micro-batch "
            f"{tr.micro_batch_size} x {seq} tokens",
        ],
        producer / GIB,
        trainer / GIB,
    )


def dry_run(cfg: Config) -> DryRunReport:
    """Every check above; the first failure is a ConfigError of one line."""
    target_dir = resolve_target(cfg)
    target = read_target_config(target_dir)
    t = text_config(target)
    layers, vocab = int(t["num_hidden_layers"]), int(t["vocab_size"])
    algo = get_algorithm(cfg.draft.algorithm)
    capture = cfg.draft.capture_indices or list(algo.default_capture_indices(cfg.draft, layers))
    check_capture_indices(capture, layers)
    draft_vocab = cfg.vocab.draft_vocab_size
    if draft_vocab is not None and draft_vocab > vocab:
        raise ConfigError(
            f"'vocab.draft_vocab_size' {draft_vocab} exceeds the target's vocab_size {vocab}"
        )
    dcfg = algo.derive_config(target, cfg, draft_vocab, target_dir)
    lines = [
        f"target: {target_dir} ({t.get('model_type')}, {layers} layers, hidden "
        f"{t['hidden_size']}, vocab {vocab})",
        f"capture indices {list(capture)}: in [0, {layers - 1}]",
        f"draft vocab: {draft_vocab or vocab} of {vocab}",
        check_template(cfg, target_dir),
    ]
    memory, producer, trainer = memory_estimate(cfg, target_dir, target, dcfg)
    return DryRunReport(target_dir, lines + memory, producer, trainer)


def main(argv: Optional[list[str]] = None) -> int:
    """``specflow dry-run --config C [section.key=value ...]``: validate without loading weights."""
    parser = argparse.ArgumentParser(prog="specflow dry-run", description=main.__doc__)
    parser.add_argument("--config", help="YAML preset (e.g. configs/qwen3-8b-eagle3.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. target.path=/models/x")
    args = parser.parse_args(argv)
    report = dry_run(load_config(args.config, args.overrides))
    for line in report.lines:
        print(line)
    print("dry run passed")
    return 0
