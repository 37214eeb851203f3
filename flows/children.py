"""The Prefect side of the parent's children: a deployment run as a supervised ``Child``.

The supervision policy (fail fast, tolerate a producer, let producers leave, cancel everything on
failure) is ``spec_core.streaming.supervisor.run_concurrently``, shared with the plain-Python
``run_streaming``. In local mode a child is a subflow coroutine of this run
(``coroutine_child``); in deployments mode it is a run of a deployment on its work pool, created
with ``arun_deployment(timeout=0)`` so all start at once and awaited by ``await_deployment_run``
with two deadlines (docs/architecture.md §processes): a worker of its pool must start it within
``orchestration.child_start_timeout_s`` (a pool without a live worker would otherwise hold the
parent forever), and it must end within ``orchestration.child_timeout_s``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import arun_deployment
from prefect.exceptions import FlowRunWaitTimeout
from prefect.flow_runs import wait_for_flow_run
from prefect.states import Cancelled, Cancelling

from spec_core.streaming.supervisor import Child, ChildFailed


async def await_deployment_run(
    flow_run_id: UUID,
    name: str,
    deployment: str,
    start_timeout_s: float,
    timeout_s: float,
    poll_s: float = 1.0,
) -> FlowRun:
    """The run once it has ended; ``ChildFailed`` naming it when no worker started it within
    ``start_timeout_s`` (it stays Scheduled: its pool has no live worker) or it did not end
    within ``timeout_s``."""
    began = time.monotonic()
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and not run.state.is_scheduled():
                break
            if time.monotonic() - began > start_timeout_s:
                # Withdrawn, so a worker that turns up later does not start an orphan.
                await client.set_flow_run_state(
                    flow_run_id, Cancelled(message="not started in time"), force=True
                )
                raise ChildFailed(
                    f"{name} was never started: no worker of work pool '{run.work_pool_name}' "
                    f"picked up its run of {deployment} within {start_timeout_s:.0f}s; start a "
                    "worker for that pool or raise 'orchestration.child_start_timeout_s'"
                )
            await asyncio.sleep(poll_s)
    left = timeout_s - (time.monotonic() - began)
    try:
        return await wait_for_flow_run(flow_run_id, timeout=max(int(left), 1))
    except FlowRunWaitTimeout:
        raise ChildFailed(
            f"{name} ({deployment}) did not end within {timeout_s:.0f}s "
            "('orchestration.child_timeout_s')"
        ) from None


async def deployment_child(
    name: str,
    deployment: str,
    parameters: dict[str, Any],
    idempotency_key: str,
    *,
    start_timeout_s: float,
    timeout_s: float,
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
        finished = await await_deployment_run(
            flow_run.id, name, deployment, start_timeout_s, timeout_s
        )
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
                # Only a run no worker has taken can be withdrawn outright; a Pending one may
                # already have a process starting, which only the worker's Cancelling stops.
                waiting = current.state.is_scheduled()
                await client.set_flow_run_state(
                    flow_run.id, Cancelled() if waiting else Cancelling(), force=True
                )
        try:
            await asyncio.wait_for(asyncio.gather(future, return_exceptions=True), 60)
        except asyncio.TimeoutError:
            future.cancel()

    return Child(name, future, cancel)
