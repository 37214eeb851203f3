"""The key queue: who produces which sample, what is ready, what was trained, on a TCPStore.

Only small strings travel here (JSON ``SampleRef``s, counters, ids); tensors live in Mooncake.
Everything a producer or trainer does is one of a few atomic store operations, so any number of
producers and trainer ranks, on any machines, agree without a coordinator process of their own.

Per run (all keys under ``{run_id}/``):

- ``plan``: dataset size, epochs, shuffle seed and number of trainer ranks, set once
  (compare-and-set) by whoever knows it first; a producer with a different dataset fails fast
  instead of training on a mix.
- Claims: epoch ``e``'s shuffled positions are handed out by the counter ``next/e`` (``add``), a
  batch at a time. Each claim is logged under ``claims/<producer>`` and carries an *attempt*
  number. A producer heartbeats ``beat/<producer>``; one whose counter stops moving for
  ``claim_lease_s`` (observed locally, so clocks need not agree) is *reaped* by another producer:
  its unresolved claims go to the ``redo`` queue and their budget reservations are released.
- Resolution: ``resolved/e/<sample>`` is set by compare-and-set when a sample is published (or
  skipped because it was already trained, or dropped as bad data), so a sample is published at
  most once per epoch even if a "dead" producer turns out to be alive. ``done/e`` counts resolved
  samples; a rank knows no more refs will arrive once every ``done/e`` equals the dataset size
  and its ``refs/<rank>`` queue is empty (read in that order: publishers push before they count).
- Dealing: published refs go round-robin (a global counter) to one queue per trainer rank, so
  each rank gets its exact share and the ranks run out together: with one shared queue a rank
  that prefetched more would leave the tail to extra steps the trainer does not plan for.
- Byte budget: ``resident`` holds the bytes of published-but-unacked samples plus reservations.
  Producers reserve with one atomic ``add`` before putting and take it back if that overshot
  (a compare-and-set of the value could report a false success and lose an update), trainers
  subtract on ack. Mooncake evicts silently near 90 % full; the budget keeps
  residency far below that.
- Acks: ``acked/e/<sample>`` + an append-only ``acked_log``; ``finished/e`` counts samples that
  need nothing more (acked, skipped or dropped). Producers linger until every epoch is finished,
  so a trainer that finds a sample's data gone can hand it back (``requeue_missing``).

Blocking reads poll with short sleeps instead of the store's blocking ``wait``: a timeout there is
global to the client and spams C++ warnings, and polling lets every wait check for the end of data
or a stop request, so nothing can hang past ``transfer.pop_timeout_s``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from spec_core.contracts.plan import DataPlan
from spec_core.errors import DataError, ServiceError
from spec_core.transfer.records import SampleRef

log = logging.getLogger(__name__)

_POLL_MIN_S, _POLL_MAX_S = 0.005, 0.05


class StopRequested(Exception):
    """A producer was told to stop while it waited; it leaves cleanly (not an error)."""


@dataclass(frozen=True)
class Claim:
    epoch: int
    sample_id: str
    attempt: int


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


class KeyQueue:
    """Client side of the key queue; one per process (thread-safe: TCPStore serialises calls)."""

    def __init__(self, store: dist.TCPStore, run_id: str, byte_budget: int) -> None:
        self.store = store
        self.run_id = run_id
        self.byte_budget = int(byte_budget)
        self._plan: Optional[DataPlan] = None
        self._beats_seen: dict[str, tuple[int, float]] = {}
        self.store.add(self._k("resident"), 0)

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

    def _k(self, *parts: object) -> str:
        return "/".join([self.run_id, *(str(p) for p in parts)])

    def _int(self, *parts: object) -> int:
        return int(self.store.add(self._k(*parts), 0))

    def _exists(self, *parts: object) -> bool:
        return bool(self.store.check([self._k(*parts)]))

    def _once(self, *parts: object) -> bool:
        """True for exactly one caller per key (until the key is deleted): an atomic counter."""
        return int(self.store.add(self._k(*parts), 1)) == 1

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

    # ---- producers ----------------------------------------------------------------------------

    def register_producer(self, producer: str) -> None:
        if "\n" in producer or "\t" in producer or not producer:
            raise ServiceError(f"producer id {producer!r} must be non-empty, no tab/newline")
        if not self._once("producer", producer):
            raise ServiceError(
                f"producer id {producer!r} is already registered in run {self.run_id!r}"
            )
        self.store.append(self._k("producers"), producer + "\n")
        self.beat(producer)

    def beat(self, producer: str) -> None:
        self.store.add(self._k("beat", producer), 1)

    def start_heartbeat(self, producer: str, interval_s: float) -> threading.Event:
        """Beat from a thread (forward passes release the GIL); set the returned event to stop."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval_s):
                try:
                    self.beat(producer)
                except Exception:  # queue gone at shutdown: nothing left to keep alive
                    return

        threading.Thread(target=run, name=f"heartbeat-{producer}", daemon=True).start()
        return stop

    def producers(self) -> list[str]:
        if not self._exists("producers"):
            return []
        return [p for p in self.store.get(self._k("producers")).decode().splitlines() if p]

    def claim(
        self, producer: str, count: int, sample_id_of: Callable[[int, int], str]
    ) -> list[Claim]:
        """Up to ``count`` samples to produce: re-production requests first, then fresh positions
        of the earliest epoch that has any. Empty when nothing is claimable right now."""
        plan = self._plan
        assert plan is not None, "set_plan() first"
        picked: list[tuple[int, str]] = []
        while len(picked) < count:
            try:
                entry = self.store.queue_pop(self._k("redo"), block=False).decode()
            except dist.QueueEmptyError:
                break
            epoch, sample_id = entry.split("\t")
            picked.append((int(epoch), sample_id))
        for epoch in range(plan.num_epochs):
            if len(picked) >= count:
                break
            if self._int("next", epoch) >= plan.num_samples:
                continue
            want = count - len(picked)
            end = int(self.store.add(self._k("next", epoch), want))
            for pos in range(max(end - want, 0), min(end, plan.num_samples)):
                picked.append((epoch, _check_id(sample_id_of(epoch, pos))))
        claims = []
        for epoch, sample_id in picked:
            attempt = int(self.store.add(self._k("attempts", epoch, sample_id), 1)) - 1
            claims.append(Claim(epoch, sample_id, attempt))
        if claims:
            self.store.append(
                self._k("claims", producer),
                "".join(f"{c.epoch}\t{c.sample_id}\t{c.attempt}\n" for c in claims),
            )
        return claims

    def is_acked(self, epoch: int, sample_id: str) -> bool:
        return self._exists("acked", epoch, sample_id)

    def resolve(self, claim: Claim, reason: str) -> bool:
        """Close a claim without publishing (``skipped``: already trained; ``dropped``: bad data)."""
        if not self._once("resolved", claim.epoch, claim.sample_id):
            return False
        self.store.add(self._k("done", claim.epoch), 1)
        self.store.add(self._k("finished", claim.epoch), 1)
        self.store.add(self._k("count", reason), 1)
        return True

    def reserve(self, claim: Claim, nbytes: int, should_stop: Callable[[], bool]) -> float:
        """Wait until ``nbytes`` fit in the byte budget and reserve them; returns seconds waited.
        A sample larger than the whole budget is admitted only into an empty store."""
        key = self._k("resident")
        start = time.monotonic()
        delay = _POLL_MIN_S
        while True:
            current = self._int("resident")
            if current == 0 or current + nbytes <= self.byte_budget:
                # One atomic add, rolled back if it overshot: unlike a compare-and-set of the
                # value it can never lose a concurrent update (docs/architecture.md §key-queue).
                after = int(self.store.add(key, nbytes))
                if after == nbytes or after <= self.byte_budget:
                    break
                self.store.add(key, -nbytes)
            if should_stop():
                raise StopRequested("stop requested while waiting for the byte budget")
            if delay == _POLL_MIN_S:  # count each reservation that had to wait, once
                self.store.add(self._k("count", "budget_waits"), 1)
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)
        self.store.set(self._k("resv", claim.epoch, claim.sample_id, claim.attempt), str(nbytes))
        return time.monotonic() - start

    def publish(self, claim: Claim, ref: SampleRef) -> bool:
        """Make a produced sample visible to trainers, unless another attempt already did."""
        if not self._once("resolved", claim.epoch, claim.sample_id):
            self.release(claim)
            return False
        rank = (int(self.store.add(self._k("dealt"), 1)) - 1) % self.plan(0.0).num_ranks
        self.store.queue_push(self._k("refs", rank), ref.to_json())
        # The bytes now belong to the published ref (trainers subtract them on ack). If a reaper
        # wrongly took us for dead and released the reservation meanwhile, count them again.
        if not self.store.delete_key(self._k("resv", claim.epoch, claim.sample_id, claim.attempt)):
            self.store.add(self._k("resident"), ref.nbytes)
        self.store.add(self._k("done", claim.epoch), 1)
        return True

    def is_resolved(self, claim: Claim) -> bool:
        """A re-queued sample another attempt has published meanwhile needs no work."""
        return self._exists("resolved", claim.epoch, claim.sample_id)

    def release(self, claim: Claim) -> int:
        """Give back a reservation whose sample this attempt will not publish. Only the caller
        that deletes the record subtracts, so an owner and a reaper cannot both release it."""
        key = self._k("resv", claim.epoch, claim.sample_id, claim.attempt)
        if not self.store.check([key]):
            return 0
        nbytes = int(self.store.get(key))
        if not self.store.delete_key(key):  # someone else released it first
            return 0
        self.store.add(self._k("resident"), -nbytes)
        return nbytes

    def reap(self, me: str, remove_keys: Callable[[Claim], None], lease_s: float) -> int:
        """Hand the unresolved claims of producers silent for ``lease_s`` to the redo queue.
        Returns how many claims were re-queued."""
        now = time.monotonic()
        requeued = 0
        for producer in self.producers():
            if producer == me:
                continue
            beats = self._int("beat", producer)
            seen = self._beats_seen.get(producer)
            if seen is None or seen[0] != beats:
                self._beats_seen[producer] = (beats, now)
                continue
            if now - seen[1] < lease_s or not self._once("reaped", producer):
                continue
            log.warning(
                "producer %s silent for %.0fs: re-queueing its claims", producer, now - seen[1]
            )
            requeued += self._requeue_claims_of(producer, remove_keys)
        return requeued

    def retire(self, me: str, remove_keys: Callable[[Claim], None]) -> int:
        """A producer leaving (done, stopped or failing) hands back what it did not publish."""
        if not self._once("reaped", me):
            return 0
        return self._requeue_claims_of(me, remove_keys)

    def _requeue_claims_of(self, producer: str, remove_keys: Callable[[Claim], None]) -> int:
        if not self._exists("claims", producer):
            return 0
        requeued = 0
        for line in self.store.get(self._k("claims", producer)).decode().splitlines():
            epoch, sample_id, attempt = line.split("\t")
            claim = Claim(int(epoch), sample_id, int(attempt))
            if self._exists("resolved", claim.epoch, claim.sample_id):
                continue
            self.release(claim)
            remove_keys(claim)  # a half-finished put of that attempt
            if self._mark_once("unpublished", claim):
                self.store.queue_push(self._k("redo"), f"{claim.epoch}\t{claim.sample_id}")
                self.store.add(self._k("count", "reclaimed"), 1)
                requeued += 1
        return requeued

    def _mark_once(self, kind: str, claim: Claim) -> bool:
        """Re-queue an attempt at most once per kind of failure (reapers race each other, and
        trainer ranks may both find the same data gone)."""
        return self._once("failed", kind, claim.epoch, claim.sample_id, claim.attempt)

    def production_complete(self) -> bool:
        """Every sample of every epoch resolved: no more refs will be pushed (barring redo)."""
        plan = self.plan(0.0)
        return all(self._int("done", e) >= plan.num_samples for e in range(plan.num_epochs))

    def all_finished(self) -> bool:
        """Every sample of every epoch trained, skipped or dropped: producers may leave."""
        plan = self.plan(0.0)
        return all(self._int("finished", e) >= plan.num_samples for e in range(plan.num_epochs))

    # ---- trainers -----------------------------------------------------------------------------

    def try_pop(self, rank: int) -> Optional[SampleRef]:
        try:
            raw = self.store.queue_pop(self._k("refs", rank), block=False)
        except dist.QueueEmptyError:
            return None
        return SampleRef.from_json(raw)

    def end_of_data(self, rank: int) -> bool:
        """No ref is queued for ``rank`` and none will come. ``done`` is read before the queue
        length: a publisher pushes its ref before counting it, so this order cannot miss one."""
        complete = self.production_complete()
        return complete and self.store.queue_len(self._k("refs", rank)) == 0

    def ack(self, refs: list[SampleRef]) -> None:
        """Trained: never produce these again, and give their bytes back to the budget."""
        for ref in refs:
            if not self._once("acked", ref.epoch, ref.sample_id):
                log.warning("sample %s (epoch %d) acked twice", ref.sample_id, ref.epoch)
                continue
            self.store.append(self._k("acked_log"), f"{ref.epoch}\t{ref.sample_id}\n")
            self.store.add(self._k("finished", ref.epoch), 1)
            self.store.add(self._k("resident"), -ref.nbytes)
        self.store.add(self._k("ack_calls"), 1)

    def requeue_missing(self, ref: SampleRef) -> bool:
        """A published sample's data is gone: give its id back for re-production."""
        if not self._mark_once("missing", Claim(ref.epoch, ref.sample_id, ref.attempt)):
            return False
        self.store.add(self._k("resident"), -ref.nbytes)
        self.store.delete_key(self._k("resolved", ref.epoch, ref.sample_id))
        self.store.add(self._k("done", ref.epoch), -1)
        self.store.queue_push(self._k("redo"), f"{ref.epoch}\t{ref.sample_id}")
        self.store.add(self._k("count", "missing"), 1)
        return True

    def ack_calls(self) -> int:
        return self._int("ack_calls")

    def acked(self) -> list[tuple[int, str]]:
        if not self._exists("acked_log"):
            return []
        out = []
        for line in self.store.get(self._k("acked_log")).decode().splitlines():
            epoch, sample_id = line.split("\t")
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
        return self._int("resident")

    def produced(self) -> int:
        """Samples resolved so far over all planned epochs (published, skipped or dropped):
        generation progress for dashboards."""
        plan = self.plan(0.0)
        return sum(self._int("done", e) for e in range(plan.num_epochs))

    def counts(self) -> dict[str, int]:
        return {
            name: self._int("count", name)
            for name in ("skipped", "dropped", "reclaimed", "missing", "budget_waits")
        }
