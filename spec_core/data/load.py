"""Read conversations from local files: JSON (array or lines), JSONL, Parquet, Arrow, a ``datasets``
save dir, or a directory of those.

Each bad record is skipped and counted by reason with its location (``file.jsonl:17``); the load
fails with one line only when nothing valid remains. ``limit`` keeps the first N valid
conversations in file order (files sorted by relative path), which is what ``max_conversations``
means everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from spec_core.data import conversation as cv
from spec_core.data.conversation import Conversation, InvalidRecord
from spec_core.data.report import DataReport
from spec_core.errors import ConfigError, DataError
from spec_core.utils.fingerprint import files_digest

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
_SAVE_DIR_MARKERS = ("state.json", "dataset_dict.json")


@dataclass
class LoadResult:
    conversations: list[Conversation]
    report: DataReport
    locations: list[str] = field(default_factory=list)  # parallel to conversations


# A source yields (location, record) or (location, InvalidRecord) for unreadable pieces.
Item = tuple[str, Any]


def load_conversations(
    path: Path,
    messages_key: Optional[str] = None,
    *,
    limit: Optional[int] = None,
    progress: bool = False,
) -> LoadResult:
    """Load and normalize every conversation under ``path``; raise DataError if none is valid."""
    path = Path(path)
    sources = data_sources(path)
    report = DataReport(files=[_display_name(path, s) for s in sources])
    conversations: list[Conversation] = []
    locations: list[str] = []
    seen_ids: dict[str, int] = {}
    bar = tqdm(desc="loading", unit=" conv", disable=not progress, leave=False)
    items = read_records(path)
    try:
        for location, record in items:
            if limit is not None and len(conversations) >= limit:
                break
            bar.update(1)
            if isinstance(record, InvalidRecord):
                if record.reason not in (cv.EMPTY_FILE, cv.UNREADABLE_FILE):
                    report.records += 1
                report.skip(record.reason, location, record.detail)
                continue
            report.records += 1
            try:
                conv = cv.normalize_record(record, messages_key)
            except InvalidRecord as exc:
                report.skip(exc.reason, location, exc.detail)
                continue
            repeats = seen_ids.get(conv.id, 0)
            seen_ids[conv.id] = repeats + 1
            if repeats:
                conv.id = f"{conv.id}#{repeats + 1}"
                report.renamed_duplicate_ids += 1
            conversations.append(conv)
            locations.append(location)
    finally:
        bar.close()
    report.valid = len(conversations)
    if not conversations:
        raise DataError(f"no valid conversations in {path}: {report.one_line()}")
    return LoadResult(conversations, report, locations)


def read_records(path: Path) -> Iterator[Item]:
    """(location, raw record) of every record under ``path``, in ``load_conversations`` order;
    unreadable pieces come as ``InvalidRecord`` (for callers whose records are not chats)."""
    path = Path(path)
    for source in data_sources(path):
        yield from _read_source(source, _display_name(path, source))


def data_sources(path: Path) -> list[Path]:
    """The files (and ``datasets`` save dirs) to read, sorted by relative path."""
    if not path.exists():
        raise ConfigError(f"dataset path {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise ConfigError(
                f"unsupported dataset file type '{path.suffix}' ({path}); use "
                + ", ".join(DATA_SUFFIXES)
                + ", a datasets save dir, or a directory of those"
            )
        return [path]
    found = _collect(path)
    if not found:
        raise ConfigError(
            f"dataset directory {path} holds no {', '.join(DATA_SUFFIXES)} files "
            "or datasets save dirs"
        )
    return found


def dataset_fingerprint(path: Path) -> str:
    """sha256 over every data file ``data_sources`` reads (names relative to ``path``, bytes)."""
    path = Path(path)
    files = []
    for source in data_sources(path):
        inner = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        files += [(str(f.relative_to(path)) if path.is_dir() else f.name, f) for f in inner]
    return files_digest(files)


def _collect(directory: Path) -> list[Path]:
    if _is_save_dir(directory):
        return [directory]
    found: list[Path] = []
    for child in sorted(directory.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            found += _collect(child)
        elif child.suffix.lower() in DATA_SUFFIXES:
            found.append(child)
    return found


def _is_save_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _SAVE_DIR_MARKERS)


def _display_name(root: Path, source: Path) -> str:
    return source.name if source == root else str(source.relative_to(root))


def _read_source(source: Path, name: str) -> Iterator[Item]:
    if source.is_dir():
        yield from _read_save_dir(source, name)
        return
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_json_lines(source, name)
    elif suffix == ".json":
        yield from _read_json(source, name)
    elif suffix == ".parquet":
        yield from _read_parquet(source, name)
    else:
        yield from _read_arrow(source, name)


def _read_json_lines(path: Path, name: str, data: Optional[bytes] = None) -> Iterator[Item]:
    raw = path.read_bytes() if data is None else data
    any_line = False
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        any_line = True
        location = f"{name}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                location,
                InvalidRecord(cv.NON_UTF8, f"invalid UTF-8 byte at column {exc.start + 1}"),
            )
            continue
        try:
            yield location, json.loads(text)
        except ValueError as exc:
            yield location, InvalidRecord(cv.MALFORMED_JSON, str(exc).split(":")[0])
    if not any_line:
        yield name, InvalidRecord(cv.EMPTY_FILE, "no records")


def _read_json(path: Path, name: str) -> Iterator[Item]:
    """A JSON array (or one object), else JSON lines: the first non-blank byte decides."""
    raw = path.read_bytes()
    stripped = raw.lstrip()
    if not stripped.startswith(b"["):
        # '{' may start one pretty-printed object or the first of many lines.
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            yield from _read_json_lines(path, name, raw)
            return
        yield f"{name}:1", value
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        yield (
            f"{name}:{line}",
            InvalidRecord(
                cv.UNREADABLE_FILE, f"invalid UTF-8 byte in a JSON array file (line {line})"
            ),
        )
        return
    try:
        records = json.loads(text)
    except ValueError as exc:
        line = getattr(exc, "lineno", "?")
        yield (
            f"{name}:{line}",
            InvalidRecord(cv.UNREADABLE_FILE, f"malformed JSON array: {str(exc).split(':')[0]}"),
        )
        return
    if not records:
        yield name, InvalidRecord(cv.EMPTY_FILE, "empty JSON array")
    for i, record in enumerate(records):
        yield f"{name}[{i}]", record


def _read_parquet(path: Path, name: str) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        yield from _rows(batches, name)
    except (OSError, ValueError) as exc:
        yield name, InvalidRecord(cv.UNREADABLE_FILE, f"cannot read Parquet: {exc}")


def _read_arrow(path: Path, name: str) -> Iterator[Item]:
    """Arrow IPC: the stream format (what ``datasets`` writes) or the file format."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            yield from _rows(batches, name)
    except (OSError, ValueError) as exc:
        yield name, InvalidRecord(cv.UNREADABLE_FILE, f"cannot read Arrow: {exc}")


def _read_save_dir(path: Path, name: str) -> Iterator[Item]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        yield name, InvalidRecord(cv.UNREADABLE_FILE, f"cannot load datasets save dir: {exc}")
        return
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(
                f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                "point dataset.path at one split's directory"
            )
        ds = ds["train"]
    yield from _rows(ds.with_format("arrow").iter(batch_size=1024), name)


def _rows(batches: Any, name: str) -> Iterator[Item]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield f"{name}:{row}", record
    if row == 0:
        yield name, InvalidRecord(cv.EMPTY_FILE, "no rows")
