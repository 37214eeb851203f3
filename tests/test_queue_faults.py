"""Every key-queue injection point, deterministically, on a real TCPStore: a producer (or trainer
rank) dies at the n-th time it reaches a point, a peer reaps it (a restarted rank recovers), and
the run must still train every sample exactly once with its byte count back at 0.

One process plays every part (the fault is a ``raise`` that ends that part's life, which is what a
SIGKILL does to the store's view of it); the Mooncake objects are a dict here, named as such
(test_chaos.py runs the same with real processes and the real store). Also: heartbeats that
survive errors, no-progress reaping, a reaped producer told so, a retry as a fresh incarnation.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter

import pytest

from spec_core.contracts.plan import DataPlan
from spec_core.transfer.queue import Claim, KeyQueue, ProducerReaped
from spec_core.transfer.records import SampleRef, TensorMeta, tensor_key
from spec_core.utils import faults
from spec_core.utils.faults import FaultInjected

N, EPOCHS, BATCH = 6, 2, 2
_runs = itertools.count()


class FakeObjects:
    """Stands in for Mooncake's objects: which tensor keys exist."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def remove_attempt(self, run: str, claim: Claim) -> None:
        self.keys.discard(
            tensor_key(run, claim.epoch, claim.sample_id, "aux_hidden", claim.attempt)
        )


def _ids(epoch: int, pos: int) -> str:
    return f"s{DataPlan(N, EPOCHS, 0).order(epoch)[pos]}"


def _ref(run: str, claim: Claim, producer: str) -> SampleRef:
    key = tensor_key(run, claim.epoch, claim.sample_id, "aux_hidden", claim.attempt)
    meta = {"aux_hidden": TensorMeta(key, (10 + claim.pos,), "uint8")}
    return SampleRef(run, claim.epoch, claim.sample_id, meta, producer, claim.attempt, claim.pos)


def _client(address: str, run: str, ranks: int = 1) -> KeyQueue:
    q = KeyQueue.connect(address, run, 10_000, timeout_s=5)
    q.set_plan(DataPlan(N, EPOCHS, 0, num_ranks=ranks))
    return q


def _produce_step(q: KeyQueue, objects: FakeObjects, run: str) -> bool:
    """One batch of a producer's loop (claim, skip/produce, reserve, put, publish); False when
    nothing was claimable."""
    claims = q.claim(BATCH, _ids)
    for claim in claims:
        if q.is_resolved(claim):
            continue
        if q.is_acked(claim.epoch, claim.sample_id):
            q.resolve(claim, "skipped")
            continue
        ref = _ref(run, claim, q.producer or "")
        q.reserve(claim, ref.nbytes, lambda: False)
        objects.keys.add(ref.keys[0])
        if not q.publish(claim, ref):
            objects.keys.discard(ref.keys[0])
    return bool(claims)


def _train_step(q: KeyQueue, objects: FakeObjects, rank: int) -> bool:
    """Pop up to two refs, re-queue those whose data is gone, ack the rest; False at the end."""
    refs = []
    while len(refs) < 2 and (ref := q.try_pop(rank)) is not None:
        if ref.keys[0] in objects.keys:
            refs.append(ref)
        else:
            q.requeue_missing(ref)
    for ref in refs:
        objects.keys.discard(ref.keys[0])
    q.ack(refs)
    return not q.end_of_data(rank)


def _finish(address: str, run: str, objects: FakeObjects, producers, trainers) -> None:
    """Run the survivors until every sample is finished (reaping the dead on the way)."""
    deadline = time.monotonic() + 60
    while not producers[0].all_finished():
        assert time.monotonic() < deadline, "the run did not finish"
        for p in producers:
            if not _produce_step(p, objects, run):
                p.reap(lambda c: objects.remove_attempt(run, c), lease_s=0.0)
        for rank, t in enumerate(trainers):
            _train_step(t, objects, rank)
    for p in producers:
        p.refresh_bytes(force=True, everyone=True)  # what a producer leaving a finished run does
        p.retire(lambda c: objects.remove_attempt(run, c))


def _check(address: str, run: str, objects: FakeObjects) -> None:
    q = KeyQueue.connect(address, run, 10_000)
    q.plan(1.0)
    plan = Counter((e, _ids(e, pos)) for e in range(EPOCHS) for pos in range(N))
    assert Counter(q.acked()) == plan
    assert q.resident_bytes() == 0 and objects.keys == set()


PRODUCER_POINTS = [p for p in faults.POINTS["producer"] if p.startswith("queue.")]


@pytest.mark.parametrize("nth", [1, 2, 3])
@pytest.mark.parametrize("point", PRODUCER_POINTS)
def test_a_producer_dying_at_any_queue_point_loses_and_duplicates_nothing(
    queue_address, point, nth
):
    run = f"f{next(_runs)}"
    objects = FakeObjects()
    ghost, victim = _client(queue_address, run), _client(queue_address, run)
    trainer = _client(queue_address, run)
    ghost.register_producer("ghost")  # dies after one batch: the victim will reap it
    _produce_step(ghost, objects, run)
    remove = lambda c: objects.remove_attempt(run, c)  # noqa: E731
    faults.configure(f"{point}@{nth}:raise")
    try:
        victim.register_producer("victim")
        for _ in range(3):
            _produce_step(victim, objects, run)
            _train_step(trainer, objects, 0)
            victim.reap(remove, lease_s=0.0)
        victim.refresh_bytes(force=True)
        victim.retire(remove)
    except FaultInjected:
        pass  # the victim is dead from here on: nobody calls it again
    finally:
        faults.configure(None)
    survivor = _client(queue_address, run)
    survivor.register_producer("survivor")
    _finish(queue_address, run, objects, [survivor], [trainer])
    _check(queue_address, run, objects)


TRAINER_POINTS = [p for p in faults.POINTS["trainer"] if p.startswith("queue.")]


@pytest.mark.parametrize("nth", [1, 2, 3])
@pytest.mark.parametrize("point", TRAINER_POINTS)
def test_a_trainer_rank_dying_at_any_queue_point_is_recovered_by_its_restart(
    queue_address, point, nth
):
    run = f"t{next(_runs)}"
    objects = FakeObjects()
    producer = _client(queue_address, run, ranks=2)
    producer.register_producer("p")
    trainers = [_client(queue_address, run, ranks=2) for _ in range(2)]
    for rank, t in enumerate(trainers):
        t.recover_rank(rank)
    for _ in range(3):
        _produce_step(producer, objects, run)
    # Some data goes missing, so voids and their re-queues happen too.
    objects.keys.discard(sorted(objects.keys)[0])
    faults.configure(f"{point}@{nth}:raise")
    try:
        for _ in range(4):
            _train_step(trainers[1], objects, 1)
        trainers[1].recover_rank(1)
    except FaultInjected:
        pass
    finally:
        faults.configure(None)
    restarted = _client(queue_address, run, ranks=2)
    restarted.recover_rank(1)  # the rank comes back (elastic restart / retry)
    _finish(queue_address, run, objects, [producer], [trainers[0], restarted])
    _check(queue_address, run, objects)


def test_heartbeat_survives_errors_and_a_hung_producer_is_reaped(queue_address):
    run = f"h{next(_runs)}"
    hung, peer = _client(queue_address, run), _client(queue_address, run)
    hung.register_producer("hung")
    peer.register_producer("peer")
    hung.claim(BATCH, _ids)
    beat = hung.start_heartbeat(0.05)
    try:
        faults.configure("queue.beat%1.0:raise")  # every beat fails for a while ...
        time.sleep(0.3)
        faults.configure(None)
        before = hung._int("beat", hung.producer)
        time.sleep(0.3)
        assert hung._int("beat", hung.producer) > before  # ... and beating resumes
        # It beats but its main loop never reports progress: reaped after progress_timeout_s.
        removed: list[Claim] = []
        assert peer.reap(removed.append, lease_s=60, progress_timeout_s=0.2) == 0
        time.sleep(0.3)
        assert peer.reap(removed.append, lease_s=60, progress_timeout_s=0.2) == BATCH
        assert len(removed) == BATCH
        deadline = time.monotonic() + 5
        while not hung._fenced.is_set():  # its heartbeat learns it was reaped ...
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(ProducerReaped, match=r"hung#1 was reaped .*no progress"):
            hung.claim(BATCH, _ids)  # ... and its next call says so
        assert hung.retire(lambda c: None) == 0  # it leaves without touching anything
    finally:
        beat.set()


def test_a_retried_producer_is_a_fresh_incarnation_and_reaps_its_predecessor(queue_address):
    run = f"r{next(_runs)}"
    first, retry = _client(queue_address, run), _client(queue_address, run)
    assert first.register_producer("p") == "p#1"
    claims = first.claim(BATCH, _ids)
    assert retry.register_producer("p") == "p#2"  # a Prefect retry reuses the id
    with pytest.raises(ProducerReaped, match="superseded by p#2"):
        first.claim(BATCH, _ids)
    assert retry.reap(lambda c: None, lease_s=60) == BATCH  # replayed at once, no lease wait
    again = retry.claim(BATCH, _ids)
    assert {(c.sample_id, c.attempt) for c in again} == {(c.sample_id, 1) for c in claims}


def test_a_reaped_producer_that_publishes_in_the_race_window_loses_nothing(queue_address):
    """The reaper removes the 'dead' producer's put and re-queues its claim; the producer, which
    passed its fence check just before, then wins the publish with data that is gone. The
    trainer voids it and the sample is produced again under a fresh attempt number (the
    reaper's attempt was taken and dropped meanwhile), and trained once."""
    run = f"z{next(_runs)}"
    objects = FakeObjects()
    slow, peer, trainer = (_client(queue_address, run) for _ in range(3))
    slow.register_producer("slow")
    peer.register_producer("peer")
    (claim, *_) = claims = slow.claim(BATCH, _ids)
    ref = _ref(run, claim, slow.producer)
    slow.reserve(claim, ref.nbytes, lambda: False)
    objects.keys.add(ref.keys[0])
    remove = lambda c: objects.remove_attempt(run, c)  # noqa: E731
    peer.reap(remove, lease_s=0.0)
    assert peer.reap(remove, lease_s=0.0) == len(claims)  # fenced, put removed, re-queued
    slow.check_fenced = lambda: None  # it passed its check just before the fence
    assert slow.publish(claim, ref)
    for _ in range(2):  # the peer takes the re-queued attempt of each: that one is resolved
        _produce_step(peer, objects, run)
    _finish(queue_address, run, objects, [peer], [trainer])
    _check(queue_address, run, objects)
    assert trainer.counts()["missing"] == 1


def test_producer_waits_have_deadlines_that_name_what_was_waited_for(queue_address):
    from spec_core.errors import ServiceError
    from spec_core.streaming.producer import _Linger

    run = f"d{next(_runs)}"
    q = KeyQueue.connect(queue_address, run, 100, timeout_s=5)
    q.set_plan(DataPlan(N, EPOCHS, 0))
    q.register_producer("p")
    first, second = q.claim(BATCH, _ids)
    q.reserve(first, 100, lambda: False)  # the budget is full and no trainer acks
    with pytest.raises(ServiceError, match=r"byte budget .*transfer.budget_wait_timeout_s"):
        q.reserve(second, 100, lambda: False, timeout_s=0.3)
    linger = _Linger(q, timeout_s=0.3)
    with pytest.raises(ServiceError, match=r"trainers to finish .*transfer.linger_timeout_s"):
        for _ in range(100):
            linger.wait("p#1")
