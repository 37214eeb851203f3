"""Seeded fuzzing of the dataset loader, through the Python API and the ``specflow data`` CLI a
new user runs: deep nesting, wrong Arrow types, huge records, odd ids, random bytes, truncated
files, BOMs, mixed encodings and single flipped bytes. Every file ends in conversations and
counted skips, or in one ``error:`` line; never a traceback, never a hang."""

from __future__ import annotations

import codecs
import json
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spec_core.data import conversation as cv
from spec_core.data.load import load_conversations
from spec_core.errors import SpecflowError

SEED = 18
CAP = 4096  # dataset.max_record_bytes for the fuzz: "huge" records are cheap to make
CASE_TIMEOUT_S = 60  # generous: a hang is minutes, not seconds, on a contended CPU
REPO = Path(__file__).resolve().parents[1]


def good(i: int, rng: random.Random) -> dict:
    words = " ".join(
        rng.choice(["hi", "tea", "ok", "é", "🙂", '"q"', "[x]", "{y}", "\\"]) for _ in range(6)
    )
    return {
        "id": f"g{i}",
        "messages": [
            {"role": "user", "content": f"question {i}: {words}"},
            {"role": "assistant", "content": f"answer {i}: {words}"},
        ],
    }


def nested(depth: int, rng: random.Random) -> str:
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    return opener * depth + "1" + closer * depth


def odd_id(rng: random.Random) -> object:
    return rng.choice(
        ["a", "a", "a#2", "t\tab", "new\nline", "nul\x00", "x" * 5000, "é🙂", "", None, 7, 1.5]
    )


# ---- generators: each writes one file (or dir) and returns its path --------------------------


def deep_json(d: Path, rng: random.Random, k: int) -> Path:
    depth = rng.choice([70, 1000, 5000, 200_000])
    body = [json.dumps(good(0, rng)), nested(depth, rng), json.dumps(good(1, rng))]
    if rng.random() < 0.5:
        return _write(d / f"deep{k}.json", ("[" + ",".join(body) + "]").encode())
    return _write(d / f"deep{k}.jsonl", "\n".join(body).encode())


def deep_record(d: Path, rng: random.Random, k: int) -> Path:
    record = good(k, rng)
    record["messages"][1]["tool_calls"] = json.loads(nested(rng.choice([70, 300]), rng))
    return _write(d / f"deeprec{k}.jsonl", (json.dumps(record) + "\n").encode())


def huge(d: Path, rng: random.Random, k: int) -> Path:
    big = good(k, rng)
    big["messages"][0]["content"] = "z" * rng.choice([CAP, 4 * CAP, 64 * CAP])
    rows = [good(0, rng), big, good(1, rng)]
    kind = rng.choice(["json", "jsonl", "parquet"])
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), d / f"huge{k}.parquet")
        return d / f"huge{k}.parquet"
    if kind == "json":
        return _write(d / f"huge{k}.json", json.dumps(rows).encode())
    return _write(d / f"huge{k}.jsonl", "\n".join(map(json.dumps, rows)).encode())


def odd_ids(d: Path, rng: random.Random, k: int) -> Path:
    rows = [dict(good(i, rng), id=odd_id(rng)) for i in range(8)]
    if rng.random() < 0.5:
        return _write(d / f"ids{k}.jsonl", "\n".join(map(json.dumps, rows)).encode())
    table = pa.Table.from_pylist(
        [dict(r, id=None if r["id"] is None else str(r["id"])) for r in rows]
    )
    pq.write_table(table, d / f"ids{k}.parquet")
    return d / f"ids{k}.parquet"


def wrong_arrow_types(d: Path, rng: random.Random, k: int) -> Path:
    n = 4
    choices: list[Callable[[], pa.Array]] = [
        lambda: pa.array(list(range(n))),
        lambda: pa.array([b"\xff\xfe"] * n, pa.binary()),
        lambda: pa.array([[1, 2]] * n),
        lambda: pa.array(["x"] * n).dictionary_encode(),
        lambda: pa.array([None] * n, pa.null()),
        lambda: pa.array([{"role": 1, "content": b"\x00"}] * n),
        lambda: pa.array([[{"role": "user", "content": 3}]] * n),
        lambda: pa.array([[{"k": 1}]] * n, pa.list_(pa.map_(pa.string(), pa.int64()))),
        lambda: pa.array([1.5] * n),
        lambda: pa.array([[[[[[[1]]]]]]] * n),
        lambda: pa.array([12345] * n, pa.timestamp("s")),
        lambda: pa.array([{"a": [1, None]}] * n),
    ]
    columns = {"messages": rng.choice(choices)(), "id": rng.choice(choices)()}
    table = pa.table(columns)
    if rng.random() < 0.5:
        pq.write_table(table, d / f"types{k}.parquet")
        return d / f"types{k}.parquet"
    return _arrow(d / f"types{k}.arrow", table, rng)


def random_bytes(d: Path, rng: random.Random, k: int) -> Path:
    suffix = rng.choice([".json", ".jsonl", ".parquet", ".arrow"])
    data = rng.randbytes(rng.choice([0, 1, 17, 4096, 3 * CAP]))
    if rng.random() < 0.3:
        data = rng.choice([b"[", b"{", b"PAR1", b"ARROW1\x00\x00"]) + data
    return _write(d / f"random{k}{suffix}", data)


def truncated(d: Path, rng: random.Random, k: int) -> Path:
    rows = [good(i, rng) for i in range(6)]
    kind = rng.choice(["json", "jsonl", "parquet", "arrow"])
    path = d / f"trunc{k}.{kind}"
    if kind == "json":
        path.write_bytes(json.dumps(rows, indent=rng.choice([None, 2])).encode())
    elif kind == "jsonl":
        path.write_bytes("\n".join(map(json.dumps, rows)).encode())
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        _arrow(path, pa.Table.from_pylist(rows), rng)
    data = path.read_bytes()
    return _write(path, data[: rng.randrange(1, len(data))])


def boms(d: Path, rng: random.Random, k: int) -> Path:
    rows = [good(i, rng) for i in range(3)]
    text = json.dumps(rows) if rng.random() < 0.5 else "\n".join(map(json.dumps, rows))
    suffix = ".json" if text.startswith("[") else rng.choice([".json", ".jsonl"])
    encoding = rng.choice(["utf-8-sig", "utf-16", "utf-16-le-bom", "utf-32"])
    if encoding == "utf-16-le-bom":
        data = codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    else:
        data = text.encode(encoding)
    return _write(d / f"bom{k}{suffix}", data)


def mixed_encodings(d: Path, rng: random.Random, k: int) -> Path:
    lines = []
    for i in range(6):
        record = good(i, rng)
        record["messages"][1]["content"] = "café crème"
        encoding = rng.choice(["utf-8", "latin-1", "cp1252", "utf-16-le"])
        lines.append(json.dumps(record, ensure_ascii=False).encode(encoding, "replace"))
    if rng.random() < 0.5:
        return _write(d / f"mixed{k}.json", b"[" + b",\n".join(lines) + b"]")
    return _write(d / f"mixed{k}.jsonl", b"\n".join(lines))


def flipped_byte(d: Path, rng: random.Random, k: int) -> Path:
    rows = [good(i, rng) for i in range(8)]
    kind = rng.choice(["json", "jsonl", "parquet"])
    path = d / f"flip{k}.{kind}"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        sep = "," if kind == "json" else "\n"
        text = sep.join(map(json.dumps, rows))
        path.write_bytes((f"[{text}]" if kind == "json" else text).encode())
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] = rng.choice([0xFF, 0x00, ord("{"), ord('"'), ord("]")])
    return _write(path, bytes(data))


def mutated_json(d: Path, rng: random.Random, k: int) -> Path:
    """A valid array, object stream or JSON lines file with a few structural bytes inserted,
    deleted or repeated: what the element scanner has to survive."""
    rows = [good(i, rng) for i in range(6)]
    shape = rng.choice(["array", "stream", "lines"])
    if shape == "array":
        text = json.dumps(rows, indent=rng.choice([None, 1]))
    elif shape == "stream":
        text = "\n".join(json.dumps(r, indent=2) for r in rows)
    else:
        text = "\n".join(map(json.dumps, rows))
    data = bytearray(text.encode())
    for _ in range(rng.randint(1, 5)):
        at = rng.randrange(len(data))
        action = rng.choice(["insert", "delete", "repeat"])
        if action == "insert":
            data[at:at] = rng.choice([b"[", b"]", b"{", b"}", b'"', b"\\", b",", b":"])
        elif action == "delete":
            del data[at]
        else:
            data[at:at] = data[at : at + rng.randint(1, 40)]
    return _write(d / f"mutated{k}.{'jsonl' if shape == 'lines' else 'json'}", bytes(data))


def broken_save_dir(d: Path, rng: random.Random, k: int) -> Path:
    import datasets

    out = d / f"saved{k}"
    datasets.Dataset.from_list([good(i, rng) for i in range(3)]).save_to_disk(str(out))
    victim = rng.choice(["state.json", "dataset_info.json"])
    (out / victim).write_bytes(rng.choice([b"{oops", b"[]", b'{"_data_files": 5}', b""]))
    return out


GENERATORS = [
    deep_json,
    deep_record,
    huge,
    odd_ids,
    wrong_arrow_types,
    random_bytes,
    truncated,
    boms,
    mixed_encodings,
    flipped_byte,
    mutated_json,
    broken_save_dir,
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _arrow(path: Path, table: pa.Table, rng: random.Random) -> Path:
    with pa.OSFile(str(path), "wb") as sink:
        new = pa.ipc.new_stream if rng.random() < 0.5 else pa.ipc.new_file
        with new(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def corpus(root: Path, per_kind: int) -> list[tuple[str, Path]]:
    rng = random.Random(SEED)
    cases = []
    for gen in GENERATORS:
        folder = root / gen.__name__
        folder.mkdir(parents=True)
        cases += [(gen.__name__, gen(folder, rng, k)) for k in range(per_kind)]
    return cases


@contextmanager
def deadline(seconds: int):
    """SIGALRM turns a hang into a TimeoutError the harness counts."""

    def expire(signum, frame):
        raise TimeoutError(f"no result after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_loader_fuzz_python_api(tmp_path):
    cases = corpus(tmp_path, per_kind=40)
    outcomes: Counter = Counter()
    reasons: Counter = Counter()
    tracebacks, hangs = [], []
    for kind, path in cases:
        try:
            with deadline(CASE_TIMEOUT_S):
                result = load_conversations(path, max_record_bytes=CAP)
            outcomes["loaded"] += 1
            reasons.update(result.report.skipped)
            ids = [c.id for c in result.conversations]
            assert len(set(ids)) == len(ids), path  # renaming never collides
            assert not any("\t" in i or "\n" in i for i in ids), path
        except TimeoutError:
            hangs.append(path)
        except SpecflowError as exc:
            outcomes["one_line_error"] += 1
            assert "\n" not in str(exc), path
        except Exception as exc:  # anything else is a traceback for the user
            tracebacks.append(f"{kind} {path.name}: {type(exc).__name__}: {exc}"[:300])
    print(
        f"\nloader fuzz (seed {SEED}): {len(cases)} files, {outcomes['loaded']} loaded, "
        f"{outcomes['one_line_error']} one-line errors, {sum(reasons.values())} counted skips "
        f"{dict(reasons.most_common())}, {len(tracebacks)} tracebacks, {len(hangs)} hangs"
    )
    assert tracebacks == [] and hangs == [], tracebacks[:5]
    # every hostile shape was met and counted under its own reason
    for reason in (cv.TOO_DEEP, cv.RECORD_TOO_LARGE, cv.BAD_ID, cv.TRUNCATED, cv.NON_UTF8):
        assert reasons[reason] > 0, reason


def test_one_bad_element_costs_only_itself(tmp_path):
    rng = random.Random(SEED)
    rows = [good(i, rng) for i in range(5)]
    text = json.dumps(rows, indent=2).encode()
    broken = text.replace(b"answer 2", b"answer \xff", 1)
    deep = b"[" + b",".join([json.dumps(rows[0]).encode(), b"[" * 100_000, b"]" * 100_000])
    for name, data, kept, reason in (
        ("badbyte.json", broken, ["g0", "g1", "g3", "g4"], cv.NON_UTF8),
        ("bom.json", codecs.BOM_UTF8 + text, [f"g{i}" for i in range(5)], None),
        # concatenated pretty-printed objects, as jq reads them
        ("stream.json", "\n".join(json.dumps(r, indent=2) for r in rows).encode(), None, None),
        ("cut.json", text[: text.index(b'"g4"')], ["g0", "g1", "g2", "g3"], cv.TRUNCATED),
        ("deep.json", deep + b"," + json.dumps(rows[1]).encode() + b"]", ["g0", "g1"], cv.TOO_DEEP),
    ):
        result = load_conversations(_write(tmp_path / name, data))
        assert [c.id for c in result.conversations] == (kept or [f"g{i}" for i in range(5)]), name
        assert dict(result.report.skipped) == ({reason: 1} if reason else {}), name


def test_duplicate_ids_never_collide_and_control_characters_are_counted(tmp_path):
    rng = random.Random(SEED)
    ids = ["a", "a", "a#2", "a", "b\tc", "d\ne"]
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(json.dumps(dict(good(i, rng), id=x)) for i, x in enumerate(ids)))
    result = load_conversations(path)
    assert [c.id for c in result.conversations] == ["a", "a#2", "a#2#2", "a#3"]
    assert result.report.skipped == {cv.BAD_ID: 2}
    assert result.report.renamed_duplicate_ids == 3


def test_records_over_the_cap_are_skipped_without_reading_them_whole(tmp_path):
    rng = random.Random(SEED)
    big = good(1, rng)
    big["messages"][0]["content"] = "z" * (64 * CAP)
    rows = [good(0, rng), big, good(2, rng)]
    for name, data in (
        ("big.jsonl", "\n".join(map(json.dumps, rows)).encode()),
        ("big.json", json.dumps(rows).encode()),
    ):
        result = load_conversations(_write(tmp_path / name, data), max_record_bytes=CAP)
        assert [c.id for c in result.conversations] == ["g0", "g2"], name
        assert result.report.skipped == {cv.RECORD_TOO_LARGE: 1}, name


def specflow_data(dataset: Path, out: Path, cache: Path, in_process: bool) -> tuple[int, str]:
    args = [
        "data",
        "--quiet",
        f"dataset.path={dataset}",
        f"run.output_dir={out}",
        f"run.cache_dir={cache}",
        f"dataset.max_record_bytes={CAP}",
        "dataset.num_proc=1",
        "dataset.eval_conversations=1",
        "dataset.max_conversations=null",
    ]
    if in_process:
        from spec_core.cli import main

        return main(args), ""
    proc = subprocess.run(
        [sys.executable, "-m", "spec_core.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_loader_fuzz_through_specflow_data(tmp_path, asset_cache, capsys):
    """One file of every kind through ``specflow data`` in this process (exit 0, or 2 with one
    ``error:`` line), then the whole corpus as one dataset dir through the real command."""
    cases = corpus(tmp_path / "corpus", per_kind=3)
    outcomes: Counter = Counter()
    for kind, path in cases[::3]:
        capsys.readouterr()
        with deadline(300):
            code, _ = specflow_data(path, tmp_path / "out", asset_cache, in_process=True)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code in (0, 2), (kind, path, err[-2000:])
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("error: "), (kind, err[-2000:])
        outcomes[code] += 1
    code, output = specflow_data(tmp_path / "corpus", tmp_path / "out", asset_cache, False)
    assert code == 0 and "Traceback" not in output, output[-3000:]
    lines = output.splitlines()
    totals = next(line for line in lines if line.startswith("records read"))
    counts = [" ".join(line.split(":")[0].split()[1:]) for line in lines if "  skipped" in line]
    print(
        f"\nspecflow data fuzz: {len(cases[::3])} files one by one ({outcomes[0]} tokenized, "
        f"{outcomes[2]} one-line errors, 0 tracebacks); whole corpus of {len(cases)} files: "
        f"{totals} ({', '.join(counts)})"
    )
