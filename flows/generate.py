"""``hidden_state_generation``: one producer; deployed on the ``gpu-inference`` pool.

The parent starts ``inference.replicas`` of these (subflows in local mode, deployment runs in
deployments mode); each runs one producer until every sample is trained or a stop is requested.
"""

from __future__ import annotations

from typing import Any, Optional

from tasks.generate import generate_hidden_states
from tasks.processes import process_owning_flow, stop_owned_by_run


@process_owning_flow(
    stop_owned_by_run, name="hidden-state-generation", flow_run_name="{producer_id}"
)
async def hidden_state_generation(
    config: dict[str, Any],
    services: dict[str, Any],
    train_path: str,
    producer_id: str,
    work_dir: str,
    target_dir: Optional[str] = None,
) -> dict[str, Any]:
    """Produce hidden states for the run's trainers; returns the producer's stats."""
    return await generate_hidden_states(
        config, services, train_path, producer_id, work_dir, target_dir
    )
