"""Mooncake services (metadata server, master, segment holder) and the store client.

Where the bytes live. Mooncake keeps an object in the *global segment of the client that mounted
it*; the master only holds metadata. If producers mounted the segments, a producer that dies (or
is SIGKILLed) would take its published-but-unread samples with it. So the coordinator runs a
standalone **segment holder** (``holder.py``) that owns all store memory; producers and trainers
mount 0 bytes. A dead producer then loses only the samples it had claimed but not yet published,
and the key queue re-claims those (``queue.py``). As a second line of defence a trainer that finds
a published sample's data gone hands the id back for re-production
(``KeyQueue.requeue_missing``), counted and logged.

Two client modes, both ordinary Mooncake clients (the master allocates, tracks and deletes every
object either way):
- ``shm`` (same host as the holder): the holder's segment is a shared-memory file that the client
  maps too. A put reserves the object (``batch_put_session_start``/``end``), learns where the
  master placed it (its replica descriptor) and copies the sample straight there: one copy. A get
  is a view of the object's bytes in the segment (``get_staged``) or one copy out (``get``).
- ``tcp`` (another host): transfers go through a registered staging buffer over the TCP
  transport (0.5-1.5 GB/s on loopback), into the holder's segment. ``auto`` picks ``shm`` when
  the holder's segment can be mapped here. ``MC_STORE_MEMCPY=0`` is set for clients: the
  same-host memcpy shortcut segfaulted upstream (Mooncake #1986), and the segment mapping does
  that job.

Every put is *hard-pinned*: Mooncake never evicts such objects, so a full store answers ``-200``
(turned into a bounded wait here) instead of silently evicting older samples (which unpinned
objects suffer near the 90 % watermark, and even with the watermark at 100 %: the master then
evicts to make room for a new put). Trainers delete every object explicitly after the optimizer
step. Our master also runs with ``--eviction_high_watermark_ratio=1.0`` so nothing is evicted
before the store is really full. The key queue's byte budget keeps residency well below capacity
in the first place, also for external masters.

Security: the master and metadata server bind ``transfer.host`` (127.0.0.1 by default), but every
Mooncake client (the holder, producers, trainers) also opens transfer-engine listeners on all
interfaces whatever is configured (Mooncake 0.3.13: ``MC_TCP_BIND_ADDRESS`` only picks the
address a client advertises); tests run inside ``unshare -n`` so those are reachable only on
loopback. README "Security notes" has the exposure and its mitigation. The shared segment is reachable only by processes allowed to open
the holder's ``/proc/<pid>/fd`` (same user), and a client checks the file's random token.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
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
from spec_core.transfer.holder import SegmentInfo, SharedSegment, fetch_info
from spec_core.transfer.records import TensorMeta
from spec_core.utils.logs import CHILD_LOG_ENV, child_env
from spec_core.utils.net import free_port
from spec_core.utils.procs import ProcessGroup

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
    """A server process we own: its own process group, logs in a file, stopped by group id."""

    name: str
    group: ProcessGroup
    log_path: Path

    @property
    def popen(self) -> subprocess.Popen:
        return self.group.popen

    @property
    def pid(self) -> int:
        return self.group.pid

    def alive(self) -> bool:
        return self.group.alive()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``timeout_s``; idempotent."""
        self.group.stop(timeout_s)


def spawn(
    name: str, argv: list[str], log_dir: Path, env: Optional[dict[str, str]] = None
) -> ManagedProcess:
    """Start ``argv`` in its own group (Ctrl-C in the terminal reaches us; we stop it), its output
    appended to ``log_dir/<name>.log``. It dies with this process, SIGKILL included
    (``ProcessGroup`` ``die_with_owner``): a service outliving its coordinator serves nobody."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as fh:
        group = ProcessGroup.start(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(env),
            die_with_owner=True,
        )
    return ManagedProcess(name, group, log_path)


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
    protocol: str = "tcp",
    device_name: str = "",
) -> tuple[ManagedProcess, str]:
    """Start the process that owns the store's memory (``holder.py``); healthy once the master
    counts its segment and it has published where same-host clients find it. Returns the holder's
    Mooncake endpoint, the name replica descriptors give its segment."""
    ready = log_dir / "mooncake-holder.ready.json"
    ready.unlink(missing_ok=True)
    before = master_metrics(metrics_url).get("master_total_capacity_bytes", 0.0)
    proc = spawn(
        "mooncake-holder",
        [
            sys.executable,
            "-m",
            "spec_core.transfer.holder",
            f"--host={host}",
            f"--master={master}",
            f"--metadata-url={metadata_url}",
            f"--segment-mb={segment_mb}",
            f"--ready-file={ready}",
            f"--protocol={protocol}",
            f"--device-name={device_name}",
            f"--owner-pid={os.getpid()}",
        ],
        log_dir,
        # What the transfer engine advertises; it does not narrow its listeners (README,
        # "Security notes"). Passed here so the process's environment shows what it was given.
        env={"MC_TCP_BIND_ADDRESS": host},
    )

    def mounted() -> bool:
        capacity = master_metrics(metrics_url).get("master_total_capacity_bytes", 0.0)
        return ready.exists() and capacity >= before + segment_mb * MB

    _wait_healthy(proc, mounted, timeout_s, "Mooncake segment holder")
    return proc, SegmentInfo.from_json(ready.read_text()).endpoint


# ---------------------------------------------------------------------------------------------
# Client


def _import_store(bind_host: str):
    # Read by the native library when the client is set up; clients never hold data (see module
    # docstring), and the transfer engine needs an address to advertise inside a loopback-only
    # network namespace where it finds no LAN address of its own.
    os.environ["MC_STORE_MEMCPY"] = "0"
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", bind_host)
    for key, value in CHILD_LOG_ENV.items():  # quiet in-process clients like our children
        os.environ.setdefault(key, value)
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig

    return MooncakeDistributedStore, ReplicateConfig


def _local_address_towards(host: str, port: int) -> str:
    """The address of the interface this machine uses to reach ``host`` (advertised to peers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return str(s.getsockname()[0])


class _Staging:
    """One registered buffer for transfers over the transfer engine (tcp mode, and objects that
    are not in a mapped segment); grows on demand."""

    def __init__(self, store: Any, nbytes: int) -> None:
        self.store = store
        self.ptr, self.size, self.view = 0, 0, torch.empty(0, dtype=torch.uint8)
        self.ensure(nbytes)

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.size:
            return
        size = -(-max(nbytes, 2 * self.size) // MB) * MB
        if self.ptr:
            self.store.unregister_buffer(self.ptr)
        view = torch.empty(size, dtype=torch.uint8)
        rc = self.store.register_buffer(view.data_ptr(), size)
        if rc != 0:
            raise ServiceError(f"Mooncake register_buffer({size // MB} MB) failed with code {rc}")
        self.ptr, self.size, self.view = view.data_ptr(), size, view


def _layout(sizes: list[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    return offsets, total


def _typed(raw: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """``raw`` bytes as ``meta`` says. Mooncake places objects at any byte offset, so bytes not
    aligned for the dtype are copied into an aligned tensor first (a typed view cannot start
    mid-element)."""
    dtype = getattr(torch, meta.dtype)
    if raw.data_ptr() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).reshape(meta.shape)


class MooncakeClient:
    """Puts and gets whole samples; in ``shm`` mode straight in the holder's mapped segment.

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
        self.lock = threading.RLock()
        timeout = cfg.connect_timeout_s
        if cfg.client_mode == "shm" and not holder:
            raise ConfigError("'transfer.client_mode' shm needs a segment holder address")
        if holder:  # a name (the holder's Mooncake endpoint), not a port that listens
            split_address(holder, "transfer.holder_address")
        require_reachable(master, "mooncake_master", "transfer.master_address", timeout)
        meta_host, meta_port = _url_host_port(metadata_url)
        require_reachable(
            f"{meta_host}:{meta_port}",
            "Mooncake metadata server",
            "transfer.metadata_server",
            timeout,
        )
        self.segment = self._map_segment(metadata_url, holder, cfg.client_mode)
        self.mode = "shm" if self.segment else "tcp"
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
        if rc != 0:
            raise ServiceError(
                f"Mooncake client setup against master {master} failed with code {rc}"
            )
        # Hard-pinned objects are never evicted: a full store answers -200 (a bounded wait here)
        # instead of silently dropping older samples. We delete every object explicitly on ack.
        self._put_config = replicate()
        self._put_config.with_hard_pin = True
        if holder:
            self._put_config.preferred_segment = holder
        # tcp mode stages every transfer here; shm mode only objects outside the mapped segment.
        self._staging = _Staging(self.store, cfg.local_buffer_mb * MB if not self.segment else MB)
        self._staged: dict[str, tuple[int, int]] = {}  # key -> (staging offset, bytes) to send
        self._closed = False

    @staticmethod
    def _map_segment(
        metadata_url: str, holder: Optional[str], mode: str
    ) -> Optional[SharedSegment]:
        """The holder's segment mapped here, or None for tcp mode (asked for, or not same-host)."""
        if mode == "tcp" or not holder:
            return None
        info = fetch_info(metadata_url, holder)
        try:
            if info is None:
                raise OSError(f"holder {holder} published no segment info on {metadata_url}")
            return SharedSegment(info)
        except OSError as exc:
            if mode == "shm":
                raise ServiceError(
                    f"'transfer.client_mode' shm: cannot map the segment of holder {holder} ({exc}); "
                    "run on the holder's host or set client_mode to auto or tcp"
                ) from exc
            log.info("segment holder %s not mappable here (%s): using tcp", holder, exc)
            return None

    def stage(self, keys: list[str], sizes: list[int]) -> list[torch.Tensor]:
        """Zero-copy put, step 1: uint8 views to write each sample into (an engine can write its
        output there directly, as a GPU engine's DtoH copy would). In shm mode the objects are
        reserved here (waiting while the store is full) and the views are their bytes in the
        segment; otherwise they are in this client's registered buffer. Nothing may read the
        objects before ``put_staged(keys)``: publish refs only after it. Threads sharing a client
        hold ``client.lock`` from ``stage`` to ``put_staged``."""
        with self.lock:
            views: dict[str, torch.Tensor] = {}
            if self.segment:
                views = self._reserve_in_segment(keys, sizes)
            rest = [(k, n) for k, n in zip(keys, sizes, strict=True) if k not in views]
            offsets, total = _layout([n for _, n in rest])
            self._staging.ensure(total)
            for (key, n), off in zip(rest, offsets, strict=True):
                self._staged[key] = (off, n)
                views[key] = self._staging.view[off : off + n]
            return [views[k] for k in keys]

    def put_staged(self, keys: list[str]) -> None:
        """Zero-copy put, step 2: the objects are complete and readable once this returns.
        Sends what was staged in the registered buffer (waits, bounded by
        ``transfer.put_timeout_s``, while the store is full); segment writes need nothing more."""
        with self.lock:
            pending = [(k, self._staged.pop(k)) for k in keys if k in self._staged]
            if pending:
                self._send(
                    [k for k, _ in pending],
                    [self._staging.ptr + off for _, (off, _) in pending],
                    [n for _, (_, n) in pending],
                )

    def put(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Store tensors under keys: one copy of each, into the segment (shm) or staging (tcp)."""
        keys = [k for k, _ in items]
        sizes = [t.numel() * t.element_size() for _, t in items]
        with self.lock:
            for view, (_, t), n in zip(self.stage(keys, sizes), items, sizes, strict=True):
                src = t.detach().cpu().contiguous()
                ctypes.memmove(view.data_ptr(), src.data_ptr(), n)  # plain memcpy: no op dispatch
            self.put_staged(keys)

    def _reserve_in_segment(self, keys: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
        """Reserve objects and return their bytes in the mapped segment; objects the master put
        elsewhere (another client's segment) are removed again and left to the staging path."""
        assert self.segment is not None
        self._retry_while_full(
            lambda: list(self.store.batch_put_session_start(keys, sizes, self._put_config)),
            keys,
            sizes,
            on_partial=lambda done: (
                self.store.batch_put_session_end(done),
                self.store.batch_remove(done, True),
            ),
        )
        rcs = list(self.store.batch_put_session_end(keys))
        if any(rc != 0 for rc in rcs):
            self.store.batch_remove(keys, True)
            bad = next(rc for rc in rcs if rc != 0)
            raise ServiceError(f"Mooncake put of {keys[0]} failed at commit with code {bad}")
        views, elsewhere = {}, []
        for key, n in zip(keys, sizes, strict=True):
            view = self._segment_view(key, n)
            if view is None:
                elsewhere.append(key)
            else:
                views[key] = view
        if elsewhere:
            self.store.batch_remove(elsewhere, True)
        return views

    def _segment_view(self, key: str, nbytes: int) -> Optional[torch.Tensor]:
        assert self.segment is not None
        for replica in self.store.get_replica_desc(key):
            if replica.is_memory_replica():
                desc = replica.get_memory_descriptor().buffer_descriptor
                if desc.size == nbytes and desc.transport_endpoint == self.segment.info.endpoint:
                    return self.segment.at(desc.buffer_address, nbytes)
        return None

    def _send(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> None:
        self._retry_while_full(
            lambda: list(self.store.batch_put_from(keys, ptrs, sizes, self._put_config)),
            keys,
            sizes,
            on_partial=lambda done: self.store.batch_remove(done, True),
        )

    def _retry_while_full(self, attempt, keys: list[str], sizes: list[int], on_partial) -> None:
        """Run a batched put ``attempt`` until every key lands; while the store is full, undo the
        keys that did land (a retry must not collide with them) and wait, bounded by
        ``transfer.put_timeout_s``."""
        deadline = time.monotonic() + self.cfg.put_timeout_s
        delay = 0.05
        while True:
            rcs = attempt()
            if all(rc == 0 for rc in rcs):
                return
            done = [k for k, rc in zip(keys, rcs, strict=True) if rc == 0]
            if done:
                on_partial(done)
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

    def get_staged(self, metas: list[TensorMeta]) -> list[torch.Tensor]:
        """Zero-copy get: typed views of the objects' bytes, in the mapped segment (shm: valid
        until the object is removed) or in the registered buffer (valid until the next call on
        this client); bytes misaligned for their dtype come as an aligned copy. Raises ``MissingDataError`` if an object is gone and ``ServiceError`` if its
        size is not what the ref promised (Mooncake reports that only as a return code)."""
        with self.lock:
            return [_typed(raw, m) for raw, m in zip(self._fetch_raw(metas), metas, strict=True)]

    def _fetch_raw(self, metas: list[TensorMeta]) -> list[torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        if self.segment:
            found = self._views_in_segment(metas)
        rest = [m for m in metas if m.key not in found]
        if rest:
            found.update(self._receive(rest))
        return [found[m.key] for m in metas]

    def _views_in_segment(self, metas: list[TensorMeta]) -> dict[str, torch.Tensor]:
        assert self.segment is not None
        descs = self.store.batch_get_replica_desc([m.key for m in metas])
        out = {}
        for m in metas:
            replicas = [r for r in descs.get(m.key, []) if r.is_memory_replica()]
            if not replicas:
                raise MissingDataError(f"object {m.key} is not in the Mooncake store")
            desc = replicas[0].get_memory_descriptor().buffer_descriptor
            if desc.size != m.nbytes:
                raise ServiceError(
                    f"Mooncake object {m.key} holds {desc.size} bytes, expected {m.nbytes} bytes"
                )
            if desc.transport_endpoint == self.segment.info.endpoint:
                view = self.segment.at(desc.buffer_address, m.nbytes)
                if view is not None:
                    out[m.key] = view
        return out

    def _receive(self, metas: list[TensorMeta]) -> dict[str, torch.Tensor]:
        sizes = [m.nbytes for m in metas]
        offsets, total = _layout(sizes)
        self._staging.ensure(total)
        ptrs = [self._staging.ptr + off for off in offsets]
        rcs = list(self.store.batch_get_into([m.key for m in metas], ptrs, sizes))
        out = {}
        for m, rc, off, n in zip(metas, rcs, offsets, sizes, strict=True):
            if rc == RC_NOT_FOUND:
                raise MissingDataError(f"object {m.key} is not in the Mooncake store")
            if rc != n:
                raise ServiceError(
                    f"Mooncake read of {m.key} returned {rc} "
                    f"({RC_NAMES.get(rc, 'size mismatch')}), expected {n} bytes"
                )
            out[m.key] = self._staging.view[off : off + n]
        return out

    def get(self, metas: list[TensorMeta]) -> list[torch.Tensor]:
        """Fetch tensors described by ``metas`` into tensors the caller owns (one copy each)."""
        with self.lock:
            out = []
            for raw, m in zip(self._fetch_raw(metas), metas, strict=True):
                t = torch.empty(m.shape, dtype=getattr(torch, m.dtype))
                ctypes.memmove(t.data_ptr(), raw.data_ptr(), m.nbytes)
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
        """Idempotent. Waits at most ``transfer.close_timeout_s`` for the client lock: a thread
        stuck in a store call (a prefetch read) must not hang its owner's shutdown forever."""
        if self._closed:
            return
        if not self.lock.acquire(timeout=self.cfg.close_timeout_s):
            raise ServiceError(
                f"closing the Mooncake client: another thread held its lock for "
                f"{self.cfg.close_timeout_s:.0f}s (a store call that does not return); "
                "'transfer.close_timeout_s'"
            )
        try:
            if not self._closed:
                self._closed = True
                self.store.close()
        finally:
            self.lock.release()


def _url_host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if not parsed.hostname or not parsed.port:
        raise ConfigError(
            f"'transfer.metadata_server' must look like http://host:port/metadata, got {url!r}"
        )
    return parsed.hostname, parsed.port
