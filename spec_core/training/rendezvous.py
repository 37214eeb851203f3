"""Where trainer node 0 listens for torchrun's rendezvous, found at run time through the key queue.

Why: on work pools the parent flow cannot choose which worker - which host - picks up node 0's
run, so it cannot name a rendezvous address in advance. Every trainer node already reaches the
run's key-queue store, so node 0 publishes ``host:port`` there once it knows its host (the local
address it routes to the store from, which the other hosts can reach too) and the other nodes wait
for that key, with a deadline. A configured ``training.rdzv_endpoint`` still wins.
See docs/architecture.md §rendezvous.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Optional

from spec_core.errors import ServiceError
from spec_core.transfer.mooncake import split_address
from spec_core.transfer.queue import KeyQueue
from spec_core.utils.net import free_port

ENDPOINT_KEY = "rdzv/endpoint"


def routable_address(peer: str) -> str:
    """The local address this host uses to reach ``peer`` (host:port); no packet is sent."""
    host, port = split_address(peer, "transfer.queue_address")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


def node_endpoint(
    queue_address: str, run_id: str, node_rank: int, timeout_s: float, advertise: Optional[str]
) -> str:
    """Node 0: pick a free port on its routable address and publish ``host:port``; other nodes:
    wait up to ``timeout_s`` for node 0 to publish it."""
    queue = KeyQueue.connect(queue_address, run_id, byte_budget=0)
    key = f"{run_id}/{ENDPOINT_KEY}"
    if node_rank == 0:
        local = routable_address(queue_address)
        endpoint = f"{advertise or local}:{free_port(local)}"
        queue.store.set(key, endpoint)
        return endpoint
    try:
        queue.store.wait([key], timedelta(seconds=timeout_s))
    except Exception:  # TCPStore raises DistStoreError (a RuntimeError) on timeout
        raise ServiceError(
            f"trainer node {node_rank} waited {timeout_s:.0f}s for node 0 to publish its "
            f"rendezvous address in the key queue at {queue_address}; is node 0's training run "
            "scheduled (a worker on the training pool)? (training.rdzv_timeout_s)"
        ) from None
    return queue.store.get(key).decode()
