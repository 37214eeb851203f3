"""The parent's children - producers and trainer nodes - and how it runs them at the same time.

A child is a running ``hidden_state_generation`` or ``draft_training``: a subflow in this process
(local mode) or a deployment run on a work pool (deployments mode, created with
``arun_deployment(timeout=0)`` so all start at once, awaited with ``wait_for_flow_run``).
``run_concurrently`` supervises them the same way in both modes:

- a producer that fails is logged and tolerated (the key queue re-claims its samples); when every
  producer has ended while samples are still missing, the stream is stopped with their errors so
  the trainer fails with the reason instead of waiting for data that will never come;
- when the trainers finish, producers are told to leave (a ``num_steps`` run stops before the data
  ends) and any still running after a grace period are cancelled;
- when a trainer fails, or the parent is cancelled, the stream is stopped and every child is
  cancelled before the error propagates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Optional

from prefect.client.orchestration import get_client
from prefect.deployments import arun_deployment
from prefect.flow_runs import wait_for_flow_run
from prefect.states import Cancelled, Cancelling

from spec_core.errors import SpecflowError
from spec_core.transfer.queue import KeyQueue


class ChildFailed(SpecflowError):
    """A producer or trainer run ended in a non-completed state."""


@dataclass
class Child:
    """One child run: ``future`` resolves to its result dict or raises ``ChildFailed``."""

    name: str
    future: asyncio.Future
    cancel: Callable[[], Awaitable[None]]

    def failure(self) -> Optional[BaseException]:
        if not self.future.done() or self.future.cancelled():
            return None
        return self.future.exception()


def local_child(name: str, subflow: Coroutine[Any, Any, dict[str, Any]]) -> Child:
    """A subflow of this run, started now in this event loop."""

    async def run() -> dict[str, Any]:
        try:
            return await subflow
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ChildFailed(f"{name} failed: {exc}") from exc

    future = asyncio.ensure_future(run())

    async def cancel() -> None:
        future.cancel()
        await asyncio.gather(future, return_exceptions=True)

    return Child(name, future, cancel)


async def deployment_child(
    name: str,
    deployment: str,
    parameters: dict[str, Any],
    idempotency_key: str,
) -> Child:
    """A run of ``deployment`` on its work pool, created now; its result read when it ends."""
    flow_run = await arun_deployment(
        deployment,
        parameters=parameters,
        timeout=0,
        flow_run_name=name,
        idempotency_key=idempotency_key,
        as_subflow=True,
    )

    async def run() -> dict[str, Any]:
        finished = await wait_for_flow_run(flow_run.id, timeout=None)
        state = finished.state
        if state is None or not state.is_completed():
            message = state.message if state is not None else "no state"
            raise ChildFailed(f"{name} ({state.name if state else '?'}): {message}")
        return await state.aresult()

    future = asyncio.ensure_future(run())

    async def cancel() -> None:
        async with get_client() as client:
            current = await client.read_flow_run(flow_run.id)
            if current.state is not None and not current.state.is_final():
                waiting = current.state.is_scheduled() or current.state.is_pending()
                await client.set_flow_run_state(
                    flow_run.id, Cancelled() if waiting else Cancelling(), force=True
                )
        try:
            await asyncio.wait_for(asyncio.gather(future, return_exceptions=True), 60)
        except asyncio.TimeoutError:
            future.cancel()

    return Child(name, future, cancel)


@dataclass
class Outcome:
    producers: list[dict[str, Any]] = field(default_factory=list)  # stats of those that finished
    producer_failures: list[str] = field(default_factory=list)
    trainers: list[dict[str, Any]] = field(default_factory=list)  # by node rank


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
    """Wait for all children with the failure policy in the module docstring."""
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
            for child in trainers:
                if child.failure() is not None:
                    raise child.failure()  # type: ignore[misc]
            for child in producers:
                error = child.failure()
                if error is not None and child.name not in seen:
                    seen.add(child.name)
                    outcome.producer_failures.append(str(error))
                    logger.warning("%s; the other producers take over its samples", error)
            if (
                producers
                and all(p.future.done() for p in producers)
                and not queue.stop_requested()
                and not queue.all_finished()
            ):
                reason = "; ".join(outcome.producer_failures) or "producers left early"
                logger.error("every producer has ended with samples left: %s", reason)
                queue.request_stop(f"every producer ended: {reason}")
            if on_poll is not None:
                await on_poll()
        outcome.trainers = [t.future.result() for t in trainers]
        if not queue.all_finished():  # trained the configured steps before the data ended
            queue.request_stop("training finished")
        pending = [p.future for p in producers if not p.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=producer_grace_s)
        for child in producers:
            if not child.future.done():
                logger.warning(
                    "%s did not leave within %.0fs; cancelling", child.name, producer_grace_s
                )
                await child.cancel()
            elif child.failure() is None and not child.future.cancelled():
                outcome.producers.append(child.future.result())
            elif child.name not in seen:
                outcome.producer_failures.append(str(child.failure()))
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
