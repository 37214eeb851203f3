"""The key queue on a real TCPStore: claims, budget, publish-once, reaping, end of data, acks."""

from __future__ import annotations

import threading
import time

import pytest

from spec_core.contracts.plan import DataPlan
from spec_core.errors import DataError, ServiceError
from spec_core.transfer.queue import Claim, KeyQueue, StopRequested, start_queue_server
from spec_core.transfer.records import SampleRef, TensorMeta, tensor_key

N = 10


def _client(address: str, budget: int = 1000) -> KeyQueue:
    q = KeyQueue.connect(address, "run", budget, timeout_s=5)
    q.set_plan(DataPlan(num_samples=N, num_epochs=2, seed=3))
    return q


def _ids(epoch: int, pos: int) -> str:
    return f"s{DataPlan(N, 2, 3).order(epoch)[pos]}"


def _ref(claim: Claim, nbytes: int = 100) -> SampleRef:
    key = tensor_key("run", claim.epoch, claim.sample_id, "aux_hidden", claim.attempt)
    return SampleRef(
        "run",
        claim.epoch,
        claim.sample_id,
        {"aux_hidden": TensorMeta(key, (nbytes,), "uint8")},
        "p",
        claim.attempt,
        claim.pos,
    )


def _publish_all(q: KeyQueue, producer: str, claims: list[Claim]) -> None:
    for c in claims:
        q.reserve(c, 100, lambda: False)
        assert q.publish(c, _ref(c))


def test_plan_order_is_a_seeded_permutation_and_mismatch_fails(queue_address):
    plan = DataPlan(N, 2, 3)
    assert sorted(plan.order(0)) == list(range(N)) and plan.order(0) == DataPlan(N, 2, 3).order(0)
    assert plan.order(0) != plan.order(1)
    _client(queue_address)
    other = KeyQueue.connect(queue_address, "run", 1000)
    with pytest.raises(DataError, match="same prepared dataset"):
        other.set_plan(DataPlan(N + 1, 2, 3))


def test_two_producers_claim_every_position_once_epoch_by_epoch(queue_address):
    a, b = _client(queue_address), _client(queue_address)
    a.register_producer("a")
    b.register_producer("b")
    seen: list[Claim] = []
    while True:
        got = a.claim(3, _ids) + b.claim(4, _ids)
        if not got:
            break
        seen += got
    assert len(seen) == 2 * N
    for epoch in (0, 1):
        ids = sorted(c.sample_id for c in seen if c.epoch == epoch)
        assert ids == sorted(f"s{i}" for i in range(N))
    assert [c.epoch for c in seen[:N]] == [0] * N  # epoch 0 is handed out before epoch 1
    assert all(c.attempt == 0 for c in seen)


def test_budget_blocks_until_ack_and_counter_never_exceeds_it(queue_address):
    q = _client(queue_address, budget=250)
    q.register_producer("p")
    claims = q.claim(4, _ids)
    _publish_all(q, "p", claims[:2])  # 200 of 250 bytes resident
    assert q.resident_bytes() == 200
    waited: list[float] = []
    t = threading.Thread(target=lambda: waited.append(q.reserve(claims[2], 100, lambda: False)))
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and q.resident_bytes() == 200
    trainer = KeyQueue.connect(queue_address, "run", 250)
    refs = [trainer.try_pop(0), trainer.try_pop(0)]
    trainer.ack(refs)  # frees 200
    t.join(5)
    assert not t.is_alive() and waited[0] >= 0.25 and q.resident_bytes() == 100
    assert q.counts()["budget_waits"] == 1
    assert trainer.acked() == [(r.epoch, r.sample_id) for r in refs]


def test_reserve_admits_an_oversized_sample_only_into_an_empty_store(queue_address):
    q = _client(queue_address, budget=50)
    q.register_producer("p")
    (c,) = q.claim(1, _ids)
    assert q.reserve(c, 500, lambda: False) < 1.0
    (c2,) = q.claim(1, _ids)
    with pytest.raises(StopRequested):
        q.reserve(c2, 10, lambda: True)


def test_publish_once_per_sample_and_loser_releases_reservation(queue_address):
    q = _client(queue_address)
    q.register_producer("p")
    (c,) = q.claim(1, _ids)
    later = Claim(c.epoch, c.sample_id, c.attempt + 1, c.pos)
    q.reserve(c, 100, lambda: False)
    q.reserve(later, 100, lambda: False)
    assert q.publish(c, _ref(c))
    assert not q.publish(later, _ref(later))
    assert q.resident_bytes() == 100  # only the published sample's bytes remain
    assert q.try_pop(0).attempt == c.attempt and q.try_pop(0) is None


def test_dead_producer_claims_are_reaped_with_their_reservations(queue_address):
    dead, alive = _client(queue_address), _client(queue_address)
    dead.register_producer("dead")
    alive.register_producer("alive")
    claims = dead.claim(3, _ids)
    dead.reserve(claims[0], 100, lambda: False)  # reserved, never published
    _publish_all(dead, "dead", claims[1:2])  # one published before dying
    removed: list[Claim] = []
    assert alive.reap(removed.append, lease_s=0.2) == 0  # first sighting
    time.sleep(0.3)
    assert alive.reap(removed.append, lease_s=0.2) == 2
    assert {c.sample_id for c in removed} == {claims[0].sample_id, claims[2].sample_id}
    assert alive.resident_bytes() == 100  # the published one only
    again = alive.claim(2, _ids)
    assert {(c.sample_id, c.attempt) for c in again} == {
        (claims[0].sample_id, 1),
        (claims[2].sample_id, 1),
    }
    assert alive.reap(removed.append, lease_s=0.0) == 0  # reaped once only
    assert alive.counts()["reclaimed"] == 2


def test_beating_producer_is_not_reaped(queue_address):
    slow, other = _client(queue_address), _client(queue_address)
    slow.register_producer("slow")
    other.register_producer("other")
    slow.claim(2, _ids)
    stop = slow.start_heartbeat(0.05)
    try:
        for _ in range(4):
            assert other.reap(lambda c: None, lease_s=0.2) == 0
            time.sleep(0.1)
    finally:
        stop.set()


def test_end_of_data_skip_drop_and_missing_requeue(queue_address):
    q = _client(queue_address, budget=100_000)
    q.register_producer("p")
    claims = []
    while got := q.claim(7, _ids):
        claims += got
    q.mark_acked([(0, claims[0].sample_id)])
    assert q.is_acked(0, claims[0].sample_id)
    assert q.resolve(claims[0], "skipped") and not q.resolve(claims[0], "skipped")
    assert q.resolve(claims[1], "dropped")
    _publish_all(q, "p", claims[2:])
    assert not q.end_of_data(0)  # refs still queued
    refs = []
    while (r := q.try_pop(0)) is not None:
        refs.append(r)
    assert q.end_of_data(0)
    # A trainer finds one sample's data gone: production is incomplete again until redone.
    assert q.requeue_missing(refs[0]) and not q.requeue_missing(refs[0])
    assert not q.end_of_data(0)
    (redo,) = q.claim(1, _ids)
    assert (redo.epoch, redo.sample_id, redo.attempt) == (
        refs[0].epoch,
        refs[0].sample_id,
        refs[0].attempt + 1,
    )
    q.reserve(redo, 100, lambda: False)
    assert q.publish(redo, _ref(redo))
    q.ack(refs[1:] + [q.try_pop(0)])
    assert q.end_of_data(0) and q.all_finished()
    assert q.counts() == {
        "skipped": 1,
        "dropped": 1,
        "reclaimed": 0,
        "missing": 1,
        "budget_waits": 0,
    }
    q.refresh_bytes(force=True)  # the producer learns its samples were trained (or voided)
    assert q.resident_bytes() == 0


def test_stop_and_gate(queue_address):
    q = _client(queue_address)
    assert not q.gate_open() and not q.stop_requested()
    q.open_gate()
    q.request_stop("because")
    assert q.gate_open() and q.stop_requested() and q.stop_reason() == "because"


def test_connect_to_nothing_is_one_clear_error():
    store, port = start_queue_server("127.0.0.1")
    del store  # nothing listens there any more
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match="key-queue TCPStore .* not reachable"):
        KeyQueue.connect(f"127.0.0.1:{port}", "run", 10, timeout_s=1)
    assert time.monotonic() - t0 < 10


def test_sample_ref_attempt_round_trip():
    c = Claim(1, "x", 2)
    ref = _ref(c)
    assert ref.tensors["aux_hidden"].key == "run/1/x/aux_hidden.2"
    back = SampleRef.from_json(ref.to_json())
    assert back == ref and back.attempt == 2
    assert tensor_key("run", 0, "x", "input_ids") == "run/0/x/input_ids"


def test_refs_are_dealt_round_robin_to_trainer_ranks(queue_address):
    q = KeyQueue.connect(queue_address, "run", 10_000)
    q.set_plan(DataPlan(num_samples=7, num_epochs=1, seed=0, num_ranks=3))
    q.register_producer("p")
    claims = q.claim(7, lambda e, pos: f"s{pos}")
    _publish_all(q, "p", claims)
    per_rank = []
    for rank in range(3):
        refs = []
        while (r := q.try_pop(rank)) is not None:
            refs.append(r.sample_id)
        per_rank.append(refs)
        assert q.end_of_data(rank)
    assert [len(r) for r in per_rank] == [3, 2, 2]
    assert sorted(sum(per_rank, [])) == sorted(c.sample_id for c in claims)
    assert DataPlan.from_json(DataPlan(7, 1, 0, 3).to_json()).num_ranks == 3
