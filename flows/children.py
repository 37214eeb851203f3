"""The Prefect side of the parent's children: a deployment run as a supervised ``Child``.

The supervision policy (fail fast, tolerate a producer, let producers leave, cancel everything on
failure) is ``spec_core.streaming.supervisor.run_concurrently``, shared with the plain-Python
``run_streaming``. In local mode a child is a subflow coroutine of this run
(``coroutine_child``); in deployments mode it is a run of a deployment on its work pool, created
with ``arun_deployment(timeout=0)`` so all start at once and awaited with ``wait_for_flow_run``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect.client.orchestration import get_client
from prefect.deployments import arun_deployment
from prefect.flow_runs import wait_for_flow_run
from prefect.states import Cancelled, Cancelling

from spec_core.streaming.supervisor import Child, ChildFailed


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
