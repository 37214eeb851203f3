"""Chat-template registry: the markers that delimit assistant turns, plus a Jinja rendering for
tokenizers that ship no chat template of their own.

A template is named in ``dataset.chat_template`` or detected from the tokenizer's own template.
Loss masks come from the markers only: the text between an ``assistant_header`` and the next
``end_of_turn`` string (which is included) is supervised. The Jinja here is ours, a faithful but
minimal rendering of each family (no tools schema, no dates); when a tokenizer has its own
template, that one renders and only the markers come from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from spec_core.errors import ConfigError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    assistant_header: str  # text that opens an assistant turn (not supervised)
    end_of_turn: tuple[str, ...]  # any of these closes it (supervised)
    jinja: str
    special_tokens: tuple[str, ...]  # must be single tokens in a matching tokenizer


@dataclass(frozen=True)
class Span:
    """Character (or token) positions of one assistant turn: [content_start, end) is supervised."""

    header_start: int
    content_start: int
    end: int


def assistant_spans(text: str, template: ChatTemplate) -> list[Span]:
    """Every assistant turn in rendered text: after its header, through its end-of-turn marker
    (or to the end of the text when the marker is missing). A header that ends the text opens
    no turn (Mistral's ``[/INST]`` closes every user turn, a last one included)."""
    spans: list[Span] = []
    header = template.assistant_header
    pos = 0
    while (h := text.find(header, pos)) >= 0:
        start = h + len(header)
        if start >= len(text):
            break
        found = [(i, i + len(e)) for e in template.end_of_turn if (i := text.find(e, start)) >= 0]
        end = min(found)[1] if found else len(text)
        spans.append(Span(h, start, end))
        pos = end
    return spans


def last_turn(spans: list[Span]) -> list[Span]:
    """The spans of the final assistant message: a message may render as several segments
    (gpt-oss analysis + final) that follow each other with nothing but a header in between."""
    if not spans:
        return []
    first = len(spans) - 1
    while first > 0 and spans[first - 1].end == spans[first].header_start:
        first -= 1
    return spans[first:]


# Qwen3 keeps reasoning only on assistant turns after the last user message.
_QWEN3_REASONING = "{% if m.get('reasoning_content') and loop.index0 > ns.last_user %}{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{% endif %}"
_LAST_USER = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
)


def _chatml_like(
    system_default: Optional[str],
    assistant_prefix: str = "",
    tool_as_user: bool = False,
    reasoning: bool = False,
) -> str:
    """ChatML family (SmolLM2, Qwen): '<|im_start|>role\\n' + content + '<|im_end|>\\n'."""
    parts = [_LAST_USER] if reasoning else []
    if system_default is not None:
        parts.append(
            "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
            + system_default
            + "<|im_end|>\\n' }}{% endif %}"
        )
    tool = (
        "{{ '<|im_start|>user\\n<tool_response>\\n' + m['content'] + "
        "'\\n</tool_response><|im_end|>\\n' }}"
        if tool_as_user
        else "{{ '<|im_start|>tool\\n' + m['content'] + '<|im_end|>\\n' }}"
    )
    parts.append(
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n"
        + assistant_prefix
        + "' }}"
        + (_QWEN3_REASONING if reasoning else "")
        + "{{ m['content'] + '<|im_end|>\\n' }}"
        "{% elif m['role'] == 'tool' %}" + tool + "{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n" + assistant_prefix + "' }}"
        "{% endif %}"
    )
    return "".join(parts)


def _header_family(bos: str, start: str, end: str, eot: str) -> str:
    """Llama 3/4: bos + start + role + end + '\\n\\n' + content + eot (tool results as ipython)."""
    return (
        "{{ '" + bos + "' }}{% for m in messages %}"
        "{% set role = 'ipython' if m['role'] == 'tool' else m['role'] %}"
        "{{ '" + start + "' + role + '" + end + "\\n\\n' + m['content'] + '" + eot + "' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '" + start + "assistant" + end + "\\n\\n' }}"
        "{% endif %}"
    )


_DEEPSEEK_V3 = (
    _LAST_USER + "{{ '<｜begin▁of▁sentence｜>' }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
    "{% if m.get('reasoning_content') and loop.index0 > ns.last_user %}"
    "{{ '<think>' + m['reasoning_content'] + '</think>' }}"
    "{% endif %}{{ m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% else %}{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + m['content'] + "
    "'<｜tool▁output▁end｜><｜tool▁outputs▁end｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

_KIMI_K2 = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_system|>system<|im_middle|>"
    "You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<|im_user|>user<|im_middle|>' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|im_assistant|>assistant<|im_middle|>' }}"
    "{% else %}{{ '<|im_system|>' + m['role'] + '<|im_middle|>' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_assistant|>assistant<|im_middle|>' }}{% endif %}"
)

# Harmony: reasoning (kept after the last user turn) goes to the analysis channel, the answer to the final channel; the last
# assistant message ends with <|return|>, earlier ones with <|end|>.
_GPT_OSS = (
    _LAST_USER + "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% if m.get('reasoning_content') and loop.index0 > ns.last_user %}"
    "{{ '<|start|>assistant<|channel|>analysis<|message|>' + "
    "m['reasoning_content'] + '<|end|>' }}{% endif %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + m['content'] + "
    "('<|return|>' if loop.last else '<|end|>') }}"
    "{% elif m['role'] == 'tool' %}{{ '<|start|>functions.' + (m.get('name') or 'tool') + "
    "' to=assistant<|channel|>commentary<|message|>' + m['content'] + '<|end|>' }}"
    "{% elif m['role'] == 'system' %}{{ '<|start|>developer<|message|># Instructions\\n\\n' + "
    "m['content'] + '<|end|>' }}"
    "{% else %}{{ '<|start|>user<|message|>' + m['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)

_PHI4 = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + "
    "'<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# Gemma: no system role (its text opens the first user turn); the assistant is 'model'.
_GEMMA = (
    "{{ '<bos>' }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'assistant' %}{{ '<start_of_turn>model\\n' + m['content'] + "
    "'<end_of_turn>\\n' }}"
    "{% else %}{{ '<start_of_turn>user\\n' + ns.system + m['content'] + '<end_of_turn>\\n' }}"
    "{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Mistral (v3 tokenizer shape): user turns in [INST] .. [/INST], each answer closed by </s>.
_MISTRAL = (
    "{{ '<s>' }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + '</s>' }}"
    "{% else %}{{ '[INST] ' + ns.system + m['content'] + ' [/INST]' }}{% set ns.system = '' %}"
    "{% endif %}{% endfor %}"
)

_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_QWEN3_EMPTY_THINK = "<think>\\n\\n</think>\\n\\n"
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            "chatml",
            "<|im_start|>assistant\n",
            ("<|im_end|>",),
            _chatml_like(None),
            _CHATML_TOKENS,
        ),
        ChatTemplate(
            "qwen",
            "<|im_start|>assistant\n",
            ("<|im_end|>",),
            _chatml_like(_QWEN_SYSTEM, tool_as_user=True),
            _CHATML_TOKENS,
        ),
        ChatTemplate(
            "qwen3-instruct",
            "<|im_start|>assistant\n<think>\n\n</think>\n\n",
            ("<|im_end|>",),
            _chatml_like(None, _QWEN3_EMPTY_THINK, tool_as_user=True),
            _CHATML_TOKENS + ("<think>", "</think>"),
        ),
        ChatTemplate(
            "qwen3-thinking",
            "<|im_start|>assistant\n",
            ("<|im_end|>",),
            _chatml_like(None, tool_as_user=True, reasoning=True),
            _CHATML_TOKENS + ("<think>", "</think>"),
        ),
        ChatTemplate(
            "llama3",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            ("<|eot_id|>",),
            _header_family(
                "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
            ),
            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        ),
        ChatTemplate(
            "llama4",
            "<|header_start|>assistant<|header_end|>\n\n",
            ("<|eot|>",),
            _header_family("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>"),
            ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>"),
        ),
        ChatTemplate(
            "deepseek-v3",
            "<｜Assistant｜>",
            ("<｜end▁of▁sentence｜>",),
            _DEEPSEEK_V3,
            (
                "<｜begin▁of▁sentence｜>",
                "<｜end▁of▁sentence｜>",
                "<｜User｜>",
                "<｜Assistant｜>",
                "<｜tool▁outputs▁begin｜>",
                "<｜tool▁outputs▁end｜>",
                "<｜tool▁output▁begin｜>",
                "<｜tool▁output▁end｜>",
                "<think>",
                "</think>",
            ),
        ),
        ChatTemplate(
            "kimi-k2",
            "<|im_assistant|>assistant<|im_middle|>",
            ("<|im_end|>",),
            _KIMI_K2,
            ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>"),
        ),
        ChatTemplate(
            "gpt-oss",
            "<|start|>assistant",
            ("<|end|>", "<|return|>", "<|call|>"),
            _GPT_OSS,
            ("<|start|>", "<|end|>", "<|return|>", "<|call|>", "<|channel|>", "<|message|>"),
        ),
        ChatTemplate(
            "gemma",
            "<start_of_turn>model\n",
            ("<end_of_turn>",),
            _GEMMA,
            ("<bos>", "<start_of_turn>", "<end_of_turn>"),
        ),
        ChatTemplate(
            "mistral", "[/INST]", ("</s>",), _MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]")
        ),
        ChatTemplate(
            "phi4",
            "<|im_start|>assistant<|im_sep|>",
            ("<|im_end|>",),
            _PHI4,
            _CHATML_TOKENS + ("<|im_sep|>",),
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(
            f"unknown chat template '{name}' in 'dataset.chat_template'; valid: "
            + ", ".join(TEMPLATES)
        )
    return TEMPLATES[name]


PROBE_USER = "PROBE_USER_TEXT"
PROBE_ASSISTANT = "PROBE_ASSISTANT_TEXT"


def detect_template(render: Callable[[list[dict]], str]) -> Optional[ChatTemplate]:
    """The registry entry whose markers wrap the assistant turn of a probe rendering.

    ``render`` renders OpenAI-style messages with the tokenizer's own template. Among entries
    whose markers yield one span that ends with the probe answer plus an end-of-turn marker and
    holds no user text, the longest header wins (qwen3-instruct's header extends chatml's).
    """
    text = render(
        [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ASSISTANT}]
    )
    matches = [t for t in TEMPLATES.values() if _wraps_probe(text, t)]
    return max(matches, key=lambda t: len(t.assistant_header), default=None)


def template_fits(render: Callable[[list[dict]], str], template: ChatTemplate) -> bool:
    """Whether ``template``'s markers find the assistant turn of the tokenizer's own rendering
    (the loss masks of a named template would then land on the right tokens)."""
    text = render(
        [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ASSISTANT}]
    )
    return _wraps_probe(text, template)


def _wraps_probe(text: str, template: ChatTemplate) -> bool:
    spans = assistant_spans(text, template)
    if len(spans) != 1:
        return False
    supervised = text[spans[0].content_start : spans[0].end]
    return PROBE_USER not in supervised and any(
        supervised.endswith(PROBE_ASSISTANT + end) for end in template.end_of_turn
    )
