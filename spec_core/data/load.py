"""Read conversations from local files: JSON (array or lines), JSONL, Parquet, Arrow, a ``datasets``
save dir, or a directory of those.

Files are streamed (JSON lines by line, JSON arrays by element, Arrow by batch), never read
whole. Each bad record is skipped and counted by reason with its location (``file.jsonl:17``,
``file.json[3]``); the load fails with one line only when nothing valid remains
(docs/architecture.md §dataset-loading). ``limit`` keeps the first N valid
conversations in file order (files sorted by relative path), which is what ``max_conversations``
means everywhere.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional

from tqdm.auto import tqdm

from spec_core.config import DatasetConfig
from spec_core.data import conversation as cv
from spec_core.data.conversation import Conversation, InvalidRecord
from spec_core.data.report import DataReport
from spec_core.errors import ConfigError, DataError
from spec_core.utils.fingerprint import files_digest

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
_SAVE_DIR_MARKERS = ("state.json", "dataset_dict.json")
DEFAULT_MAX_RECORD_BYTES = DatasetConfig.max_record_bytes
# Deeper than any chat record needs; checked without recursion, so nothing downstream (Arrow
# conversion, templates) can hit Python's recursion limit on a hostile record.
MAX_DEPTH = 64
_CHUNK = 1 << 20
_WIDE_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_WIDE_BOM_HINT = (
    "UTF-16/UTF-32 text (byte order mark); convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8"
)


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
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> LoadResult:
    """Load and normalize every conversation under ``path``; raise DataError if none is valid.
    Files are streamed; a record over ``max_record_bytes`` is a counted skip."""
    path = Path(path)
    if max_record_bytes <= 0:
        raise ConfigError(f"'dataset.max_record_bytes' must be positive, got {max_record_bytes}")
    sources = data_sources(path)
    report = DataReport(files=[_display_name(path, s) for s in sources])
    conversations: list[Conversation] = []
    locations: list[str] = []
    ids = UniqueIds()
    bar = tqdm(desc="loading", unit=" conv", disable=not progress, leave=False)
    items = read_records(path, max_record_bytes)
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
                check_shape(record, max_record_bytes)
                conv = cv.normalize_record(record, messages_key)
            except InvalidRecord as exc:
                report.skip(exc.reason, location, exc.detail)
                continue
            unique = ids.claim(conv.id)
            if unique != conv.id:
                conv.id = unique
                report.renamed_duplicate_ids += 1
            conversations.append(conv)
            locations.append(location)
    finally:
        bar.close()
    report.valid = len(conversations)
    if not conversations:
        raise DataError(f"no valid conversations in {path}: {report.one_line()}")
    return LoadResult(conversations, report, locations)


class UniqueIds:
    """Hands out unique sample ids: a repeat of ``a`` becomes ``a#2``, ``a#3``, ... skipping any
    name already taken, so ``a, a, a#2`` yields ``a, a#2, a#2#2`` and never a collision."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.next_suffix: dict[str, int] = {}

    def claim(self, conv_id: str) -> str:
        unique = conv_id
        if unique in self.taken:
            k = self.next_suffix.get(conv_id, 2)
            while f"{conv_id}#{k}" in self.taken:
                k += 1
            self.next_suffix[conv_id] = k + 1
            unique = f"{conv_id}#{k}"
        self.taken.add(unique)
        return unique


def check_shape(record: Any, max_bytes: int) -> None:
    """Refuse a record nested deeper than ``MAX_DEPTH`` or holding over ``max_bytes`` of text
    (Arrow rows are not size-checked while read), walking it without recursion."""
    stack = [(record, 1)]
    size = 0
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRecord(cv.TOO_DEEP, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
            size += sum(len(str(k)) for k in value)
        elif isinstance(value, (list, tuple)):
            stack += [(v, depth + 1) for v in value]
        else:
            size += len(value) if isinstance(value, (str, bytes)) else 8
        if size > max_bytes:
            raise _too_large(max_bytes)


def read_records(path: Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Item]:
    """(location, raw record) of every record under ``path``, in ``load_conversations`` order;
    unreadable pieces come as ``InvalidRecord`` (for callers whose records are not chats)."""
    path = Path(path)
    for source in data_sources(path):
        yield from _read_source(source, _display_name(path, source), max_record_bytes)


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


def _read_source(source: Path, name: str, max_bytes: int) -> Iterator[Item]:
    if source.is_dir():
        yield from _read_save_dir(source, name)
        return
    suffix = source.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _read_json_file(source, name, max_bytes, array_allowed=suffix == ".json")
    elif suffix == ".parquet":
        yield from _read_parquet(source, name)
    else:
        yield from _read_arrow(source, name)


def _read_json_file(path: Path, name: str, max_bytes: int, array_allowed: bool) -> Iterator[Item]:
    """JSON lines; for ``.json`` also a JSON array or a stream of (pretty-printed) objects, each
    streamed element by element. The first non-blank byte decides, then whether the first line
    is a whole record; a UTF-8 BOM is skipped, UTF-16/32 is refused in one line."""
    with path.open("rb") as fh:
        head = fh.read(4)
        if head.startswith(_WIDE_BOMS):
            yield name, InvalidRecord(cv.UNREADABLE_FILE, _WIDE_BOM_HINT)
            return
        fh.seek(len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0)
        first = _first_non_blank(fh)
        if array_allowed and first == b"[":
            yield from _read_json_elements(fh, name, max_bytes, stream=False)
        elif array_allowed and first == b"{" and not _first_line_is_a_record(fh, max_bytes):
            yield from _read_json_elements(fh, name, max_bytes, stream=True)
        else:
            yield from _read_json_lines(fh, name, max_bytes)


def _first_non_blank(fh: BinaryIO) -> bytes:
    """The first non-whitespace byte (the stream is left where it started)."""
    start = fh.tell()
    while chunk := fh.read(_CHUNK):
        stripped = chunk.lstrip()
        if stripped:
            fh.seek(start)
            return stripped[:1]
    fh.seek(start)
    return b""


def _first_line_is_a_record(fh: BinaryIO, max_bytes: int) -> bool:
    """Whether the first non-blank line is one whole JSON value (JSON lines), rather than the
    start of a pretty-printed object (the stream is left where it started)."""
    start = fh.tell()
    line = b""
    while not line.strip() and (line := fh.readline(max_bytes + 1)):
        pass
    fh.seek(start)
    return not isinstance(_parse_record(line), InvalidRecord)


def _read_json_lines(fh: BinaryIO, name: str, max_bytes: int) -> Iterator[Item]:
    """One record per line, read a line at a time; a line over ``max_bytes`` is skipped unread."""
    any_line = False
    lineno = 0
    while line := fh.readline(max_bytes + 1):
        lineno += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            _skip_line(fh)
            any_line = True
            yield f"{name}:{lineno}", _too_large(max_bytes)
            continue
        if not line.strip():
            continue
        any_line = True
        yield f"{name}:{lineno}", _parse_record(line)
    if not any_line:
        yield name, InvalidRecord(cv.EMPTY_FILE, "no records")


def _skip_line(fh: BinaryIO) -> None:
    while chunk := fh.readline(_CHUNK):
        if chunk.endswith(b"\n"):
            return


def _too_large(max_bytes: int) -> InvalidRecord:
    return InvalidRecord(
        cv.RECORD_TOO_LARGE, f"over {max_bytes} bytes (raise dataset.max_record_bytes to keep it)"
    )


def _parse_record(raw: bytes) -> Any:
    """One JSON record from its bytes, or the InvalidRecord saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidRecord(cv.NON_UTF8, f"invalid UTF-8 byte at column {exc.start + 1}")
    try:
        return json.loads(text)
    except RecursionError:
        return InvalidRecord(cv.TOO_DEEP, "nested too deeply to parse")
    except ValueError as exc:
        return InvalidRecord(cv.MALFORMED_JSON, str(exc).split(":")[0])


def _read_json_elements(fh: BinaryIO, name: str, max_bytes: int, stream: bool) -> Iterator[Item]:
    """A JSON array (``stream``: a sequence of objects), element by element: a bad byte or a
    malformed element costs that element only, an element over ``max_bytes`` is skipped without
    being kept in memory, and a file that ends inside an element keeps every element before it."""
    scanner = ElementScanner(max_bytes, stream)
    index = 0
    while True:
        chunk = fh.read(_CHUNK)
        for element in scanner.feed(chunk) if chunk else scanner.finish():
            label = f"{name}:{element.line}" if stream else f"{name}[{index}]"
            yield label, _element_record(element, max_bytes)
            index += 1
        if not chunk:
            break
    if index == 0:
        yield (
            name,
            InvalidRecord(cv.EMPTY_FILE, "empty JSON array" if scanner.closed else "no records"),
        )
    if scanner.trailing:
        detail = f"data after the JSON array's closing ']' (line {scanner.line})"
        yield name, InvalidRecord(cv.MALFORMED_JSON, detail)


def _element_record(element: Element, max_bytes: int) -> Any:
    if element.data is None:
        record: Any = _too_large(max_bytes)
    elif element.truncated:
        record = InvalidRecord(cv.TRUNCATED, "the file ends inside this element")
    else:
        record = _parse_record(element.data)
    if isinstance(record, InvalidRecord):
        record = InvalidRecord(record.reason, f"{record.detail} (line {element.line})")
    return record


@dataclass
class Element:
    data: Optional[bytes]  # None: over the size cap, not kept
    line: int  # 1-based line where it starts
    truncated: bool = False


# A string (to its closing quote, or to the chunk's end: then ``escape`` tells a pending
# backslash) or one structural byte; everything between tokens is skipped in C.
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:(?P<close>")|(?P<escape>\\)?\Z)|[\[\]{},]', re.DOTALL)
_STRING_END = re.compile(rb'["\\]')
_QUOTE = ord('"')
_OPENERS = {ord("["): ord("]"), ord("{"): ord("}")}


class ElementScanner:
    """Splits a top-level JSON array (or, ``stream``, a sequence of objects) into its elements'
    bytes, fed in chunks.

    It tracks only strings, escapes and bracket nesting (a byte stack, no recursion), which is
    enough to find where elements end (a comma in an array, the closing brace in a stream); each
    element is then parsed on its own. A mismatched closing bracket is kept inside the element so
    that element fails to parse."""

    def __init__(self, max_bytes: int, stream: bool = False) -> None:
        self.max_bytes = max_bytes
        self.stream = stream
        # open brackets' expected closers; [0] is the array's ']' (a stream's is implied)
        self.stack = bytearray(b"]" if stream else b"")
        self.in_string = False
        self.escape = False
        self.started = stream  # the array's '[' was seen
        self.closed = False  # the array's ']' was seen
        self.trailing = False  # non-blank bytes after the closing ']'
        self.line = 1
        self._counted = 0
        self._buf: Optional[bytearray] = bytearray()
        self._start_line = 1
        self._has_content = False

    def feed(self, chunk: bytes) -> list[Element]:
        out: list[Element] = []
        pos, seg = 0, 0  # seg: where the current element's bytes in this chunk begin
        n = len(chunk)
        self._counted = 0  # newlines of this chunk before _counted are in self.line
        while pos < n:
            if self.closed:
                self.trailing = self.trailing or bool(chunk[pos:].strip())
                break
            if self.in_string:
                if self.escape:
                    self.escape, pos = False, pos + 1
                    continue
                m = _STRING_END.search(chunk, pos)
                if m is None:
                    break
                pos = m.end()
                if m.group() == b"\\":
                    self.escape = True
                else:
                    self.in_string = False
                continue
            m = _TOKEN.search(chunk, pos)
            if m is None:
                break
            c, at = chunk[m.start()], m.start()
            pos = m.end()
            if c == _QUOTE:  # a whole string in one match, or its start up to the chunk's end
                if m.group("close") is None:
                    self.in_string, self.escape = True, m.group("escape") is not None
                continue
            if not self.started:
                self.started, seg = True, pos  # the caller checked this is the '['
                self.stack.append(ord("]"))
                self._start_line = self._line_at(chunk, pos)
                continue
            depth = len(self.stack)
            if c in _OPENERS:
                self.stack.append(_OPENERS[c])
            elif depth > 1 and c == self.stack[-1]:
                self.stack.pop()
                if self.stream and depth == 2:  # a stream's element ends with its bracket
                    self._take(chunk[seg:pos])
                    out.append(self._emit())
                    self._start_line = self._line_at(chunk, pos)
                    seg = pos
            elif depth == 1 and c == ord("]") and self.stream:
                pass  # a stray bracket between a stream's objects: kept, fails to parse
            elif depth == 1 and c in (ord(","), ord("]")):
                self._take(chunk[seg:at])
                if self._has_content or c == ord(","):
                    out.append(self._emit())
                self._start_line = self._line_at(chunk, pos)
                seg = pos
                if c == ord("]"):
                    self.stack.pop()
                    self.closed = True
        if not self.closed:
            self._take(chunk[seg:])
        self._line_at(chunk, n)
        return out

    def _line_at(self, chunk: bytes, pos: int) -> int:
        """The line number at ``pos`` of ``chunk`` (positions only move forward: linear)."""
        self.line += chunk.count(b"\n", self._counted, pos)
        self._counted = pos
        return self.line

    def finish(self) -> list[Element]:
        """End of file: an element still open is reported truncated."""
        if self.closed or not self._has_content:
            return []
        element = self._emit()
        element.truncated = True
        return [element]

    def _take(self, piece: bytes) -> None:
        if not piece:
            return
        if not self._has_content and piece.strip():
            self._has_content = True
        if self._buf is not None:
            self._buf += piece
            if len(self._buf) > self.max_bytes:
                self._buf = None

    def _emit(self) -> Element:
        data = None if self._buf is None else bytes(self._buf)
        element = Element(data, self._start_line + _leading_newlines(data))
        self._buf, self._has_content = bytearray(), False
        return element


def _leading_newlines(data: Optional[bytes]) -> int:
    if not data:
        return 0
    return data.count(b"\n", 0, len(data) - len(data.lstrip()))


_BATCH_ROWS = 256


def _arrow_errors() -> tuple[type[BaseException], ...]:
    """What a reader of an untrusted Arrow/Parquet file may raise besides our own errors:
    every ``pyarrow.ArrowException`` (type, not-implemented, capacity, ... not just
    ``ArrowInvalid``), OS errors, and the ValueError/TypeError pyarrow raises on bad schemas."""
    import pyarrow as pa

    return (OSError, ValueError, TypeError, NotImplementedError, pa.ArrowException)


def _read_parquet(path: Path, name: str) -> Iterator[Item]:
    import pyarrow.parquet as pq

    rows = _Counter()
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
        yield from _rows(batches, name, rows)
    except _arrow_errors() as exc:
        yield name, InvalidRecord(cv.UNREADABLE_FILE, _arrow_detail("Parquet", exc, rows))


def _read_arrow(path: Path, name: str) -> Iterator[Item]:
    """Arrow IPC: the stream format (what ``datasets`` writes) or the file format."""
    import pyarrow as pa

    rows = _Counter()
    try:
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            yield from _rows(batches, name, rows)
    except _arrow_errors() as exc:
        yield name, InvalidRecord(cv.UNREADABLE_FILE, _arrow_detail("Arrow", exc, rows))


def _read_save_dir(path: Path, name: str) -> Iterator[Item]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    # ``datasets`` has no error contract for a corrupt state.json / dataset_info.json (it raises
    # AttributeError, KeyError, TypeError, ... from inside its parsing): any failure to open the
    # dir is that dir's problem, reported as one counted skip.
    except Exception as exc:
        detail = f"cannot load datasets save dir: {type(exc).__name__}: {_first_line(exc)}"
        yield name, InvalidRecord(cv.UNREADABLE_FILE, detail)
        return
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(
                f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                "point dataset.path at one split's directory"
            )
        ds = ds["train"]
    rows = _Counter()
    try:
        yield from _rows(ds.with_format("arrow").iter(batch_size=_BATCH_ROWS), name, rows)
    except _arrow_errors() as exc:
        yield name, InvalidRecord(cv.UNREADABLE_FILE, _arrow_detail("the save dir", exc, rows))


@dataclass
class _Counter:
    value: int = 0


def _rows(batches: Any, name: str, rows: _Counter) -> Iterator[Item]:
    for batch in batches:
        for record in batch.to_pylist():
            rows.value += 1
            yield f"{name}:{rows.value}", record
    if rows.value == 0:
        yield name, InvalidRecord(cv.EMPTY_FILE, "no rows")


def _arrow_detail(what: str, exc: BaseException, rows: _Counter) -> str:
    kept = f" after row {rows.value} (the rows before it are kept)" if rows.value else ""
    return f"cannot read {what}{kept}: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""
