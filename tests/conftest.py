"""Shared fixtures: the real SmolLM2 assets (materialized once into the user cache) and a tiny
random Llama that uses the real SmolLM2 tokenizer, for fast unit tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def asset_cache() -> Path:
    return Path(os.environ.get("SPECFLOW_TEST_CACHE", "~/.cache/specflow")).expanduser()


@pytest.fixture(scope="session")
def smollm2_dir(asset_cache: Path) -> Path:
    from spec_core.assets import resolve_target_path

    return resolve_target_path("builtin:smollm2-135m-instruct", asset_cache)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def chitchat_path(asset_cache: Path) -> Path:
    from spec_core.assets import resolve_dataset_path

    return resolve_dataset_path("builtin:chitchat", asset_cache)


def make_tiny_target(
    out: Path,
    tokenizer_dir: Path,
    *,
    num_layers: int = 4,
    hidden: int = 64,
    tie: bool = True,
    seed: int = 0,
) -> Path:
    """A random Llama with SmolLM2's real tokenizer and vocab (49,152), saved as an HF dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
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
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, smollm2_dir: Path) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny-target"), smollm2_dir)
