"""Training checkpoint -> EAGLE-3 HF draft dir that SGLang and vLLM load (DESIGN §3, anchors §5).

The DCP checkpoint already stores the draft under its export names (``fc.weight``, ``midlayer.*``,
``norm.weight``, ``lm_head.weight``, ``d2t``/``t2d`` when pruned), so exporting is: read the shards
without a process group, strip any wrapper prefixes, optionally *post-prune* a full-vocab head with a
vocab map, cast, and write ``config.json`` + ``model.safetensors`` + a provenance sidecar. Every
export then runs ``validate_export`` over the files it wrote (the checklist of anchors §5.6), so a
bad dir never leaves this module.

Per-engine aux-layer ids (anchors §5.4): vLLM reads the top-level
``eagle_aux_hidden_state_layer_ids`` verbatim as capture indices; SGLang reads
``eagle_config.eagle_aux_hidden_state_layer_ids`` in the post-layer convention (capture - 1). Both
go into one ``config.json``; our own capture indices stay in ``specflow.capture_indices``.

A full-vocab draft carries no ``d2t``/``t2d`` (vLLM refuses ``d2t`` when the draft vocab equals the
target's); a pruned one carries both, ``lm_head`` rows in ascending target id.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.engines import conventions
from spec_core.errors import ConfigError, SpecflowError
from spec_core.models.draft_config import ARCHITECTURE, Eagle3Config, rope_settings, text_config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SIDECAR_FILE = "specflow_export.json"
EXPORT_FORMAT = "1"  # bump when the files written here change meaning
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Wrapper prefixes trainers leave in state-dict keys (SpecForge/TorchSpec, FSDP1, DDP, compile).
_LEADING_PREFIXES = ("draft_model.", "module.")
_INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
VOCAB_KEYS = ("d2t", "t2d")
EMBED_KEY = "embed_tokens.weight"


class ExportError(SpecflowError):
    """The checkpoint cannot become a servable draft dir (or an exported dir is broken)."""


@dataclass
class DraftCheckpoint:
    """The draft weights of one training checkpoint, read without a process group."""

    path: Path
    config: Eagle3Config
    state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any] = field(default_factory=dict)
    vocab_map_file: Optional[Path] = None

    @property
    def step(self) -> Optional[int]:
        step = self.trainer_state.get("step")
        return int(step) if step is not None else None


@dataclass
class ExportResult:
    out_dir: Path
    pruned: bool
    post_pruned: bool
    draft_vocab_size: int
    vocab_size: int
    capture_indices: list[int]
    dtype: str
    checks: list[str]
    provenance: dict[str, Any]
    speculators_dir: Optional[Path] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "hf_dir": str(self.out_dir),
            "pruned": self.pruned,
            "post_pruned": self.post_pruned,
            "draft_vocab_size": self.draft_vocab_size,
            "vocab_size": self.vocab_size,
            "capture_indices": list(self.capture_indices),
            "sglang_layer_ids": sglang_layer_ids(self.capture_indices),
            "vllm_layer_ids": vllm_layer_ids(self.capture_indices),
            "dtype": self.dtype,
            "checks": list(self.checks),
            "provenance": self.provenance,
            "speculators_dir": str(self.speculators_dir) if self.speculators_dir else None,
        }


# ----------------------------------------------------------------------------- layer ids


def vllm_layer_ids(capture_indices: list[int] | tuple[int, ...]) -> list[int]:
    """vLLM reads ``eagle_aux_hidden_state_layer_ids`` as capture indices (the input of layer k)."""
    with _as_export_error():
        return conventions.vllm_layer_ids(capture_indices)


def sglang_layer_ids(capture_indices: list[int] | tuple[int, ...]) -> list[int]:
    """SGLang's ``eagle_config`` ids are post-layer (output of layer k): capture index - 1."""
    with _as_export_error():
        return conventions.sglang_layer_ids(capture_indices)


def capture_indices_from_hf(config: dict[str, Any]) -> list[int]:
    """Capture indices of an exported config: ours, else vLLM's top-level ids, else SGLang's + 1."""
    with _as_export_error():
        return conventions.capture_indices_from_hf(config)


@contextmanager
def _as_export_error() -> Iterator[None]:
    """The translations live in ``spec_core.engines.conventions`` (shared with the producers)."""
    try:
        yield
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


# ----------------------------------------------------------------------------- reading


def resolve_export_source(path: str | Path, select: str = "latest") -> Path:
    """An ``iter_*`` dir as is; a run or checkpoints dir -> its ``latest`` or ``best`` pointer."""
    from spec_core.training.checkpoint import BEST, resolve_checkpoint

    if select not in ("latest", "best"):
        raise ConfigError(f"checkpoint selection must be 'latest' or 'best', got {select!r}")
    path = Path(path).expanduser()
    if select == "best":
        for root in (path, path / "checkpoints"):
            pointer = root / BEST
            if pointer.is_file():
                return resolve_checkpoint(root / pointer.read_text().strip())
    return resolve_checkpoint(path)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``draft_model.``, ``module.``, FSDP1/compile wrappers) from keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        clean = key
        for wrapper in _INNER_WRAPPERS:
            clean = clean.replace(wrapper, "")
        for prefix in _LEADING_PREFIXES:
            if clean.startswith(prefix):
                clean = clean[len(prefix) :]
        if clean in out:
            raise ExportError(f"two checkpoint tensors map to the same name {clean!r}")
        out[clean] = value
    return out


def read_checkpoint(path: str | Path, select: str = "latest") -> DraftCheckpoint:
    """Load a DCP checkpoint's draft weights into plain tensors (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from spec_core.training.checkpoint import STATE_FILE

    ckpt = resolve_export_source(path, select)
    model_dir = ckpt / "model"
    if not (model_dir / ".metadata").is_file():
        raise ExportError(f"{model_dir}: no DCP metadata; is {ckpt} a complete checkpoint?")
    config = Eagle3Config.load(ckpt / CONFIG_FILE)
    reader = FileSystemReader(str(model_dir))
    state: dict[str, torch.Tensor] = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            raise ExportError(f"{model_dir}: entry {key!r} is not a tensor; not a draft checkpoint")
        state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # "torch.distributed is disabled": intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    trainer_state = json.loads((ckpt / STATE_FILE).read_text())
    vocab_file = ckpt / "vocab_map.safetensors"
    return DraftCheckpoint(
        path=ckpt,
        config=config,
        state=strip_prefixes(state),
        trainer_state=trainer_state,
        vocab_map_file=vocab_file if vocab_file.is_file() else None,
    )


# ----------------------------------------------------------------------------- pruning


def post_prune(
    config: Eagle3Config, state: dict[str, torch.Tensor], d2t: torch.Tensor, t2d: torch.Tensor
) -> tuple[Eagle3Config, dict[str, torch.Tensor]]:
    """Keep the ``lm_head`` rows of the kept target ids (``t2d``; ascending = draft id order).

    Refused for a head that is already pruned: its rows are tied to the training-time map, and
    slicing them by another map would silently scramble the vocabulary (TorchSpec's converter
    indexed rows by the ``d2t`` *offsets*, the other way to get this wrong).
    """
    if config.pruned:
        raise ExportError(
            f"the draft head is already pruned ({config.draft_vocab_size} of {config.vocab_size} "
            "tokens); re-pruning is refused because its rows follow the training-time vocab map. "
            "Export it without a vocab map, or retrain with the full vocab"
        )
    d2t, t2d = d2t.to(torch.int64), t2d.to(torch.bool)
    if t2d.numel() != config.vocab_size:
        raise ExportError(
            f"vocab map covers {t2d.numel()} target tokens but the draft's vocab is "
            f"{config.vocab_size}; build the map for this target"
        )
    check_vocab_map(d2t, t2d, config.vocab_size)
    head = state["lm_head.weight"]
    pruned_state = dict(state)
    pruned_state["lm_head.weight"] = head[t2d].clone()
    pruned_state["d2t"] = d2t.clone()
    pruned_state["t2d"] = t2d.clone()
    new_config = Eagle3Config.from_hf_dict(
        {**config.to_hf_dict(), "draft_vocab_size": int(d2t.numel())}, "post-pruned config"
    )
    return new_config, pruned_state


def check_vocab_map(d2t: torch.Tensor, t2d: torch.Tensor, vocab_size: int) -> None:
    """d2t int64 offsets with strictly ascending target ids in range, t2d bool marking exactly them."""
    if d2t.dtype != torch.int64 or t2d.dtype != torch.bool:
        raise ExportError(f"d2t must be int64 and t2d bool, got {d2t.dtype} and {t2d.dtype}")
    if d2t.dim() != 1 or t2d.shape != (vocab_size,):
        raise ExportError(
            f"d2t must be 1-D and t2d [{vocab_size}], got {tuple(d2t.shape)} / {tuple(t2d.shape)}"
        )
    target_ids = torch.arange(d2t.numel(), dtype=torch.int64) + d2t
    if target_ids.numel() and (int(target_ids.min()) < 0 or int(target_ids.max()) >= vocab_size):
        raise ExportError(f"d2t maps draft ids outside the target vocab [0, {vocab_size})")
    if not bool((target_ids[1:] > target_ids[:-1]).all()):
        raise ExportError("d2t target ids are not strictly ascending")
    if int(t2d.sum()) != d2t.numel() or not bool(t2d[target_ids].all()):
        raise ExportError(
            f"t2d marks {int(t2d.sum())} tokens but d2t has {d2t.numel()}, or they disagree"
        )


# ----------------------------------------------------------------------------- config


def engine_config(config: Eagle3Config, provenance: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for both engines: Llama fields, per-engine layer ids, our metadata."""
    data = config.to_hf_dict()
    capture = list(config.capture_indices)
    if not capture:
        raise ExportError("the draft config has no specflow.capture_indices")
    data.update(
        {
            "eagle_aux_hidden_state_layer_ids": vllm_layer_ids(capture),
            "eagle_config": {
                "use_aux_hidden_state": True,
                "eagle_aux_hidden_state_layer_ids": sglang_layer_ids(capture),
            },
            "norm_before_residual": False,
            "specflow": {**data.get("specflow", {}), **provenance},
        }
    )
    return data


# ----------------------------------------------------------------------------- export


def export_draft(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    select: str = "latest",
    target_dir: Optional[str | Path] = None,
    vocab_map: Optional[str | Path] = None,
    dtype: Optional[str] = None,
    include_embedding: bool = False,
    embedding_key: str = "model.embed_tokens.weight",
    speculators_dir: Optional[str | Path] = None,
    provenance: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the HF draft dir for ``checkpoint``; ``vocab_map`` post-prunes a full-vocab head.

    ``target_dir`` (the target's HF dir) lets the validator check vocab, hidden size and RoPE
    against the target, and is required for ``include_embedding`` (the embedding is copied from
    the target, never taken from anywhere else). DFlash/DSpark checkpoints are written by
    ``spec_core.export_dflash`` in their own HF layout.
    """
    from spec_core.export_dflash import export_block_draft, is_block_checkpoint

    if is_block_checkpoint(checkpoint, select):
        return export_block_draft(
            checkpoint,
            out_dir,
            select=select,
            target_dir=target_dir,
            vocab_map=vocab_map,
            dtype=dtype,
            include_embedding=include_embedding,
            embedding_key=embedding_key,
            speculators_dir=speculators_dir,
            provenance=provenance,
            overwrite=overwrite,
        )
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --force to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if include_embedding and target_dir is None:
        raise ConfigError("copying embed_tokens needs the target dir (--target)")

    ckpt = read_checkpoint(checkpoint, select)
    config, state = ckpt.config, dict(ckpt.state)
    state.pop(EMBED_KEY, None)  # the frozen target embedding; copied fresh below if wanted
    post_pruned = vocab_map is not None
    if post_pruned:
        from spec_core.vocab import load_vocab_map

        vmap = load_vocab_map(Path(vocab_map))
        config, state = post_prune(config, state, vmap.d2t, vmap.t2d)
    elif config.pruned:
        _attach_training_vocab(ckpt, state)
    else:
        for key in VOCAB_KEYS:  # vLLM refuses d2t on a full-vocab draft
            state.pop(key, None)

    dtype_name = dtype or _dominant_dtype(state)
    cast = DTYPES[dtype_name]
    state = {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    config.torch_dtype = dtype_name
    if include_embedding:
        from spec_core.models.target import read_tensors

        emb = read_tensors(Path(target_dir), [embedding_key])[embedding_key]  # type: ignore[arg-type]
        state[EMBED_KEY] = emb.to(cast).contiguous()

    meta = _provenance(ckpt, target_dir, post_pruned, provenance or {})
    hf_config = engine_config(config, meta)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_dir(tmp, hf_config, state, meta)
        checks = validate_export(tmp, target_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    spec_dir = None
    if speculators_dir is not None:
        spec_dir = write_speculators_dir(out_dir, speculators_dir, overwrite=overwrite)
    result = ExportResult(
        out_dir=out_dir,
        pruned=config.pruned,
        post_pruned=post_pruned,
        draft_vocab_size=config.draft_vocab_size,
        vocab_size=config.vocab_size,
        capture_indices=list(config.capture_indices),
        dtype=dtype_name,
        checks=checks,
        provenance=meta,
        speculators_dir=spec_dir,
    )
    log.info("exported %s -> %s (%d checks passed)", ckpt.path, out_dir, len(checks))
    return result


def _attach_training_vocab(ckpt: DraftCheckpoint, state: dict[str, torch.Tensor]) -> None:
    """A pre-pruned checkpoint converts as it is; its d2t/t2d must agree with its vocab map file."""
    missing = [k for k in VOCAB_KEYS if k not in state]
    if missing and ckpt.vocab_map_file is None:
        raise ExportError(
            f"{ckpt.path}: pruned draft ({ckpt.config.draft_vocab_size} tokens) without {missing} "
            "and without vocab_map.safetensors; the checkpoint is incomplete"
        )
    if ckpt.vocab_map_file is not None:
        from spec_core.vocab import load_vocab_map

        vmap = load_vocab_map(ckpt.vocab_map_file)
        for key, value in (("d2t", vmap.d2t), ("t2d", vmap.t2d)):
            if key in state and not torch.equal(state[key].to(value.dtype), value):
                raise ExportError(
                    f"{ckpt.path}: {key} in the weights differs from vocab_map.safetensors"
                )
            state.setdefault(key, value)
    state["d2t"] = state["d2t"].to(torch.int64)
    state["t2d"] = state["t2d"].to(torch.bool)


def _dominant_dtype(state: dict[str, torch.Tensor]) -> str:
    counts: dict[torch.dtype, int] = {}
    for value in state.values():
        if value.is_floating_point():
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    dtype = max(counts, key=counts.__getitem__) if counts else torch.float32
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ExportError(f"checkpoint weights are {dtype}; pass an export dtype explicitly")
    return names[dtype]


def _provenance(
    ckpt: DraftCheckpoint,
    target_dir: Optional[str | Path],
    post_pruned: bool,
    extra: dict[str, Any],
) -> dict[str, Any]:
    import spec_core

    meta: dict[str, Any] = {
        "export_format": EXPORT_FORMAT,
        "specflow_version": getattr(spec_core, "__version__", "0.1.0"),
        "algorithm": ckpt.config.specflow.get("algorithm", "eagle3"),
        "capture_indices": list(ckpt.config.capture_indices),
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "post_pruned": post_pruned,
    }
    if target_dir is not None:
        from spec_core.data.regenerate import target_fingerprint

        meta["target_revision"] = target_fingerprint(Path(target_dir))[:16]
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


def _write_dir(
    out: Path, hf_config: dict[str, Any], state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(
        state,
        str(out / WEIGHTS_FILE),
        metadata={"format": "pt", "specflow": json.dumps(meta, sort_keys=True)},
    )
    (out / SIDECAR_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- validation


def expected_shapes(config: Eagle3Config) -> dict[str, tuple[int, ...]]:
    """Every weight of a one-layer EAGLE-3 draft and its shape (anchors §5.1)."""
    h, inter = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    return {
        "fc.weight": (h, config.aux_dim),
        "midlayer.self_attn.q_proj.weight": (q_dim, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv_dim, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv_dim, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, q_dim),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (config.draft_vocab_size, h),
    }


def validate_export(hf_dir: str | Path, target_dir: Optional[str | Path] = None) -> list[str]:
    """Run the converter checklist on an exported dir; raise ExportError on the first failure.

    Returns the names of the checks that passed (recorded with the export).
    """
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    where = str(hf_dir)
    try:
        raw = json.loads((hf_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{hf_dir / CONFIG_FILE}: unreadable: {exc}") from None
    checks: list[str] = []

    def require(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ExportError(f"{where}: {message}")
        if name not in checks:
            checks.append(name)

    require(
        raw.get("architectures") == [ARCHITECTURE],
        "architecture",
        f"architectures must be [{ARCHITECTURE!r}], got {raw.get('architectures')}",
    )
    require(
        raw.get("tie_word_embeddings") is False,
        "untied",
        "tie_word_embeddings must be false (SGLang would tie lm_head to the embedding)",
    )
    require(int(raw.get("num_hidden_layers", 0)) == 1, "one_layer", "num_hidden_layers must be 1")
    require("draft_vocab_size" in raw, "draft_vocab_size", "config has no draft_vocab_size")
    config = Eagle3Config.from_hf_dict(raw, where)
    capture = capture_indices_from_hf(raw)
    require(
        raw.get("eagle_aux_hidden_state_layer_ids") == vllm_layer_ids(capture),
        "vllm_layer_ids",
        f"top-level eagle_aux_hidden_state_layer_ids must equal the capture indices {capture}",
    )
    eagle = raw.get("eagle_config") or {}
    require(
        eagle.get("eagle_aux_hidden_state_layer_ids") == sglang_layer_ids(capture),
        "sglang_layer_ids",
        f"eagle_config.eagle_aux_hidden_state_layer_ids must be capture - 1 = "
        f"{sglang_layer_ids(capture)}",
    )
    require(
        len(capture) * config.target_hidden_size == config.aux_dim,
        "capture_count",
        "specflow.capture_indices disagrees with the config",
    )

    with safe_open(str(hf_dir / WEIGHTS_FILE), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (no iter on safe_open)
    bad_prefix = [
        k
        for k in tensors
        if k.startswith(_LEADING_PREFIXES + ("layers.",)) or any(w in k for w in _INNER_WRAPPERS)
    ]
    require(
        not bad_prefix,
        "no_trainer_prefixes",
        f"tensor names carry trainer/wrapper prefixes or layers.N names: {bad_prefix[:4]}",
    )
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(tensors))
    require(not missing, "required_keys", f"missing tensors {missing}")
    allowed = set(shapes) | {EMBED_KEY} | (set(VOCAB_KEYS) if config.pruned else set())
    unexpected = sorted(set(tensors) - allowed)
    require(
        not unexpected,
        "no_unexpected_keys",
        f"unexpected tensors {unexpected}"
        + (
            " (a full-vocab draft must not carry d2t/t2d: vLLM refuses it)"
            if set(unexpected) & set(VOCAB_KEYS)
            else ""
        ),
    )
    for name, shape in shapes.items():
        require(
            tuple(tensors[name].shape) == shape,
            "shapes",
            f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}",
        )
    dtype = DTYPES.get(config.torch_dtype)
    require(dtype is not None, "torch_dtype", f"torch_dtype {config.torch_dtype!r} unknown")
    floats = {k: v for k, v in tensors.items() if k not in VOCAB_KEYS}
    wrong = [k for k, v in floats.items() if v.dtype != dtype]
    require(not wrong, "dtypes", f"tensors {wrong[:4]} are not {config.torch_dtype} (torch_dtype)")
    nonfinite = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]
    require(not nonfinite, "finite", f"tensors {nonfinite} hold NaN/inf")
    if EMBED_KEY in tensors:
        require(
            tuple(tensors[EMBED_KEY].shape) == (config.vocab_size, config.hidden_size),
            "embedding_shape",
            f"{EMBED_KEY} must be [{config.vocab_size}, {config.hidden_size}]",
        )
    if config.pruned:
        require(
            all(k in tensors for k in VOCAB_KEYS),
            "vocab_map_present",
            "a pruned draft needs d2t and t2d",
        )
        require(
            tuple(tensors["d2t"].shape) == (config.draft_vocab_size,),
            "d2t_shape",
            f"d2t must have draft_vocab_size={config.draft_vocab_size} entries",
        )
        try:
            check_vocab_map(tensors["d2t"], tensors["t2d"], config.vocab_size)
        except ExportError as exc:
            raise ExportError(f"{where}: {exc}") from None
        checks += ["d2t_int64_monotone", "t2d_sum"]

    if target_dir is not None:
        _check_against_target(config, tensors, Path(target_dir), require)
    return checks


def _check_against_target(config, tensors, target_dir: Path, require) -> None:
    target = text_config(json.loads((target_dir / CONFIG_FILE).read_text()))
    require(
        int(target["vocab_size"]) == config.vocab_size,
        "target_vocab",
        f"vocab_size {config.vocab_size} != target's {target['vocab_size']}",
    )
    require(
        int(target["hidden_size"]) == config.target_hidden_size,
        "target_hidden",
        f"target_hidden_size {config.target_hidden_size} != target's {target['hidden_size']}",
    )
    layers = int(target["num_hidden_layers"])
    capture = list(config.capture_indices)
    require(
        all(0 <= k < layers for k in capture),
        "capture_in_range",
        f"capture indices {capture} out of range for a {layers}-layer target",
    )
    theta, scaling = rope_settings(target)
    require(
        theta == config.rope_theta and scaling == config.rope_scaling,
        "rope_from_target",
        f"RoPE (theta {config.rope_theta}, scaling {config.rope_scaling}) differs from the "
        f"target's (theta {theta}, scaling {scaling})",
    )
    if EMBED_KEY in tensors:
        from spec_core.models.target import read_tensors

        key = "model.embed_tokens.weight"
        try:
            emb = read_tensors(target_dir, [key])[key]
        except ConfigError:
            return
        same = torch.equal(tensors[EMBED_KEY].float(), emb.to(tensors[EMBED_KEY].dtype).float())
        require(same, "embedding_is_target", f"{EMBED_KEY} is not the target's embedding")


# ----------------------------------------------------------------------------- loading back


def load_hf_draft(
    hf_dir: str | Path,
    target_dir: Optional[str | Path] = None,
    embedding_key: str = "model.embed_tokens.weight",
    dtype: torch.dtype = torch.float32,
):
    """Rebuild an ``Eagle3Draft`` from an exported dir alone (the engines' view of it).

    Without ``embed_tokens`` in the file, the target's embedding is read from ``target_dir``, as
    SGLang and vLLM share it.
    """
    from safetensors.torch import load_file

    from spec_core.models.eagle3 import Eagle3Draft

    hf_dir = Path(hf_dir)
    raw = json.loads((hf_dir / CONFIG_FILE).read_text())
    raw.setdefault("specflow", {})
    raw["specflow"] = {**raw["specflow"], "capture_indices": capture_indices_from_hf(raw)}
    config = Eagle3Config.from_hf_dict(raw, str(hf_dir / CONFIG_FILE))
    tensors = load_file(str(hf_dir / WEIGHTS_FILE))
    if EMBED_KEY not in tensors:
        if target_dir is None:
            raise ConfigError(f"{hf_dir} has no {EMBED_KEY}; pass the target dir to share its")
        from spec_core.models.target import read_tensors

        tensors[EMBED_KEY] = read_tensors(Path(target_dir), [embedding_key])[embedding_key]
    model = Eagle3Draft(config)
    model.load_state_dict(tensors, strict=True)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- speculators


def speculators_config(hf_config: dict[str, Any], verifier: str, num_tokens: int = 3) -> dict:
    """vLLM's self-describing speculators config (anchors §5.3) for a native EAGLE-3 config."""
    layer = {
        k: v
        for k, v in hf_config.items()
        if k
        not in (
            "architectures",
            "eagle_config",
            "eagle_aux_hidden_state_layer_ids",
            "draft_vocab_size",
            "target_hidden_size",
            "norm_before_residual",
            "specflow",
        )
    }
    layer["num_hidden_layers"] = 1
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "transformer_layer_config": layer,
        "draft_vocab_size": hf_config["draft_vocab_size"],
        "target_hidden_size": hf_config["target_hidden_size"],
        "norm_before_residual": False,  # the adapter defaults a missing value to true
        "eagle_aux_hidden_state_layer_ids": hf_config["eagle_aux_hidden_state_layer_ids"],
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": num_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
        },
        "specflow": hf_config.get("specflow", {}),
    }


def write_speculators_dir(
    hf_dir: str | Path,
    out_dir: str | Path,
    verifier: Optional[str] = None,
    num_tokens: int = 3,
    overwrite: bool = False,
) -> Path:
    """The speculators-format twin of a native dir: ``midlayer.`` -> ``layers.0.``, same tensors."""
    from safetensors.torch import load_file, save_file

    hf_dir, out_dir = Path(hf_dir), Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --force to replace it")
    hf_config = json.loads((hf_dir / CONFIG_FILE).read_text())
    verifier = verifier or str((hf_config.get("specflow") or {}).get("target_dir") or "")
    if not verifier:
        raise ConfigError("the speculators format needs the verifier (target) path or name")
    tensors = {
        (("layers.0." + k[len("midlayer.") :]) if k.startswith("midlayer.") else k): v
        for k, v in load_file(str(hf_dir / WEIGHTS_FILE)).items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    config = speculators_config(hf_config, verifier, num_tokens)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
    """``specflow export --checkpoint CKPT --out DIR``: DCP checkpoint -> HF draft dir."""
    parser = argparse.ArgumentParser(prog="specflow export", description=main.__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="iter_* dir, checkpoints dir or run dir"
    )
    parser.add_argument("--out", required=True, help="output HF dir")
    parser.add_argument(
        "--select",
        default="latest",
        choices=("latest", "best"),
        help="which checkpoint of a run/checkpoints dir",
    )
    parser.add_argument("--target", default=None, help="target HF dir (checks; needed for --embed)")
    parser.add_argument(
        "--prune-vocab-map",
        default=None,
        help="vocab_map.safetensors: post-prune a full-vocab head to its tokens",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="weight dtype (default: the checkpoint's)",
    )
    parser.add_argument(
        "--embed", action="store_true", help="include embed_tokens copied from the target"
    )
    parser.add_argument("--speculators", default=None, help="also write a speculators-format dir")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output dir")
    args = parser.parse_args(argv)
    target = args.target or _target_from_run(args.checkpoint)
    result = export_draft(
        args.checkpoint,
        args.out,
        select=args.select,
        target_dir=target,
        vocab_map=args.prune_vocab_map,
        dtype=args.dtype,
        include_embedding=args.embed,
        speculators_dir=args.speculators,
        provenance={"target_dir": str(target) if target else None},
        overwrite=args.force,
    )
    print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    return 0


def _target_from_run(checkpoint: str) -> Optional[str]:
    """The target dir recorded in the run's ``train_job.json``, when the checkpoint has one."""
    path = Path(checkpoint).expanduser().resolve()
    for parent in [path, *path.parents][:4]:
        job = parent / "train_job.json"
        if job.is_file():
            target = json.loads(job.read_text()).get("target_dir")
            if target and (Path(target) / CONFIG_FILE).is_file():
                return str(target)
    return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpecflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
