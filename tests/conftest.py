"""Shared fixtures: the real SmolLM2 assets (materialized once into the user cache) and tiny
random Llamas that use the real SmolLM2 tokenizer (spec_core.assets.build_tiny_target), for fast
unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, smollm2_dir: Path) -> Path:
    from spec_core.assets import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("tiny-target"), smollm2_dir)


@pytest.fixture(scope="session")
def untied_target_dir(tmp_path_factory, smollm2_dir: Path) -> Path:
    """The tiny Llama, untied: a tied random model just repeats its input token (whitespace
    after a chat header), an untied one produces varied text (what regeneration tests need)."""
    from spec_core.assets import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("untied"), smollm2_dir, tie=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models' ops are too small to split; on a busy 2-core box two OpenMP threads
    make every op wait for a time slice (measured 20-50x slower), so modules that generate text
    use one (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def queue_address():
    """A fresh key-queue TCPStore on 127.0.0.1 (tests using it run in a private network
    namespace)."""
    from spec_core.transfer.queue import start_queue_server

    store, port = start_queue_server("127.0.0.1")
    yield f"127.0.0.1:{port}"
    del store
