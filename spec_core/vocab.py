"""Draft vocabulary: the ``draft_vocab_size`` target tokens the draft's LM head predicts.

Frequencies are counted over supervised (loss-masked) tokens of the tokenized training split, the
most frequent ids are kept (ties -> lower id) and sorted ascending, and the map is stored as
``vocab_map.safetensors`` (``d2t`` int64 offsets, target_id = draft_id + d2t[draft_id]; ``t2d`` bool
over the target vocab) next to ``coverage.json``: the fraction of supervised tokens covered at
several sizes, like TorchSpec's ``--analyze-vocab``.

Fewer distinct supervised tokens than ``draft_vocab_size``: every supervised token is kept and the
remaining slots go to tokens seen only in unsupervised positions (prompt text, most frequent
first), then to the lowest unseen ids. The map always has exactly ``draft_vocab_size`` entries and
``coverage.json`` says how many slots were filled each way.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from spec_core.errors import ConfigError, DataError
from spec_core.utils.cli import config_parser, parse_config_args, run_main
from spec_core.utils.files import atomic_write_json, publish_dir, staging_dir
from spec_core.utils.fingerprint import (
    VOCAB_CODE,
    cache_key,
    code_version,
    files_digest,
    tree_files,
)

log = logging.getLogger(__name__)

VOCAB_MAP_FILE = "vocab_map.safetensors"
COVERAGE_FILE = "coverage.json"
_VOCAB_FORMAT = "1"  # bump when selection or file layout changes


@dataclass
class VocabMap:
    d2t: torch.Tensor  # int64 [draft_vocab]: target_id = draft_id + d2t[draft_id]
    t2d: torch.Tensor  # bool [target_vocab]: kept target ids
    draft_vocab_size: int
    target_vocab_size: int

    @property
    def kept_ids(self) -> torch.Tensor:
        """Target ids of the draft vocabulary, ascending (draft id order)."""
        return torch.arange(self.draft_vocab_size, dtype=torch.int64) + self.d2t

    def draft_to_target(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int64)
        return ids + self.d2t.to(ids.device)[ids]

    @cached_property
    def _draft_of_target(self) -> torch.Tensor:
        lookup = torch.full((self.target_vocab_size,), -1, dtype=torch.int64)
        lookup[self.kept_ids] = torch.arange(self.draft_vocab_size, dtype=torch.int64)
        return lookup

    def target_to_draft(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of target ids; -1 where a target id is not in the draft vocabulary."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        return self._draft_of_target.to(ids.device)[ids]


@dataclass
class VocabResult:
    vocab_map_path: Path
    coverage_path: Path
    cache_key: str
    cached: bool
    draft_vocab_size: int
    target_vocab_size: int
    coverage: float  # fraction of supervised training tokens the kept ids cover

    def to_dict(self) -> dict[str, Any]:
        return {
            "vocab_map_path": str(self.vocab_map_path),
            "coverage_path": str(self.coverage_path),
            "cache_key": self.cache_key,
            "cached": self.cached,
            "draft_vocab_size": self.draft_vocab_size,
            "target_vocab_size": self.target_vocab_size,
            "coverage": self.coverage,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VocabResult:
        return cls(
            Path(data["vocab_map_path"]),
            Path(data["coverage_path"]),
            data["cache_key"],
            bool(data["cached"]),
            int(data["draft_vocab_size"]),
            int(data["target_vocab_size"]),
            float(data["coverage"]),
        )


def vocab_cache_key(
    train_path: Path,
    target_vocab_size: int,
    draft_vocab_size: int,
    coverage_sizes: list[int],
) -> str:
    """Key of a vocab map: the tokenized data's cache key (or a hash of its files) + sizes."""
    train_path = Path(train_path)
    manifest = train_path.parent / "prepared.json"
    if manifest.is_file():
        data_key = json.loads(manifest.read_text())["cache_key"]
    else:
        data_key = files_digest(tree_files(train_path))
    code = code_version(VOCAB_CODE) + _VOCAB_FORMAT
    return cache_key(
        [data_key, int(target_vocab_size), int(draft_vocab_size), sorted(coverage_sizes), code]
    )


def build_vocab_map(
    train_path: Path,
    target_vocab_size: int,
    draft_vocab_size: int,
    out_root: Path,
    coverage_sizes: list[int],
    progress: bool = False,
) -> VocabResult:
    """Count supervised tokens in ``train_path`` and store the draft vocab map under
    ``out_root/<cache_key>/`` (reused when the key matches)."""
    if draft_vocab_size <= 0 or draft_vocab_size > target_vocab_size:
        raise ConfigError(
            f"'vocab.draft_vocab_size' must be in [1, {target_vocab_size}] (the target vocab), "
            f"got {draft_vocab_size}"
        )
    key = vocab_cache_key(train_path, target_vocab_size, draft_vocab_size, coverage_sizes)
    out = Path(out_root) / key
    if (out / COVERAGE_FILE).is_file() and (out / VOCAB_MAP_FILE).is_file():
        return _result(out, key, cached=True)
    supervised, seen = count_tokens(Path(train_path), target_vocab_size, progress)
    kept, filled = select_tokens(supervised, seen, draft_vocab_size)
    coverage = coverage_report(supervised, draft_vocab_size, coverage_sizes, kept)
    coverage.update(filled)
    coverage.update(
        {
            "cache_key": key,
            "train_path": str(train_path),
            "draft_vocab_size": draft_vocab_size,
            "target_vocab_size": target_vocab_size,
        }
    )
    tmp = staging_dir(out)
    try:
        save_vocab_map(tmp / VOCAB_MAP_FILE, kept, target_vocab_size)
        atomic_write_json(tmp / COVERAGE_FILE, coverage)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "draft vocab %d/%d covers %.4f of %d supervised tokens",
        draft_vocab_size,
        target_vocab_size,
        coverage["selected_coverage"],
        coverage["supervised_tokens"],
    )
    return _result(out, key, cached=False)


def count_tokens(
    train_path: Path, target_vocab_size: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-id counts over supervised positions, and over all positions."""
    import pyarrow.compute as pc
    from tqdm.auto import tqdm

    from spec_core.data.tokenize import load_tokenized

    ds = load_tokenized(train_path)
    supervised = np.zeros(target_vocab_size, dtype=np.int64)
    seen = np.zeros(target_vocab_size, dtype=np.int64)
    with tqdm(total=len(ds), desc="counting tokens", unit=" sample", disable=not progress) as bar:
        for batch in ds.with_format("arrow").iter(batch_size=1024):
            ids = pc.list_flatten(batch["input_ids"]).to_numpy().astype(np.int64)
            mask = pc.list_flatten(batch["loss_mask"]).to_numpy().astype(bool)
            if ids.size and (ids.max() >= target_vocab_size or ids.min() < 0):
                raise DataError(
                    f"{train_path}: token id {int(ids.max())} is outside the target vocab "
                    f"({target_vocab_size}); the data was tokenized for another model"
                )
            supervised += np.bincount(ids[mask], minlength=target_vocab_size)
            seen += np.bincount(ids, minlength=target_vocab_size)
            bar.update(batch.num_rows)
    if supervised.sum() == 0:
        raise DataError(f"{train_path}: no supervised tokens to count")
    return supervised, seen


def select_tokens(
    supervised: np.ndarray, seen: np.ndarray, draft_vocab_size: int
) -> tuple[np.ndarray, dict[str, int]]:
    """Top ids by (supervised count, count anywhere, lower id), returned ascending."""
    ids = np.arange(len(supervised))
    order = np.lexsort((ids, -seen, -supervised))  # last key is the primary one
    kept = np.sort(order[:draft_vocab_size])
    unique = int((supervised > 0).sum())
    filled = {
        "unique_supervised_tokens": unique,
        "filled_from_unsupervised": int(((supervised[kept] == 0) & (seen[kept] > 0)).sum()),
        "filled_unseen": int((seen[kept] == 0).sum()),
    }
    if unique < draft_vocab_size:
        log.warning(
            "only %d distinct supervised tokens for a draft vocab of %d: %d slots filled from "
            "prompt tokens, %d with unseen ids",
            unique,
            draft_vocab_size,
            filled["filled_from_unsupervised"],
            filled["filled_unseen"],
        )
    return kept, filled


def coverage_report(
    supervised: np.ndarray, draft_vocab_size: int, sizes: list[int], kept: np.ndarray
) -> dict[str, Any]:
    """Fraction of supervised tokens that the top-k ids cover, for each k."""
    total = int(supervised.sum())
    cumulative = np.cumsum(np.sort(supervised)[::-1])
    unique = int((supervised > 0).sum())
    vocab = len(supervised)
    points = sorted(k for k in {*sizes, draft_vocab_size, unique, vocab} if 0 < k <= vocab)
    return {
        "supervised_tokens": total,
        "selected_coverage": float(supervised[kept].sum() / total),
        "coverage": [{"size": k, "coverage": float(cumulative[k - 1] / total)} for k in points],
    }


def save_vocab_map(path: Path, kept: np.ndarray, target_vocab_size: int) -> None:
    from safetensors.torch import save_file

    kept_t = torch.as_tensor(np.asarray(kept), dtype=torch.int64)
    d2t = kept_t - torch.arange(len(kept_t), dtype=torch.int64)
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[kept_t] = True
    save_file(
        {"d2t": d2t.contiguous(), "t2d": t2d},
        str(path),
        metadata={
            "draft_vocab_size": str(len(kept_t)),
            "target_vocab_size": str(target_vocab_size),
        },
    )


def load_vocab_map(path: Path) -> VocabMap:
    """Load ``vocab_map.safetensors`` (or the directory holding it) and check its invariants."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / VOCAB_MAP_FILE
    if not path.is_file():
        raise DataError(f"vocab map {path} not found; run `specflow vocab` first")
    tensors = load_file(str(path))
    if set(tensors) != {"d2t", "t2d"}:
        raise DataError(f"{path}: expected tensors d2t and t2d, found {sorted(tensors)}")
    d2t, t2d = tensors["d2t"], tensors["t2d"]
    if d2t.dtype != torch.int64 or t2d.dtype != torch.bool:
        raise DataError(f"{path}: d2t must be int64 and t2d bool, got {d2t.dtype}/{t2d.dtype}")
    vocab_map = VocabMap(d2t, t2d, len(d2t), len(t2d))
    kept = vocab_map.kept_ids
    ascending = bool((kept[1:] > kept[:-1]).all())
    if int(t2d.sum()) != len(d2t) or not ascending or not bool(t2d[kept].all()):
        raise DataError(f"{path}: d2t and t2d disagree; rebuild it with `specflow vocab`")
    return vocab_map


def _result(out: Path, key: str, cached: bool) -> VocabResult:
    coverage = json.loads((out / COVERAGE_FILE).read_text())
    return VocabResult(
        out / VOCAB_MAP_FILE,
        out / COVERAGE_FILE,
        key,
        cached,
        coverage["draft_vocab_size"],
        coverage["target_vocab_size"],
        coverage["selected_coverage"],
    )


def target_vocab_size(target_dir: Path) -> int:
    """The target model's vocab size (its LM head rows) from its ``config.json``."""
    config_path = Path(target_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {config_path}: {exc}") from None
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(size, int):
        raise ConfigError(f"{config_path} has no integer vocab_size")
    return size


def main(argv: Optional[list[str]] = None) -> int:
    """``specflow vocab``: prepare the data (cached) and build the draft vocab map."""
    from spec_core.assets import resolve_target
    from spec_core.data.tokenize import prepare_run_dataset
    from spec_core.paths import RunPaths

    parser = config_parser("specflow vocab", "Build the draft vocabulary map and coverage report.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args, cfg = parse_config_args(parser, argv)
    target_dir = resolve_target(cfg)
    prepared = prepare_run_dataset(cfg, target_dir, progress=not args.quiet)
    vocab = target_vocab_size(target_dir)
    draft = cfg.vocab.draft_vocab_size or vocab
    result = build_vocab_map(
        prepared.train_path,
        vocab,
        draft,
        RunPaths.from_config(cfg).vocab_dir,
        cfg.vocab.coverage_sizes,
        progress=not args.quiet,
    )
    report = json.loads(result.coverage_path.read_text())
    if cfg.vocab.draft_vocab_size is None:
        print("vocab.draft_vocab_size is null: the map keeps the full target vocabulary")
    print(f"vocab map: {result.vocab_map_path}{' (cached)' if result.cached else ''}")
    print(f"coverage report: {result.coverage_path}")
    print(
        f"draft vocab {draft} of {vocab}: covers {result.coverage:.4f} of "
        f"{report['supervised_tokens']} supervised tokens "
        f"({report['unique_supervised_tokens']} distinct)"
    )
    for point in report["coverage"]:
        print(f"  top {point['size']:>6}: {point['coverage']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
