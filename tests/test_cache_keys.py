"""Every content-addressed cache keys on the same inputs: a tokenizer file or a data-loading
source change invalidates both the tokenized data and the regenerated data, and nothing else
does. Keys are computed from files only, so the target here is a few small synthetic files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spec_core.config import load_config
from spec_core.data import regenerate as rg
from spec_core.data import tokenize as tk
from spec_core.utils import fingerprint

TOKENIZER_EDITS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


@pytest.fixture
def target(tmp_path) -> Path:
    """An HF-style dir with every kind of file the keys read (contents are placeholders)."""
    out = tmp_path / "target"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"vocab_size": 8}))
    (out / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (out / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (out / "merges.txt").write_text("#version: 0.2\na b\n")
    (out / "chat_template.jinja").write_text("{{ messages }}")
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return out


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "chats.jsonl"
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    }
    path.write_text(json.dumps(record) + "\n")
    return path


def both_keys(target: Path, data: Path, tmp_path: Path) -> tuple[str, str]:
    cfg = load_config(
        None, [f"target.path={target}", f"dataset.path={data}", "dataset.regenerate.enabled=true"]
    )
    tokenized = tk.dataset_cache_key(cfg.dataset, target, tmp_path / "assets")
    regenerated = rg.regen_cache_key(cfg, data, target)
    return tokenized, regenerated


def test_unchanged_inputs_keep_both_keys(target, data, tmp_path):
    keys = both_keys(target, data, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(target, copy)
    assert both_keys(target, data, tmp_path) == keys
    assert both_keys(copy, data, tmp_path) == keys  # content, not location


@pytest.mark.parametrize("name", TOKENIZER_EDITS)
def test_a_changed_tokenizer_file_invalidates_both_caches(target, data, tmp_path, name):
    tokenized, regenerated = both_keys(target, data, tmp_path)
    path = target / name
    path.write_text(path.read_text() + "\n")
    new_tokenized, new_regenerated = both_keys(target, data, tmp_path)
    assert new_tokenized != tokenized, name
    assert new_regenerated != regenerated, name


def test_an_added_tokenizer_file_invalidates_both_caches(target, data, tmp_path):
    tokenized, regenerated = both_keys(target, data, tmp_path)
    (target / "special_tokens_map.json").write_text("{}")
    new_tokenized, new_regenerated = both_keys(target, data, tmp_path)
    assert new_tokenized != tokenized and new_regenerated != regenerated


def test_changed_loader_code_invalidates_both_caches(target, data, tmp_path, monkeypatch):
    tokenized, regenerated = both_keys(target, data, tmp_path)
    real = fingerprint.source_bytes

    def edited(module: str) -> bytes:
        return real(module) + (b"# edited\n" if module == "data/load.py" else b"")

    monkeypatch.setattr(fingerprint, "source_bytes", edited)
    new_tokenized, new_regenerated = both_keys(target, data, tmp_path)
    assert new_tokenized != tokenized and new_regenerated != regenerated


@pytest.mark.parametrize(
    ("module", "tokenized_changes", "regenerated_changes"),
    [
        ("data/tokenize.py", True, False),
        ("data/generators.py", False, True),
        ("data/render.py", True, True),
        ("vocab.py", False, False),
    ],
)
def test_each_cache_keys_on_its_own_sources_only(
    target, data, tmp_path, monkeypatch, module, tokenized_changes, regenerated_changes
):
    tokenized, regenerated = both_keys(target, data, tmp_path)
    real = fingerprint.source_bytes
    monkeypatch.setattr(
        fingerprint, "source_bytes", lambda m: real(m) + (b"#\n" if m == module else b"")
    )
    new_tokenized, new_regenerated = both_keys(target, data, tmp_path)
    assert (new_tokenized != tokenized) == tokenized_changes
    assert (new_regenerated != regenerated) == regenerated_changes


def test_weights_change_only_the_regenerated_key(target, data, tmp_path):
    tokenized, regenerated = both_keys(target, data, tmp_path)
    (target / "model.safetensors").write_bytes(bytes(range(255, -1, -1)) * 64)
    new_tokenized, new_regenerated = both_keys(target, data, tmp_path)
    assert new_tokenized == tokenized and new_regenerated != regenerated


def test_code_lists_name_real_modules():
    for modules in (
        fingerprint.TOKENIZED_CODE,
        fingerprint.REGENERATED_CODE,
        fingerprint.VOCAB_CODE,
    ):
        for module in modules:
            assert fingerprint.source_bytes(module), module
    assert "data/load.py" in fingerprint.TOKENIZED_CODE
    assert "data/load.py" in fingerprint.REGENERATED_CODE
