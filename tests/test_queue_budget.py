"""The key queue's byte budget under contention: 8 clients reserving equal sizes on a real
TCPStore. A compare-and-set of the counter's value reported false successes here (two clients
writing the same new value both "won"), so the counter undercounted and the store could overfill."""

from __future__ import annotations

import threading

from spec_core.contracts.plan import DataPlan
from spec_core.transfer.queue import Claim, KeyQueue

CLIENTS = 8
ROUNDS = 40
NBYTES = 100


def _clients(address: str, budget: int) -> list[KeyQueue]:
    queues = [KeyQueue.connect(address, "run", budget, timeout_s=5) for _ in range(CLIENTS)]
    for i, q in enumerate(queues):
        q.set_plan(DataPlan(num_samples=CLIENTS * ROUNDS, num_epochs=1, seed=0))
        q.register_producer(f"c{i}")
    return queues


def _run_all(target, queues: list[KeyQueue]) -> None:
    threads = [threading.Thread(target=target, args=(i, q)) for i, q in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a reservation hung"


def test_counter_equals_the_sum_of_reservations(queue_address):
    """Everything fits: after 8 x 40 concurrent reservations the counter is exactly their sum."""
    queues = _clients(queue_address, budget=CLIENTS * ROUNDS * NBYTES)

    def reserve_many(i: int, q: KeyQueue) -> None:
        for r in range(ROUNDS):
            q.reserve(Claim(0, f"c{i}-{r}", 0), NBYTES, lambda: False)

    _run_all(reserve_many, queues)
    assert queues[0].resident_bytes() == CLIENTS * ROUNDS * NBYTES


def test_budget_is_never_exceeded_and_returns_to_zero(queue_address):
    """A budget for 3 samples and 8 clients that reserve, hold and release: at no moment do more
    than 3 hold a reservation, every reservation goes through, and the counter ends at 0."""
    budget = 3 * NBYTES
    queues = _clients(queue_address, budget=budget)
    lock = threading.Lock()
    holding = [0]
    peak = [0]
    done = [0]

    def reserve_release(i: int, q: KeyQueue) -> None:
        for r in range(ROUNDS // 4):
            claim = Claim(0, f"c{i}-{r}", 0)
            q.reserve(claim, NBYTES, lambda: False)
            with lock:
                holding[0] += 1
                peak[0] = max(peak[0], holding[0])
            with lock:
                holding[0] -= 1
            assert q.release(claim) == NBYTES
            with lock:
                done[0] += 1

    _run_all(reserve_release, queues)
    assert done[0] == CLIENTS * (ROUNDS // 4)
    assert peak[0] <= budget // NBYTES
    assert queues[0].resident_bytes() == 0
