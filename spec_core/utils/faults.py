"""Fault injection: kill (or fail) this process at a named point, for chaos tests.

Off unless the environment names points (the one place specflow reads the environment for
behaviour: a test harness sets it on the processes it starts, a user never does):

- ``SPECFLOW_FAULTS``: comma-separated rules ``<point>@<n>[:<action>]``: at the ``n``-th time
  this process reaches ``<point>``, do ``<action>``: ``kill`` (default; SIGKILL to itself, so
  nothing after the point runs, no ``finally``, no atexit) or ``raise`` (``FaultInjected``, a
  ``ServiceError``: a transient failure the code must survive). ``<point>%<p>`` instead fires
  with probability ``p`` at every hit (seeded by ``SPECFLOW_FAULT_SEED``).
- ``SPECFLOW_FAULT_LOG``: a file each fired fault appends ``<pid> <point> <hit> <unix time>`` to, before it
  acts (the chaos test's tally of injected faults per point).

Points are named ``<area>.<step>`` (``queue.publish.cas``, ``producer.put`` ...); ``POINTS`` lists
every one, so a harness can pick among them. When the variable is unset, ``point()`` is a global
lookup and a comparison: nothing on the hot path.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Optional

from spec_core.errors import ConfigError, ServiceError

ENV = "SPECFLOW_FAULTS"
ENV_LOG = "SPECFLOW_FAULT_LOG"
ENV_SEED = "SPECFLOW_FAULT_SEED"

# Every injection point, by the process that reaches it (docs/architecture.md §key-queue).
POINTS: dict[str, tuple[str, ...]] = {
    "producer": (
        "queue.beat",
        "queue.register.incarnation",
        "queue.register.list",
        "queue.claim.take_journal",
        "queue.claim.take",
        "queue.claim.chunk_journal",
        "queue.claim.chunk",
        "queue.claim.hint",
        "queue.reserve.announce",
        "queue.reserve.retract",
        "producer.put",
        "producer.put_done",
        "queue.publish.journal",
        "queue.publish.cas",
        "queue.publish.push",
        "queue.publish.held",
        "queue.resolve.journal",
        "queue.resolve.cas",
        "queue.resolve.push",
        "queue.release.held",
        "queue.reap.fence",
        "queue.reap.remove",
        "queue.reap.requeue",
        "queue.reap.push",
        "queue.reap.held",
        "queue.reap.done",
        "queue.refresh.held",
    ),
    "trainer": (
        "queue.pop",
        "stream.fetch",
        "queue.void.cas",
        "queue.void.requeue",
        "stream.ack.remove",
        "queue.ack.log",
        "queue.ack.index",
        "queue.recover.push",
    ),
    "holder": (
        "holder.setup",
        "holder.mount",
        "holder.publish_info",
        "holder.close",
    ),
}
ALL_POINTS = frozenset(p for points in POINTS.values() for p in points)


class FaultInjected(ServiceError):
    """A ``raise`` fault: the transient error a store call could have raised here."""


@dataclass
class _Rule:
    point: str
    nth: Optional[int]  # fire at this hit ...
    probability: float  # ... or with this probability at every hit
    action: str


def _parse(spec: str) -> dict[str, _Rule]:
    rules: dict[str, _Rule] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        body, _, action = item.partition(":")
        action = action or "kill"
        if "@" in body:
            name, _, n = body.partition("@")
            nth, probability = int(n) if n.isdigit() else -1, 0.0
        else:
            name, _, p = body.partition("%")
            nth, probability = None, float(p or "nan")
        bad = (
            name not in ALL_POINTS
            or action not in ("kill", "raise")
            or (nth is not None and nth < 1)
            or (nth is None and not 0.0 <= probability <= 1.0)
        )
        if bad:
            raise ConfigError(
                f"{ENV}: bad rule {item!r}; write <point>@<n>[:kill|raise] or <point>%<p>, with "
                f"a point from spec_core.utils.faults.POINTS"
            )
        rules[name] = _Rule(name, nth, probability, action)
    return rules


class _Injector:
    def __init__(self, spec: str, log_path: Optional[str] = None) -> None:
        self.rules = _parse(spec)
        self.hits: dict[str, int] = {}
        self.log_path = log_path or os.environ.get(ENV_LOG)
        self.rng = random.Random(int(os.environ.get(ENV_SEED, "0")) + os.getpid())

    def hit(self, name: str) -> None:
        rule = self.rules.get(name)
        if rule is None:
            return
        n = self.hits[name] = self.hits.get(name, 0) + 1
        fire = n == rule.nth if rule.nth is not None else self.rng.random() < rule.probability
        if not fire:
            return
        if self.log_path:
            with open(self.log_path, "a") as fh:  # one short write: whole lines, even when killed
                fh.write(f"{os.getpid()} {name} {n} {time.time():.3f}\n")
        if rule.action == "raise":
            raise FaultInjected(f"fault injected at {name} (hit {n})")
        os.kill(os.getpid(), signal.SIGKILL)


_INJECTOR: Optional[_Injector] = _Injector(os.environ[ENV]) if os.environ.get(ENV) else None


def point(name: str) -> None:
    """An injection point: does nothing unless ``SPECFLOW_FAULTS`` names ``name``."""
    if _INJECTOR is not None:
        _INJECTOR.hit(name)


def configure(spec: Optional[str], log_path: Optional[str] = None) -> None:
    """Replace the rules in this process (a forked test process, or tests in one process;
    ``None`` turns injection off)."""
    global _INJECTOR
    _INJECTOR = _Injector(spec, log_path) if spec else None
