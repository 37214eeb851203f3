"""prepare_dataset: splits, columns, cache keys (hit and miss per component), skip accounting."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spec_core.assets import TOKENIZER_FILES
from spec_core.config import DatasetConfig
from spec_core.data import tokenize as tk
from spec_core.data.conversation import Conversation
from spec_core.data.render import ConversationRenderer
from spec_core.errors import DataError


@pytest.fixture(scope="module")
def chitchat_lines(chitchat_path) -> list[str]:
    with chitchat_path.open(encoding="utf-8") as fh:
        return [next(fh) for _ in range(80)]


@pytest.fixture
def data_file(tmp_path, chitchat_lines) -> Path:
    path = tmp_path / "data" / "chat.jsonl"
    path.parent.mkdir()
    path.write_text("".join(chitchat_lines[:24]))
    return path


@pytest.fixture
def tok_dir(tmp_path, smollm2_dir) -> Path:
    """A tokenizer-only copy of SmolLM2 that tests may edit."""
    out = tmp_path / "tok"
    out.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, out / name)
    return out


def make_cfg(path: Path, **overrides) -> DatasetConfig:
    base = dict(
        path=str(path),
        max_conversations=20,
        eval_conversations=4,
        max_seq_length=256,
        num_proc=1,
        last_turn_loss_only="false",
    )
    return DatasetConfig(**{**base, **overrides})


def prepare(cfg: DatasetConfig, tok_dir: Path, work: Path, cache: Path) -> tk.PreparedData:
    return tk.prepare_dataset(cfg, tok_dir, work, cache, progress=False)


def test_splits_columns_and_report(tmp_path, data_file, tok_dir, asset_cache):
    cfg = make_cfg(data_file)
    prepared = prepare(cfg, tok_dir, tmp_path / "work", asset_cache)
    assert not prepared.cached
    assert prepared.train_path == tmp_path / "work" / "tokenized" / prepared.cache_key / "train"
    assert prepared.cache_key == tk.dataset_cache_key(cfg, tok_dir, asset_cache)
    train, evals = tk.load_tokenized(prepared.train_path), tk.load_tokenized(prepared.eval_path)
    assert train.column_names == tk.TRAIN_COLUMNS and evals.column_names == tk.EVAL_COLUMNS
    assert str(train.features["input_ids"].feature) == "Value('int32')"
    assert str(train.features["loss_mask"].feature) == "Value('uint8')"
    assert train.features["num_tokens"].dtype == "int32"

    # the first 20 conversations in file order; 4 of them held out by Random(seed)
    source_ids = [json.loads(line)["id"] for line in data_file.read_text().splitlines()[:20]]
    held_out = sorted(random.Random(cfg.seed).sample(range(20), 4))
    assert list(evals["sample_id"]) == [source_ids[i] for i in held_out]
    assert list(train["sample_id"]) == [s for i, s in enumerate(source_ids) if i not in held_out]

    renderer = ConversationRenderer(_tokenizer(tok_dir))
    for row in evals:
        conv = Conversation.from_dict(json.loads(row["messages"]))
        assert conv.id == row["sample_id"]
        expected = renderer.tokenize(conv, max_seq_length=256)
        assert row["input_ids"] == expected.input_ids.tolist()
        assert row["loss_mask"] == expected.loss_mask.tolist()
        assert row["num_tokens"] == len(row["input_ids"]) <= 256
        assert row["num_loss_tokens"] == sum(row["loss_mask"]) > 0
    conv = tk.load_eval_conversations(prepared.eval_path)[0]
    assert conv.id == evals[0]["sample_id"]

    report = prepared.report
    assert (report.train_samples, report.eval_samples, report.conversations) == (16, 4, 20)
    assert report.train_tokens == sum(train["num_tokens"])
    assert report.train_loss_tokens == sum(train["num_loss_tokens"])
    assert report.total_tokens == report.train_tokens + report.eval_tokens
    assert report.supervised_tokens == report.train_loss_tokens + report.eval_loss_tokens
    assert report.truncated == sum(
        n == 256 for n in list(train["num_tokens"]) + list(evals["num_tokens"])
    )
    assert report.template == "chatml"
    round_trip = tk.PreparedData.from_dict(json.loads(json.dumps(prepared.to_dict())))
    assert round_trip.to_dict() == prepared.to_dict()
    assert not [p for p in (tmp_path / "work" / "tokenized").iterdir() if p.name.startswith(".")]


def _tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def test_cache_hits_on_everything_that_does_not_change_the_output(
    tmp_path, data_file, tok_dir, asset_cache
):
    work = tmp_path / "work"
    cfg = make_cfg(data_file)
    first = prepare(cfg, tok_dir, work, asset_cache)
    os.utime(data_file, (1, 1))  # mtime alone is not content
    same = [
        cfg,
        dataclasses.replace(cfg, num_proc=2),
        dataclasses.replace(cfg, min_turns=5),  # only affects builtin:chitchat
        dataclasses.replace(cfg, regenerate=dataclasses.replace(cfg.regenerate, max_new_tokens=7)),
    ]
    for variant in same:
        again = prepare(variant, tok_dir, work, asset_cache)
        assert again.cached and again.cache_key == first.cache_key
        assert again.train_path == first.train_path


KEY_CHANGES = {
    "messages_key": {"messages_key": "conversations"},
    "chat_template": {"chat_template": "llama3"},
    "last_turn_loss_only": {"last_turn_loss_only": "true"},
    "max_seq_length": {"max_seq_length": 300},
    "min_loss_tokens": {"min_loss_tokens": 3},
    "max_conversations": {"max_conversations": 21},
    "eval_conversations": {"eval_conversations": 5},
    "seed": {"seed": 1},
}


@pytest.mark.parametrize("component", sorted(KEY_CHANGES))
def test_each_option_changes_the_key(component, data_file, tok_dir, asset_cache):
    cfg = make_cfg(data_file)
    changed = dataclasses.replace(cfg, **KEY_CHANGES[component])
    assert tk.dataset_cache_key(changed, tok_dir, asset_cache) != tk.dataset_cache_key(
        cfg, tok_dir, asset_cache
    )


def test_data_tokenizer_and_code_changes_change_the_key(
    data_file, tok_dir, asset_cache, monkeypatch
):
    cfg = make_cfg(data_file)
    base = tk.dataset_cache_key(cfg, tok_dir, asset_cache)
    keys = set()
    data_file.write_text(data_file.read_text().replace("a", "A", 1))
    keys.add(tk.dataset_cache_key(cfg, tok_dir, asset_cache))
    (tok_dir / "chat_template.jinja").write_text(
        (tok_dir / "chat_template.jinja").read_text() + " "
    )
    keys.add(tk.dataset_cache_key(cfg, tok_dir, asset_cache))
    (tok_dir / "special_tokens_map.json").write_text("{}")  # a tokenizer file appearing
    keys.add(tk.dataset_cache_key(cfg, tok_dir, asset_cache))
    monkeypatch.setattr(tk, "code_version", lambda modules: "another-version")
    keys.add(tk.dataset_cache_key(cfg, tok_dir, asset_cache))
    assert len(keys) == 4 and base not in keys


def test_changed_inputs_retokenize(tmp_path, data_file, tok_dir, asset_cache, monkeypatch):
    work = tmp_path / "work"
    cfg = make_cfg(data_file, max_conversations=8, eval_conversations=2)
    first = prepare(cfg, tok_dir, work, asset_cache)
    shorter = prepare(dataclasses.replace(cfg, max_seq_length=64), tok_dir, work, asset_cache)
    assert not shorter.cached and shorter.cache_key != first.cache_key
    assert max(tk.load_tokenized(shorter.train_path)["num_tokens"]) <= 64
    data_file.write_text(data_file.read_text().replace("Goals", "Goals!", 1))
    edited = prepare(cfg, tok_dir, work, asset_cache)
    assert not edited.cached and edited.cache_key != first.cache_key
    monkeypatch.setattr(tk, "code_version", lambda modules: "another-version")
    recoded = prepare(cfg, tok_dir, work, asset_cache)
    assert not recoded.cached and recoded.cache_key not in (first.cache_key, edited.cache_key)
    assert prepare(cfg, tok_dir, work, asset_cache).cached
    assert len([p for p in (work / "tokenized").iterdir()]) == 4


def test_bad_inputs_and_tokenization_skips_are_counted(
    tmp_path, chitchat_lines, tok_dir, asset_cache
):
    # a chat template that refuses tool turns, to exercise template_error
    (tok_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
    )
    tool_turns = {
        "id": "tool",
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "calling"},
            {"role": "tool", "content": "result"},
            {"role": "assistant", "content": "done"},
        ],
    }
    long_prompt = {
        "id": "long",
        "messages": [
            {"role": "user", "content": "word " * 400},
            {"role": "assistant", "content": "ok"},
        ],
    }
    short_answer = {
        "id": "short",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "k"}],
    }
    lines = [
        *chitchat_lines[:6],
        "{not json\n",
        json.dumps(tool_turns) + "\n",
        json.dumps(long_prompt) + "\n",
        json.dumps(short_answer) + "\n",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n",
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(lines))
    cfg = make_cfg(data, max_conversations=None, eval_conversations=1, min_loss_tokens=3)
    prepared = prepare(cfg, tok_dir, tmp_path / "work", asset_cache)
    report = prepared.report.data
    assert dict(report.skipped) == {
        "malformed_json": 1,
        "template_error": 1,
        tk.NO_LOSS_TOKENS: 1,
        tk.TOO_FEW_LOSS_TOKENS: 1,
        "no_assistant_turn": 1,
    }
    assert report.examples["malformed_json"][0].startswith("mixed.jsonl:7")
    assert report.examples["template_error"][0].startswith(
        "mixed.jsonl:8 (chat template failed: no tools"
    )
    assert report.examples[tk.NO_LOSS_TOKENS][0].startswith(
        "mixed.jsonl:9 (no assistant tokens in the first 256 of"
    )
    assert report.examples[tk.TOO_FEW_LOSS_TOKENS][0].startswith(
        "mixed.jsonl:10 (2 assistant tokens"
    )
    assert report.examples["no_assistant_turn"][0].startswith("mixed.jsonl:11")
    assert prepared.report.train_samples + prepared.report.eval_samples == 6
    assert prepared.to_dict()["report"]["skipped"]["template_error"] == 1
    assert any("template_error" in line for line in prepared.report.lines())


def test_nothing_valid_after_tokenization_fails_with_one_line_and_leaves_nothing(
    tmp_path, data_file, tok_dir, asset_cache
):
    work = tmp_path / "work"
    cfg = make_cfg(data_file, max_seq_length=8)
    with pytest.raises(DataError) as info:
        prepare(cfg, tok_dir, work, asset_cache)
    message = str(info.value)
    assert "\n" not in message and "no valid training samples" in message
    assert "no_loss_tokens (first: chat.jsonl:" in message
    assert list((work / "tokenized").iterdir()) == []  # no partial cache entry


def test_too_many_eval_conversations_is_a_data_error(tmp_path, data_file, tok_dir, asset_cache):
    cfg = make_cfg(data_file, max_conversations=5, eval_conversations=5)
    with pytest.raises(DataError, match="eval_conversations' \\(5\\) leaves no training data"):
        prepare(cfg, tok_dir, tmp_path / "work", asset_cache)


def test_num_proc_2_matches_num_proc_1(tmp_path, chitchat_lines, tok_dir, asset_cache):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(chitchat_lines))
    cfg = make_cfg(data, max_conversations=None, eval_conversations=8)
    one = prepare(cfg, tok_dir, tmp_path / "w1", asset_cache)
    two = prepare(dataclasses.replace(cfg, num_proc=2), tok_dir, tmp_path / "w2", asset_cache)
    assert one.cache_key == two.cache_key and not two.cached
    for split in ("train_path", "eval_path"):
        a = tk.load_tokenized(getattr(one, split)).to_dict()
        b = tk.load_tokenized(getattr(two, split)).to_dict()
        assert a == b
    timeless = [{**p.report.to_dict(), "seconds": None} for p in (one, two)]
    assert timeless[0] == timeless[1]
    assert one.report.train_samples == 72


def test_builtin_chitchat_and_last_turn_auto(tmp_path, tok_dir, asset_cache):
    cfg = make_cfg("builtin:chitchat", max_conversations=10, eval_conversations=2)
    cfg = dataclasses.replace(cfg, last_turn_loss_only="auto")
    prepared = prepare(cfg, tok_dir, tmp_path / "work", asset_cache)
    assert prepared.report.data_path.endswith(".jsonl") and prepared.report.train_samples == 8
    assert prepared.report.last_turn_only == 0  # chitchat has no reasoning


def test_cli_prepares_and_reports(tmp_path, asset_cache, capsys):
    from spec_core.data.__main__ import main

    args = [
        f"run.output_dir={tmp_path}",
        f"run.cache_dir={asset_cache}",
        "dataset.max_conversations=12",
        "dataset.eval_conversations=2",
        "dataset.num_proc=1",
    ]
    assert main(["--quiet", "--json", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not result["cached"] and result["report"]["train_samples"] == 10
    assert Path(result["train_path"]).is_dir()
    assert main(["--quiet", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cached:") and "train: 10 samples" in out


def test_cli_data_error_is_one_line_without_traceback(tmp_path, asset_cache):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spec_core.data",
            f"dataset.path={bad}",
            f"run.output_dir={tmp_path}",
            f"run.cache_dir={asset_cache}",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert (
        lines[-1].startswith("error: no valid conversations in") and "malformed_json" in lines[-1]
    )
    assert "Traceback" not in proc.stderr


def test_eval_split_rows_are_json_conversations(tmp_path, data_file, tok_dir, asset_cache):
    prepared = prepare(make_cfg(data_file), tok_dir, tmp_path / "work", asset_cache)
    evals = tk.load_tokenized(prepared.eval_path)
    record = json.loads(evals[0]["messages"])
    assert set(record) == {"id", "messages"}
    assert record["messages"][0]["role"] == "user"
    ids = np.asarray(evals[0]["input_ids"])
    assert ids.dtype.kind == "i"


def test_missing_or_broken_tokenizer_is_a_config_error(tmp_path, data_file, asset_cache):
    from spec_core.errors import ConfigError

    empty = tmp_path / "empty-tok"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no tokenizer files"):
        prepare(make_cfg(data_file), empty, tmp_path / "work", asset_cache)
    broken = tmp_path / "broken-tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not a tokenizer")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}')
    with pytest.raises(ConfigError, match="cannot load a tokenizer from"):
        prepare(make_cfg(data_file), broken, tmp_path / "work", asset_cache)


def test_no_eval_conversations_gives_an_empty_loadable_eval_split(
    tmp_path, data_file, tok_dir, asset_cache
):
    prepared = prepare(
        make_cfg(data_file, eval_conversations=0), tok_dir, tmp_path / "w", asset_cache
    )
    evals = tk.load_tokenized(prepared.eval_path)
    assert len(evals) == 0 and evals.column_names == tk.EVAL_COLUMNS
    assert len(tk.load_tokenized(prepared.train_path)) == 20
    assert tk.load_eval_conversations(prepared.eval_path) == []
