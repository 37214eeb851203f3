"""Targets and datasets named by hub id, read offline from a hand-built HF cache (refs/,
snapshots/ with blob symlinks, as huggingface_hub lays it out), sharded checkpoints, the
``device_map`` option, and ``specflow dry-run`` on the Qwen3 presets against the published
Qwen3-8B / Qwen3-30B-A3B configs (no weights: only config.json and a tokenizer)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_samples

from spec_core.assets import resolve_dataset_path, resolve_target_path
from spec_core.config import load_config
from spec_core.contracts.capture import CaptureSpec
from spec_core.data.templates import get_template
from spec_core.dry_run import dry_run
from spec_core.engines.hf import HFEngine
from spec_core.errors import ConfigError
from spec_core.families import tiny_family_target
from spec_core.models.common.target import INDEX_FILE, load_target_head

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Published values of Qwen/Qwen3-8B's and Qwen/Qwen3-30B-A3B's config.json.
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B = {
    **QWEN3_8B,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "norm_topk_prob": True,
}


def put_snapshot(cache: Path, repo_type: str, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay ``files`` out as huggingface_hub does: blobs by hash, snapshots/<commit>/ symlinks,
    refs/main holding the commit."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(os.path.relpath(blob, (snap / name).parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def dir_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty HF cache that huggingface_hub's lookups read (HF_HUB_CACHE for subprocesses)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def sharded_target(tmp_path_factory, asset_cache, smollm2_dir) -> tuple[Path, Path]:
    """(the tiny Llama-3, the same weights saved as 1 MB safetensors shards with an index)."""
    from transformers import AutoModelForCausalLM

    single = tiny_family_target(asset_cache, smollm2_dir, "llama3")
    out = tmp_path_factory.mktemp("sharded")
    model = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="4MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).write_bytes((single / name).read_bytes())
    return single, out


def test_sharded_target_by_hub_id_captures_like_the_single_file(
    hub_cache, sharded_target, tmp_path
):
    single, sharded = sharded_target
    assert (sharded / INDEX_FILE).is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    put_snapshot(hub_cache, "model", "acme/tiny-llama3", dir_files(sharded))
    resolved = resolve_target_path("acme/tiny-llama3", tmp_path)
    assert resolved == (hub_cache / "models--acme--tiny-llama3" / "snapshots" / COMMIT).resolve()
    assert resolve_target_path("hf:acme/tiny-llama3@main", tmp_path) == resolved
    cfg = load_config(None, []).target
    ref, got = load_target_head(single, cfg), load_target_head(resolved, cfg)
    assert torch.equal(ref.lm_head, got.lm_head) and torch.equal(ref.norm_weight, got.norm_weight)
    assert torch.equal(ref.load_embedding(), got.load_embedding())
    spec = CaptureSpec((1, 3), with_last_hidden=True)
    samples = random_samples(2, lo=5, hi=12)
    a = HFEngine(single, spec).capture(samples)
    b = HFEngine(resolved, spec, device_map="cpu").capture(samples)  # the device_map path
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.aux_hidden, y.aux_hidden) and torch.equal(x.last_hidden, y.last_hidden)


def test_missing_hub_ids_fail_with_one_line(hub_cache, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_target_path("Qwen/Qwen3-8B", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "'Qwen/Qwen3-8B'" in msg and str(hub_cache) in msg
    assert "hf download Qwen/Qwen3-8B" in msg
    with pytest.raises(ConfigError, match="hf download acme/chats --repo-type dataset"):
        resolve_dataset_path("hf:acme/chats", tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_dataset_path("acme/chats", tmp_path)  # bare ids are local paths for datasets


def test_dataset_by_hub_id_loads_its_files(hub_cache, tmp_path):
    from spec_core.data.load import data_sources

    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    put_snapshot(hub_cache, "dataset", "acme/chats", {"data/train.jsonl": data})
    path = resolve_dataset_path("hf:acme/chats", tmp_path)
    assert [p.name for p in data_sources(path)] == ["train.jsonl"]


def qwen_snapshot(cache: Path, repo_id: str, config: dict, smollm2_dir: Path) -> Path:
    """config.json with the published values and a tokenizer with Qwen's chat template (SmolLM2's
    tokenizer files stand in for Qwen's 11 MB tokenizer.json; no weights)."""
    files = {n: (smollm2_dir / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
    files["config.json"] = json.dumps(config).encode()
    files["chat_template.jinja"] = get_template("qwen3-instruct").jinja.encode()
    return put_snapshot(cache, "model", repo_id, files)


@pytest.mark.parametrize("preset", ["qwen3-8b-eagle3", "qwen3-8b-dflash", "qwen3-8b-dspark"])
def test_dry_run_passes_the_qwen3_8b_presets(preset, hub_cache, smollm2_dir):
    qwen_snapshot(hub_cache, "Qwen/Qwen3-8B", QWEN3_8B, smollm2_dir)
    report = dry_run(load_config(str(ROOT / "configs" / f"{preset}.yaml"), []))
    text = "\n".join(report.lines)
    assert "36 layers" in text and "qwen3-instruct fits" in text
    # bf16 Qwen3-8B: ~8.2B params -> 15-16 GiB of weights, and the trainer holds far less
    assert 15 < report.producer_gib and 0.5 < report.trainer_gib < report.producer_gib * 4


def test_dry_run_fails_in_one_line_on_a_wrong_index_or_template(hub_cache, smollm2_dir):
    qwen_snapshot(hub_cache, "Qwen/Qwen3-8B", QWEN3_8B, smollm2_dir)
    preset = str(ROOT / "configs" / "qwen3-8b-eagle3.yaml")
    with pytest.raises(ConfigError, match=r"capture_indices.*\[0, 35\] for a target with 36"):
        dry_run(load_config(preset, ["draft.capture_indices=[2,18,36]"]))
    with pytest.raises(ConfigError, match="'llama3' does not fit the target's tokenizer") as err:
        dry_run(load_config(preset, ["dataset.chat_template=llama3"]))
    assert "\n" not in str(err.value)


def specflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spec_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow  # a subprocess importing transformers
def test_dry_run_cli_on_the_moe_preset(hub_cache, smollm2_dir):
    """Through ``specflow dry-run`` in a subprocess: HF_HUB_CACHE from the environment."""
    qwen_snapshot(hub_cache, "Qwen/Qwen3-30B-A3B", QWEN3_30B_A3B, smollm2_dir)
    ok = specflow("dry-run", "--config", str(ROOT / "configs" / "qwen3-30b-a3b-eagle3.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "48 layers" in ok.stdout and ok.stdout.strip().endswith("dry run passed")
    missing = specflow("dry-run", "--config", str(ROOT / "configs" / "qwen3-8b-eagle3.yaml"))
    assert missing.returncode == 2 and "hf download Qwen/Qwen3-8B" in missing.stderr
    assert "Traceback" not in missing.stderr
