"""On-policy training data: replace assistant turns with the target's own responses.

A draft is judged on the target's own outputs, so it should be trained on them: human replies teach
it the wrong distribution. For every conversation, system/user/tool turns are kept byte for byte
and the assistant turns chosen by ``dataset.regenerate.turns`` (``last`` or ``all``) are replaced by
the target's reply to the conversation so far (earlier turns already regenerated), generated from
the prompt specflow's own chat template renders, stopping at the template's end of turn.

Length: a turn is regenerated only if its prompt plus ``max_new_tokens`` (plus the template's
trailing token) fits in ``dataset.max_seq_length``, so tokenization never cuts a regenerated reply.
A conversation is cut to end at the assistant turn before the first one that cannot be regenerated
(too long, or the target answered with nothing); with ``turns: last`` that earlier turn is the one
regenerated. Conversations with no turn left are skipped and counted by reason in the manifest.

Output, under ``work_dir/regenerated/<cache_key>/``: ``conversations.jsonl`` (OpenAI ``messages``
records in source order, read back by ``load_conversations``) and ``manifest.json``, written last
(a completed entry is one with a manifest). While running, each finished conversation is appended
to ``partial.jsonl`` (flushed and fsynced), so a crash loses at most the batch in flight and a
rerun continues where it stopped. Batches are a fixed function of the data and config (never of
what was already done), so with greedy decoding a resumed run writes the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from spec_core.config import Config, DatasetConfig, RegenerateConfig
from spec_core.data.conversation import Conversation, Message
from spec_core.data.generators import (
    STOP,
    Completion,
    Generator,
    HFGenerator,
    OpenAIGenerator,
    SamplingParams,
    derive_seed,
)
from spec_core.data.load import dataset_fingerprint, load_conversations
from spec_core.data.render import ConversationRenderer
from spec_core.data.templates import assistant_spans
from spec_core.errors import ConfigError, DataError, ServiceError
from spec_core.utils.cli import config_parser, parse_config_args, run_main
from spec_core.utils.files import atomic_write_json, atomic_write_text
from spec_core.utils.fingerprint import (
    REGENERATED_CODE,
    cache_key,
    code_version,
    target_fingerprint,
)
from spec_core.utils.redact import redact_text

log = logging.getLogger(__name__)

OUTPUT = "conversations.jsonl"
MANIFEST = "manifest.json"
PARTIAL = "partial.jsonl"
PROMPT_TOO_LONG = "prompt_too_long"  # skip reasons, counted in the manifest
EMPTY_RESPONSE = "empty_response"
NO_REPLACEABLE_TURN = "no_replaceable_turn"  # every assistant turn is a tool call (kept as is)
TAIL_TOKENS = 1  # what a template renders after the end-of-turn token ('\n' in ChatML)
_THINK = re.compile(r"^\s*(?:<think>)?(.*?)</think>(.*)$", re.DOTALL)

Progress = Callable[[int, int], None]


@dataclass
class RegenResult:
    output_path: Path
    manifest_path: Path
    cache_key: str
    cached: bool
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_path": str(self.output_path),
            "manifest_path": str(self.manifest_path),
            "cache_key": self.cache_key,
            "cached": self.cached,
            "manifest": self.manifest,
        }

    def dataset_config(self, ds: DatasetConfig) -> DatasetConfig:
        """``ds`` pointed at the regenerated data (written in OpenAI ``messages`` format)."""
        return dataclasses.replace(ds, path=str(self.output_path), messages_key="messages")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegenResult:
        return cls(
            Path(data["output_path"]),
            Path(data["manifest_path"]),
            data["cache_key"],
            bool(data["cached"]),
            dict(data.get("manifest", {})),
        )


def regenerated_source(path: str | Path) -> Optional[Path]:
    """The dataset a regenerated ``conversations.jsonl`` was made from (its manifest names it),
    or None when ``path`` is no regeneration output: evaluation reads held-out conversations'
    later turns there, which ``max_turns`` cut from the regenerated copy."""
    path = Path(path)
    manifest = path.parent / MANIFEST
    if path.name != OUTPUT or not manifest.is_file():
        return None
    return Path(json.loads(manifest.read_text())["source"]["path"])


# ----------------------------------------------------------------------------- cache key


def sampling_settings(rc: RegenerateConfig) -> dict[str, Any]:
    """What changes the sampled tokens; greedy output depends on neither seed nor top_p."""
    if rc.temperature <= 0:
        return {"temperature": 0.0}
    return {"temperature": rc.temperature, "top_p": rc.top_p, "seed": rc.seed}


def key_components(cfg: Config, dataset_path: Path, target_dir: Path) -> dict[str, Any]:
    """Everything the regenerated dataset depends on, by name (the cache key hashes this)."""
    rc, ds = cfg.dataset.regenerate, cfg.dataset
    engine: dict[str, Any] = {"engine": rc.engine}
    if rc.engine == "openai":
        engine["model_name"] = rc.model_name
    return {
        "dataset": dataset_fingerprint(dataset_path),
        "target": target_fingerprint(target_dir),
        "template": ds.chat_template,
        "selection": {
            "messages_key": ds.messages_key,
            "dataset_max_conversations": ds.max_conversations,
            "max_conversations": rc.max_conversations,
            "turns": rc.turns,
            "max_turns": rc.max_turns,
            "max_seq_length": ds.max_seq_length,
            "max_record_bytes": ds.max_record_bytes,
        },
        "sampling": {**sampling_settings(rc), "max_new_tokens": rc.max_new_tokens},
        "engine": engine,
        "code": code_version(REGENERATED_CODE),
    }


def regen_cache_key(cfg: Config, dataset_path: Path, target_dir: Path) -> str:
    """The key ``regenerate_dataset`` stores under: hashes of files and settings, no generation."""
    return cache_key(key_components(cfg, dataset_path, target_dir))


# ----------------------------------------------------------------------------- conversations


@dataclass
class _Job:
    """One conversation on its way through regeneration."""

    index: int  # position in source order
    original: Conversation
    messages: list[Message]
    pending: list[int]  # message indices still to regenerate, ascending
    prompt: list[int] = field(default_factory=list)  # token ids for pending[0]
    regenerated: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    hit_max_new_tokens: int = 0
    cut: bool = False  # ended before a turn that could not be regenerated
    skip: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.skip is not None or not self.pending

    def record(self, gen_seconds: float) -> dict[str, Any]:
        conv = None if self.skip else Conversation(self.original.id, self.messages).to_dict()
        return {
            "index": self.index,
            "id": self.original.id,
            "conversation": conv,
            "skip": self.skip,
            "stats": {
                "regenerated": self.regenerated,
                "generated_tokens": self.generated_tokens,
                "prompt_tokens": self.prompt_tokens,
                "hit_max_new_tokens": self.hit_max_new_tokens,
                "cut": self.cut,
                "gen_seconds": round(gen_seconds, 4),
            },
        }


class _Planner:
    """Builds prompts with the chat template and decides which turns fit (thread-safe)."""

    def __init__(self, renderer: ConversationRenderer, rc: RegenerateConfig, max_seq_length: int):
        self.renderer = renderer
        self.turns = rc.turns
        self.max_turns = rc.max_turns
        self.budget = max_seq_length - rc.max_new_tokens - TAIL_TOKENS
        self.split_reasoning = "</think>" in renderer.template.special_tokens
        self._lock = threading.Lock()  # HF tokenizers are not safe to share across threads

    def job(self, index: int, conv: Conversation) -> _Job:
        messages = list(conv.messages)
        if self.max_turns is not None:
            head = 1 if messages and messages[0].role == "system" else 0
            messages = messages[: head + self.max_turns]
        replaceable = [
            i for i, m in enumerate(messages) if m.role == "assistant" and not m.tool_calls
        ]
        pending = replaceable if self.turns == "all" else replaceable[-1:]
        job = _Job(index, conv, messages, pending)
        if not pending:
            job.skip = NO_REPLACEABLE_TURN
        self.next_prompt(job)
        return job

    def next_prompt(self, job: _Job) -> None:
        """Set ``job.prompt`` for its next turn, cutting the conversation where a turn is too long."""
        while not job.finished:
            target = job.pending[0]
            prompt = self.prompt_ids(job.messages[: target + 1])
            if len(prompt) <= self.budget:
                job.prompt = prompt
                return
            if self.turns == "last":
                target = self._last_fitting(job.messages, target)
            self.cut(job, target, PROMPT_TOO_LONG)

    def _last_fitting(self, messages: list[Message], target: int) -> int:
        """Where to cut a too-long conversation for turns=last: just after the last assistant turn
        before ``target`` whose prompt fits (binary search: prompts grow with the turn index, and
        long chats have hundreds of turns)."""
        candidates = [
            i for i, m in enumerate(messages[:target]) if m.role == "assistant" and not m.tool_calls
        ]
        lo, hi = 0, len(candidates)  # candidates[:lo] fit, candidates[hi:] do not
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.prompt_ids(messages[: candidates[mid] + 1])) <= self.budget:
                lo = mid + 1
            else:
                hi = mid
        return candidates[lo] if lo < len(candidates) else target

    def cut(self, job: _Job, target: int, reason: str) -> None:
        """End the conversation at the last assistant turn before ``target`` (a dangling user turn
        would only cost tokens); with turns=last that turn becomes the one to regenerate. Skip
        the conversation when no regenerated turn remains."""
        messages = job.messages[:target]
        while messages and messages[-1].role != "assistant":
            messages.pop()
        job.messages = messages
        job.cut = True
        if self.turns == "last":
            earlier = [
                i for i, m in enumerate(job.messages) if m.role == "assistant" and not m.tool_calls
            ]
            job.pending = earlier[-1:]
        else:
            job.pending = []
        if not job.pending and job.regenerated == 0:
            job.skip = reason

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Token ids of the rendered conversation up to the content of its last (assistant)
        message: exactly the context the draft is trained on, cut at the assistant header."""
        with self._lock:
            text = self.renderer.render(Conversation("prompt", messages))
            spans = assistant_spans(text, self.renderer.template)
            if not spans:
                raise DataError(
                    f"chat template '{self.renderer.template_name}' rendered no assistant header "
                    "for a conversation; check 'dataset.chat_template'"
                )
            prefix = text[: spans[-1].content_start]
            return list(self.renderer.tokenizer(prefix, add_special_tokens=False)["input_ids"])

    def apply(self, job: _Job, completion: Completion) -> None:
        target = job.pending[0]
        job.generated_tokens += completion.num_tokens
        job.prompt_tokens += len(job.prompt)
        reasoning, content = self.split(completion.text)
        if not content.strip():
            self.cut(job, target, EMPTY_RESPONSE)
        else:
            old = job.messages[target]
            job.messages[target] = Message("assistant", content, reasoning, None, old.name)
            job.regenerated += 1
            job.hit_max_new_tokens += completion.finish_reason != STOP
            job.pending = job.pending[1:]
        self.next_prompt(job)

    def split(self, text: str) -> tuple[Optional[str], str]:
        """(reasoning, answer) of a reply from a thinking template; (None, text) otherwise or
        when the thinking block never closed (cut by max_new_tokens)."""
        match = _THINK.match(text) if self.split_reasoning else None
        if match is None:
            return None, text
        reasoning = match.group(1).strip("\n")
        return (reasoning or None), match.group(2).lstrip("\n")


def _stop_tokens(renderer: ConversationRenderer, target_dir: Path) -> list[int]:
    """The template's single-token end-of-turn markers plus the model's eos ids."""
    template = renderer.template
    if template.name == "gpt-oss":
        raise ConfigError(
            "regeneration does not support the gpt-oss (harmony channels) template yet; set "
            "'dataset.regenerate.enabled: false'"
        )
    tokenizer = renderer.tokenizer
    stops = set()
    for end in template.end_of_turn:
        ids = tokenizer(end, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            stops.add(int(ids[0]))
    if not stops:
        raise ConfigError(
            f"end-of-turn {template.end_of_turn} of template '{template.name}' is not a single "
            "token in this tokenizer; is 'dataset.chat_template' right for this target?"
        )
    for name in ("generation_config.json", "config.json"):
        path = Path(target_dir) / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        if eos is not None:
            stops.update(eos if isinstance(eos, list) else [eos])
            break
    return sorted(int(s) for s in stops)


# ----------------------------------------------------------------------------- the step


def regenerate_dataset(
    cfg: Config,
    dataset_path: Path,
    target_dir: Path,
    work_dir: Path,
    progress: Optional[Progress] = None,
) -> RegenResult:
    """The dataset at ``dataset_path`` with its assistant turns regenerated by the target, from the
    cache when the key matches, resuming a run that stopped part-way."""
    dataset_path, target_dir = Path(dataset_path), Path(target_dir)
    components = key_components(cfg, dataset_path, target_dir)
    key = cache_key(components)
    out = Path(work_dir) / "regenerated" / key
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out / ".lock", cfg.dataset.regenerate.lock_timeout_s):
        if (out / MANIFEST).is_file():
            log.info("regenerated data cache hit: %s", out)
            manifest = json.loads((out / MANIFEST).read_text())
            if progress is not None:
                progress(manifest["counts"]["selected"], manifest["counts"]["selected"])
            return RegenResult(out / OUTPUT, out / MANIFEST, key, True, manifest)
        manifest = _run(cfg, dataset_path, target_dir, out, components, key, progress)
    return RegenResult(out / OUTPUT, out / MANIFEST, key, False, manifest)


def _run(
    cfg: Config,
    dataset_path: Path,
    target_dir: Path,
    out: Path,
    components: dict[str, Any],
    key: str,
    progress: Optional[Progress],
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    rc, ds = cfg.dataset.regenerate, cfg.dataset
    _check(rc)
    started = time.perf_counter()
    limit = _min_optional(ds.max_conversations, rc.max_conversations)
    loaded = load_conversations(
        dataset_path, ds.messages_key, limit=limit, max_record_bytes=ds.max_record_bytes
    )
    renderer = ConversationRenderer(AutoTokenizer.from_pretrained(target_dir), ds.chat_template)
    planner = _Planner(renderer, rc, ds.max_seq_length)
    if planner.budget <= 0:
        raise ConfigError(
            f"'dataset.regenerate.max_new_tokens' ({rc.max_new_tokens}) leaves no room for a "
            f"prompt in 'dataset.max_seq_length' ({ds.max_seq_length}); lower it"
        )
    params = SamplingParams(rc.max_new_tokens, rc.temperature, rc.top_p, rc.seed)
    partial = out / PARTIAL
    done = _read_partial(partial)
    resumed = len(done)
    total = len(loaded.conversations)
    # Plan every conversation, done or not: batches must not depend on what a killed run left.
    jobs = [planner.job(i, conv) for i, conv in enumerate(loaded.conversations)]
    if resumed:
        log.info("resuming %s: %d of %d conversations already done", out, resumed, total)
    with _Appender(partial, done, total, progress) as appender:
        appender.write([j for j in jobs if j.finished])  # skipped before any generation
        todo = [j for j in jobs if not j.finished]
        if any(j.index not in appender.records for j in todo):
            generator = _make_generator(cfg, target_dir, renderer)
            appender.start_clock()
            try:
                with _torch_threads(rc.num_threads if rc.engine == "hf" else 0):
                    _generate_all(todo, generator, planner, params, appender)
            finally:
                generator.close()
        records = appender.records
    manifest = _manifest(
        cfg, components, key, dataset_path, target_dir, renderer, loaded, records, resumed
    )
    manifest["wall_time_s"] = round(time.perf_counter() - started, 2)
    _write_output(out, records)
    atomic_write_json(out / MANIFEST, manifest, sort_keys=True)
    partial.unlink(missing_ok=True)
    counts = manifest["counts"]
    log.info(
        "regenerated %d turns in %d conversations (%d skipped), %d tokens at %.1f tok/s -> %s",
        counts["turns_regenerated"],
        counts["written"],
        sum(counts["skipped"].values()),
        manifest["tokens_generated"],
        manifest["tokens_per_s"],
        out / OUTPUT,
    )
    return manifest


def _generate_all(
    jobs: list[_Job],
    generator: Generator,
    planner: _Planner,
    params: SamplingParams,
    appender: _Appender,
) -> None:
    """Fixed batches (longest prompts first), each driven through all its turns; batches run one
    at a time (HF) or ``generator.parallelism`` at once in threads (endpoint)."""
    ordered = sorted(jobs, key=lambda j: (-len(j.prompt), j.index))
    size = generator.batch_size
    batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
    # A batch with a missing conversation runs whole (same batch, same numerics); only the
    # missing ones are written.
    batches = [b for b in batches if any(j.index not in appender.records for j in b)]
    if generator.parallelism <= 1:
        for batch in batches:
            _drive(batch, generator, planner, params)
            appender.write(batch)
        return
    with ThreadPoolExecutor(generator.parallelism, thread_name_prefix="regen") as pool:
        running: dict[Future, list[_Job]] = {}
        queue = iter(batches)
        failure: Optional[BaseException] = None
        for batch in queue:
            running[pool.submit(_drive, batch, generator, planner, params)] = batch
            if len(running) >= generator.parallelism:
                break
        while running:
            finished, _ = wait(running, return_when=FIRST_EXCEPTION)
            for future in finished:
                batch = running.pop(future)
                if future.exception() is not None:
                    failure = failure or future.exception()
                    continue
                appender.write(batch)
                if failure is None and (nxt := next(queue, None)) is not None:
                    running[pool.submit(_drive, nxt, generator, planner, params)] = nxt
        if failure is not None:
            raise failure


def _drive(batch: list[_Job], generator: Generator, planner: _Planner, params: SamplingParams):
    """Generate round after round until every conversation of the batch is finished."""
    for round_ in itertools.count():
        live = [j for j in batch if not j.finished]
        if not live:
            return
        seed = derive_seed(params.seed, batch[0].original.id, round_)
        completions = generator.generate([j.prompt for j in live], params, seed)
        for job, completion in zip(live, completions, strict=True):
            planner.apply(job, completion)


def _make_generator(cfg: Config, target_dir: Path, renderer: ConversationRenderer) -> Generator:
    rc = cfg.dataset.regenerate
    stops = _stop_tokens(renderer, target_dir)
    if rc.engine == "openai":
        if not rc.endpoint:
            raise ConfigError("'dataset.regenerate.endpoint' is required for engine openai")
        return OpenAIGenerator(
            rc.endpoint,
            renderer.template.end_of_turn,
            stops,
            model_name=rc.model_name,
            concurrency=rc.concurrency,
            timeout_s=rc.request_timeout_s,
            max_retries=rc.max_retries,
        )
    import torch

    from spec_core.engines.hf import resolve_device

    return HFGenerator(
        target_dir,
        renderer.tokenizer,
        stops,
        batch_size=rc.batch_size,
        dtype=getattr(torch, cfg.target.dtype),
        device=resolve_device(cfg.inference.device),
    )


@contextlib.contextmanager
def _torch_threads(num_threads: int) -> Iterator[None]:
    """``num_threads`` torch CPU threads for the block (0 = leave torch's setting alone): on a
    2-core box shared with other work, one thread is often faster than two waiting on each
    other's time slices."""
    import torch

    before = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check(rc: RegenerateConfig) -> None:
    if rc.max_new_tokens <= 0:
        raise ConfigError(
            f"'dataset.regenerate.max_new_tokens' must be positive, got {rc.max_new_tokens}"
        )
    if rc.max_turns is not None and rc.max_turns < 2:
        raise ConfigError(
            f"'dataset.regenerate.max_turns' must be >= 2 (a user and an assistant message) or "
            f"null, got {rc.max_turns}"
        )
    if rc.max_conversations is not None and rc.max_conversations <= 0:
        raise ConfigError(
            f"'dataset.regenerate.max_conversations' must be positive or null, got "
            f"{rc.max_conversations}"
        )
    if rc.num_threads < 0:
        raise ConfigError(f"'dataset.regenerate.num_threads' must be >= 0, got {rc.num_threads}")
    if not 0 < rc.top_p <= 1:
        raise ConfigError(f"'dataset.regenerate.top_p' must be in (0, 1], got {rc.top_p}")


def _min_optional(a: Optional[int], b: Optional[int]) -> Optional[int]:
    values = [v for v in (a, b) if v is not None]
    return min(values) if values else None


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def _exclusive(lock_path: Path, timeout_s: float) -> Iterator[None]:
    """One process per cache entry; a second one waits (at most ``timeout_s``), then finds the
    finished manifest. The holder writes its pid into the lock file so a waiter can name it."""
    with lock_path.open("a+") as fh:
        deadline = time.monotonic() + timeout_s
        logged = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "unknown"
                    raise ServiceError(
                        f"another process (pid {holder}) has been regenerating into "
                        f"{lock_path.parent} for over {timeout_s:.0f}s; wait for it, stop it, or "
                        "raise 'dataset.regenerate.lock_timeout_s'"
                    ) from None
                if not logged:
                    log.info("waiting for another process regenerating into %s", lock_path.parent)
                    logged = True
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0.01)))
        fh.truncate(0)
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_partial(path: Path) -> dict[int, dict[str, Any]]:
    """Records a previous run finished; a torn last line (killed mid-write) is cut off."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    records: dict[int, dict[str, Any]] = {}
    good = 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            record = json.loads(line)
        except ValueError:
            break
        records[int(record["index"])] = record
        good += len(line)
    if good < len(raw):
        with path.open("r+b") as fh:
            fh.truncate(good)
    return records


class _Appender:
    """Appends finished conversations to the partial file, durably, and reports progress.

    Wall time since the previous write (or ``start_clock``) is shared among the records written,
    so their sum is the generation time over every session, however many batches ran at once.
    """

    def __init__(
        self,
        path: Path,
        done: dict[int, dict[str, Any]],
        total: int,
        progress: Optional[Progress],
    ):
        self.path = path
        self.records = dict(done)
        self.total = total
        self.progress = progress
        self._fd = -1
        self._clock = time.perf_counter()

    def __enter__(self) -> _Appender:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._report()
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def start_clock(self) -> None:
        self._clock = time.perf_counter()

    def write(self, jobs: Sequence[_Job]) -> None:
        fresh = [j for j in jobs if j.index not in self.records]
        if not fresh:
            return
        now = time.perf_counter()
        new = [j.record((now - self._clock) / len(fresh)) for j in fresh]
        self._clock = now
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new).encode()
        os.write(self._fd, data)
        os.fsync(self._fd)
        for r in new:
            self.records[r["index"]] = r
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(len(self.records), self.total)


def _write_output(out: Path, records: dict[int, dict[str, Any]]) -> None:
    lines = [
        json.dumps(records[i]["conversation"], ensure_ascii=False) + "\n"
        for i in sorted(records)
        if records[i]["conversation"] is not None
    ]
    if not lines:
        raise DataError(
            f"regeneration left no conversation (see {out / PARTIAL}); raise "
            "'dataset.max_seq_length' or lower 'dataset.regenerate.max_new_tokens'"
        )
    atomic_write_text(out / OUTPUT, "".join(lines))


def _manifest(
    cfg: Config,
    components: dict[str, Any],
    key: str,
    dataset_path: Path,
    target_dir: Path,
    renderer: ConversationRenderer,
    loaded: Any,
    records: dict[int, dict[str, Any]],
    resumed: int,
) -> dict[str, Any]:
    stats = [r["stats"] for r in records.values()]
    skipped = Counter(r["skip"] for r in records.values() if r["skip"])
    tokens = sum(s["generated_tokens"] for s in stats)
    seconds = sum(s["gen_seconds"] for s in stats)
    rc = cfg.dataset.regenerate
    return {
        "cache_key": key,
        "code_version": components["code"],
        "source": {
            "path": str(dataset_path),
            "sha256": components["dataset"],
            "load_report": loaded.report.to_dict(),
        },
        "target": {"path": str(target_dir), "fingerprint": components["target"]},
        "template": renderer.template_name,
        "engine": {
            "engine": rc.engine,
            "endpoint": redact_text(rc.endpoint or "") if rc.engine == "openai" else None,
            "model_name": rc.model_name,
            "batch_size": rc.batch_size if rc.engine == "hf" else 1,
            "concurrency": rc.concurrency if rc.engine == "openai" else 1,
            "num_threads": rc.num_threads if rc.engine == "hf" else None,
        },
        "sampling": {
            "temperature": rc.temperature,
            "top_p": rc.top_p,
            "seed": rc.seed,
            "max_new_tokens": rc.max_new_tokens,
        },
        "selection": components["selection"],
        "counts": {
            "selected": len(records),
            "written": sum(1 for r in records.values() if r["conversation"] is not None),
            "skipped": dict(skipped.most_common()),
            "turns_regenerated": sum(s["regenerated"] for s in stats),
            "cut": sum(1 for s in stats if s["cut"]),
            "hit_max_new_tokens": sum(s["hit_max_new_tokens"] for s in stats),
            "resumed": resumed,
        },
        "tokens_generated": tokens,
        "prompt_tokens": sum(s["prompt_tokens"] for s in stats),
        "generation_time_s": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
    from tqdm.auto import tqdm

    from spec_core.assets import resolve_dataset, resolve_target
    from spec_core.paths import RunPaths

    parser = config_parser(
        "specflow regenerate",
        "Regenerate the dataset's assistant turns with the target (cached, resumable).",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args, cfg = parse_config_args(parser, argv)
    target_dir = resolve_target(cfg)
    dataset_path = resolve_dataset(cfg)
    work_dir = RunPaths.from_config(cfg).work_dir
    bar = tqdm(desc="regenerating", unit=" conv", disable=args.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        result = regenerate_dataset(cfg, dataset_path, target_dir, work_dir, progress)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    m = result.manifest
    state = "cached" if result.cached else "regenerated"
    print(f"{state}: {result.output_path} (key {result.cache_key})")
    print(
        f"conversations: {m['counts']['written']} written, skipped {m['counts']['skipped']}; "
        f"turns regenerated: {m['counts']['turns_regenerated']}; tokens: "
        f"{m['tokens_generated']} at {m['tokens_per_s']} tok/s; wall {m['wall_time_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
