"""Data tasks: the target's files, tokenized data and the draft vocab map.

Tokenization and the vocab map are cached by Prefect on the data engineer's content keys (hash of
the data, tokenizer files, template, lengths, mask options and code) plus the work dir the files
live in, with results persisted as JSON next to those files (``<work_dir>/prefect``). A re-run
with the same inputs shows both as Cached; any changed input makes a new key, so they run again.
None of these retries: a failure here is bad data or config, and a retry would fail the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from spec_core import assets
from spec_core.config import Config, config_from_dict
from spec_core.data.tokenize import dataset_cache_key, prepare_run_dataset
from spec_core.paths import RunPaths, cache_dir
from spec_core.vocab import build_vocab_map as build_vocab
from spec_core.vocab import target_vocab_size, vocab_cache_key

# A stage's content key from the resolved config and the task's parameters.
ContentKey = Callable[[Config, dict[str, Any]], str]


def work_dir(cfg: Config) -> Path:
    return RunPaths.from_config(cfg).work_dir


def result_dir(config: dict[str, Any]) -> Path:
    """Where the cached tasks persist their results: beside the content-addressed files, so
    deleting the work dir forgets both together."""
    return work_dir(config_from_dict(config)) / "prefect"


def work_dir_tag(cfg: Config) -> str:
    """Short hash of the work dir: a Prefect cache key names where its files live, so the same
    inputs under another ``run.output_dir`` are built there instead of pointing at stale paths."""
    return hashlib.sha256(str(work_dir(cfg)).encode()).hexdigest()[:8]


def content_cached_task(name: str, key_prefix: str, content_key: ContentKey) -> Any:
    """``@task`` for a data stage Prefect caches on ``content_key`` plus the work dir, its result
    persisted as JSON (``pipeline.cached`` points the storage at ``result_dir``)."""

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        cfg = config_from_dict(parameters["config"])
        return f"{key_prefix}-{content_key(cfg, parameters)}-{work_dir_tag(cfg)}"

    return task(name=name, cache_key_fn=cache_key, persist_result=True, result_serializer="json")


def _tokenize_key(cfg: Config, parameters: dict[str, Any]) -> str:
    return dataset_cache_key(cfg.dataset, Path(parameters["target_dir"]), cache_dir(cfg))


def _vocab_key(cfg: Config, parameters: dict[str, Any]) -> str:
    size = cfg.vocab.draft_vocab_size
    assert size is not None
    return vocab_cache_key(
        Path(parameters["train_path"]),
        target_vocab_size(Path(parameters["target_dir"])),
        size,
        cfg.vocab.coverage_sizes,
    )


@task(name="resolve-target")
def resolve_target(config: dict[str, Any]) -> str:
    """The target's HF dir (the builtin SmolLM2 is materialized into the cache on first use)."""
    cfg = config_from_dict(config)
    return str(assets.resolve_target(cfg))


@content_cached_task("tokenize-dataset", "tokenize", _tokenize_key)
def tokenize_dataset(config: dict[str, Any], target_dir: str) -> dict[str, Any]:
    """``PreparedData.to_dict()``: train/eval split paths, cache key and the data report."""
    cfg = config_from_dict(config)
    prepared = prepare_run_dataset(cfg, Path(target_dir), progress=False)
    logger = get_run_logger()
    for line in prepared.report.lines():
        logger.info(line)
    return prepared.to_dict()


@content_cached_task("build-vocab-map", "vocab", _vocab_key)
def build_vocab_map(config: dict[str, Any], train_path: str, target_dir: str) -> dict[str, Any]:
    """``VocabResult.to_dict()``: the d2t/t2d map and its coverage of the supervised tokens."""
    cfg = config_from_dict(config)
    size = cfg.vocab.draft_vocab_size
    assert size is not None, "build_vocab_map needs vocab.draft_vocab_size"
    result = build_vocab(
        Path(train_path),
        target_vocab_size(Path(target_dir)),
        size,
        RunPaths.from_config(cfg).vocab_dir,
        cfg.vocab.coverage_sizes,
    )
    get_run_logger().info(
        "draft vocab %d/%d covers %.4f of the supervised tokens (%s)",
        result.draft_vocab_size,
        result.target_vocab_size,
        result.coverage,
        result.vocab_map_path,
    )
    return result.to_dict()


def missing_outputs(result: Optional[dict[str, Any]], *keys: str) -> list[str]:
    """Paths a cached result names that no longer exist (then the flow refreshes the cache)."""
    if result is None:
        return []
    return [result[k] for k in keys if not Path(result[k]).exists()]
