"""Chat templates and assistant-only loss masks, checked by hand for every registered template.

Templates whose special tokens SmolLM2 lacks run on a copy of the real SmolLM2 tokenizer with
those tokens added, so both mask paths (character offsets, token-id scan) see real BPE merges.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from spec_core.data.conversation import Conversation, Message
from spec_core.data.render import (
    ConversationRenderer,
    render_conversation,
    wants_last_turn_only,
)
from spec_core.data.templates import TEMPLATES, Span, get_template, last_turn
from spec_core.errors import ConfigError

# ------------------------------------------------------------------ oracle: the mask from ids alone
# The production path builds masks from character offsets; this independent scan over token ids
# must agree with it on every template.


@dataclass(frozen=True)
class TokenMarkers:
    """A template's markers as token ids, for masks computed from ids alone."""

    header_ids: tuple[int, ...]  # the header without its trailing whitespace
    tail_chars: int  # length of that trailing whitespace
    end_ids: tuple[tuple[int, ...], ...]
    token_chars: np.ndarray  # decoded length of every token id (walks the header tail)


def mask_from_token_ids(
    input_ids: Sequence[int], markers: TokenMarkers, last_turn_only: bool = False
) -> np.ndarray:
    """The loss mask from token ids alone (e.g. for sequences an engine tokenized itself)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    n, header = len(ids), markers.header_ids
    spans: list[Span] = []
    i = 0
    for i0 in np.flatnonzero(ids == header[0]):
        if i0 < i or tuple(ids[i0 : i0 + len(header)]) != header:
            continue
        start, remaining = int(i0) + len(header), markers.tail_chars
        while remaining > 0 and start < n:  # tokens starting inside the header tail
            remaining -= int(markers.token_chars[ids[start]])
            start += 1
        if start >= n:  # a header that ends the sequence opens no turn
            break
        end = _find_end(ids, start, markers.end_ids)
        spans.append(Span(int(i0), start, end))
        i = end
    if last_turn_only:
        spans = last_turn(spans)
    mask = np.zeros(n, dtype=np.uint8)
    for span in spans:
        mask[span.content_start : span.end] = 1
    return mask


def _find_end(ids: np.ndarray, start: int, end_ids: tuple[tuple[int, ...], ...]) -> int:
    """End (exclusive) of the earliest end-of-turn sequence at or after ``start``, else len."""
    best_k, best_end = len(ids), len(ids)
    for seq in end_ids:
        for k in np.flatnonzero(ids[start:best_k] == seq[0]) + start:
            if tuple(ids[k : k + len(seq)]) == seq:
                best_k, best_end = int(k), int(k) + len(seq)
                break
    return best_end


def token_markers(renderer: ConversationRenderer) -> TokenMarkers:
    """The template's markers as ids; ConfigError if the header does not tokenize stably."""
    header = renderer.template.assistant_header
    core = header.rstrip()
    encode = renderer._backend.encode
    header_ids = tuple(encode(core, add_special_tokens=False).ids)
    if (
        not header_ids
        or tuple(encode(header, add_special_tokens=False).ids)[: len(header_ids)] != header_ids
    ):
        raise ConfigError(f"assistant header {header!r} does not tokenize stably")
    ends = tuple(
        tuple(encode(e, add_special_tokens=False).ids) for e in renderer.template.end_of_turn
    )
    vocab = renderer._backend.get_vocab_size()
    pieces = renderer._backend.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
    return TokenMarkers(
        header_ids,
        len(header) - len(core),
        ends,
        np.fromiter((len(p) for p in pieces), dtype=np.int64, count=vocab),
    )


CONV = Conversation(
    "hand",
    [
        Message("system", "Be brief."),
        Message("user", "Hi there"),
        Message("assistant", "Hello! How can I help?"),
        Message("user", "Tell me a joke"),
        Message("assistant", "Why did the chicken cross the road?"),
    ],
)
A1, A2 = "Hello! How can I help?", "Why did the chicken cross the road?"

# Hand-written renderings of CONV: (full text, supervised segments).
EXPECTED = {
    "gemma": (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        f"<start_of_turn>model\n{A1}<end_of_turn>\n"
        "<start_of_turn>user\nTell me a joke<end_of_turn>\n"
        f"<start_of_turn>model\n{A2}<end_of_turn>\n",
        [f"{A1}<end_of_turn>", f"{A2}<end_of_turn>"],
    ),
    "mistral": (
        f"<s>[INST] Be brief.\n\nHi there [/INST]{A1}</s>[INST] Tell me a joke [/INST]{A2}</s>",
        [f"{A1}</s>", f"{A2}</s>"],
    ),
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\nTell me a joke<|im_end|>\n"
        f"<|im_start|>assistant\n{A2}<|im_end|>\n",
        [f"{A1}<|im_end|>", f"{A2}<|im_end|>"],
    ),
    "qwen": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\nTell me a joke<|im_end|>\n"
        f"<|im_start|>assistant\n{A2}<|im_end|>\n",
        [f"{A1}<|im_end|>", f"{A2}<|im_end|>"],
    ),
    "qwen3-instruct": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\n\n</think>\n\n{A1}<|im_end|>\n"
        "<|im_start|>user\nTell me a joke<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\n\n</think>\n\n{A2}<|im_end|>\n",
        [f"{A1}<|im_end|>", f"{A2}<|im_end|>"],
    ),
    "qwen3-thinking": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\nTell me a joke<|im_end|>\n"
        f"<|im_start|>assistant\n{A2}<|im_end|>\n",
        [f"{A1}<|im_end|>", f"{A2}<|im_end|>"],
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTell me a joke<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A2}<|eot_id|>",
        [f"{A1}<|eot_id|>", f"{A2}<|eot_id|>"],
    ),
    "llama4": (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi there<|eot|>"
        f"<|header_start|>assistant<|header_end|>\n\n{A1}<|eot|>"
        "<|header_start|>user<|header_end|>\n\nTell me a joke<|eot|>"
        f"<|header_start|>assistant<|header_end|>\n\n{A2}<|eot|>",
        [f"{A1}<|eot|>", f"{A2}<|eot|>"],
    ),
    "deepseek-v3": (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there"
        f"<｜Assistant｜>{A1}<｜end▁of▁sentence｜><｜User｜>Tell me a joke"
        f"<｜Assistant｜>{A2}<｜end▁of▁sentence｜>",
        [f"{A1}<｜end▁of▁sentence｜>", f"{A2}<｜end▁of▁sentence｜>"],
    ),
    "kimi-k2": (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi there<|im_end|>"
        f"<|im_assistant|>assistant<|im_middle|>{A1}<|im_end|>"
        "<|im_user|>user<|im_middle|>Tell me a joke<|im_end|>"
        f"<|im_assistant|>assistant<|im_middle|>{A2}<|im_end|>",
        [f"{A1}<|im_end|>", f"{A2}<|im_end|>"],
    ),
    "gpt-oss": (
        "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
        "<|start|>user<|message|>Hi there<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{A1}<|end|>"
        "<|start|>user<|message|>Tell me a joke<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{A2}<|return|>",
        # the channel tokens are generated by the model, so they are supervised too
        [f"<|channel|>final<|message|>{A1}<|end|>", f"<|channel|>final<|message|>{A2}<|return|>"],
    ),
    "phi4": (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
        "<|im_start|>user<|im_sep|>Hi there<|im_end|>"
        f"<|im_start|>assistant<|im_sep|>{A1}<|im_end|>"
        "<|im_start|>user<|im_sep|>Tell me a joke<|im_end|>"
        f"<|im_start|>assistant<|im_sep|>{A2}<|im_end|>",
        [f"{A1}<|im_end|>", f"{A2}<|im_end|>"],
    ),
}


@pytest.fixture(scope="module")
def multi_tokenizer(smollm2_dir):
    """SmolLM2's real tokenizer plus every registered template's special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    specials = sorted({t for tpl in TEMPLATES.values() for t in tpl.special_tokens})
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


@pytest.fixture(scope="module")
def renderers(multi_tokenizer):
    return {name: ConversationRenderer(multi_tokenizer, name) for name in TEMPLATES}


def segments(tokenizer, ids, mask) -> tuple[list[str], list[str]]:
    """Decoded runs of supervised and of unsupervised tokens."""
    sup, unsup, run, state = [], [], [], None
    for token, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if state is not None and m != state:
            (sup if state else unsup).append(tokenizer.decode(run))
            run = []
        run.append(token)
        state = m
    if run:
        (sup if state else unsup).append(tokenizer.decode(run))
    return sup, unsup


def test_every_issue_template_is_registered():
    wanted = {"chatml", "llama3", "llama4", "qwen", "qwen3-instruct", "qwen3-thinking"}
    wanted |= {"deepseek-v3", "kimi-k2", "gpt-oss", "phi4", "gemma", "mistral"}
    assert wanted <= set(TEMPLATES) and set(EXPECTED) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hand_checked_rendering_and_mask(name, renderers, multi_tokenizer):
    renderer = renderers[name]
    text, expected_supervised = EXPECTED[name]
    assert renderer.render(CONV) == text
    sample = renderer.tokenize(CONV)
    sup, unsup = segments(multi_tokenizer, sample.input_ids, sample.loss_mask)
    assert sup == expected_supervised
    unsupervised_text = "".join(unsup)
    for fragment in (
        "Be brief.",
        "Hi there",
        "Tell me a joke",
        get_template(name).assistant_header,
    ):
        assert fragment in unsupervised_text
    assert A1 not in unsupervised_text and A2 not in unsupervised_text
    # each template's own special tokens are single tokens here (no accidental splits)
    assert multi_tokenizer.decode(sample.input_ids) == text


def test_smollm2_own_template_default_system_prompt_and_ids(smollm2_tokenizer):
    conv = Conversation("s", CONV.messages[1:])  # no system: SmolLM2 inserts its own
    renderer = ConversationRenderer(smollm2_tokenizer)
    assert renderer.template_name == "chatml" and renderer.jinja is None
    sample = renderer.tokenize(conv)
    sup, unsup = segments(smollm2_tokenizer, sample.input_ids, sample.loss_mask)
    assert sup == [f"{A1}<|im_end|>", f"{A2}<|im_end|>"]
    assert "You are a helpful AI assistant named SmolLM" in unsup[0]
    messages = [m.to_dict() for m in conv.messages]
    reference = smollm2_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert sample.input_ids.tolist() == list(reference)
    assert sample.input_ids.dtype == np.int32 and sample.loss_mask.dtype == np.uint8


def test_detection_picks_the_registry_entry_of_a_tokenizer_template(smollm2_dir):
    from transformers import AutoTokenizer

    for name in ("llama3", "qwen3-instruct", "gpt-oss", "kimi-k2"):
        tok = AutoTokenizer.from_pretrained(smollm2_dir)
        tok.chat_template = TEMPLATES[name].jinja
        assert ConversationRenderer(tok).template_name == name


def test_missing_or_unknown_templates_are_config_errors(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(ConfigError, match="unknown chat template 'llama5'"):
        ConversationRenderer(tok, "llama5")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        ConversationRenderer(tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="cannot find the assistant-turn markers"):
        ConversationRenderer(tok)


def tricky_conversations(chitchat: list[Conversation]) -> list[Conversation]:
    """Edge cases for BPE merges at the header boundary, plus real chitchat."""
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}
    convs = [
        CONV,
        Conversation(
            "ws",
            [
                Message("user", "q"),
                Message("assistant", "\n a leading newline and space"),  # merges with header \n
                Message("user", " spaced"),
                Message("assistant", "\n\n\ttabs"),
                Message("user", "u"),
                Message("assistant", "  two spaces 漢字 é"),
            ],
        ),
        Conversation(
            "tools",
            [
                Message("system", "sys"),
                Message("user", "find x"),
                Message("assistant", "", tool_calls=[call]),
                Message("tool", "x=1", name="lookup"),
                Message("assistant", "x is 1", reasoning_content="the tool said 1"),
            ],
        ),
        Conversation(
            "think",
            [
                Message("user", "2+2?"),
                Message("assistant", "4", reasoning_content="add"),
                Message("user", "3+3?"),
                Message("assistant", "6", reasoning_content="add again"),
            ],
        ),
    ]
    return convs + chitchat


@pytest.fixture(scope="module")
def chitchat_slice(chitchat_path):
    from spec_core.data.load import load_conversations

    return load_conversations(chitchat_path, limit=12).conversations


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_offsets_mask_equals_token_scan_mask(name, renderers, chitchat_slice):
    renderer = renderers[name]
    markers = token_markers(renderer)
    for conv in tricky_conversations(chitchat_slice):
        for last in (False, True):
            sample = renderer.tokenize(conv, last_turn_only=last)
            scanned = mask_from_token_ids(sample.input_ids, markers, last_turn_only=last)
            assert np.array_equal(scanned, sample.loss_mask), (name, conv.id, last)
            assert sample.num_loss_tokens > 0
        full = renderer.tokenize(conv)
        for cut in (5, len(full.input_ids) // 2, len(full.input_ids) - 1):
            short = renderer.tokenize(conv, max_seq_length=cut)
            scanned = mask_from_token_ids(short.input_ids, markers)
            assert np.array_equal(scanned, short.loss_mask), (name, conv.id, cut)


def test_header_newline_merged_into_content_is_not_supervised(renderers, multi_tokenizer):
    """'\\n' closing the chatml header + content '\\n a' tokenizes as one '\\n\\n' token that
    starts in the header: neither mask path supervises it (TorchSpec's skip_after_header trap)."""
    conv = Conversation("t", [Message("user", "q"), Message("assistant", "\n a")])
    sample = renderers["chatml"].tokenize(conv)
    pieces = multi_tokenizer.convert_ids_to_tokens(sample.input_ids.tolist())
    merged = pieces.index("ĊĊ")
    assert pieces[merged - 1] == "istant" and sample.loss_mask[merged] == 0
    assert sample.loss_mask[merged + 1] == 1  # 'Ġa'
    sup, _ = segments(multi_tokenizer, sample.input_ids, sample.loss_mask)
    assert sup == [" a<|im_end|>"]


def test_last_turn_only_keeps_the_final_assistant_message(renderers, multi_tokenizer):
    sample = renderers["llama3"].tokenize(CONV, last_turn_only=True)
    sup, _ = segments(multi_tokenizer, sample.input_ids, sample.loss_mask)
    assert sup == [f"{A2}<|eot_id|>"]
    # gpt-oss renders one message as analysis + final segments: both belong to the last turn
    conv = Conversation(
        "r",
        [
            Message("user", "q1"),
            Message("assistant", "a1", reasoning_content="r1"),
            Message("user", "q2"),
            Message("assistant", "a2", reasoning_content="r2"),
        ],
    )
    sample = renderers["gpt-oss"].tokenize(conv, last_turn_only=True)
    sup, _ = segments(multi_tokenizer, sample.input_ids, sample.loss_mask)
    assert sup == [
        "<|channel|>analysis<|message|>r2<|end|>",
        "<|channel|>final<|message|>a2<|return|>",
    ]


def test_auto_last_turn_follows_reasoning():
    plain = CONV
    thinking = Conversation(
        "t", [Message("user", "q"), Message("assistant", "a", reasoning_content="why")]
    )
    assert not wants_last_turn_only(plain, "auto") and wants_last_turn_only(thinking, "auto")
    assert wants_last_turn_only(plain, "true") and not wants_last_turn_only(thinking, "false")


def test_reasoning_and_tool_calls_are_inlined_when_the_template_ignores_them(smollm2_tokenizer):
    renderer = ConversationRenderer(smollm2_tokenizer)
    assert renderer.inline_reasoning and renderer.inline_tool_calls
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}
    conv = Conversation(
        "i",
        [
            Message("user", "q"),
            Message("assistant", "", tool_calls=[call]),
            Message("tool", "1"),
            Message("assistant", "one", reasoning_content="tool said 1"),
        ],
    )
    text = renderer.render(conv)
    payload = json.dumps({"name": "lookup", "arguments": {"q": "x"}})
    assert f"<|im_start|>assistant\n<tool_call>\n{payload}\n</tool_call><|im_end|>" in text
    assert "<|im_start|>assistant\n<think>\ntool said 1\n</think>\n\none<|im_end|>" in text
    # qwen3-thinking renders reasoning itself (after the last user turn only): nothing inlined
    assert not ConversationRenderer(smollm2_tokenizer, "qwen3-thinking").inline_reasoning


def test_truncation_clips_ids_and_mask(smollm2_tokenizer):
    renderer = ConversationRenderer(smollm2_tokenizer)
    full = renderer.tokenize(CONV)
    first_answer = int(np.flatnonzero(full.loss_mask)[0])
    for cut in (first_answer, first_answer + 3):
        short = renderer.tokenize(CONV, max_seq_length=cut)
        assert len(short.input_ids) == cut and short.full_length == len(full.input_ids)
        assert short.truncated and not full.truncated
        assert np.array_equal(short.input_ids, full.input_ids[:cut])
        assert np.array_equal(short.loss_mask, full.loss_mask[:cut])
        assert short.num_loss_tokens == cut - first_answer
    one_shot = render_conversation(CONV, smollm2_tokenizer, max_seq_length=first_answer + 3)
    assert np.array_equal(one_shot.loss_mask, short.loss_mask)


def test_offsets_fallback_when_boundary_chars_have_no_token():
    """A pre-tokenizer that drops whitespace leaves the newline after the end-of-turn marker without
    a token; the mask then comes from every token's offsets, with the same start-offset rule."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from spec_core.data.render import _mask_from_offsets
    from spec_core.data.templates import assistant_spans

    words = ["<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "hello", "there"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="user"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n"
    enc = tok.encode(text, add_special_tokens=False)
    spans = assistant_spans(text, TEMPLATES["chatml"])
    assert enc.char_to_token(spans[0].end) is None  # the '\n' closing the turn has no token
    mask = _mask_from_offsets(enc, len(text), spans)
    assert [t for t, m in zip(enc.tokens, mask.tolist(), strict=True) if m] == [
        "hello",
        "there",
        "<|im_end|>",
    ]
