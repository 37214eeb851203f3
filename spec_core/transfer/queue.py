"""The key queue: who produces which sample, what is ready, what was trained, on a TCPStore.

Only small strings travel here (JSON ``SampleRef``s, counters, ids); tensors live in Mooncake.
The state machine and its recovery rules are docs/architecture.md §key-queue; in short, every
transition is safe against a SIGKILL between any two store calls because it is either

- **one store operation** (a ``compare_set`` that takes ownership, an ``append`` that commits, a
  ``multi_set`` that writes several keys at once), or
- preceded by a **write-ahead line** in the acting producer's journal ``wal/<incarnation>``, after
  which every step is idempotent, so a peer that *reaps* the producer replays the journal and
  finishes (or undoes) what it started, as often as it likes, without counting anything twice.

Producers are *incarnations* ``<id>#<n>`` (a retried producer gets a fresh ``n`` and reaps its
predecessors at once). A peer reaps an incarnation whose heartbeat stops for ``claim_lease_s`` or
whose main loop makes no progress for ``progress_timeout_s`` (a hung engine keeps beating): it
*fences* it (``fence/<inc>``), replays its journal and keeps its byte count true. A fenced
producer that comes back learns it from its heartbeat or its next call (``ProducerReaped``) and
leaves without touching anything.

Trainer ranks need no journal: a rank's refs are re-derivable from the per-sample records, so a
restarted rank (``recover_rank``) re-queues what its previous incarnation popped and did not ack.

Blocking waits poll with short sleeps instead of the store's blocking ``wait``: a timeout there is
global to the client and spams C++ warnings, and polling lets every wait check for the end of data
or a stop request, so nothing waits past its configured deadline.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist

from spec_core.contracts.plan import DataPlan
from spec_core.errors import DataError, ServiceError
from spec_core.transfer.records import SampleRef
from spec_core.utils import faults

log = logging.getLogger(__name__)

_POLL_MIN_S, _POLL_MAX_S = 0.005, 0.05
_REFRESH_EVERY_S = 0.2  # how often a waiting producer re-counts the bytes it and the dead hold
_PROGRESS_EVERY_S = 1.0  # how often a producer's main loop reports progress
_TOMBSTONE = "T\t"  # refs/<rank> message for a sample resolved without data (skipped, dropped)


class StopRequested(Exception):
    """A producer was told to stop while it waited; it leaves cleanly (not an error)."""


class ProducerReaped(ServiceError):
    """Peers took this producer incarnation for dead and handed its work on; it must leave."""


@dataclass(frozen=True)
class Claim:
    epoch: int
    sample_id: str
    attempt: int
    pos: int = 0  # place in the epoch's shuffled order; decides the trainer rank (pos % ranks)

    @property
    def ident(self) -> tuple[int, str, int]:
        return (self.epoch, self.sample_id, self.attempt)


def start_queue_server(host: str, port: int = 0, timeout_s: float = 30.0):
    """A TCPStore master listening on ``host`` only (we bind the socket and hand it over;
    TCPStore itself would bind every interface). Returns ``(store, port)``; the store owns the
    listening socket from then on and closes it when it is destroyed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    port = int(sock.getsockname()[1])
    store = dist.TCPStore(
        host,
        port,
        is_master=True,
        master_listen_fd=sock.fileno(),
        use_libuv=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout_s),
    )
    sock.detach()
    return store, port


def _check_id(sample_id: str) -> str:
    if not sample_id or "\t" in sample_id or "\n" in sample_id:
        raise DataError(f"sample_id {sample_id!r} must be non-empty and contain no tab or newline")
    return sample_id


@dataclass
class _Record:
    """``res/<epoch>/<pos>``: the one record that says what became of a sample in an epoch.

    ``state`` is ``published`` (``ref`` is on its way to a rank), ``void`` (published, then its
    data was found missing: a new attempt is queued for production), ``skipped`` or ``dropped``.
    ``voided`` lists every attempt that was published and voided (byte accounting needs it).
    Each change is one ``compare_set`` from the exact previous value, so two writers can never
    both move a sample on."""

    state: str
    attempt: int
    producer: str
    sample_id: str
    voided: list[int] = field(default_factory=list)
    ref: Optional[dict[str, Any]] = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "s": self.state,
                "a": self.attempt,
                "p": self.producer,
                "id": self.sample_id,
                "v": self.voided,
                "ref": self.ref,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str) -> _Record:
        d = json.loads(raw)
        return cls(d["s"], int(d["a"]), d["p"], d["id"], [int(a) for a in d["v"]], d["ref"])

    def was_published(self, attempt: int) -> bool:
        return (self.state == "published" and self.attempt == attempt) or attempt in self.voided

    def open_for(self, attempt: int) -> bool:
        """May ``attempt`` still resolve this sample? Only after a void of an earlier attempt."""
        return self.state == "void" and self.attempt < attempt


@dataclass
class _Journal:
    """A producer incarnation's write-ahead lines, parsed (see ``KeyQueue._replay``)."""

    chunks: list[tuple[int, int, list[str]]] = field(default_factory=list)  # C: epoch, chunk, ids
    takes: list[tuple[int, int, int, str]] = field(default_factory=list)  # T: epoch, pos, a, id
    pubs: list[tuple[int, int, int, str]] = field(default_factory=list)  # P: ... , ref json
    resolves: list[tuple[int, int, int, str, str]] = field(default_factory=list)  # S: reason, id

    @classmethod
    def parse(cls, text: str) -> _Journal:
        j = cls()
        for line in text.splitlines():
            kind, _, rest = line.partition("\t")
            f = rest.split("\t")
            if kind == "C":
                j.chunks.append((int(f[0]), int(f[1]), f[2:]))
            elif kind == "T":
                j.takes.append((int(f[0]), int(f[1]), int(f[2]), f[3]))
            elif kind == "P":
                j.pubs.append((int(f[0]), int(f[1]), int(f[2]), rest.split("\t", 3)[3]))
            elif kind == "S":
                j.resolves.append((int(f[0]), int(f[1]), int(f[2]), f[3], f[4]))
        return j


class KeyQueue:
    """Client side of the key queue; one per process (thread-safe: TCPStore serialises calls,
    ``_lock`` guards this client's own bookkeeping)."""

    def __init__(self, store: dist.TCPStore, run_id: str, byte_budget: int) -> None:
        self.store = store
        self.run_id = run_id
        self.byte_budget = int(byte_budget)
        self._plan: Optional[DataPlan] = None
        self._lock = threading.RLock()
        # producer side
        self.producer: Optional[str] = None  # this client's incarnation, once registered
        self._fenced = threading.Event()
        self._held = 0  # bytes announced in held/<me>: reservations + published, unfinished
        self._reserved: dict[tuple[int, str, int], int] = {}
        self._outstanding: dict[tuple[int, str, int], tuple[int, int]] = {}  # -> (pos, bytes)
        self._chunk: Optional[int] = None
        self._redo_tried: set[tuple[int, int, int]] = set()
        self._seen_beats: dict[str, tuple[int, int, float, float]] = {}
        self._last_replay: dict[str, float] = {}
        self._last_refresh = 0.0
        self._last_reap = -1e9
        self._last_progress = 0.0
        # trainer side, per rank: (epoch, pos) -> attempt taken; attempts voided; finished count
        self._taken: dict[int, dict[tuple[int, int], int]] = {}
        self._voided: dict[int, dict[tuple[int, int], int]] = {}
        self._finished: dict[int, int] = {}

    @classmethod
    def connect(
        cls, address: str, run_id: str, byte_budget: int, timeout_s: float = 30.0
    ) -> KeyQueue:
        from spec_core.transfer.mooncake import require_reachable, split_address

        require_reachable(address, "key-queue TCPStore", "transfer.queue_address", timeout_s)
        host, port = split_address(address, "transfer.queue_address")
        try:
            store = dist.TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=timeout_s), use_libuv=True
            )
        except dist.DistError as exc:
            raise ServiceError(
                f"cannot connect to the key queue at {address}: {str(exc).splitlines()[0]}"
            ) from None
        return cls(store, run_id, byte_budget)

    # ---- store helpers --------------------------------------------------------------------------

    def _k(self, *parts: object) -> str:
        return "/".join([self.run_id, *(str(p) for p in parts)])

    def _int(self, *parts: object) -> int:
        return int(self.store.add(self._k(*parts), 0))

    def _exists(self, *parts: object) -> bool:
        return bool(self.store.check([self._k(*parts)]))

    def _get(self, *parts: object) -> Optional[str]:
        key = self._k(*parts)
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _once(self, *parts: object) -> bool:
        """True for exactly one caller per key: an atomic counter (statistics guards only)."""
        return int(self.store.add(self._k(*parts), 1)) == 1

    def _take(self, value: str, *parts: object) -> bool:
        """Own a key that nobody owns yet: one ``compare_set``; ``value`` is unique to the
        caller (it names the incarnation), so the answer is never ambiguous."""
        return self.store.compare_set(self._k(*parts), "", value).decode() == value

    def _record(self, epoch: int, pos: int) -> tuple[str, Optional[_Record]]:
        raw = self._get("res", epoch, pos)
        return (raw or ""), (_Record.from_json(raw) if raw else None)

    def _move(self, epoch: int, pos: int, old: str, new: _Record) -> bool:
        """Move a sample's record from exactly ``old`` to ``new``: one ``compare_set``. ``new``
        names its attempt, so it differs from every value another writer could have set."""
        want = new.to_json()
        return self.store.compare_set(self._k("res", epoch, pos), old, want).decode() == want

    def _rank_of(self, pos: int) -> int:
        return pos % self.plan(0.0).num_ranks

    # ---- plan --------------------------------------------------------------------------------

    def set_plan(self, plan: DataPlan) -> DataPlan:
        current = self.store.compare_set(self._k("plan"), "", plan.to_json()).decode()
        theirs = DataPlan.from_json(current)
        if theirs != plan:
            raise DataError(
                f"key queue run {self.run_id!r} already has plan {theirs}, this process has {plan}: "
                "every producer must use the same prepared dataset, epochs and seed"
            )
        self._plan = plan
        return plan

    def plan(self, timeout_s: float) -> DataPlan:
        if self._plan is None:
            self._wait_for(
                lambda: self._exists("plan"), timeout_s, "the data plan (no producer started?)"
            )
            self._plan = DataPlan.from_json(self.store.get(self._k("plan")))
        return self._plan

    def _wait_for(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        delay = _POLL_MIN_S
        while not cond():
            if time.monotonic() > deadline:
                raise ServiceError(f"timed out after {timeout_s:.0f}s waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S * 4)

    # ---- gate, stop -----------------------------------------------------------------------------

    def open_gate(self) -> None:
        """Let producers start claiming (set once acked ids from a checkpoint are restored)."""
        self.store.set(self._k("gate"), "open")

    def gate_open(self) -> bool:
        return self._exists("gate")

    def request_stop(self, reason: str = "stop requested") -> None:
        """Producers leave; trainers still waiting for data fail with ``reason``."""
        self.store.set(self._k("stop"), reason)

    def stop_requested(self) -> bool:
        return self._exists("stop")

    def stop_reason(self) -> str:
        return self.store.get(self._k("stop")).decode() if self.stop_requested() else ""

    # ---- producer incarnations -------------------------------------------------------------------

    def register_producer(self, producer: str) -> str:
        """Register a fresh incarnation ``<producer>#<n>`` and reap earlier ones of the same id
        (a retry means they are gone). Safe to be killed anywhere: before its name is listed an
        incarnation owns nothing, and ``held/<inc>`` exists before anyone sums it."""
        if not producer or any(c in producer for c in "\t\n#/"):
            raise ServiceError(f"producer id {producer!r} must be non-empty, no tab/newline/#//")
        faults.point("queue.register.incarnation")
        me = f"{producer}#{int(self.store.add(self._k('incarnation', producer), 1))}"
        self.store.set(self._k("held", me), "0")
        self.store.add(self._k("beat", me), 1)
        faults.point("queue.register.list")
        self.store.append(self._k("producers"), me + "\n")
        self.producer = me
        for other in self.incarnations():  # replayed by this one's first reap(), no lease wait
            if other != me and other.rpartition("#")[0] == producer:
                if self._fence(other, f"superseded by {me}"):
                    log.warning("producer %s: reaping my earlier incarnation %s", me, other)
        return me

    def incarnations(self) -> list[str]:
        if not self._exists("producers"):
            return []
        return [p for p in self.store.get(self._k("producers")).decode().splitlines() if p]

    def start_heartbeat(self, interval_s: float) -> threading.Event:
        """Beat from a thread (forward passes release the GIL); set the returned event to stop.
        A failing beat is logged and retried (a store hiccup must not make peers reap a live
        producer); a beat that finds this incarnation fenced sets ``fenced``."""
        stop = threading.Event()
        me = self._me()

        def run() -> None:
            failures = 0
            while not stop.wait(interval_s):
                try:
                    faults.point("queue.beat")
                    self.store.add(self._k("beat", me), 1)
                    if self._exists("fence", me):
                        self._fenced.set()
                        return
                    failures = 0
                except Exception as exc:
                    failures += 1
                    if failures in (1, 10) or failures % 100 == 0:
                        log.warning("heartbeat of %s failed %d times: %s", me, failures, exc)

        threading.Thread(target=run, name=f"heartbeat-{me}", daemon=True).start()
        return stop

    def progress(self) -> None:
        """The main loop is alive (called often; one store call a second at most). Peers reap an
        incarnation whose progress stops for ``progress_timeout_s`` even if it beats."""
        now = time.monotonic()
        if now - self._last_progress >= _PROGRESS_EVERY_S:
            self._last_progress = now
            self.store.add(self._k("progress", self._me()), 1)

    def check_fenced(self) -> None:
        if self._fenced.is_set() or self._exists("fence", self._me()):
            self._fenced.set()
            reason = self._get("fence", self._me()) or "reaped"
            raise ProducerReaped(
                f"producer {self._me()} was reaped by its peers ({reason}) and leaves; its "
                "samples are produced by others (a retry registers a fresh incarnation)"
            )

    def _me(self) -> str:
        if self.producer is None:
            raise ServiceError("register_producer() first")
        return self.producer

    def _journal(self, line: str) -> None:
        self.store.append(self._k("wal", self._me()), line + "\n")

    # ---- claims ----------------------------------------------------------------------------------

    def claim(self, count: int, sample_id_of: Callable[[int, int], str]) -> list[Claim]:
        """About ``count`` samples to produce: re-production requests first, then the next free
        chunk of the earliest epoch that has one. Empty when nothing is claimable right now.

        Each claim is one ``compare_set`` that names this incarnation as owner (``take/...`` for
        a redo entry, ``chunk/<epoch>/<c>`` for fresh positions), preceded by a journal line, so
        a reaper finds everything this incarnation may own and checks which it really does."""
        plan = self._plan
        assert plan is not None, "set_plan() first"
        self.check_fenced()
        me = self._me()
        chunk = self._chunk_size(count)
        picked: list[Claim] = []
        for epoch, pos, attempt in self._redo_entries():
            if len(picked) >= count:
                break
            self._redo_tried.add((epoch, pos, attempt))
            sample_id = _check_id(sample_id_of(epoch, pos))
            faults.point("queue.claim.take_journal")
            self._journal(f"T\t{epoch}\t{pos}\t{attempt}\t{sample_id}")
            faults.point("queue.claim.take")
            if self._take(me, "take", epoch, pos, attempt):
                picked.append(Claim(epoch, sample_id, attempt, pos))
        for epoch in range(plan.num_epochs):
            while len(picked) < count:
                c = self._int("hint", epoch)
                if c * chunk >= plan.num_samples:
                    break
                positions = range(c * chunk, min((c + 1) * chunk, plan.num_samples))
                ids = [_check_id(sample_id_of(epoch, pos)) for pos in positions]
                faults.point("queue.claim.chunk_journal")
                self._journal("\t".join(["C", str(epoch), str(c), *ids]))
                faults.point("queue.claim.chunk")
                won = self._take(me, "chunk", epoch, c)
                # The hint only moves past a chunk somebody owns, so no chunk is ever skipped.
                faults.point("queue.claim.hint")
                self.store.compare_set(self._k("hint", epoch), str(c), str(c + 1))
                if won:
                    picked += [Claim(epoch, i, 0, p) for p, i in zip(positions, ids, strict=True)]
        if picked:
            self.progress()
        return picked

    def _chunk_size(self, count: int) -> int:
        """Positions per chunk: the first producer's batch size, the same for the whole run."""
        if self._chunk is None:
            self._chunk = int(self.store.compare_set(self._k("chunk_size"), "", str(count)))
        return self._chunk

    def _redo_entries(self) -> list[tuple[int, int, int]]:
        """Entries of the append-only ``redo`` log this client has not tried yet; the ``take``
        compare-and-set lets one producer have each."""
        raw = self._get("redo")
        if not raw:
            return []
        out = []
        for line in raw.splitlines():
            epoch, pos, attempt = (int(x) for x in line.split("\t"))
            if (epoch, pos, attempt) not in self._redo_tried:
                out.append((epoch, pos, attempt))
        return out

    def _requeue(self, epoch: int, pos: int, failed: int, stat: str) -> None:
        """Ask for a new attempt of a sample whose attempt ``failed`` will not be trained.

        The new attempt's number comes from the sample's own counter (``attempts/<e>/<pos>``), so
        it was never handed out before: an attempt that a producer took and dropped (the sample
        was resolved then) can never block a later request. Re-running a requeue (a replay, a
        restarted rank) adds another entry; producing twice is harmless, the record's
        ``compare_set`` lets one attempt resolve the sample. The ``append`` is the request; a
        kill before it only wastes a number, and the replay requests again."""
        attempt = int(self.store.add(self._k("attempts", epoch, pos), 1))
        self.store.append(self._k("redo"), f"{epoch}\t{pos}\t{attempt}\n")
        if self._once("counted", stat, epoch, pos, failed):
            self.store.add(self._k("count", stat), 1)

    def is_acked(self, epoch: int, sample_id: str) -> bool:
        return self._exists("acked", epoch, sample_id)

    def is_resolved(self, claim: Claim) -> bool:
        """Nothing left for this claim: the sample is resolved by this or another attempt."""
        _, rec = self._record(claim.epoch, claim.pos)
        return rec is not None and not rec.open_for(claim.attempt)

    # ---- resolution ----------------------------------------------------------------------------

    def resolve(self, claim: Claim, reason: str) -> bool:
        """Close a claim without publishing (``skipped``: already trained; ``dropped``: bad data):
        journal line, then one ``compare_set`` of the sample's record, then a tombstone to its
        rank (a replay re-sends it; ranks ignore repeats)."""
        me = self._me()
        faults.point("queue.resolve.journal")
        self._journal(
            f"S\t{claim.epoch}\t{claim.pos}\t{claim.attempt}\t{reason}\t{claim.sample_id}"
        )
        old, rec = self._record(claim.epoch, claim.pos)
        if rec is not None and not rec.open_for(claim.attempt):
            return False
        new = _Record(reason, claim.attempt, me, claim.sample_id, rec.voided if rec else [])
        faults.point("queue.resolve.cas")
        if not self._move(claim.epoch, claim.pos, old, new):
            return False
        faults.point("queue.resolve.push")
        self._push_tombstone(claim.epoch, claim.pos, claim.attempt, claim.sample_id)
        self.store.add(self._k("count", reason), 1)
        self.progress()
        return True

    def _push_tombstone(self, epoch: int, pos: int, attempt: int, sample_id: str) -> None:
        message = f"{_TOMBSTONE}{epoch}\t{pos}\t{attempt}\t{sample_id}"
        self.store.queue_push(self._k("refs", self._rank_of(pos)), message)

    def publish(self, claim: Claim, ref: SampleRef) -> bool:
        """Make a produced sample visible to its trainer rank, unless another attempt resolved it.

        Journal line (with the ref), then one ``compare_set`` of the sample's record: that is the
        commit. The push to the rank's queue after it is replayed by a reaper if this producer
        dies first (ranks ignore repeats). The bytes stay in this producer's count until a
        trainer acks (or voids) the sample."""
        me = self._me()
        self.check_fenced()
        faults.point("queue.publish.journal")
        self._journal(f"P\t{claim.epoch}\t{claim.pos}\t{claim.attempt}\t{ref.to_json()}")
        old, rec = self._record(claim.epoch, claim.pos)
        if rec is not None and not rec.open_for(claim.attempt):
            self.release(claim)
            return False
        new = _Record(
            "published",
            claim.attempt,
            me,
            claim.sample_id,
            rec.voided if rec else [],
            json.loads(ref.to_json()),
        )
        faults.point("queue.publish.cas")
        if not self._move(claim.epoch, claim.pos, old, new):
            self.release(claim)
            return False
        faults.point("queue.publish.push")
        self.store.queue_push(self._k("refs", self._rank_of(claim.pos)), ref.to_json())
        faults.point("queue.publish.held")
        with self._lock:
            nbytes = self._reserved.pop(claim.ident, 0)
            self._outstanding[claim.ident] = (claim.pos, nbytes)
        self.store.add(self._k("count", "published"), 1)
        self.progress()
        return True

    # ---- byte budget ----------------------------------------------------------------------------

    def reserve(
        self,
        claim: Claim,
        nbytes: int,
        should_stop: Callable[[], bool],
        timeout_s: Optional[float] = None,
    ) -> float:
        """Wait until ``nbytes`` fit in the byte budget and reserve them; returns seconds waited.
        A sample larger than the whole budget is admitted only into an otherwise empty store.

        Announce, then check: when the sum over all incarnations leaves room, the bytes go into
        this incarnation's own ``held/<inc>`` (a plain ``set``: only it writes there while
        alive), then the sum is read again.
        Of two producers that announce at once, at least one sees the other's bytes, so admitted
        reservations never exceed the budget, and no concurrent update can be lost."""
        start = time.monotonic()
        delay = _POLL_MIN_S
        waited_once = False
        while True:
            self.check_fenced()
            total = self.resident_bytes()
            if total + nbytes <= self.byte_budget or total == 0:  # worth announcing
                faults.point("queue.reserve.announce")
                with self._lock:
                    self._set_held(self._held + nbytes)
                total = self.resident_bytes()
                if total <= self.byte_budget or total == nbytes:
                    with self._lock:
                        self._held += nbytes
                        self._reserved[claim.ident] = self._reserved.get(claim.ident, 0) + nbytes
                    return time.monotonic() - start
                faults.point("queue.reserve.retract")
                with self._lock:
                    self._set_held(self._held)
            if should_stop():
                raise StopRequested("stop requested while waiting for the byte budget")
            waited = time.monotonic() - start
            if timeout_s is not None and waited > timeout_s:
                raise ServiceError(
                    f"producer {self._me()} waited {waited:.0f}s for {nbytes} bytes of the byte "
                    f"budget ({total} of {self.byte_budget} held); no trainer acked meanwhile "
                    "(transfer.budget_wait_timeout_s)"
                )
            if not waited_once:  # count each reservation that had to wait, once
                waited_once = True
                self.store.add(self._k("count", "budget_waits"), 1)
            self.progress()
            self.refresh_bytes()
            time.sleep(delay * (1 + random.random()))  # jitter: two oversized ones take turns
            delay = min(delay * 2, _POLL_MAX_S)

    def _set_held(self, value: int) -> None:
        """Only a live incarnation writes its own count; once fenced, peers recount it."""
        if not self._fenced.is_set():
            self.store.set(self._k("held", self._me()), str(value))

    def release(self, claim: Claim) -> int:
        """Give back a reservation whose sample this incarnation will not publish."""
        with self._lock:
            nbytes = self._reserved.pop(claim.ident, 0)
            if nbytes:
                self._held -= nbytes
                faults.point("queue.release.held")
                self._set_held(self._held)
        return nbytes

    def refresh_bytes(self, force: bool = False, everyone: bool = False) -> None:
        """Drop from this incarnation's count the samples trainers have acked or voided, and
        re-count the bytes of fenced incarnations (nobody else would). Rate-limited.
        ``everyone`` re-counts every incarnation: for a producer leaving a finished run, when
        nobody reserves any more (a producer killed after its last publish is never fenced)."""
        now = time.monotonic()
        if not force and now - self._last_refresh < _REFRESH_EVERY_S:
            return
        self._last_refresh = now
        if self.producer is not None:
            with self._lock:
                done = [
                    ident
                    for ident, (pos, _) in self._outstanding.items()
                    if self._finished_publication(ident[0], pos, ident[1], ident[2])
                ]
                for ident in done:
                    self._held -= self._outstanding.pop(ident)[1]
                if done:
                    faults.point("queue.refresh.held")
                    self._set_held(self._held)
        for other in self.incarnations():
            if other != self.producer and (everyone or self._exists("fence", other)):
                self._recount(other)

    def _finished_publication(self, epoch: int, pos: int, sample_id: str, attempt: int) -> bool:
        """A published attempt needs no bytes any more: acked, or voided by its trainer."""
        if self.is_acked(epoch, sample_id):
            return True
        _, rec = self._record(epoch, pos)
        return rec is None or not (rec.state == "published" and rec.attempt == attempt)

    def _recount(self, inc: str, journal: Optional[_Journal] = None) -> int:
        """Set another incarnation's ``held`` to the bytes of its publications that no trainer
        has finished: a ``compare_set`` from the value read, so a slower recount can never
        overwrite a newer (smaller) one. Anyone may run it, any number of times."""
        held = self._get("held", inc)
        if held is None or int(held) == 0:
            return 0
        if journal is None:
            journal = _Journal.parse(self._get("wal", inc) or "")
        truth = 0
        for epoch, pos, attempt, ref_json in journal.pubs:
            ref = SampleRef.from_json(ref_json)
            _, rec = self._record(epoch, pos)
            if rec is None or rec.producer != inc or not rec.was_published(attempt):
                continue  # the compare-and-set never happened: no bytes were handed over
            if not self._finished_publication(epoch, pos, ref.sample_id, attempt):
                truth += ref.nbytes
        if truth != int(held):
            faults.point("queue.reap.held")
            self.store.compare_set(self._k("held", inc), held, str(truth))
        return truth

    # ---- reaping ----------------------------------------------------------------------------------

    def reap(
        self,
        remove_keys: Callable[[Claim], None],
        lease_s: float,
        progress_timeout_s: Optional[float] = None,
    ) -> int:
        """Fence and replay incarnations whose heartbeat was still for ``lease_s`` or whose main
        loop made no progress for ``progress_timeout_s`` (observed locally, so clocks need not
        agree); replay again those fenced by a peer that may have died mid-replay. Returns how
        many claims were re-queued."""
        now = time.monotonic()
        shortest = min(lease_s, progress_timeout_s if progress_timeout_s is not None else lease_s)
        if now - self._last_reap < min(shortest / 4, 1.0):  # silence is measured in leases
            return 0
        self._last_reap = now
        requeued = 0
        for other in self.incarnations():
            if other == self.producer or self._exists("reaped", other):
                continue
            if not self._exists("fence", other):
                reason = self._silence(other, now, lease_s, progress_timeout_s)
                if not reason:
                    continue
                if self._fence(other, f"{reason}; reaped by {self.producer}"):
                    log.warning("producer %s: %s; re-queueing its claims", other, reason)
            if now - self._last_replay.get(other, -1e9) >= lease_s:  # a reaper may have died
                self._last_replay[other] = now
                requeued += self._replay(other, remove_keys)
        return requeued

    def _silence(
        self, other: str, now: float, lease_s: float, progress_timeout_s: Optional[float]
    ) -> str:
        """Why ``other`` counts as dead, or "" (the first sighting only starts the clocks)."""
        beats, progress = self._int("beat", other), self._int("progress", other)
        seen = self._seen_beats.get(other)
        if seen is None:
            self._seen_beats[other] = (beats, progress, now, now)
            return ""
        beat_at = seen[2] if beats == seen[0] else now
        progress_at = seen[3] if progress == seen[1] else now
        self._seen_beats[other] = (beats, progress, beat_at, progress_at)
        if now - beat_at >= lease_s:
            return f"no heartbeat for {now - beat_at:.0f}s (transfer.claim_lease_s)"
        if progress_timeout_s is not None and now - progress_at >= progress_timeout_s:
            return (
                f"no progress for {now - progress_at:.0f}s while beating "
                "(transfer.progress_timeout_s)"
            )
        return ""

    def retire(self, remove_keys: Callable[[Claim], None]) -> int:
        """A producer leaving (done, stopped or failing) reaps itself: what it did not publish
        goes back to the queue, what it published keeps being counted until trained."""
        me = self._me()
        if self._fenced.is_set():
            return 0
        self._fence(me, "retired")
        with self._lock:
            self._reserved.clear()
        return self._replay(me, remove_keys)

    def _fence(self, inc: str, reason: str) -> bool:
        """Mark ``inc`` reaped (first reason wins). True for the caller that fenced it."""
        faults.point("queue.reap.fence")
        return self.store.compare_set(self._k("fence", inc), "", reason).decode() == reason

    def _replay(self, inc: str, remove_keys: Callable[[Claim], None]) -> int:
        """Finish or undo everything a fenced incarnation's journal says it may have started.
        Every step is idempotent, so this may run many times, concurrently, or be killed:

        - a claim it owns (its ``compare_set`` won) that no attempt has resolved: its partial
          put is removed and the next attempt is queued (``redo``);
        - a publication or tombstone whose ``compare_set`` won: re-sent to the rank (ranks
          ignore repeats), unless already acked;
        - its byte count is set to the bytes of its unfinished publications.
        """
        journal = _Journal.parse(self._get("wal", inc) or "")
        chunk = self._chunk_size(1) if journal.chunks else 0  # set by its first claim
        owned: list[Claim] = []
        for epoch, c, ids in journal.chunks:
            if self._get("chunk", epoch, c) == inc:
                owned += [Claim(epoch, sid, 0, c * chunk + i) for i, sid in enumerate(ids)]
        for epoch, pos, attempt, sample_id in journal.takes:
            if self._get("take", epoch, pos, attempt) == inc:
                owned.append(Claim(epoch, sample_id, attempt, pos))
        requeued = 0
        for claim in owned:
            epoch, pos, attempt = claim.epoch, claim.pos, claim.attempt
            _, rec = self._record(epoch, pos)
            if rec is not None and rec.producer == inc and rec.attempt == attempt:
                continue  # it resolved this one itself
            if rec is not None and rec.was_published(attempt):
                continue
            faults.point("queue.reap.remove")
            remove_keys(claim)
            if rec is None or rec.open_for(attempt):
                faults.point("queue.reap.requeue")
                self._requeue(epoch, pos, attempt, "reclaimed")
                requeued += 1
        for epoch, pos, attempt, ref_json in journal.pubs:
            _, rec = self._record(epoch, pos)
            if rec is not None and rec.state == "published" and rec.attempt == attempt:
                if rec.producer == inc and not self.is_acked(epoch, rec.sample_id):
                    faults.point("queue.reap.push")
                    self.store.queue_push(self._k("refs", self._rank_of(pos)), ref_json)
        for epoch, pos, attempt, reason, sample_id in journal.resolves:
            _, rec = self._record(epoch, pos)
            if rec is not None and (rec.state, rec.producer, rec.attempt) == (reason, inc, attempt):
                faults.point("queue.reap.push")
                self._push_tombstone(epoch, pos, attempt, sample_id)
        self._recount(inc, journal)
        faults.point("queue.reap.done")
        self.store.set(self._k("reaped", inc), "1")
        return requeued

    # ---- end of production -----------------------------------------------------------------------

    def all_finished(self) -> bool:
        """Every sample of every epoch trained, skipped or dropped: producers may leave."""
        plan = self.plan(0.0)
        return self.finished_count() >= plan.num_samples * plan.num_epochs

    def finished_count(self) -> int:
        """Samples trained, skipped or dropped: each rank's own count (``finished/<rank>``)."""
        plan = self.plan(0.0)
        return sum(self._int("finished", r) for r in range(plan.num_ranks))

    # ---- trainers -----------------------------------------------------------------------------

    def _rank_state(self, rank: int) -> tuple[dict, dict]:
        return self._taken.setdefault(rank, {}), self._voided.setdefault(rank, {})

    def expected(self, rank: int) -> int:
        """Samples dealt to ``rank`` over all epochs: positions ``rank, rank + R, ...``."""
        plan = self.plan(0.0)
        return plan.num_epochs * len(range(rank, plan.num_samples, plan.num_ranks))

    def try_pop(self, rank: int) -> Optional[SampleRef]:
        """The next ref for ``rank`` this client has not taken yet, or None. Tombstones and
        repeats (a reaper re-sends what it cannot prove was sent) are consumed here."""
        taken, voided = self._rank_state(rank)
        while True:
            faults.point("queue.pop")
            try:
                raw = self.store.queue_pop(self._k("refs", rank), block=False).decode()
            except dist.QueueEmptyError:
                return None
            with self._lock:
                if raw.startswith(_TOMBSTONE):
                    epoch, pos, attempt, _ = raw[len(_TOMBSTONE) :].split("\t", 3)
                    key = (int(epoch), int(pos))
                    if key not in taken:
                        taken[key] = int(attempt)
                        self._finished[rank] = self._finished.get(rank, 0) + 1
                        self.store.set(self._k("finished", rank), str(self._finished[rank]))
                    continue
                ref = SampleRef.from_json(raw)
                key = (ref.epoch, ref.pos)
                if key in taken or ref.attempt <= voided.get(key, -1):
                    continue
                taken[key] = ref.attempt
                return ref

    def end_of_data(self, rank: int) -> bool:
        """Every sample dealt to ``rank`` has reached this client (refs are dealt by position,
        so each rank knows how many it gets)."""
        taken, _ = self._rank_state(rank)
        with self._lock:
            return len(taken) >= self.expected(rank)

    def ack(self, refs: list[SampleRef]) -> None:
        """Trained: one ``append`` of the step's samples to ``acked_log`` commits the ack; one
        ``multi_set`` then indexes them (``acked/<epoch>/<id>``, read by producers) with the
        rank's finished count. A rank restarted in between redoes the index (``recover_rank``)."""
        if refs:
            lines = "".join(f"{r.epoch}\t{r.sample_id}\t{r.pos}\t{r.attempt}\n" for r in refs)
            faults.point("queue.ack.log")
            self.store.append(self._k("acked_log"), lines)
            rank = self._rank_of(refs[0].pos)
            with self._lock:
                self._finished[rank] = self._finished.get(rank, 0) + len(refs)
                keys = [self._k("acked", r.epoch, r.sample_id) for r in refs]
                faults.point("queue.ack.index")
                self.store.multi_set(
                    [*keys, self._k("finished", rank)],
                    ["1"] * len(keys) + [str(self._finished[rank])],
                )
        self.store.add(self._k("ack_calls"), 1)

    def requeue_missing(self, ref: SampleRef) -> bool:
        """A published sample's data is gone: void it (one ``compare_set``) and queue its next
        attempt. A restarted rank re-queues a void whose ``redo`` line was never written."""
        rank = self._rank_of(ref.pos)
        taken, voided = self._rank_state(rank)
        key = (ref.epoch, ref.pos)
        with self._lock:
            taken.pop(key, None)
            voided[key] = max(voided.get(key, -1), ref.attempt)
        old, rec = self._record(ref.epoch, ref.pos)
        if rec is None or rec.state != "published" or rec.attempt != ref.attempt:
            return False  # a stale repeat of an earlier attempt
        new = _Record("void", ref.attempt, rec.producer, rec.sample_id, [*rec.voided, ref.attempt])
        faults.point("queue.void.cas")
        if not self._move(ref.epoch, ref.pos, old, new):
            return False
        faults.point("queue.void.requeue")
        self._requeue(ref.epoch, ref.pos, ref.attempt, "missing")
        return True

    def recover_rank(self, rank: int) -> int:
        """Called by every trainer rank at start. The first incarnation of a rank has nothing
        to recover; a restarted one rebuilds what it has taken from ``acked_log`` and the
        sample records, re-sends to itself every published, unacked sample of its positions
        (its predecessor may have popped them), re-queues voids and redoes the ack index.
        Returns how many refs it re-sent."""
        if int(self.store.add(self._k("rank_incarnation", rank), 1)) == 1:
            return 0
        plan = self.plan(0.0)
        taken, _ = self._rank_state(rank)
        acked_keys: list[str] = []
        for line in (self._get("acked_log") or "").splitlines():
            fields = line.split("\t")
            if len(fields) == 4 and int(fields[2]) % plan.num_ranks == rank:
                taken[(int(fields[0]), int(fields[2]))] = int(fields[3])
                acked_keys.append(self._k("acked", fields[0], fields[1]))
        finished = len(taken)
        resent = 0
        for epoch in range(plan.num_epochs):
            for pos in range(rank, plan.num_samples, plan.num_ranks):
                if (epoch, pos) in taken:
                    continue
                _, rec = self._record(epoch, pos)
                if rec is None:
                    continue
                if rec.state in ("skipped", "dropped"):
                    taken[(epoch, pos)] = rec.attempt
                    finished += 1
                elif rec.state == "published":
                    faults.point("queue.recover.push")
                    self.store.queue_push(self._k("refs", rank), json.dumps(rec.ref))
                    resent += 1
                elif rec.state == "void":
                    self._requeue(epoch, pos, rec.attempt, "missing")
        with self._lock:
            self._finished[rank] = finished
        self.store.multi_set(
            [*acked_keys, self._k("finished", rank)], ["1"] * len(acked_keys) + [str(finished)]
        )
        return resent

    def ack_calls(self) -> int:
        return self._int("ack_calls")

    def acked(self) -> list[tuple[int, str]]:
        if not self._exists("acked_log"):
            return []
        out = []
        for line in self.store.get(self._k("acked_log")).decode().splitlines():
            epoch, sample_id = line.split("\t")[:2]
            out.append((int(epoch), sample_id))
        return out

    def mark_acked(self, pairs: list[tuple[int, str]]) -> int:
        """Restore acked ids from a checkpoint: producers will skip them."""
        restored = 0
        for epoch, sample_id in pairs:
            if self._once("acked", epoch, _check_id(sample_id)):
                self.store.append(self._k("acked_log"), f"{epoch}\t{sample_id}\n")
                restored += 1
        return restored

    # ---- observability ------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        """Bytes held by every producer incarnation: reservations plus published samples no
        trainer has finished. One ``multi_get`` (every listed incarnation has its key)."""
        keys = [self._k("held", p) for p in self.incarnations()]
        return sum(int(v) for v in self.store.multi_get(keys)) if keys else 0

    def produced(self) -> int:
        """Samples resolved so far (published, skipped or dropped): a progress figure for
        dashboards (a producer killed mid-publish can leave it one short)."""
        return sum(self._int("count", n) for n in ("published", "skipped", "dropped"))

    def counts(self) -> dict[str, int]:
        return {
            name: self._int("count", name)
            for name in ("skipped", "dropped", "reclaimed", "missing", "budget_waits")
        }
