"""Evaluation prompt sets: how each kind is cut, that held-out kinds never leave the held-out
conversations, the standard sets shipped in packages, local prompt files, config errors, and the
weighted summary of per-set results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluate import (
    chat,
    eval_split,  # noqa: F401  (fixture)
)
from test_evaluate import renderer as chat_renderer  # noqa: F401  (fixture)

from spec_core.acceptance.stats import set_table, weighted_summary
from spec_core.config import PromptSetConfig, load_config
from spec_core.data.conversation import Message
from spec_core.data.prompt_sets import (
    HUMANEVAL_INSTRUCTION,
    NO_LATER_TURN,
    PROMPT_TOO_LONG,
    PromptSources,
    build_prompt_set,
    first_turn_ids,
    generation_prompt_ids,
    later_turn_ids,
)
from spec_core.errors import ConfigError, DataError


def sources(renderer, eval_path=None, dataset_path=None, **ev) -> PromptSources:
    ev = load_config(None, [f"evaluation.{k}={v}" for k, v in ev.items()]).evaluation
    return PromptSources(renderer, ev, eval_path, None, dataset_path)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sharegpt(conv_id: str, *turns: str) -> dict:
    roles = ("human", "gpt")
    return {
        "id": conv_id,
        "conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)],
    }


def test_first_and_later_turn_cuts(chat_renderer):  # noqa: F811
    r = chat_renderer
    conv = chat("q1 " * 30, "a1", "q2", "a2", "q3", "a3", system="Be brief.")
    first, _ = first_turn_ids(conv, r, 10_000)
    assert first == generation_prompt_ids(r, conv.messages[:2])
    later, _ = later_turn_ids(conv, r, 10_000)
    assert later == generation_prompt_ids(r, conv.messages[:6])  # before the last turn
    # The latest later turn that fits whole; earlier turns are never dropped.
    budget = len(generation_prompt_ids(r, conv.messages[:4]))
    assert later_turn_ids(conv, r, budget) == (generation_prompt_ids(r, conv.messages[:4]), None)
    assert later_turn_ids(conv, r, budget - 1) == (None, PROMPT_TOO_LONG)
    assert later_turn_ids(chat("q", "a"), r, 512) == (None, NO_LATER_TURN)
    assert first_turn_ids(conv, r, 5) == (None, PROMPT_TOO_LONG)


@pytest.fixture(scope="module")
def split(tmp_path_factory, tiny_target_dir, asset_cache):
    """A full dataset, a copy cut to first exchanges (what ``regenerate.max_turns: 2`` leaves),
    and the eval split tokenized from the cut copy."""
    from spec_core.data.tokenize import load_eval_conversations, prepare_dataset

    root = tmp_path_factory.mktemp("prompt-sets")
    full = [
        sharegpt(f"c{i}", f"hello {i}", f"hi {i}", f"how is {i}?", f"fine {i}", f"bye {i}", "bye")
        for i in range(20)
    ]
    full_path = write_jsonl(root / "full.jsonl", full)
    cut = [dict(r, conversations=r["conversations"][:2]) for r in full]
    cut_path = write_jsonl(root / "cut.jsonl", cut)
    cfg = load_config(
        None,
        [
            f"dataset.path={cut_path}",
            "dataset.eval_conversations=6",
            "dataset.num_proc=1",
        ],
    )
    eval_path = prepare_dataset(
        cfg.dataset, tiny_target_dir, root / "work", asset_cache, progress=False
    ).eval_path
    held_out = {c.id for c in load_eval_conversations(eval_path)}
    return {"eval": eval_path, "full": full_path, "cut": cut_path, "held_out": held_out}


def test_mid_conversation_prompts_come_from_held_out_conversations(chat_renderer, split):  # noqa: F811
    src = sources(chat_renderer, split["eval"], split["full"], num_prompts=10)
    first = build_prompt_set(PromptSetConfig(source="first_turns"), src)
    mid = build_prompt_set(PromptSetConfig(source="mid_conversation"), src)
    assert len(first.prompts) == len(mid.prompts) == 6  # every held-out conversation, no other
    assert {p.id for p in mid.prompts} == {p.id for p in first.prompts} == split["held_out"]
    for f, m in zip(first.prompts, mid.prompts, strict=True):
        i = f.id[1:]
        text = chat_renderer.tokenizer.decode(m.input_ids)
        assert f"fine {i}" in text and f"bye {i}" in text  # the later turns of the full copy
        assert m.input_ids[: len(f.input_ids) - 3] == f.input_ids[:-3]  # same opening turn
    # The pipeline points dataset.path at the regenerated file: its manifest leads to the source.
    regen = split["full"].parent / "regenerated" / "key"
    regen.mkdir(parents=True, exist_ok=True)
    (regen / "conversations.jsonl").write_text(split["cut"].read_text())
    (regen / "manifest.json").write_text(json.dumps({"source": {"path": str(split["full"])}}))
    via_regen = sources(chat_renderer, split["eval"], regen / "conversations.jsonl", num_prompts=10)
    again = build_prompt_set(PromptSetConfig(source="mid_conversation"), via_regen)
    assert [p.input_ids for p in again.prompts] == [p.input_ids for p in mid.prompts]
    # Without the full copy the cut split has no later turn: every prompt is skipped, loudly.
    with pytest.raises(DataError, match="mid_conversation.*no_later_assistant_turn"):
        build_prompt_set(
            PromptSetConfig(source="mid_conversation"), sources(chat_renderer, split["eval"])
        )


def test_standard_sets_ship_in_packages(chat_renderer):  # noqa: F811
    src = sources(chat_renderer, num_prompts=200, max_prompt_tokens=2048)
    humaneval = build_prompt_set(PromptSetConfig(source="humaneval"), src)
    assert len(humaneval.prompts) == 164 and humaneval.prompts[0].id == "HumanEval/0"
    text = chat_renderer.tokenizer.decode(humaneval.prompts[0].input_ids)
    assert HUMANEVAL_INSTRUCTION.strip() in text and "def has_close_elements" in text
    mt = build_prompt_set(PromptSetConfig(source="mt_bench", num_prompts=5), src)
    assert len(mt.prompts) == 5 and mt.prompts[0].id == "81"  # MT-Bench's first question id
    assert mt.origin.endswith("mt_bench/question.jsonl")


def test_a_local_file_of_prompts_and_conversations(chat_renderer, tmp_path):  # noqa: F811
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {"question": "What is 2 + 3?", "answer": "5"},  # GSM8K
        {"question_id": 7, "turns": ["Write a haiku.", "Now another."]},  # MT-Bench
        {"id": "chat", "messages": [{"role": "user", "content": "hi"}]},  # ends in a user turn
        {
            "id": "chat2",
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
        {"prompt": ""},  # unusable
    ]
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    src = sources(chat_renderer)
    got = build_prompt_set(PromptSetConfig(source="file", path=str(path)), src)
    assert [p.id for p in got.prompts] == ["mine.jsonl:1", "7", "chat", "chat2"]
    assert got.name == "mine" and got.skipped == {"bad_record": 1} and got.considered == 5
    decoded = chat_renderer.tokenizer.decode(got.prompts[1].input_ids)
    assert "Write a haiku." in decoded and "Now another." not in decoded
    assert got.prompts[3].input_ids == generation_prompt_ids(chat_renderer, [Message("user", "a")])
    table = pa.table({"prompt": ["one", "two"], "id": ["x", "y"]})
    pq.write_table(table, tmp_path / "p.parquet")
    parquet = build_prompt_set(
        PromptSetConfig(source="file", path=str(tmp_path / "p.parquet"), name="pq"), src
    )
    assert [p.id for p in parquet.prompts] == ["x", "y"] and parquet.name == "pq"
    with pytest.raises(ConfigError, match="does not exist"):
        build_prompt_set(PromptSetConfig(source="file", path=str(tmp_path / "no.jsonl")), src)


@pytest.mark.parametrize(
    "sets, message",
    [
        ("[{source: file}]", r"prompts\[0\].path' is required"),
        ("[{source: humaneval, path: x.jsonl}]", r"prompts\[0\].path' is required"),
        ("[{source: gsm8k}]", "valid choices: held_out, first_turns"),
        ("[{source: humaneval}, {source: humaneval}]", "second prompt set named 'humaneval'"),
        ("[{source: humaneval, weight: 0}]", "weights sum to 0"),
    ],
)
def test_bad_prompt_set_config_fails_with_one_line(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"evaluation.prompts={sets}"])


def result(tau: float, alpha: list[float], prompts: int, lossless: bool = True) -> dict:
    return {
        "tau": tau,
        "acceptance_rate": (tau - 1) / len(alpha),
        "wall_speedup": tau / 2,
        "alpha": alpha,
        "accept_rate_per_position": alpha,
        "num_prompts": prompts,
        "num_steps": 10,
        "num_draft_tokens": 30,
        "num_accepted_tokens": 5,
        "generated_tokens": 15,
        "accepted_per_position": [3, 1, 1],
        "accept_length_histogram": [5, 2, 2, 1],
        "lossless": lossless,
        "mismatched_prompts": [] if lossless else ["p1"],
        "speculative": {"wall_s": 2.0, "tokens_per_s": 10.0},
        "baseline": {"wall_s": 3.0, "tokens_per_s": 5.0},
        "depth": {"max_depth": 2, "k": [1, 2], "tau": [tau - 0.5, tau]},
    }


def test_weighted_summary_by_hand():
    sets = {"chat": result(3.0, [0.8, 0.6, 0.4], 40), "code": result(1.5, [0.3, 0.1, 0.0], 10)}
    summary = weighted_summary(sets, {"chat": 3.0, "code": 1.0})
    assert summary["tau"] == pytest.approx((3 * 3.0 + 1.5) / 4)
    assert summary["alpha"] == pytest.approx([(2.4 + 0.3) / 4, (1.8 + 0.1) / 4, 1.2 / 4])
    assert summary["num_prompts"] == 50 and summary["accept_length_histogram"] == [10, 4, 4, 2]
    assert summary["speculative"] == {"wall_s": 4.0, "tokens_per_s": pytest.approx(10.0)}
    assert summary["depth"]["tau"] == pytest.approx([(3 * 2.5 + 1.0) / 4, summary["tau"]])
    assert summary["lossless"]
    lossy = weighted_summary(
        {"chat": sets["chat"], "code": result(1.5, [0.3, 0.1, 0.0], 10, lossless=False)},
        {"chat": 1.0, "code": 1.0},
    )
    assert not lossy["lossless"] and lossy["mismatched_prompts"] == ["code/p1"]
    assert lossy["tau"] == pytest.approx(2.25)
    rows = set_table(sets, summary)
    assert [r["set"] for r in rows] == ["chat", "code", "summary (weighted)"]
    assert rows[-1]["tau"] == pytest.approx(summary["tau"], abs=1e-4) and rows[0]["weight"] == 3.0


def test_conversation_records_need_messages(chat_renderer, tmp_path):  # noqa: F811
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt key"}])
    with pytest.raises(DataError, match="no usable prompt or conversation"):
        build_prompt_set(PromptSetConfig(source="file", path=str(path)), sources(chat_renderer))


def test_cli_writes_per_set_results_table_and_plots(tiny_target_dir, eval_split, tmp_path):  # noqa: F811
    """``specflow evaluate`` with three kinds of sets: each set's result, the weighted summary,
    the per-set table and both plots land in the eval dir."""
    from test_evaluate import draft_for, export_model

    from spec_core.evaluate import main

    hf_dir = export_model(draft_for(tiny_target_dir), tmp_path / "draft")
    sets = "[{source: first_turns}, {source: mid_conversation}, {source: humaneval, weight: 2}]"
    args = [
        f"--draft={hf_dir}",
        f"--eval-data={eval_split}",
        f"--out={tmp_path / 'ev'}",
        f"target.path={tiny_target_dir}",
        "dataset.max_conversations=24",
        "evaluation.num_prompts=2",
        "evaluation.max_new_tokens=6",
        "evaluation.sweep_depth=3",
        f"evaluation.prompts={sets}",
        f"run.output_dir={tmp_path}",
    ]
    assert main(args) == 0
    out = tmp_path / "ev"
    result = json.loads((out / "acceptance.json").read_text())
    assert set(result["sets"]) == {"first_turns", "mid_conversation", "humaneval"}
    assert result["weights"] == {"first_turns": 1.0, "mid_conversation": 1.0, "humaneval": 2.0}
    taus = {n: r["tau"] for n, r in result["sets"].items()}
    assert result["tau"] == pytest.approx(
        (taus["first_turns"] + taus["mid_conversation"] + 2 * taus["humaneval"]) / 4
    )
    assert all(r["num_prompts"] == 2 for r in result["sets"].values())
    first = {p["id"]: p["prompt_ids"] for p in result["sets"]["first_turns"]["prompts"]}
    mid = {p["id"]: p["prompt_ids"] for p in result["sets"]["mid_conversation"]["prompts"]}
    assert all(len(mid[i]) > len(first[i]) for i in set(first) & set(mid))
    table = json.loads((out / "acceptance_sets.json").read_text())
    assert [row["set"] for row in table][-1] == "summary (weighted)"
    assert len(result["depth"]["tau"]) == 3
    for name in ("acceptance.png", "depth_sweep.png"):
        assert (out / name).stat().st_size > 1000
