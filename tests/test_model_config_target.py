"""Draft config derivation (geometry copied from the target) and reading the target's head from
safetensors alone (tied, untied, sharded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spec_core.config import DraftConfig, TargetConfig
from spec_core.errors import ConfigError
from spec_core.models.common.target import load_target_head, read_target_config
from spec_core.models.eagle3.config import Eagle3Config, derive_eagle3_config
from spec_core.models.eagle3.model import Eagle3Draft


def test_derive_from_smollm2_config(smollm2_dir: Path):
    target = read_target_config(smollm2_dir)
    cfg = derive_eagle3_config(target, DraftConfig(), 8192, target_name="smollm2")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (576, 1536, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.vocab_size == 49152 and cfg.draft_vocab_size == 8192 and cfg.pruned
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.capture_indices == (2, 15, 27)  # (2, N//2, N-3) for N = 30
    assert cfg.target_hidden_size == 576 and cfg.aux_dim == 3 * 576
    hf = cfg.to_hf_dict()
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["model_type"] == "llama"
    assert hf["num_hidden_layers"] == 1 and hf["tie_word_embeddings"] is False
    assert hf["specflow"]["capture_indices"] == [2, 15, 27] and hf["specflow"]["ttt_length"] == 7


def test_derive_copies_head_dim_and_rope_scaling_from_a_transformers4_config():
    target = {
        "num_hidden_layers": 36,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_attention_heads": 32,  # hidden / heads = 80, but head_dim is 128
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    cfg = derive_eagle3_config(target, DraftConfig(capture_indices=[1, 18, 33]), 32000)
    assert cfg.head_dim == 128
    assert cfg.rope_theta == 1e6
    assert cfg.rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    assert cfg.capture_indices == (1, 18, 33)


def test_draft_config_roundtrip_and_llama_config_load(tmp_path: Path):
    from transformers import LlamaConfig

    target = {
        "num_hidden_layers": 8,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 1000,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
        "max_position_embeddings": 8192,
    }
    cfg = derive_eagle3_config(target, DraftConfig(), 1000)
    assert not cfg.pruned and cfg.capture_indices == (2, 4, 5)
    path = cfg.save(tmp_path / "config.json")
    assert Eagle3Config.load(tmp_path) == cfg
    llama = LlamaConfig(**json.loads(path.read_text()))
    assert llama.head_dim == 32
    assert llama.rope_parameters["rope_type"] == "llama3"
    assert llama.rope_parameters["rope_theta"] == 500000.0
    Eagle3Draft(cfg)  # builds with the llama3 rope scaling


def test_derive_rejects_bad_capture_indices_and_vocab():
    target = {
        "num_hidden_layers": 4,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "vocab_size": 10,
    }
    with pytest.raises(ConfigError, match="capture_indices"):
        derive_eagle3_config(target, DraftConfig(capture_indices=[1, 4]), 10)
    with pytest.raises(ConfigError, match="draft vocab size"):
        derive_eagle3_config(target, DraftConfig(), 11)


def test_target_head_tied_reads_embedding(tiny_target_dir: Path):
    head = load_target_head(tiny_target_dir, TargetConfig())
    state = load_file(str(tiny_target_dir / "model.safetensors"))
    assert "lm_head.weight" not in state
    assert torch.equal(head.lm_head, state["model.embed_tokens.weight"])
    assert torch.equal(head.norm_weight, state["model.norm.weight"])
    assert torch.equal(head.load_embedding(), state["model.embed_tokens.weight"])
    assert head.vocab_size == 49152 and head.hidden_size == 64


def test_target_head_untied_and_sharded(tmp_path: Path, smollm2_dir: Path):
    from spec_core.assets import build_tiny_target

    untied = build_tiny_target(tmp_path / "untied", smollm2_dir, tie=False, hidden=32)
    state = load_file(str(untied / "model.safetensors"))
    head = load_target_head(untied, TargetConfig())
    assert torch.equal(head.lm_head, state["lm_head.weight"])
    assert not torch.equal(head.lm_head, state["model.embed_tokens.weight"])

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((untied / "config.json").read_text())
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file_name, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(sharded / file_name))
        weight_map.update({k: file_name for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    head2 = load_target_head(sharded, TargetConfig())
    assert torch.equal(head2.lm_head, head.lm_head)
    assert torch.equal(head2.load_embedding(), state["model.embed_tokens.weight"])


def test_target_head_missing_lm_head_is_a_clear_error(tmp_path: Path, tiny_target_dir: Path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tiny_target_dir / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (bad / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(tiny_target_dir / "model.safetensors"))
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ConfigError, match="lm_head_key"):
        load_target_head(bad, TargetConfig())
