"""One normalized shape for every chat record: ShareGPT, OpenAI messages, reasoning and tool turns.

Everything downstream (templates, masks, regeneration, evaluation prompts) sees only
``Conversation``/``Message``. Normalization never edits text: content strings are kept byte for
byte, so ``Conversation.to_dict()`` -> JSONL -> ``load_conversations`` round-trips exactly.
A record that cannot be used raises ``InvalidRecord`` with a reason code the loader counts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from spec_core.errors import DataError

ROLES = ("system", "user", "assistant", "tool")

# ShareGPT ``from`` values (lower-cased) -> role. ``function_call`` is an assistant turn whose text
# is the call itself; ``observation``/``function`` carry tool results.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning", "thinking_content")
MESSAGES_KEYS = ("conversations", "messages")
_OPEN_THINK = re.compile(r"<think>(?!\s*</think>)")

# Reason codes, counted by the loader and the tokenizer (see DataReport).
MALFORMED_JSON = "malformed_json"
NON_UTF8 = "non_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_MESSAGES = "missing_messages"
MISSING_FIELD = "missing_field"
UNKNOWN_ROLE = "unknown_role"
NON_STRING_CONTENT = "non_string_content"
EMPTY_CONTENT = "empty_content"
BAD_TOOL_CALLS = "bad_tool_calls"
WRONG_ROLE_ORDER = "wrong_role_order"
NO_ASSISTANT_TURN = "no_assistant_turn"
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = "unreadable_file"
RECORD_TOO_LARGE = "record_too_large"
TOO_DEEP = "too_deeply_nested"
TRUNCATED = "truncated_record"
BAD_ID = "bad_id"

# Sample ids travel through the key queue as tab/newline separated text and name store objects.
MAX_ID_CHARS = 512
_BAD_ID_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class InvalidRecord(DataError):
    """A record that cannot become a Conversation; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Message:
    role: str  # system | user | assistant | tool
    content: str
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list] = None
    name: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """OpenAI-style dict; optional fields appear only when set."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass
class Conversation:
    id: str
    messages: list[Message] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "messages": [m.to_dict() for m in self.messages]}

    @classmethod
    def from_dict(cls, record: Any, messages_key: Optional[str] = None) -> Conversation:
        """Normalize one record (OpenAI or ShareGPT); raises InvalidRecord when unusable."""
        return normalize_record(record, messages_key)

    @property
    def has_reasoning(self) -> bool:
        """True when an assistant turn carries reasoning (a field, or an open ``<think>`` block)."""
        return any(
            m.role == "assistant"
            and (bool(m.reasoning_content) or _OPEN_THINK.search(m.content) is not None)
            for m in self.messages
        )


def derive_id(messages: list[Message]) -> str:
    """A stable id for records that carry none: a hash of the normalized messages."""
    blob = json.dumps([m.to_dict() for m in messages], ensure_ascii=False, sort_keys=True)
    return "h-" + hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def normalize_record(record: Any, messages_key: Optional[str] = None) -> Conversation:
    if not isinstance(record, dict):
        raise InvalidRecord(NOT_AN_OBJECT, f"record is a {type(record).__name__}, not an object")
    key, raw_messages = _find_messages(record, messages_key)
    messages = [_normalize_message(m, f"{key}[{i}]") for i, m in enumerate(raw_messages)]
    system = record.get("system")
    if isinstance(system, str) and system and (not messages or messages[0].role != "system"):
        messages.insert(0, Message("system", system))
    _check_order(messages, key)
    raw_id = record.get("id")
    conv_id = str(raw_id) if raw_id is not None and str(raw_id) != "" else derive_id(messages)
    check_id(conv_id)
    return Conversation(conv_id, messages)


def check_id(conv_id: str) -> None:
    """Refuse ids the streaming queue cannot carry (control characters such as tab/newline, or
    absurd lengths) here, as a counted skip, instead of in a producer's claim mid-run."""
    bad = _BAD_ID_CHARS.search(conv_id)
    if bad is not None:
        raise InvalidRecord(
            BAD_ID, f"id {conv_id[:40]!r} contains control character {bad.group()!r}"
        )
    if len(conv_id) > MAX_ID_CHARS:
        raise InvalidRecord(BAD_ID, f"id is {len(conv_id)} characters (at most {MAX_ID_CHARS})")


def _find_messages(record: dict, messages_key: Optional[str]) -> tuple[str, list]:
    keys = (messages_key,) if messages_key else MESSAGES_KEYS
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise InvalidRecord(
                MISSING_MESSAGES, f"'{key}' is a {type(value).__name__}, not a list of messages"
            )
        return key, value
    hint = "" if messages_key else "; set dataset.messages_key to the field that holds them"
    raise InvalidRecord(MISSING_MESSAGES, f"no {' or '.join(map(repr, keys))} field{hint}")


def _normalize_message(raw: Any, where: str) -> Message:
    if not isinstance(raw, dict):
        raise InvalidRecord(NOT_AN_OBJECT, f"{where} is a {type(raw).__name__}, not an object")
    if raw.get("role") is not None:
        role_value, content, role_key = raw.get("role"), raw.get("content"), "role"
        role = role_value.lower() if isinstance(role_value, str) else None
        role = role if role in ROLES else None
    elif raw.get("from") is not None:
        role_value, content, role_key = raw.get("from"), raw.get("value"), "from"
        role = SHAREGPT_ROLES.get(role_value.lower()) if isinstance(role_value, str) else None
    else:
        raise InvalidRecord(
            MISSING_FIELD, f"{where} has neither 'role'/'content' nor 'from'/'value'"
        )
    if role is None:
        raise InvalidRecord(UNKNOWN_ROLE, f"{where}.{role_key} is {role_value!r}")
    tool_calls = _tool_calls(raw.get("tool_calls"), where) if role == "assistant" else None
    content = _text(content, f"{where}.content", allow_none=bool(tool_calls) or role == "system")
    if not content.strip() and role != "system" and not tool_calls:
        raise InvalidRecord(EMPTY_CONTENT, f"{where}.content is empty")
    reasoning = None
    for key in REASONING_KEYS:
        if raw.get(key) is not None:
            reasoning = _text(raw[key], f"{where}.{key}", allow_none=True) or None
            break
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRecord(NON_STRING_CONTENT, f"{where}.name is a {type(name).__name__}")
    return Message(role, content, reasoning, tool_calls, name)


def _text(value: Any, where: str, allow_none: bool) -> str:
    """A string, or a list of OpenAI text parts joined; anything else is rejected."""
    if isinstance(value, str):
        return value
    if value is None:
        if allow_none:
            return ""
        raise InvalidRecord(EMPTY_CONTENT, f"{where} is null")
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    raise InvalidRecord(
        NON_STRING_CONTENT,
        f"{where} is a {type(value).__name__}; expected a string (or a list of text parts)",
    )


def _tool_calls(value: Any, where: str) -> Optional[list]:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise InvalidRecord(BAD_TOOL_CALLS, f"{where}.tool_calls must be a list of objects")
    return value or None


_ALLOWED_BEFORE = {
    "user": ("system", "assistant", "tool", None),
    "assistant": ("user", "tool"),
    "tool": ("assistant", "tool"),
}


def _check_order(messages: list[Message], key: str) -> None:
    """system? then user first; assistant answers user/tool; tool follows assistant/tool."""
    previous: Optional[str] = None
    for i, m in enumerate(messages):
        if m.role == "system":
            ok = i == 0
        else:
            ok = previous in _ALLOWED_BEFORE[m.role]
        if not ok:
            after = f"after {previous}" if previous else "first"
            raise InvalidRecord(WRONG_ROLE_ORDER, f"{key}[{i}] is {m.role} {after}")
        previous = m.role
    if not any(m.role == "assistant" for m in messages):
        raise InvalidRecord(NO_ASSISTANT_TURN, f"'{key}' has no assistant turn")
