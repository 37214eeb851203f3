"""Mooncake services (metadata server, master, segment holder) and the store client.

Where the bytes live. Mooncake keeps an object in the *global segment of the client that mounted
it*; the master only holds metadata. If producers mounted the segments, a producer that dies (or
is SIGKILLed) would take its published-but-unread samples with it. So the coordinator runs a
standalone **segment holder** (the wheel's ``mooncake_client`` "real client") that owns all store
memory; producers and trainers mount 0 bytes. A dead producer then loses only the samples it had
claimed but not yet published, and the key queue re-claims those (``queue.py``). As a second line
of defence a trainer that finds a published sample's data gone hands the id back for
re-production (``KeyQueue.requeue_missing``), counted and logged.

Two client modes:
- ``shm`` (same host as the holder): a Mooncake "dummy" client that shares a staging buffer with
  the holder through an anonymous shared-memory fd passed over an abstract unix socket; the holder
  memcpys between that buffer and its segment. About 10 GB/s per direction here.
- ``tcp`` (another host): an ordinary client with a 0-byte segment; transfers go over the TCP
  transport (0.5-1.5 GB/s on loopback). ``MC_STORE_MEMCPY=0`` is set for these clients: the
  same-host memcpy shortcut segfaulted upstream (Mooncake #1986) and they never hold data anyway.
  The holder keeps memcpy on: its copies are between its own segment and buffers mapped into its
  own address space, the one case the upstream fix still allows.

Every put is *hard-pinned*: Mooncake never evicts such objects, so a full store answers ``-200``
(turned into a bounded wait here) instead of silently evicting older samples (which unpinned
objects suffer near the 90 % watermark, and even with the watermark at 100 %: the master then
evicts to make room for a new put). Trainers delete every object explicitly after the optimizer
step. Our master also runs with ``--eviction_high_watermark_ratio=1.0`` so nothing is evicted
before the store is really full. The key queue's byte budget keeps residency well below capacity
in the first place, also for external masters.

Security: the master, metadata server and holder RPC port bind ``transfer.host`` (127.0.0.1 by
default), but every Mooncake client (the holder, and ``tcp``-mode clients) also opens
transfer-engine listeners on all interfaces whatever is configured (Mooncake 0.3.13); tests run
inside ``unshare -n`` so those are reachable only on loopback.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.config import TransferConfig
from spec_core.errors import ConfigError, ServiceError
from spec_core.transfer.records import TensorMeta

log = logging.getLogger(__name__)

MB = 1 << 20
_ALIGN = 64

# Mooncake error codes we act on (mooncake-store/include/types.h).
RC_NO_SPACE = -200  # no segment has room: store full
RC_BUFFER_TOO_SMALL = -600  # also "invalid params"
RC_NOT_FOUND = -704
RC_HAS_LEASE = -706
RC_NAMES = {
    RC_NO_SPACE: "store full",
    RC_BUFFER_TOO_SMALL: "buffer too small / invalid params",
    RC_NOT_FOUND: "object not found",
    RC_HAS_LEASE: "object under lease",
}


class StoreFullError(ServiceError):
    """The store stayed full for longer than ``transfer.put_timeout_s``."""


class MissingDataError(ServiceError):
    """A published object is gone from the store (its holder died or it was evicted)."""


# ---------------------------------------------------------------------------------------------
# Processes we start


@dataclass
class ManagedProcess:
    """A server process we own: started in its own process group, logs in a file, stopped by PID."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM the group we created, SIGKILL what is left after ``timeout_s``; idempotent."""
        if self.popen.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:
            self.popen.wait(1.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL did not land
            log.warning("%s (pid %d) did not exit", self.name, self.popen.pid)


def spawn(
    name: str, argv: list[str], log_dir: Path, env: Optional[dict[str, str]] = None
) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as fh:
        popen = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # own group: Ctrl-C in the terminal reaches us, we stop it
        )
    return ManagedProcess(name, popen, log_path)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_address(address: str, field: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"'{field}' must look like host:port, got {address!r}")
    return host.strip("[]"), int(port)


def tcp_reachable(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def require_reachable(address: str, what: str, field: str, timeout_s: float) -> None:
    """One clear error instead of a C++ retry loop when a service is not there."""
    host, port = split_address(address, field)
    deadline = time.monotonic() + timeout_s
    while True:
        if tcp_reachable(host, port, timeout_s=min(1.0, max(timeout_s, 0.1))):
            return
        if time.monotonic() >= deadline:
            raise ServiceError(
                f"{what} at {address} is not reachable (waited {timeout_s:.0f}s); start the "
                f"services first or fix '{field}'"
            )
        time.sleep(0.1)


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _wait_healthy(proc: ManagedProcess, check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ServiceError(
                f"{what} exited with code {proc.popen.returncode} during startup; log "
                f"{proc.log_path}:\n{proc.log_tail()}"
            )
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise ServiceError(
        f"{what} not healthy after {timeout_s:.0f}s; log {proc.log_path}:\n{proc.log_tail()}"
    )


def _mooncake_binary(name: str) -> str:
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "Mooncake is not installed; run: pip install mooncake-transfer-engine-non-cuda "
            "(CPU) or mooncake-transfer-engine (CUDA)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the Mooncake wheel; reinstall it")
    return str(path)


def start_metadata_server(
    host: str, log_dir: Path, timeout_s: float = 30.0
) -> tuple[ManagedProcess, str]:
    port = free_port(host)
    proc = spawn(
        "mooncake-metadata",
        [
            sys.executable,
            "-m",
            "mooncake.http_metadata_server",
            "--host",
            host,
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ],
        log_dir,
    )
    url = f"http://{host}:{port}/metadata"
    # A missing key answers 404 "metadata not found": the server is up.
    _wait_healthy(
        proc,
        lambda: http_get(f"{url}?key=specflow-health")[0] in (200, 404),
        timeout_s,
        "Mooncake metadata server",
    )
    return proc, url


def start_master(
    host: str, log_dir: Path, timeout_s: float = 30.0
) -> tuple[ManagedProcess, str, str]:
    rpc_port, metrics_port = free_port(host), free_port(host)
    proc = spawn(
        "mooncake-master",
        [
            _mooncake_binary("mooncake_master"),
            f"--rpc_address={host}",
            f"--rpc_port={rpc_port}",
            f"--metrics_host={host}",
            f"--metrics_port={metrics_port}",
            "--enable_http_metadata_server=false",
            "--eviction_high_watermark_ratio=1.0",
            "--logtostderr",
        ],
        log_dir,
    )
    metrics_url = f"http://{host}:{metrics_port}"
    _wait_healthy(
        proc,
        lambda: (
            tcp_reachable(host, rpc_port)
            and '"status":"ok"' in http_get(f"{metrics_url}/health")[1]
        ),
        timeout_s,
        "mooncake_master",
    )
    return proc, f"{host}:{rpc_port}", metrics_url


def master_metrics(metrics_url: str) -> dict[str, float]:
    """The master's unlabelled Prometheus gauges/counters (allocated bytes, capacity, evictions)."""
    status, text = http_get(f"{metrics_url}/metrics")
    if status != 200:
        raise ServiceError(f"mooncake_master metrics at {metrics_url} answered HTTP {status}")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                continue
    return out


def start_segment_holder(
    host: str,
    segment_mb: int,
    master: str,
    metadata_url: str,
    metrics_url: str,
    log_dir: Path,
    timeout_s: float = 60.0,
) -> tuple[ManagedProcess, str]:
    """Start the process that owns the store's memory; healthy once the master sees its segment."""
    port = free_port(host)
    before = master_metrics(metrics_url).get("master_total_capacity_bytes", 0.0)
    proc = spawn(
        "mooncake-holder",
        [
            _mooncake_binary("mooncake_client"),
            f"--host={host}",
            f"--port={port}",
            f"--global_segment_size={segment_mb} MB",
            f"--master_server_address={master}",
            f"--metadata_server={metadata_url}",
            "--protocol=tcp",
            "--threads=2",
        ],
        log_dir,
        env={"MC_TCP_BIND_ADDRESS": host, "MC_STORE_MEMCPY": "1"},
    )

    def mounted() -> bool:
        capacity = master_metrics(metrics_url).get("master_total_capacity_bytes", 0.0)
        return tcp_reachable(host, port) and capacity >= before + segment_mb * MB

    _wait_healthy(proc, mounted, timeout_s, "Mooncake segment holder (mooncake_client)")
    return proc, f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Client


def _import_store(bind_host: str):
    # Read by the native library when the client is set up; clients never hold data (see module
    # docstring), and the transfer engine needs an address to advertise inside a loopback-only
    # network namespace where it finds no LAN address of its own.
    os.environ["MC_STORE_MEMCPY"] = "0"
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", bind_host)
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig

    return MooncakeDistributedStore, ReplicateConfig


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def _local_address_towards(host: str, port: int) -> str:
    """The address of the interface this machine uses to reach ``host`` (advertised to peers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return str(s.getsockname()[0])


class _Staging:
    """One registered buffer the client packs puts into and receives gets into; grows on demand."""

    def __init__(self, store: Any, shm: bool, nbytes: int) -> None:
        self.store, self.shm = store, shm
        self.ptr, self.size, self.view = 0, 0, torch.empty(0, dtype=torch.uint8)
        self._keepalive: Optional[torch.Tensor] = None
        self.ensure(nbytes)

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.size:
            return
        size = max(nbytes, 2 * self.size)
        size = -(-size // MB) * MB
        if self.ptr:
            self.store.unregister_buffer(self.ptr)
        if self.shm:
            ptr = int(self.store.alloc_from_mem_pool(size))
            if not ptr:
                raise ServiceError(f"cannot allocate {size // MB} MB of shared memory for Mooncake")
            view = torch.frombuffer((ctypes.c_uint8 * size).from_address(ptr), dtype=torch.uint8)
        else:
            view = torch.empty(size, dtype=torch.uint8)
            ptr = view.data_ptr()
        rc = self.store.register_buffer(ptr, size)
        if rc != 0:
            raise ServiceError(f"Mooncake register_buffer({size // MB} MB) failed with code {rc}")
        self.ptr, self.size, self.view, self._keepalive = ptr, size, view, view


def _layout(sizes: list[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    return offsets, total


class MooncakeClient:
    """Puts and gets whole samples through one registered staging buffer.

    Thread-safe (one re-entrant ``lock``): the trainer's prefetch thread reads while its main
    thread deletes.
    Every read is checked against the byte count the ``SampleRef`` promised, because Mooncake
    answers a too-small buffer with an error code or empty bytes rather than an exception.
    """

    def __init__(
        self,
        *,
        master: str,
        metadata_url: str,
        holder: Optional[str],
        cfg: TransferConfig,
    ) -> None:
        self.cfg = cfg
        self.mode = self._pick_mode(holder, cfg)
        self.lock = threading.RLock()
        timeout = cfg.connect_timeout_s
        if self.mode == "shm":
            assert holder is not None
            require_reachable(holder, "Mooncake segment holder", "transfer.holder_address", timeout)
            host = split_address(holder, "transfer.holder_address")[0]
            store_cls, replicate = _import_store(host)
            self.store = store_cls()
            rc = self.store.setup_dummy(0, 16 * MB, holder)
            where = f"holder {holder}"
        else:
            require_reachable(master, "mooncake_master", "transfer.master_address", timeout)
            meta_host, meta_port = _url_host_port(metadata_url)
            require_reachable(
                f"{meta_host}:{meta_port}",
                "Mooncake metadata server",
                "transfer.metadata_server",
                timeout,
            )
            master_host, master_port = split_address(master, "transfer.master_address")
            local = _local_address_towards(master_host, master_port)
            store_cls, replicate = _import_store(local)
            self.store = store_cls()
            rc = self.store.setup(
                local,
                metadata_url,
                cfg.client_segment_mb * MB,
                cfg.local_buffer_mb * MB,
                cfg.protocol,
                cfg.device_name,
                master,
            )
            where = f"master {master}"
        if rc != 0:
            raise ServiceError(f"Mooncake client setup against {where} failed with code {rc}")
        # Hard-pinned objects are never evicted: a full store answers -200 (a bounded wait here)
        # instead of silently dropping older samples. We delete every object explicitly on ack.
        self._put_config = replicate()
        self._put_config.with_hard_pin = True
        self._staging = _Staging(self.store, self.mode == "shm", cfg.local_buffer_mb * MB)
        self._closed = False

    @staticmethod
    def _pick_mode(holder: Optional[str], cfg: TransferConfig) -> str:
        mode = cfg.client_mode
        if mode == "shm" and not holder:
            raise ConfigError("'transfer.client_mode' shm needs a segment holder address")
        if mode == "auto":
            mode = "shm" if holder and _is_loopback(split_address(holder, "holder")[0]) else "tcp"
        return mode

    def stage(self, sizes: list[int]) -> list[torch.Tensor]:
        """Zero-copy put, step 1: uint8 views of the registered buffer to write samples into
        (an engine can write its output there directly, as a GPU engine's DtoH copy would).
        Views stay valid until the next call on this client; threads sharing a client hold
        ``client.lock`` from ``stage`` to ``put_staged``."""
        with self.lock:
            offsets, total = _layout(sizes)
            self._staging.ensure(total)
            return [self._staging.view[o : o + n] for o, n in zip(offsets, sizes, strict=True)]

    def put_staged(self, keys: list[str], sizes: list[int]) -> None:
        """Zero-copy put, step 2: store what ``stage(sizes)`` views hold, under ``keys``. Waits
        (bounded by ``transfer.put_timeout_s``) while the store is full."""
        deadline = time.monotonic() + self.cfg.put_timeout_s
        delay = 0.05
        with self.lock:
            offsets, _ = _layout(sizes)
            ptrs = [self._staging.ptr + off for off in offsets]
            while True:
                rcs = list(self.store.batch_put_from(keys, ptrs, sizes, self._put_config))
                if all(rc == 0 for rc in rcs):
                    return
                done = [k for k, rc in zip(keys, rcs, strict=True) if rc == 0]
                if done:  # a retry must not collide with the half that landed
                    self.store.batch_remove(done, True)
                bad = [rc for rc in rcs if rc not in (0, RC_NO_SPACE)]
                if bad:
                    raise ServiceError(
                        f"Mooncake put of {keys[0]} failed with code {bad[0]} "
                        f"({RC_NAMES.get(bad[0], 'see Mooncake types.h')})"
                    )
                if time.monotonic() >= deadline:
                    raise StoreFullError(
                        f"Mooncake store stayed full for {self.cfg.put_timeout_s:.0f}s while putting "
                        f"{sum(sizes) / MB:.1f} MB; raise 'transfer.global_segment_mb' or lower "
                        "'transfer.byte_budget_mb'"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def put(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Store tensors under keys (one copy into the registered buffer, then a zero-copy put)."""
        sizes = [t.numel() * t.element_size() for _, t in items]
        with self.lock:
            for view, (_, t), n in zip(self.stage(sizes), items, sizes, strict=True):
                src = t.detach().cpu().contiguous()
                ctypes.memmove(view.data_ptr(), src.data_ptr(), n)  # plain memcpy: no op dispatch
            self.put_staged([k for k, _ in items], sizes)

    def get_staged(self, metas: list[TensorMeta]) -> list[torch.Tensor]:
        """Zero-copy get: typed views of the registered buffer, valid until the next call on
        this client. Raises ``MissingDataError`` if an object is gone and ``ServiceError`` if its
        size is not what the ref promised (Mooncake reports that only as a return code)."""
        sizes = [m.nbytes for m in metas]
        with self.lock:
            offsets, total = _layout(sizes)
            self._staging.ensure(total)
            ptrs = [self._staging.ptr + off for off in offsets]
            rcs = list(self.store.batch_get_into([m.key for m in metas], ptrs, sizes))
            out = []
            for m, rc, off, n in zip(metas, rcs, offsets, sizes, strict=True):
                if rc == RC_NOT_FOUND:
                    raise MissingDataError(f"object {m.key} is not in the Mooncake store")
                if rc != n:
                    raise ServiceError(
                        f"Mooncake read of {m.key} returned {rc} "
                        f"({RC_NAMES.get(rc, 'size mismatch')}), expected {n} bytes"
                    )
                raw = self._staging.view[off : off + n]
                out.append(raw.view(getattr(torch, m.dtype)).reshape(m.shape))
            return out

    def get(self, metas: list[TensorMeta]) -> list[torch.Tensor]:
        """Fetch tensors described by ``metas`` into tensors the caller owns."""
        with self.lock:
            out = []
            for view in self.get_staged(metas):
                t = torch.empty_like(view)
                ctypes.memmove(t.data_ptr(), view.data_ptr(), view.numel() * view.element_size())
                out.append(t)
            return out

    def remove(self, keys: list[str]) -> int:
        """Force-delete (a recent read leaves a lease that blocks plain removal); missing is fine."""
        if not keys:
            return 0
        with self.lock:
            rcs = list(self.store.batch_remove(keys, True))
        failed = [(k, rc) for k, rc in zip(keys, rcs, strict=True) if rc not in (0, RC_NOT_FOUND)]
        if failed:
            log.warning(
                "Mooncake remove failed for %d keys, e.g. %s code %s", len(failed), *failed[0]
            )
        return sum(1 for rc in rcs if rc == 0)

    def exists(self, key: str) -> bool:
        with self.lock:
            return self.store.is_exist(key) == 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self.lock:
                self.store.close()


def _url_host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if not parsed.hostname or not parsed.port:
        raise ConfigError(
            f"'transfer.metadata_server' must look like http://host:port/metadata, got {url!r}"
        )
    return parsed.hostname, parsed.port
