"""Start (or attach to) the streaming services and describe them with one JSON-able record.

``start_services`` is what a coordinator (``spec_core.streaming``, the Prefect parent flow) calls
once per run: it starts the Mooncake metadata server, ``mooncake_master``, the segment holder that
owns the store's memory, and the key-queue TCPStore, all bound to ``transfer.host`` (127.0.0.1 by
default), health-checked before it returns. Or, when ``transfer.master_address`` /
``metadata_server`` / ``queue_address`` are configured, it only checks those external services are
reachable. Producers and trainers anywhere receive the resulting ``ServiceAddresses`` (as a dict in
a job file or flow parameter) and connect with ``connect_queue`` / ``connect_store``.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from spec_core.config import TransferConfig
from spec_core.contracts.plan import DataPlan
from spec_core.errors import ConfigError, ServiceError
from spec_core.transfer.mooncake import (
    MB,
    ManagedProcess,
    MooncakeClient,
    require_reachable,
    start_master,
    start_metadata_server,
    start_segment_holder,
)
from spec_core.transfer.queue import KeyQueue, start_queue_server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceAddresses:
    run_id: str
    master: str  # mooncake_master host:port
    metadata_url: str  # http://host:port/metadata
    queue: str  # key-queue TCPStore host:port
    byte_budget: int  # bytes of samples resident in the store before producers wait
    holder: Optional[str] = None  # the segment holder's Mooncake endpoint (host:port name)
    metrics_url: Optional[str] = None  # master's HTTP metrics (only when we started it)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceAddresses:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in data
        )
        if unknown or missing:
            raise ConfigError(
                f"service addresses: unknown fields {unknown}, missing fields {missing}"
            )
        return cls(**data)

    def connect_queue(self, timeout_s: float = 30.0) -> KeyQueue:
        return KeyQueue.connect(self.queue, self.run_id, self.byte_budget, timeout_s)

    def connect_store(self, cfg: TransferConfig) -> MooncakeClient:
        return MooncakeClient(
            master=self.master, metadata_url=self.metadata_url, holder=self.holder, cfg=cfg
        )


class ServicesHandle:
    """What ``start_services`` started; ``stop()`` ends all of it (by PID), idempotent."""

    def __init__(
        self,
        addresses: ServiceAddresses,
        processes: list[ManagedProcess],
        queue_server: Any,
        log_dir: Path,
    ) -> None:
        self.addresses = addresses
        self.processes = processes
        self.log_dir = log_dir
        self._queue_server = queue_server  # the TCPStore master, or None when external
        self._stopped = False
        atexit.register(self.stop)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for proc in reversed(self.processes):
            proc.stop()
        # Dropping the last reference to the TCPStore master closes its listening socket.
        self._queue_server = None
        atexit.unregister(self.stop)

    def __enter__(self) -> ServicesHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _external(cfg: TransferConfig) -> bool:
    given = {
        "transfer.master_address": cfg.master_address,
        "transfer.metadata_server": cfg.metadata_server,
        "transfer.queue_address": cfg.queue_address,
    }
    if not any(given.values()):
        return False
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ConfigError(
            f"external services need all of {', '.join(given)}; missing {', '.join(missing)} "
            "(or leave all three null to start them here)"
        )
    return True


def start_services(
    cfg: TransferConfig,
    run_id: str,
    log_dir: Optional[Path] = None,
    plan: Optional[DataPlan] = None,
    open_gate: bool = True,
) -> ServicesHandle:
    """Start (or attach to) Mooncake + the key queue for ``run_id``.

    ``plan`` fixes the dataset size/epochs/seed up front (producers must agree with it).
    ``open_gate=False`` keeps producers waiting until a resumed trainer has restored its acked
    ids (the rank-0 stream source opens it); a fresh run opens it at once.
    """
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="specflow-services-"))
    budget = cfg.byte_budget_mb * MB
    if _external(cfg):
        assert cfg.master_address and cfg.metadata_server and cfg.queue_address
        require_reachable(
            cfg.master_address, "mooncake_master", "transfer.master_address", cfg.connect_timeout_s
        )
        addresses = ServiceAddresses(
            run_id=run_id,
            master=cfg.master_address,
            metadata_url=cfg.metadata_server,
            queue=cfg.queue_address,
            byte_budget=budget,
            holder=cfg.holder_address,
        )
        handle = ServicesHandle(addresses, [], None, log_dir)
    else:
        handle = _start_local(cfg, run_id, log_dir, budget)
    try:
        queue = handle.addresses.connect_queue(cfg.connect_timeout_s)
        if plan is not None:
            queue.set_plan(plan)
        if open_gate:
            queue.open_gate()
    except BaseException:
        handle.stop()
        raise
    return handle


def _start_local(cfg: TransferConfig, run_id: str, log_dir: Path, budget: int) -> ServicesHandle:
    host = cfg.host
    processes: list[ManagedProcess] = []
    queue_server = None
    try:
        meta_proc, metadata_url = start_metadata_server(host, log_dir, cfg.connect_timeout_s)
        processes.append(meta_proc)
        master_proc, master, metrics_url = start_master(host, log_dir, cfg.connect_timeout_s)
        processes.append(master_proc)
        holder_proc, holder = start_segment_holder(
            host,
            cfg.global_segment_mb,
            master,
            metadata_url,
            metrics_url,
            log_dir,
            max(cfg.connect_timeout_s, 60.0),
            cfg.protocol,
            cfg.device_name,
        )
        processes.append(holder_proc)
        queue_server, port = start_queue_server(host, timeout_s=cfg.connect_timeout_s)
    except BaseException:
        for proc in reversed(processes):
            proc.stop()
        raise
    addresses = ServiceAddresses(
        run_id=run_id,
        master=master,
        metadata_url=metadata_url,
        queue=f"{host}:{port}",
        byte_budget=budget,
        holder=holder,
        metrics_url=metrics_url,
    )
    log.info("streaming services up (logs in %s): %s", log_dir, addresses.to_dict())
    return ServicesHandle(addresses, processes, queue_server, log_dir)


def check_services(addresses: ServiceAddresses, timeout_s: float = 5.0) -> None:
    """Raise ``ServiceError`` naming the first service that does not answer."""
    require_reachable(addresses.master, "mooncake_master", "transfer.master_address", timeout_s)
    meta = urlparse(addresses.metadata_url)
    require_reachable(
        f"{meta.hostname}:{meta.port}",
        "Mooncake metadata server",
        "transfer.metadata_server",
        timeout_s,
    )
    require_reachable(addresses.queue, "key-queue TCPStore", "transfer.queue_address", timeout_s)


__all__ = ["ServiceAddresses", "ServicesHandle", "ServiceError", "check_services", "start_services"]
