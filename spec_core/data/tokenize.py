"""Prepare training data: load, hold out eval conversations, tokenize with ``datasets.map``, and
save Arrow datasets under ``work_dir/tokenized/<cache_key>/``.

The cache key hashes everything that changes the output (dataset bytes, every tokenizer file,
template name, mask/length/split options, and the sources in ``TOKENIZED_CODE``; the pieces are
shared with the other caches in ``spec_core.utils.fingerprint``) and nothing else, so it is
computed without tokenizing and a run re-tokenizes only when one of them changed. Entries are built
in a temporary directory and renamed into place, so a crash never leaves a half-written entry.

Splits: ``max_conversations`` keeps the first N valid conversations in file order; then
``eval_conversations`` of those are held out, chosen by ``random.Random(seed)``, before
tokenization. Samples are kept in file order (the trainer shuffles).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from spec_core.assets import resolve_dataset_path
from spec_core.config import Config, DatasetConfig
from spec_core.data.conversation import Conversation, InvalidRecord, Message
from spec_core.data.load import dataset_fingerprint, load_conversations
from spec_core.data.render import ConversationRenderer, load_tokenizer, wants_last_turn_only
from spec_core.data.report import DataReport
from spec_core.errors import DataError
from spec_core.paths import RunPaths, cache_dir
from spec_core.utils.files import atomic_write_json, publish_dir, staging_dir
from spec_core.utils.fingerprint import (
    TOKENIZED_CODE,
    cache_key,
    code_version,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)

NO_LOSS_TOKENS = "no_loss_tokens"
TOO_FEW_LOSS_TOKENS = "too_few_loss_tokens"
MANIFEST = "prepared.json"
TRAIN_COLUMNS = ["sample_id", "input_ids", "loss_mask", "num_tokens", "num_loss_tokens"]
EVAL_COLUMNS = TRAIN_COLUMNS + ["messages"]


@dataclass
class PrepareReport:
    data_path: str
    template: str  # registry entry whose markers build the masks
    data: DataReport  # skips by reason, from loading and tokenization
    conversations: int = 0  # valid conversations used (after max_conversations)
    train_samples: int = 0
    eval_samples: int = 0
    train_tokens: int = 0
    train_loss_tokens: int = 0
    eval_tokens: int = 0
    eval_loss_tokens: int = 0
    truncated: int = 0  # kept samples cut at max_seq_length
    last_turn_only: int = 0  # kept samples supervised on their last turn only
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each build stage

    @property
    def total_tokens(self) -> int:
        return self.train_tokens + self.eval_tokens

    @property
    def supervised_tokens(self) -> int:
        return self.train_loss_tokens + self.eval_loss_tokens

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "data"}
        out["total_tokens"] = self.total_tokens
        out["supervised_tokens"] = self.supervised_tokens
        out["skipped"] = dict(self.data.skipped.most_common())
        out["data"] = self.data.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepareReport:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["data"] = DataReport.from_dict(data["data"])
        return cls(**fields)

    def lines(self) -> list[str]:
        return [
            f"data: {self.data_path} (template markers: {self.template})",
            *self.data.lines(),
            f"train: {self.train_samples} samples, {self.train_tokens} tokens, "
            f"{self.train_loss_tokens} supervised",
            f"eval:  {self.eval_samples} samples, {self.eval_tokens} tokens, "
            f"{self.eval_loss_tokens} supervised",
            f"truncated: {self.truncated}, last-turn-only: {self.last_turn_only}",
            "built in "
            + ", ".join(
                f"{stage} {self.seconds[stage]:.1f}s"
                for stage in ("load", "tokenize", "save")
                if stage in self.seconds
            ),
        ]


@dataclass
class PreparedData:
    train_path: Path
    eval_path: Path
    cache_key: str
    cached: bool
    report: PrepareReport = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_path": str(self.train_path),
            "eval_path": str(self.eval_path),
            "cache_key": self.cache_key,
            "cached": self.cached,
            "report": self.report.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreparedData:
        return cls(
            Path(data["train_path"]),
            Path(data["eval_path"]),
            data["cache_key"],
            bool(data["cached"]),
            PrepareReport.from_dict(data["report"]),
        )


def dataset_cache_key(cfg: DatasetConfig, tokenizer_dir: Path, cache_dir: Path) -> str:
    """The key ``prepare_dataset`` stores under, computed by hashing files only."""
    data_path = resolve_dataset_path(cfg.path, Path(cache_dir), cfg.min_turns)
    return _cache_key(cfg, data_path, Path(tokenizer_dir))


def _cache_key(cfg: DatasetConfig, data_path: Path, tokenizer_dir: Path) -> str:
    return cache_key(
        {
            "messages_key": cfg.messages_key,
            "chat_template": cfg.chat_template,
            "last_turn_loss_only": cfg.last_turn_loss_only,
            "max_seq_length": cfg.max_seq_length,
            "min_loss_tokens": cfg.min_loss_tokens,
            "max_conversations": cfg.max_conversations,
            "max_record_bytes": cfg.max_record_bytes,
            "eval_conversations": cfg.eval_conversations,
            "seed": cfg.seed,
            "code": code_version(TOKENIZED_CODE),
            "dataset": dataset_fingerprint(data_path),
            "tokenizer": tokenizer_fingerprint(tokenizer_dir),
        }
    )


def prepare_dataset(
    cfg: DatasetConfig,
    tokenizer_dir: Path,
    work_dir: Path,
    cache_dir: Path,
    progress: bool = True,
) -> PreparedData:
    """Tokenized train/eval datasets for ``cfg``, from the cache when the key matches."""
    tokenizer_dir, work_dir = Path(tokenizer_dir), Path(work_dir)
    data_path = resolve_dataset_path(cfg.path, Path(cache_dir), cfg.min_turns)
    key = _cache_key(cfg, data_path, tokenizer_dir)
    out = work_dir / "tokenized" / key
    if (out / MANIFEST).is_file():
        prepared = _read_manifest(out, cached=True)
        log.info("tokenized data cache hit: %s", out)
        return prepared
    tmp = staging_dir(out)
    try:
        with _progress_bars(progress):
            report = _build(cfg, data_path, tokenizer_dir, tmp, key, progress)
        atomic_write_json(
            tmp / MANIFEST, {"cache_key": key, "report": report.to_dict()}, sort_keys=True
        )
        shutil.rmtree(tmp / "scratch", ignore_errors=True)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in report.lines():
        log.info(line)
    return _read_manifest(out, cached=False)


def prepare_run_dataset(cfg: Config, target_dir: Path, progress: bool = True) -> PreparedData:
    """``prepare_dataset`` for a run: the configured dataset, tokenized for ``target_dir`` into
    the run's work dir, so every stage of one config finds the same cache entry."""
    work_dir = RunPaths.from_config(cfg).work_dir
    return prepare_dataset(cfg.dataset, target_dir, work_dir, cache_dir(cfg), progress=progress)


def _build(
    cfg: DatasetConfig, data_path: Path, tokenizer_dir: Path, tmp: Path, key: str, progress: bool
) -> PrepareReport:
    clock = _Stopwatch()
    loaded = load_conversations(
        data_path,
        cfg.messages_key,
        limit=cfg.max_conversations,
        progress=progress,
        max_record_bytes=cfg.max_record_bytes,
    )
    convs = loaded.conversations
    eval_set = set(_eval_indices(len(convs), cfg.eval_conversations, cfg.seed, data_path))
    # Build one renderer here so template problems fail fast, before any worker starts.
    renderer = ConversationRenderer(load_tokenizer(tokenizer_dir), cfg.chat_template)
    table = _input_table(convs, loaded.locations, eval_set, cfg.last_turn_loss_only)
    load_s = clock.lap()
    _INHERITED_RENDERER[key] = renderer
    try:
        mapped = _tokenize_table(table, cfg, tokenizer_dir, tmp / "scratch", key)
    finally:
        _INHERITED_RENDERER.pop(key, None)
    tokenize_s = clock.lap()
    report = PrepareReport(str(data_path), renderer.template_name, loaded.report, len(convs))
    train_rows, eval_rows = _split_and_count(mapped, report)
    if not train_rows:
        raise DataError(
            f"no valid training samples remain in {data_path}: {report.data.one_line()}"
        )
    _save(mapped.select(train_rows).select_columns(TRAIN_COLUMNS), tmp / "train")
    _save(mapped.select(eval_rows).select_columns(EVAL_COLUMNS), tmp / "eval")
    report.seconds = {"load": load_s, "tokenize": tokenize_s, "save": clock.lap()}
    return report


def _save(split: Any, path: Path) -> None:
    # datasets writes zero shards for an empty split and then cannot load it: force one
    split.save_to_disk(str(path), num_shards=1 if len(split) == 0 else None)


class _Stopwatch:
    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return round(elapsed, 3)


def _input_table(
    convs: list[Conversation], locations: list[str], eval_set: set[int], last_turn_option: str
) -> Any:
    import datasets

    return datasets.Dataset.from_dict(
        {
            "sample_id": [c.id for c in convs],
            "messages": [json.dumps(c.to_dict(), ensure_ascii=False) for c in convs],
            "last_turn_only": [wants_last_turn_only(c, last_turn_option) for c in convs],
            "location": locations,
            "is_eval": [i in eval_set for i in range(len(convs))],
        }
    )


def _tokenize_table(
    table: Any, cfg: DatasetConfig, tokenizer_dir: Path, scratch: Path, key: str
) -> Any:
    """``datasets.map`` over ``cfg.num_proc`` workers; rows keep a skip reason instead of
    disappearing, so every drop is counted."""
    import datasets

    features = table.features.copy()
    features.update(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "loss_mask": datasets.List(datasets.Value("uint8")),
            "num_tokens": datasets.Value("int32"),
            "num_loss_tokens": datasets.Value("int32"),
            "full_length": datasets.Value("int32"),
            "skip_reason": datasets.Value("string"),
            "skip_detail": datasets.Value("string"),
        }
    )
    num_proc = max(1, min(cfg.num_proc, len(table) // 32))
    scratch.mkdir(parents=True, exist_ok=True)
    return table.map(
        TokenizeBatch(
            key, str(tokenizer_dir), cfg.chat_template, cfg.max_seq_length, cfg.min_loss_tokens
        ),
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc > 1 else None,
        features=features,
        cache_file_name=str(scratch / "tokenized.arrow"),
        new_fingerprint=scratch.parent.name.replace(".", "-"),
        desc="tokenizing",
    )


def _split_and_count(mapped: Any, report: PrepareReport) -> tuple[list[int], list[int]]:
    """Count skips into ``report`` and return the kept train and eval row indices."""
    column = {
        name: mapped.data.column(name).to_pylist()
        for name in ("skip_reason", "skip_detail", "location", "is_eval", "last_turn_only")
    }
    train_rows, eval_rows = [], []
    for i, reason in enumerate(column["skip_reason"]):
        if reason:
            report.data.skip(reason, column["location"][i], column["skip_detail"][i])
        else:
            (eval_rows if column["is_eval"][i] else train_rows).append(i)
    lengths, loss, full = (
        mapped.data.column(name).to_numpy().astype(np.int64)
        for name in ("num_tokens", "num_loss_tokens", "full_length")
    )
    kept = train_rows + eval_rows
    report.data.valid = len(kept)
    report.train_samples, report.eval_samples = len(train_rows), len(eval_rows)
    report.train_tokens = int(lengths[train_rows].sum())
    report.eval_tokens = int(lengths[eval_rows].sum())
    report.train_loss_tokens = int(loss[train_rows].sum())
    report.eval_loss_tokens = int(loss[eval_rows].sum())
    report.truncated = int((full[kept] > lengths[kept]).sum())
    report.last_turn_only = sum(column["last_turn_only"][i] for i in kept)
    return train_rows, eval_rows


# The renderer ``_build`` made for a cache key, while ``datasets.map`` runs: workers forked from
# this process inherit it instead of loading the tokenizer again (spawned ones load their own).
_INHERITED_RENDERER: dict[str, ConversationRenderer] = {}


class TokenizeBatch:
    """``datasets.map`` function; the renderer comes from the parent (fork) or is loaded once."""

    def __init__(
        self,
        key: str,
        tokenizer_dir: str,
        template: Optional[str],
        max_seq_length: int,
        min_loss_tokens: int,
    ):
        self.key = key
        self.tokenizer_dir = tokenizer_dir
        self.template = template
        self.max_seq_length = max_seq_length
        self.min_loss_tokens = max(1, min_loss_tokens)
        self._renderer: Optional[ConversationRenderer] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_renderer": None}

    def renderer(self) -> ConversationRenderer:
        if self._renderer is None:
            self._renderer = _INHERITED_RENDERER.get(self.key)
        if self._renderer is None:
            tokenizer = load_tokenizer(self.tokenizer_dir)
            self._renderer = ConversationRenderer(tokenizer, self.template)
        return self._renderer

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        renderer = self.renderer()
        n = len(batch["messages"])
        out: dict[str, list] = {
            "input_ids": [np.zeros(0, np.int32)] * n,
            "loss_mask": [np.zeros(0, np.uint8)] * n,
            "num_tokens": [0] * n,
            "num_loss_tokens": [0] * n,
            "full_length": [0] * n,
            "skip_reason": [""] * n,
            "skip_detail": [""] * n,
        }
        texts, rendered = [], []
        for i, raw in enumerate(batch["messages"]):
            try:
                texts.append(renderer.render(_normalized_conversation(json.loads(raw))))
                rendered.append(i)
            except InvalidRecord as exc:
                out["skip_reason"][i], out["skip_detail"][i] = exc.reason, exc.detail
        last = [batch["last_turn_only"][i] for i in rendered]
        for i, sample in zip(
            rendered, renderer.tokenize_texts(texts, last, self.max_seq_length), strict=True
        ):
            out["input_ids"][i], out["loss_mask"][i] = sample.input_ids, sample.loss_mask
            out["num_tokens"][i] = len(sample.input_ids)
            out["num_loss_tokens"][i] = n_loss = sample.num_loss_tokens
            out["full_length"][i] = sample.full_length
            if n_loss < self.min_loss_tokens:
                out["skip_reason"][i], out["skip_detail"][i] = self._too_few(sample, n_loss)
        return out

    def _too_few(self, sample: Any, n_loss: int) -> tuple[str, str]:
        cut = (
            f" in the first {self.max_seq_length} of {sample.full_length} tokens"
            if sample.truncated
            else ""
        )
        if n_loss == 0:
            return NO_LOSS_TOKENS, f"no assistant tokens{cut}"
        return TOO_FEW_LOSS_TOKENS, (
            f"{n_loss} assistant tokens{cut} < dataset.min_loss_tokens={self.min_loss_tokens}"
        )


def _normalized_conversation(record: dict[str, Any]) -> Conversation:
    """Rebuild a conversation this module serialized itself (already validated)."""
    return Conversation(record["id"], [Message(**m) for m in record["messages"]])


def _eval_indices(n: int, k: int, seed: int, data_path: Path) -> list[int]:
    if k < 0:
        raise DataError(f"'dataset.eval_conversations' must be >= 0, got {k}")
    if k >= n:
        raise DataError(
            f"'dataset.eval_conversations' ({k}) leaves no training data: only {n} valid "
            f"conversations in {data_path}; lower it or add data"
        )
    return sorted(random.Random(seed).sample(range(n), k))


def load_tokenized(path: Path) -> Any:
    """A split saved by ``prepare_dataset`` as a ``datasets.Dataset``."""
    import datasets

    path = Path(path)
    if not (path / "state.json").is_file():
        raise DataError(f"{path} is not a tokenized split (no state.json); run prepare_dataset")
    return datasets.load_from_disk(str(path))


def load_eval_conversations(path: Path) -> list[Conversation]:
    """The held-out conversations of an eval split (its ``messages`` column), in split order."""
    ds = load_tokenized(path)
    return [Conversation.from_dict(json.loads(m)) for m in ds.data.column("messages").to_pylist()]


def _read_manifest(out: Path, cached: bool) -> PreparedData:
    manifest = json.loads((out / MANIFEST).read_text())
    return PreparedData(
        out / "train",
        out / "eval",
        manifest["cache_key"],
        cached,
        PrepareReport.from_dict(manifest["report"]),
    )


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if enabled:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
        else:
            datasets.disable_progress_bars()
