"""Loading and normalizing conversations: every input format, every bad-input reason, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spec_core.data import conversation as cv
from spec_core.data.conversation import Conversation, InvalidRecord, Message
from spec_core.data.load import load_conversations
from spec_core.errors import ConfigError, DataError

SHAREGPT = {
    "id": "sg-1",
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!", "thinking": "greet back"},
    ],
}
OPENAI = {
    "id": "oa-1",
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "18C, sunny", "name": "weather"},
        {"role": "assistant", "content": "It is 18C and sunny.", "reasoning_content": "use tool"},
    ],
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_sharegpt_and_openai_normalize_to_the_same_shape(tmp_path):
    result = load_conversations(write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, OPENAI]))
    sg, oa = result.conversations
    assert [m.role for m in sg.messages] == ["system", "user", "assistant"]
    assert sg.messages[2].reasoning_content == "greet back"
    assert sg.has_reasoning and oa.has_reasoning
    assert [m.role for m in oa.messages] == ["user", "assistant", "tool", "assistant"]
    assert (
        oa.messages[1].content == ""
        and oa.messages[1].tool_calls[0]["function"]["name"] == "weather"
    )
    assert oa.messages[2].name == "weather"
    assert result.locations == ["d.jsonl:1", "d.jsonl:2"]
    assert result.report.valid == 2 and not result.report.skipped


def test_custom_messages_key_and_top_level_system(tmp_path):
    record = {"dialog": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    record["system"] = "You are terse."
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    conv = load_conversations(path, "dialog").conversations[0]
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "You are terse."),
        ("user", "a"),
        ("assistant", "b"),
    ]
    with pytest.raises(DataError, match="missing_messages"):
        load_conversations(path)  # auto looks for conversations/messages only


def test_round_trip_is_byte_exact(tmp_path):
    """What regeneration writes (Conversation.to_dict as JSONL) reads back unchanged."""
    tricky = {
        "id": "rt",
        "messages": [
            {"role": "system", "content": "  leading and trailing  \n"},
            {"role": "user", "content": "\n a naïve 漢字 question\t"},
            {"role": "assistant", "content": "answer ", "reasoning_content": "\nthink\n"},
            {"role": "user", "content": "more"},
            OPENAI["messages"][1],
            OPENAI["messages"][2],
            {"role": "assistant", "content": "done"},
        ],
    }
    first = load_conversations(write_jsonl(tmp_path / "a.jsonl", [tricky, SHAREGPT]))
    lines = [json.dumps(c.to_dict(), ensure_ascii=False) for c in first.conversations]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    second = load_conversations(tmp_path / "b.jsonl")
    assert [json.dumps(c.to_dict(), ensure_ascii=False) for c in second.conversations] == lines
    assert second.conversations == first.conversations
    assert first.conversations[0].messages[1].content == "\n a naïve 漢字 question\t"


def test_records_without_id_get_a_stable_content_id_and_duplicates_are_renamed(tmp_path):
    no_id = {"messages": OPENAI["messages"]}
    path = write_jsonl(tmp_path / "d.jsonl", [no_id, SHAREGPT, SHAREGPT, no_id])
    result = load_conversations(path)
    ids = [c.id for c in result.conversations]
    assert ids[0].startswith("h-") and ids[3] == ids[0] + "#2"
    assert ids[1:3] == ["sg-1", "sg-1#2"]
    assert result.report.renamed_duplicate_ids == 2
    assert load_conversations(path).conversations[0].id == ids[0]  # stable across loads


def test_json_array_json_lines_parquet_arrow_and_save_dirs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [SHAREGPT, {"id": "sg-2", "conversations": SHAREGPT["conversations"]}]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "rows.parquet")
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "dsdict")
    )
    for name in (
        "array.json",
        "lines.json",
        "rows.parquet",
        "stream.arrow",
        "file.arrow",
        "saved",
        "dsdict",
    ):
        result = load_conversations(tmp_path / name)
        assert [c.id for c in result.conversations] == ["sg-1", "sg-2"], name
        assert result.conversations[0].messages[2].reasoning_content == "greet back", name
    everything = load_conversations(tmp_path)  # a directory of all of the above
    assert len(everything.conversations) == 14
    assert everything.report.renamed_duplicate_ids == 12
    assert everything.locations[0] == "array.json[0]"
    assert "rows.parquet:2" in everything.locations


def test_every_bad_input_is_counted_by_reason_with_its_line(tmp_path):
    good = json.dumps(OPENAI)
    user = {"role": "user", "content": "q"}
    answer = {"role": "assistant", "content": "a"}
    lines = [
        good.encode(),  # 1
        b'{"messages": [oops',  # 2 malformed_json
        b'{"id": "x", "messages": [{"role": "user", "content": "caf\xe9"}]}',  # 3 non_utf8
        b"[1, 2]",  # 4 not_an_object
        json.dumps({"id": "x"}).encode(),  # 5 missing_messages
        json.dumps({"messages": [{"speaker": "u", "text": "q"}, answer]}).encode(),  # 6
        json.dumps({"messages": [{"role": "wizard", "content": "q"}, answer]}).encode(),  # 7
        json.dumps({"messages": [user, {"role": "assistant", "content": "   "}]}).encode(),  # 8
        json.dumps({"messages": [user, {"role": "assistant", "content": 42}]}).encode(),  # 9
        json.dumps({"messages": [answer, user]}).encode(),  # 10 wrong_role_order
        json.dumps({"messages": [user]}).encode(),  # 11 no_assistant_turn
        json.dumps({"messages": [user, {**answer, "tool_calls": "call()"}]}).encode(),  # 12
        b"",  # blank lines are not records
        good.encode(),  # 14
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    result = load_conversations(tmp_path)
    report = result.report
    expected = {
        cv.MALFORMED_JSON: "bad.jsonl:2",
        cv.NON_UTF8: "bad.jsonl:3",
        cv.NOT_AN_OBJECT: "bad.jsonl:4",
        cv.MISSING_MESSAGES: "bad.jsonl:5",
        cv.MISSING_FIELD: "bad.jsonl:6",
        cv.UNKNOWN_ROLE: "bad.jsonl:7",
        cv.EMPTY_CONTENT: "bad.jsonl:8",
        cv.NON_STRING_CONTENT: "bad.jsonl:9",
        cv.WRONG_ROLE_ORDER: "bad.jsonl:10",
        cv.NO_ASSISTANT_TURN: "bad.jsonl:11",
        cv.BAD_TOOL_CALLS: "bad.jsonl:12",
        cv.EMPTY_FILE: "empty.jsonl",
        cv.UNREADABLE_FILE: "broken.parquet",
    }
    assert dict(report.skipped) == {reason: 1 for reason in expected}
    for reason, location in expected.items():
        assert report.examples[reason][0].split(" ")[0] == location, reason
    assert result.locations == ["bad.jsonl:1", "bad.jsonl:14"]
    assert report.records == 13 and report.valid == 2
    assert "1 malformed_json (first: bad.jsonl:2" in report.one_line()


def test_nothing_valid_fails_with_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"{oops\n" * 7 + b'{"messages": []}\n')
    with pytest.raises(DataError) as info:
        load_conversations(path)
    message = str(info.value)
    assert "\n" not in message
    assert "7 malformed_json (first: bad.jsonl:1" in message and "1 no_assistant_turn" in message


def test_examples_keep_only_the_first_few_locations(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("{oops\n" * 20 + json.dumps(OPENAI) + "\n")
    report = load_conversations(path).report
    assert report.skipped[cv.MALFORMED_JSON] == 20
    assert [e.split(" ")[0] for e in report.examples[cv.MALFORMED_JSON]] == [
        f"d.jsonl:{i}" for i in range(1, 6)
    ]


def test_limit_keeps_the_first_valid_conversations_in_file_order(tmp_path):
    records = [{"id": f"c{i}", "conversations": SHAREGPT["conversations"]} for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("{oops\n" + "".join(json.dumps(r) + "\n" for r in records))
    result = load_conversations(path, limit=4)
    assert [c.id for c in result.conversations] == ["c0", "c1", "c2", "c3"]
    assert result.report.skipped[cv.MALFORMED_JSON] == 1


def test_bad_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unsupported dataset file type '.csv'"):
        load_conversations(tmp_path / "data.csv")
    with pytest.raises(ConfigError, match="holds no"):
        load_conversations(tmp_path)


def test_from_dict_rejects_with_a_reason_and_accepts_text_parts():
    with pytest.raises(InvalidRecord) as info:
        Conversation.from_dict({"messages": [{"role": "user", "content": None}]})
    assert info.value.reason == cv.EMPTY_CONTENT
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    conv = Conversation.from_dict(
        {
            "id": 7,
            "messages": [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": "hi"},
            ],
        }
    )
    assert conv.id == "7" and conv.messages[0] == Message("user", "Hello world")


def test_has_reasoning_detects_open_think_blocks_only():
    def conv(text: str) -> Conversation:
        return Conversation("x", [Message("user", "q"), Message("assistant", text)])

    assert conv("<think>step 1</think>answer").has_reasoning
    assert not conv("<think>\n\n</think>answer").has_reasoning
    assert not conv("plain answer").has_reasoning
