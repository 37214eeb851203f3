"""``draft_training``: one trainer node running torchrun; deployed on the ``gpu-training`` pool.

With ``training.nnodes`` > 1 the parent starts one run per node, each with its ``node_rank`` and
the rendezvous address of node 0.
"""

from __future__ import annotations

from typing import Any, Optional

from tasks.data import resolve_target
from tasks.processes import process_owning_flow, stop_owned_by_run
from tasks.train import train_draft


@process_owning_flow(
    stop_owned_by_run, name="draft-training", flow_run_name="trainer-node-{node_rank}"
)
async def draft_training(
    config: dict[str, Any],
    services: dict[str, Any],
    data: dict[str, Any],
    run_dir: str,
    vocab_map: Optional[str] = None,
    node_rank: int = 0,
    rdzv_endpoint: Optional[str] = None,
    target_dir: Optional[str] = None,
) -> dict[str, Any]:
    """Train the draft on the stream; returns the trainer's summary and performance figures."""
    target_dir = target_dir or resolve_target(config)
    return await train_draft(
        config,
        run_dir,
        target_dir,
        data,
        services,
        vocab_map=vocab_map,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
    )
