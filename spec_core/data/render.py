"""Render a conversation with a chat template and build its assistant-only loss mask.

One tokenization per conversation: the rendered text is encoded once with character offsets, and
a token is supervised iff it *starts* inside an assistant span, i.e. at or after the end of an
assistant header and before the end of that turn's end-of-turn marker (the marker itself is
supervised: the draft must learn to stop). A token that straddles the header/content boundary
(BPE merging the header's trailing newline with leading whitespace of the content) starts in the
header and is therefore not supervised (tests/test_data_masks.py checks that the same rule applied
to token ids alone, walking the header's trailing whitespace by token lengths, always agrees).

Templates that ignore ``reasoning_content`` or ``tool_calls`` (SmolLM2's, for instance) get them
inlined into the content (``<think>...</think>``, ``<tool_call>...</tool_call>``) rather than
silently dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from spec_core.data.conversation import Conversation, InvalidRecord, Message
from spec_core.data.templates import (
    TEMPLATES,
    Span,
    assistant_spans,
    detect_template,
    get_template,
    last_turn,
)
from spec_core.errors import ConfigError

log = logging.getLogger(__name__)

TEMPLATE_ERROR = "template_error"
_PROBE_REASONING = "PROBE_REASONING_TEXT"
_PROBE_TOOL = "probe_tool_fn"


@dataclass
class TokenizedConversation:
    input_ids: np.ndarray  # int32 [num_tokens], after truncation
    loss_mask: np.ndarray  # uint8 [num_tokens], 1 = supervised
    full_length: int  # tokens before truncation

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def _mask_from_offsets(enc: Any, text_length: int, spans: list[Span]) -> np.ndarray:
    """Supervise tokens whose start offset lies in a span. Looks up only the span boundaries
    (``char_to_token``); falls back to every token's offsets if a boundary char has no token."""
    n = len(enc)
    mask = np.zeros(n, dtype=np.uint8)
    bounds = [
        (
            _first_token_from(enc, s.content_start, text_length, n),
            _first_token_from(enc, s.end, text_length, n),
        )
        for s in spans
    ]
    if any(lo is None or hi is None for lo, hi in bounds):
        starts = np.fromiter((s for s, _ in enc.offsets), dtype=np.int64, count=n)
        bounds = [
            (int(np.searchsorted(starts, s.content_start)), int(np.searchsorted(starts, s.end)))
            for s in spans
        ]
    for lo, hi in bounds:
        mask[lo:hi] = 1
    return mask


def _first_token_from(enc: Any, pos: int, text_length: int, n: int) -> Optional[int]:
    """Index of the first token starting at or after character ``pos`` (None: unknown)."""
    if pos >= text_length:
        return n
    t = enc.char_to_token(pos)
    if t is None:
        return None
    while t < n and enc.token_to_chars(t)[0] < pos:
        t += 1
    return t


def wants_last_turn_only(conv: Conversation, option: str) -> bool:
    """``dataset.last_turn_loss_only``: true | false | auto (= true when there is reasoning, because
    templates drop reasoning from earlier turns, so only the last turn shows what the model does)."""
    if option == "auto":
        return conv.has_reasoning
    return option == "true"


class ConversationRenderer:
    """Renders and tokenizes conversations with one tokenizer and one set of turn markers.

    ``template=None`` renders with the tokenizer's own chat template and takes the markers of the
    registry entry detected from it; a name renders with that registry entry.
    """

    def __init__(self, tokenizer: Any, template: Optional[str] = None):
        self.tokenizer = tokenizer
        self._backend = _plain_backend(tokenizer)
        if template is not None:
            self.template = get_template(template)
            self.jinja: Optional[str] = self.template.jinja
            self._warn_missing_special_tokens()
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    "the tokenizer has no chat template; set 'dataset.chat_template' to one of: "
                    + ", ".join(TEMPLATES)
                )
            self.jinja = None
            detected = detect_template(self._apply)
            if detected is None:
                raise ConfigError(
                    "cannot find the assistant-turn markers of the tokenizer's chat template; set "
                    "'dataset.chat_template' to the matching registry entry: "
                    + ", ".join(TEMPLATES)
                )
            self.template = detected
        self.inline_reasoning = not self._renders(
            Message("assistant", "a", reasoning_content=_PROBE_REASONING), _PROBE_REASONING
        )
        call = {"type": "function", "function": {"name": _PROBE_TOOL, "arguments": {}}}
        self.inline_tool_calls = not self._renders(
            Message("assistant", "", tool_calls=[call]), _PROBE_TOOL
        )

    @property
    def template_name(self) -> str:
        return self.template.name

    def render(self, conv: Conversation) -> str:
        """The conversation as text; InvalidRecord(template_error) if the template rejects it."""
        try:
            return self._apply([self._message_dict(m) for m in conv.messages])
        except Exception as exc:  # jinja raises TemplateError or anything the template calls
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidRecord(TEMPLATE_ERROR, f"chat template failed: {first[:200]}") from None

    def tokenize_texts(
        self,
        texts: Sequence[str],
        last_turn_only: Sequence[bool],
        max_seq_length: Optional[int] = None,
    ) -> list[TokenizedConversation]:
        """Encode rendered texts in one batch and build their masks from character offsets."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for text, enc, last in zip(texts, encodings, last_turn_only, strict=True):
            ids = np.asarray(enc.ids, dtype=np.int32)
            spans = assistant_spans(text, self.template)
            if last:
                spans = last_turn(spans)
            mask = _mask_from_offsets(enc, len(text), spans)
            limit = len(ids) if max_seq_length is None else max_seq_length
            out.append(TokenizedConversation(ids[:limit], mask[:limit], len(ids)))
        return out

    def tokenize(
        self,
        conv: Conversation,
        max_seq_length: Optional[int] = None,
        last_turn_only: bool = False,
    ) -> TokenizedConversation:
        return self.tokenize_texts([self.render(conv)], [last_turn_only], max_seq_length)[0]

    def _apply(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.jinja, tokenize=False
        )

    def _renders(self, probe: Message, marker: str) -> bool:
        messages = [{"role": "user", "content": "u"}, probe.to_dict()]
        try:
            return marker in self._apply(messages)
        except Exception:  # a template that rejects the field does not render it
            return False

    def _message_dict(self, m: Message) -> dict[str, Any]:
        content = m.content
        if m.role == "assistant" and m.reasoning_content and self.inline_reasoning:
            content = f"<think>\n{m.reasoning_content}\n</think>\n\n{content}"
        if m.role == "assistant" and m.tool_calls and self.inline_tool_calls:
            calls = "\n".join(_tool_call_text(c) for c in m.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        return Message(m.role, content, m.reasoning_content, m.tool_calls, m.name).to_dict()

    def _warn_missing_special_tokens(self) -> None:
        missing = [
            t
            for t in self.template.special_tokens
            if len(self._backend.encode(t, add_special_tokens=False).ids) != 1
        ]
        if missing:
            log.warning(
                "chat template '%s': %s are not single tokens in this tokenizer; is it the right "
                "template for this model?",
                self.template.name,
                ", ".join(missing),
            )


def render_conversation(
    conv: Conversation,
    tokenizer: Any,
    template: Optional[str] = None,
    max_seq_length: Optional[int] = None,
    last_turn_only: bool = False,
) -> TokenizedConversation:
    """One conversation -> input_ids + assistant-only loss mask (builds a renderer each call; use
    ConversationRenderer directly for many conversations)."""
    return ConversationRenderer(tokenizer, template).tokenize(conv, max_seq_length, last_turn_only)


def load_tokenizer(tokenizer_dir: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` with a one-line ConfigError instead of a traceback."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot load a tokenizer from {tokenizer_dir}: {first}") from None


def _tool_call_text(call: dict) -> str:
    payload = call.get("function", call)
    body = {"name": payload.get("name"), "arguments": payload.get("arguments")}
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


def _plain_backend(tokenizer: Any) -> Any:
    """A private copy of the fast tokenizer without truncation, padding or post-processing, so
    ids equal ``tokenizer(text, add_special_tokens=False)`` and offsets are never trimmed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; specflow needs tokenizer.json "
            "(character offsets build the loss masks)"
        )
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    plain.post_processor = None
    return plain
