"""Regeneration on a tiny random Llama with the real SmolLM2 tokenizer: which turns are replaced,
that everything else is kept byte for byte, end-of-turn stopping, length rules, caching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from spec_core.config import load_config
from spec_core.data import regenerate as rg
from spec_core.data.conversation import Conversation, Message
from spec_core.data.generators import LENGTH, STOP, HFGenerator, SamplingParams
from spec_core.data.load import dataset_fingerprint, load_conversations
from spec_core.data.render import ConversationRenderer
from spec_core.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORDS = [
    {
        "id": "sys-two",
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "  And  three\tplus three? 🙂 "},
            {"role": "assistant", "content": "Six, of course."},
        ],
    },
    {
        "id": "sharegpt-three",
        "conversations": [
            {"from": "human", "value": "hi there"},
            {"from": "gpt", "value": "hello! how are you"},
            {"from": "human", "value": "good, you?"},
            {"from": "gpt", "value": "great thanks"},
            {"from": "human", "value": "nice. bye"},
            {"from": "gpt", "value": "bye!"},
        ],
    },
    {
        "id": "trailing-user",
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Thanks — ünïcödé."},
        ],
    },
    {
        "id": "tool",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "content": "sunny, 21C"},
            {"role": "assistant", "content": "It is sunny."},
        ],
    },
    {
        "id": "single",
        "messages": [
            {"role": "user", "content": "Say something."},
            {"role": "assistant", "content": "Something."},
        ],
    },
]


def write_dataset(path: Path, records: list[dict] = RECORDS) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def make_cfg(target_dir: Path, data: Path, *overrides: str):
    return load_config(
        None,
        [
            f"target.path={target_dir}",
            f"dataset.path={data}",
            "dataset.max_seq_length=512",
            "dataset.regenerate.enabled=true",
            "dataset.regenerate.max_new_tokens=12",
            "dataset.regenerate.batch_size=4",
            *overrides,
        ],
    )


def replaceable(conv: Conversation) -> list[int]:
    return [i for i, m in enumerate(conv.messages) if m.role == "assistant" and not m.tool_calls]


@pytest.fixture(scope="module")
def renderer(untied_target_dir: Path) -> ConversationRenderer:
    from transformers import AutoTokenizer

    return ConversationRenderer(AutoTokenizer.from_pretrained(untied_target_dir))


def hf_greedy_ids(
    target_dir: Path, prompt: list[int], max_new: int, eos_id: int = 49151
) -> list[int]:
    """transformers' own greedy generate of the new ids (the default eos 49151 is never produced
    here: it never stops early)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=2,
    )
    return out[0, len(prompt) :].tolist()


def reference_reply(target_dir: Path, renderer, messages: list[Message], max_new: int) -> str:
    """transformers' own generate on the add_generation_prompt rendering (tool calls inlined as
    the renderer does for templates that ignore them): an independent path."""
    tok = renderer.tokenizer
    ids = tok.apply_chat_template(
        [renderer._message_dict(m) for m in messages], add_generation_prompt=True, tokenize=False
    )
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    out = hf_greedy_ids(target_dir, ids, max_new, eos_id=2)
    if out and out[-1] == 2:
        out = out[:-1]
    return tok.decode(out, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_last_turn_replaced_everything_else_byte_identical(tmp_path, untied_target_dir, renderer):
    data = write_dataset(tmp_path / "chats.jsonl")
    cfg = make_cfg(untied_target_dir, data)
    result = rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "work")
    assert not result.cached and result.output_path.parent.name == result.cache_key
    source = load_conversations(data).conversations
    out = load_conversations(result.output_path)
    assert out.report.num_skipped == 0
    assert [c.id for c in out.conversations] == [c.id for c in source]
    for orig, new in zip(source, out.conversations, strict=True):
        assert len(new.messages) == len(orig.messages)
        last = replaceable(orig)[-1]
        for i, (a, b) in enumerate(zip(orig.messages, new.messages, strict=True)):
            if i == last:
                assert b.role == "assistant" and b.content != a.content and b.content.strip()
                # the reply to the conversation so far, by transformers' own generate
                expected = reference_reply(untied_target_dir, renderer, orig.messages[:i], 12)
                assert b.content == expected
            else:
                assert json.dumps(b.to_dict(), ensure_ascii=False) == json.dumps(
                    a.to_dict(), ensure_ascii=False
                )
    m = result.manifest
    assert m["counts"]["written"] == m["counts"]["selected"] == len(RECORDS)
    assert m["counts"]["turns_regenerated"] == len(RECORDS)
    assert m["tokens_generated"] > 0 and m["sampling"]["max_new_tokens"] == 12
    assert m["source"]["sha256"] == dataset_fingerprint(data)
    assert json.loads(result.manifest_path.read_text()) == m
    assert not (result.output_path.parent / rg.PARTIAL).exists()


def test_all_turns_replaced_each_on_the_regenerated_history(tmp_path, untied_target_dir, renderer):
    data = write_dataset(tmp_path / "chats.jsonl")
    cfg = make_cfg(untied_target_dir, data, "dataset.regenerate.turns=all")
    result = rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "work")
    source = {c.id: c for c in load_conversations(data).conversations}
    out = load_conversations(result.output_path).conversations
    assert result.manifest["counts"]["turns_regenerated"] == sum(
        len(replaceable(c)) for c in source.values()
    )
    for new in out:
        orig = source[new.id]
        targets = replaceable(orig)
        for i, (a, b) in enumerate(zip(orig.messages, new.messages, strict=True)):
            assert (b.to_dict() != a.to_dict()) == (i in targets)
        # the last reply was generated after the *regenerated* earlier replies
        last = targets[-1]
        expected = reference_reply(untied_target_dir, renderer, new.messages[:last], 12)
        assert new.messages[last].content == expected


def test_max_turns_and_max_seq_length_cut_and_count(tmp_path, untied_target_dir, renderer):
    data = write_dataset(tmp_path / "chats.jsonl")
    cfg = make_cfg(untied_target_dir, data, "dataset.regenerate.max_turns=2")
    out = rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "w1")
    convs = load_conversations(out.output_path).conversations
    for conv in convs:
        body = [m for m in conv.messages if m.role != "system"]
        assert len(body) <= 2
    # the tool conversation keeps only user + tool call: no replaceable turn is left
    assert out.manifest["counts"]["skipped"] == {rg.NO_REPLACEABLE_TURN: 1}
    assert "tool" not in [c.id for c in convs]

    # A budget that fits the first exchange of every chat but not the later turns: with
    # turns=last the conversation is cut back to the last turn that fits.
    planner = rg._Planner(renderer, cfg.dataset.regenerate, 512)
    source = {c.id: c for c in load_conversations(data).conversations}
    first = len(planner.prompt_ids(source["sys-two"].messages[:3]))
    second = len(planner.prompt_ids(source["sys-two"].messages[:5]))
    max_len = second + 12 + rg.TAIL_TOKENS - 1  # second turn misses by one token
    cfg = make_cfg(untied_target_dir, data, f"dataset.max_seq_length={max_len}")
    out = rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "w2")
    convs = {c.id: c for c in load_conversations(out.output_path).conversations}
    sys_two = convs["sys-two"]
    assert len(sys_two.messages) == 3 and first + 12 + rg.TAIL_TOKENS <= max_len  # cut
    assert sys_two.messages[:2] == source["sys-two"].messages[:2]
    assert sys_two.messages[2].content != "Four."
    assert out.manifest["counts"]["cut"] >= 1

    # Nothing fits: every conversation is skipped and the step fails with one clear line.
    cfg = make_cfg(untied_target_dir, data, "dataset.max_seq_length=20")
    with pytest.raises(DataError, match="no conversation"):
        rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "w3")


def test_generator_stops_each_row_at_its_end_of_turn(untied_target_dir, renderer):
    tok = renderer.tokenizer
    prompts = [
        tok("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")["input_ids"],
        tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")["input_ids"],
        tok("a b c d e f")["input_ids"],
    ]
    raw = [hf_greedy_ids(untied_target_dir, p, 12) for p in prompts]
    assert 49151 not in sum(raw, [])
    # Stop where row 0 emits its 4th token: row 0 stops there, each other row wherever that
    # token first appears in its own continuation (or runs to max_new_tokens).
    stop_id = raw[0][3]
    gen = HFGenerator(untied_target_dir, tok, [stop_id], batch_size=3)
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=12), 0)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for row, out in zip(raw, outs, strict=True):
        if stop_id in row:
            cut = row.index(stop_id)
            assert (out.finish_reason, out.num_tokens) == (STOP, cut + 1)
            assert out.text == decode(row[:cut])  # the stop token is not in the text
        else:
            assert (out.finish_reason, out.num_tokens) == (LENGTH, 12)
            assert out.text == decode(row)
    assert outs[0].finish_reason == STOP and outs[0].num_tokens <= 4


def test_batched_left_padded_generation_equals_one_by_one(untied_target_dir, renderer):
    tok = renderer.tokenizer
    texts = ["hi", "a much longer prompt with many more tokens in it than the others", "ok then"]
    prompts = [tok(t)["input_ids"] for t in texts]
    params = SamplingParams(max_new_tokens=10)
    gen = HFGenerator(untied_target_dir, tok, [2], batch_size=3)
    batched = gen.generate(prompts, params, 0)
    single = [gen.generate([p], params, 0)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in single]


def test_sampling_is_seeded(tmp_path, untied_target_dir):
    data = write_dataset(tmp_path / "chats.jsonl", RECORDS[:2])
    sampled = ("dataset.regenerate.temperature=1.0", "dataset.regenerate.top_p=0.9")

    def run(work: str, seed: int) -> bytes:
        cfg = make_cfg(untied_target_dir, data, *sampled, f"dataset.regenerate.seed={seed}")
        return rg.regenerate_dataset(
            cfg, data, untied_target_dir, tmp_path / work
        ).output_path.read_bytes()

    assert run("a", 1) == run("b", 1)
    assert run("c", 2) != run("a", 1)


def test_reasoning_is_split_from_the_answer_and_renders_back(untied_target_dir):
    from transformers import AutoTokenizer

    cfg = make_cfg(untied_target_dir, Path("unused"), "dataset.regenerate.turns=all")
    thinking = rg._Planner(
        ConversationRenderer(AutoTokenizer.from_pretrained(untied_target_dir), "qwen3-thinking"),
        cfg.dataset.regenerate,
        512,
    )
    generated = "<think>\nThe user greets me.\n</think>\n\nHello!"
    assert thinking.split(generated) == ("The user greets me.", "Hello!")
    assert thinking.split("<think>\nstill thinking when cut") == (
        None,
        "<think>\nstill thinking when cut",
    )
    reasoning, content = thinking.split(generated)
    conv = Conversation(
        "t", [Message("user", "hi"), Message("assistant", content, reasoning_content=reasoning)]
    )
    prompt_text = thinking.renderer.render(
        Conversation("t", [Message("user", "hi"), Message("assistant", "x")])
    ).split("x<|im_end|>")[0]
    assert thinking.renderer.render(conv) == prompt_text + generated + "<|im_end|>\n"
    chatml = rg._Planner(
        ConversationRenderer(AutoTokenizer.from_pretrained(untied_target_dir)),
        cfg.dataset.regenerate,
        512,
    )
    assert chatml.split(generated) == (None, generated)  # no thinking template: kept verbatim


def test_cache_key_changes_with_each_component(tmp_path, untied_target_dir, monkeypatch):
    from spec_core.assets import build_tiny_target

    data = write_dataset(tmp_path / "chats.jsonl")
    base = make_cfg(untied_target_dir, data)
    key = rg.regen_cache_key(base, data, untied_target_dir)
    assert key == rg.regen_cache_key(make_cfg(untied_target_dir, data), data, untied_target_dir)

    def key_with(*overrides: str, data_path: Path = data, target: Path = untied_target_dir) -> str:
        return rg.regen_cache_key(make_cfg(target, data_path, *overrides), data_path, target)

    # settings that do not change the output: hit
    for same in (
        "dataset.regenerate.batch_size=1",
        "dataset.regenerate.concurrency=9",
        "dataset.regenerate.seed=5",  # greedy ignores the seed
        "dataset.regenerate.top_p=0.5",
        "dataset.regenerate.request_timeout_s=3",
    ):
        assert key_with(same) == key, same
    # each component that does: miss
    for changed in (
        "dataset.regenerate.max_new_tokens=7",
        "dataset.regenerate.temperature=0.7",
        "dataset.regenerate.turns=all",
        "dataset.regenerate.max_turns=2",
        "dataset.regenerate.max_conversations=2",
        "dataset.max_conversations=3",
        "dataset.max_seq_length=256",
        "dataset.chat_template=chatml",
        "dataset.regenerate.engine=openai",
    ):
        extra = (
            ("dataset.regenerate.endpoint=http://127.0.0.1:1/v1",) if "openai" in changed else ()
        )
        assert key_with(changed, *extra) != key, changed
    sampled = key_with("dataset.regenerate.temperature=0.7")
    assert key_with("dataset.regenerate.temperature=0.7", "dataset.regenerate.seed=5") != sampled

    # dataset bytes
    other_data = write_dataset(tmp_path / "other.jsonl", RECORDS[:-1])
    assert key_with(data_path=other_data) != key
    # target weights, and target tokenizer files
    retrained = build_tiny_target(tmp_path / "retrained", untied_target_dir, seed=1)
    assert key_with(target=retrained) != key
    edited = tmp_path / "edited"
    shutil.copytree(untied_target_dir, edited)
    assert key_with(target=edited) == key
    chat_template = edited / "chat_template.jinja"
    chat_template.write_text(chat_template.read_text() + " ")
    assert key_with(target=edited) != key
    # code version
    monkeypatch.setattr(rg, "code_version", lambda modules: "another-version")
    assert key_with() != key


def test_second_call_is_a_cache_hit_that_generates_nothing(
    tmp_path, untied_target_dir, monkeypatch
):
    data = write_dataset(tmp_path / "chats.jsonl")
    cfg = make_cfg(untied_target_dir, data)
    first = rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "work")
    content = first.output_path.read_bytes()

    def boom(*args, **kwargs):
        raise AssertionError("a cache hit must not build a generator")

    monkeypatch.setattr(rg, "_make_generator", boom)
    seen = []
    again = rg.regenerate_dataset(
        cfg, data, untied_target_dir, tmp_path / "work", progress=lambda d, t: seen.append((d, t))
    )
    assert again.cached and again.cache_key == first.cache_key
    assert again.output_path.read_bytes() == content
    assert seen[-1] == (len(RECORDS), len(RECORDS))
    assert rg.RegenResult.from_dict(again.to_dict()) == again
    # what tokenization reads next: the regenerated file, in OpenAI messages format
    ds = again.dataset_config(
        make_cfg(untied_target_dir, data, "dataset.messages_key=conversations").dataset
    )
    assert (ds.path, ds.messages_key) == (str(again.output_path), "messages")
    assert len(load_conversations(Path(ds.path), ds.messages_key).conversations) == len(RECORDS)


def test_bad_settings_fail_with_one_line(tmp_path, untied_target_dir):
    data = write_dataset(tmp_path / "chats.jsonl")
    for overrides, match in (
        (("dataset.regenerate.max_turns=1",), "max_turns"),
        (("dataset.regenerate.max_new_tokens=600",), "max_new_tokens"),
        (("dataset.regenerate.top_p=0",), "top_p"),
        (("dataset.regenerate.batch_size=0",), "batch_size"),
        (("dataset.regenerate.num_threads=-1",), "num_threads"),
    ):
        cfg = make_cfg(untied_target_dir, data, *overrides)
        with pytest.raises(ConfigError, match=match):
            rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "work")


def test_num_threads_applies_while_generating_only(tmp_path, untied_target_dir):
    data = write_dataset(tmp_path / "chats.jsonl", RECORDS[:2])
    cfg = make_cfg(untied_target_dir, data, "dataset.regenerate.num_threads=2")
    seen = []
    before = torch.get_num_threads()
    rg.regenerate_dataset(
        cfg,
        data,
        untied_target_dir,
        tmp_path / "work",
        progress=lambda d, t: seen.append(torch.get_num_threads()),
    )
    assert seen[-1] == 2  # reported from inside the generation loop
    assert torch.get_num_threads() == before


def test_turns_last_cuts_back_to_the_last_turn_that_fits(untied_target_dir, renderer):
    exchanges = [
        m
        for k in range(8)
        for m in (Message("user", f"question {k} " + "word " * 10), Message("assistant", f"a{k}"))
    ]
    conv = Conversation("long", exchanges)
    cfg = make_cfg(untied_target_dir, Path("unused"))
    probe = rg._Planner(renderer, cfg.dataset.regenerate, 512)
    lengths = [len(probe.prompt_ids(exchanges[: 2 * k + 2])) for k in range(8)]
    # room for the prompts of the first three replies only
    max_len = lengths[2] + 12 + rg.TAIL_TOKENS
    planner = rg._Planner(renderer, cfg.dataset.regenerate, max_len)
    job = planner.job(0, conv)
    assert job.cut and job.skip is None
    assert job.messages == exchanges[:6] and job.pending == [5]
    assert len(job.prompt) == lengths[2]
    # nothing fits: skipped with the reason counted
    tiny = rg._Planner(renderer, cfg.dataset.regenerate, lengths[0] + 12)
    assert tiny.job(0, conv).skip == rg.PROMPT_TOO_LONG


@pytest.mark.gpu
def test_generator_on_cuda_matches_transformers_generate(untied_target_dir, renderer):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    tok = renderer.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("hi", "a longer prompt than the first one", "ok")]
    gen = HFGenerator(untied_target_dir, tok, [2], batch_size=3, device="cuda")
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=10), 0)
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            ref = gen.model.generate(
                input_ids=torch.tensor([prompt], device="cuda"),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=2,
                pad_token_id=2,
            )[0, len(prompt) :].tolist()
        body = ref[:-1] if ref[-1] == 2 else ref
        assert out.text == tok.decode(body, skip_special_tokens=False)
