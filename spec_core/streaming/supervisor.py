"""The one streaming supervisor: how producers and trainers are watched, failed fast and stopped.

Both ways of running the generate+train stage hand their children to ``run_concurrently``: the
Prefect pipeline (``flows/pipeline.py``: subflows in local mode, deployment runs in deployments
mode, see ``flows/children.py``) and the plain-Python ``spec_core.streaming.run.run_streaming``
(producer processes and a trainer launched in a thread; tests and benchmarks). The policy:

- a producer that fails is logged and tolerated (the key queue re-claims its samples); when every
  producer has ended while samples are still missing, the stream is stopped with their errors so
  the trainer fails with the reason instead of waiting for data that will never come;
- when the trainers finish, producers are told to leave (a ``num_steps`` run stops before the data
  ends) and any still running after a grace period are cancelled;
- when a trainer fails, or the supervisor is cancelled, the stream is stopped and every child is
  cancelled before the error propagates.

A ``Child`` is a future plus a way to cancel it, so this module knows nothing of Prefect,
processes or threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from spec_core.errors import SpecflowError
from spec_core.transfer.queue import KeyQueue


class ChildFailed(SpecflowError):
    """A producer or trainer ended with an error (or, for a deployment run, not completed)."""


@dataclass
class Child:
    """One child: ``future`` resolves to its result or raises ``ChildFailed``."""

    name: str
    future: asyncio.Future
    cancel: Callable[[], Awaitable[None]]

    def failure(self) -> Optional[BaseException]:
        if not self.future.done() or self.future.cancelled():
            return None
        return self.future.exception()


def coroutine_child(
    name: str,
    work: Awaitable[Any],
    stop: Optional[Callable[[], Awaitable[None]]] = None,
) -> Child:
    """``work`` started now in this event loop; ``stop`` (if any) runs before it is cancelled,
    for work that cannot be cancelled from inside (a process, a thread)."""

    async def run() -> Any:
        try:
            return await work
        except (asyncio.CancelledError, ChildFailed):
            raise
        except Exception as exc:
            raise ChildFailed(f"{name} failed: {exc}") from exc

    future = asyncio.ensure_future(run())

    async def cancel() -> None:
        if stop is not None:
            await stop()
        future.cancel()
        await asyncio.gather(future, return_exceptions=True)

    return Child(name, future, cancel)


@dataclass
class Outcome:
    producers: list[Any] = field(default_factory=list)  # results of those that finished
    producer_failures: list[str] = field(default_factory=list)
    trainers: list[Any] = field(default_factory=list)  # results, in the order given


async def run_concurrently(
    producers: list[Child],
    trainers: list[Child],
    queue: KeyQueue,
    logger: logging.Logger | logging.LoggerAdapter,
    *,
    poll_s: float = 2.0,
    producer_grace_s: float = 120.0,
    on_poll: Optional[Callable[[], Awaitable[None]]] = None,
) -> Outcome:
    """Wait for all children with the policy in the module docstring."""
    outcome = Outcome()
    seen: set[str] = set()
    everyone = producers + trainers
    try:
        while not all(t.future.done() for t in trainers):
            await asyncio.wait(
                [c.future for c in everyone if not c.future.done()],
                timeout=poll_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            _raise_trainer_failure(trainers)
            _note_producer_failures(producers, outcome, seen, logger)
            _stop_when_every_producer_ended(producers, outcome, queue, logger)
            if on_poll is not None:
                await on_poll()
        outcome.trainers = [t.future.result() for t in trainers]
        await _let_producers_leave(producers, outcome, seen, queue, logger, producer_grace_s)
        return outcome
    except BaseException as exc:
        reason = str(exc) or type(exc).__name__
        try:
            queue.request_stop(f"pipeline stopping: {reason}")
        except Exception:  # the queue may be what failed
            pass
        await asyncio.gather(
            *(c.cancel() for c in everyone if not c.future.done()), return_exceptions=True
        )
        raise


def _raise_trainer_failure(trainers: list[Child]) -> None:
    for child in trainers:
        error = child.failure()
        if error is not None:
            raise error


def _note_producer_failures(
    producers: list[Child],
    outcome: Outcome,
    seen: set[str],
    logger: logging.Logger | logging.LoggerAdapter,
) -> None:
    for child in producers:
        error = child.failure()
        if error is not None and child.name not in seen:
            seen.add(child.name)
            outcome.producer_failures.append(str(error))
            logger.warning("%s; the other producers take over its samples", error)


def _stop_when_every_producer_ended(
    producers: list[Child],
    outcome: Outcome,
    queue: KeyQueue,
    logger: logging.Logger | logging.LoggerAdapter,
) -> None:
    """No producer left and samples missing: stop the stream so the trainer fails with why."""
    if (
        producers
        and all(p.future.done() for p in producers)
        and not queue.stop_requested()
        and not queue.all_finished()
    ):
        reason = "; ".join(outcome.producer_failures) or "producers left early"
        logger.error("every producer has ended with samples left: %s", reason)
        queue.request_stop(f"every producer ended: {reason}")


async def _let_producers_leave(
    producers: list[Child],
    outcome: Outcome,
    seen: set[str],
    queue: KeyQueue,
    logger: logging.Logger | logging.LoggerAdapter,
    grace_s: float,
) -> None:
    """Training is done: tell producers to leave, cancel those still there after ``grace_s``."""
    if not queue.all_finished():  # trained the configured steps before the data ended
        queue.request_stop("training finished")
    pending = [p.future for p in producers if not p.future.done()]
    if pending:
        await asyncio.wait(pending, timeout=grace_s)
    for child in producers:
        if not child.future.done():
            logger.warning("%s did not leave within %.0fs; cancelling", child.name, grace_s)
            await child.cancel()
        elif child.future.cancelled():
            continue
        elif child.failure() is None:
            outcome.producers.append(child.future.result())
        elif child.name not in seen:
            outcome.producer_failures.append(str(child.failure()))
