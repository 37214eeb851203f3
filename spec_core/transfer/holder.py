"""The segment holder: the one process that owns the store's memory, shared with same-host clients.

Mooncake keeps an object in the segment of the client that mounted it, so a standalone holder
keeps published samples alive when a producer dies (``mooncake.py``). The holder mounts a
shared-memory file (a memfd) as its segment instead of private memory. A client on the same
host maps the same file and reads or writes an object's bytes where the master placed them:
a put is one copy (into the segment), a get can be none. Clients on other hosts reach the same
segment through Mooncake's TCP transport, which the holder's transfer engine serves.

The file starts with a one-page header holding a random token; the holder publishes
``SegmentInfo`` (its pid, the fd, the token, where the segment is mapped) on the Mooncake metadata
server under ``specflow/segment/<endpoint>``. A client that can open ``/proc/<pid>/fd/<fd>`` and
finds the token there is on the same host, in the same pid namespace, talking to this holder.

Run as ``python -m spec_core.transfer.holder --host ... --master ... --metadata-url ...
--segment-mb N [--ready-file F] [--owner-pid P]``; it exits on SIGTERM/SIGINT, removing its info
key, and when its owner (the coordinator that started it) is gone: a watchdog on the owner's pid
that backs up the kernel's parent-death signal (``spec_core.utils.procs``), so a segment is never
held for a dead run. Its memory is a memfd, freed by the kernel when the holder exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import secrets
import signal
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from spec_core.utils import faults
from spec_core.utils.files import atomic_write_text

log = logging.getLogger(__name__)

MB = 1 << 20
HEADER_BYTES = 4096  # page-aligned: Mooncake mmaps the segment from this offset
MAGIC = b"specflow-segment-v1\n"


@dataclass(frozen=True)
class SegmentInfo:
    """What a same-host client needs to map the holder's segment."""

    endpoint: str  # the holder's Mooncake endpoint, as replica descriptors name it
    pid: int
    fd: int
    token: str  # random; written in the file's header page
    map_base: int  # address of the segment's first byte in the holder's address space
    size: int  # bytes of segment after the header page

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SegmentInfo:
        return cls(**json.loads(text))


def info_key(endpoint: str) -> str:
    return f"specflow/segment/{endpoint}"


def _metadata_request(url: str, method: str, body: Optional[bytes] = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5.0) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def publish_info(metadata_url: str, info: SegmentInfo) -> None:
    url = f"{metadata_url}?key={info_key(info.endpoint)}"
    status, body = _metadata_request(url, "PUT", info.to_json().encode())
    if status != 200:
        raise RuntimeError(f"metadata server {metadata_url} refused the segment info: {body!r}")


def fetch_info(metadata_url: str, endpoint: str) -> Optional[SegmentInfo]:
    """The segment info a holder published, or None (not our holder, or an HTTP error)."""
    try:
        status, body = _metadata_request(f"{metadata_url}?key={info_key(endpoint)}", "GET")
    except OSError:
        return None
    if status != 200:
        return None
    try:
        return SegmentInfo.from_json(body.decode())
    except (ValueError, TypeError):
        return None


def create_segment_file(size: int, token: str) -> int:
    """A memfd of header + ``size`` bytes with its memory reserved now: a host without room fails
    here with one error instead of a SIGBUS on some later put. The kernel frees it when the last
    process holding it exits, SIGKILL included, so nothing is left in /dev/shm."""
    available = _available_bytes()
    if size > available:  # fallocate would not fail: the OOM killer would pick a victim
        raise RuntimeError(
            f"the store segment needs {size // MB} MB but this host has {available // MB} MB "
            "available; lower 'transfer.global_segment_mb'"
        )
    fd = os.memfd_create("specflow-segment", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, HEADER_BYTES + size)
        os.posix_fallocate(fd, 0, HEADER_BYTES + size)
    except OSError as exc:
        os.close(fd)
        raise RuntimeError(
            f"cannot reserve {size // MB} MB of shared memory for the store segment ({exc}); "
            "lower 'transfer.global_segment_mb'"
        ) from exc
    os.pwrite(fd, MAGIC + token.encode() + b"\n", 0)
    return fd


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62  # no figure to check against (not Linux /proc): let fallocate decide


def mapped_base(fd: int, file_offset: int) -> int:
    """Where this process maps ``fd`` at ``file_offset`` (Mooncake's mmap), from /proc/self/maps."""
    inode = os.fstat(fd).st_ino
    with open("/proc/self/maps") as maps:
        for line in maps:
            cols = line.split()
            if len(cols) >= 5 and int(cols[4]) == inode and int(cols[2], 16) == file_offset:
                return int(cols[0].split("-")[0], 16)
    raise RuntimeError("the mounted segment is not mapped in this process")


def read_token(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as fh:
            header = fh.read(HEADER_BYTES)
    except OSError:
        return None
    if not header.startswith(MAGIC):
        return None
    return header[len(MAGIC) :].split(b"\n", 1)[0].decode(errors="replace")


class SharedSegment:
    """A same-host client's mapping of the holder's segment: addresses in, uint8 views out."""

    def __init__(self, info: SegmentInfo) -> None:
        path = f"/proc/{info.pid}/fd/{info.fd}"
        if read_token(path) != info.token:
            raise OSError(f"{path} is not the segment holder {info.endpoint} published")
        with open(path, "r+b") as fh:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # no faults on first use
            self._map = mmap.mmap(fh.fileno(), HEADER_BYTES + info.size, flags=flags)
        self.info = info
        self.view = torch.frombuffer(self._map, dtype=torch.uint8)[HEADER_BYTES:]

    def at(self, address: int, nbytes: int) -> Optional[torch.Tensor]:
        """The bytes at holder ``address``, or None when they are not in this segment."""
        start = address - self.info.map_base
        if start < 0 or start + nbytes > self.info.size:
            return None
        return self.view[start : start + nbytes]


def serve(args: argparse.Namespace) -> int:
    # The transfer engine advertises this address; inside a loopback-only namespace it finds none.
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", args.host)
    from mooncake.store import MooncakeDistributedStore

    size = args.segment_mb * MB
    token = secrets.token_hex(16)
    try:
        fd = create_segment_file(size, token)
    except RuntimeError as exc:
        print(f"segment holder: {exc}", file=sys.stderr)
        return 2
    store = MooncakeDistributedStore()
    faults.point("holder.setup")
    rc = store.setup(
        args.host, args.metadata_url, 0, 16 * MB, args.protocol, args.device_name, args.master
    )
    if rc != 0:
        print(f"segment holder: Mooncake setup against {args.master} failed: {rc}", file=sys.stderr)
        return 3
    faults.point("holder.mount")
    mounted = store.mount_segment(f"/proc/self/fd/{fd}", size, HEADER_BYTES, args.protocol)
    if mounted.get("ret") != 0:
        print(f"segment holder: mount_segment failed: {mounted}", file=sys.stderr)
        return 4
    endpoint = store.get_hostname()
    info = SegmentInfo(endpoint, os.getpid(), fd, token, mapped_base(fd, HEADER_BYTES), size)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    faults.point("holder.publish_info")
    publish_info(args.metadata_url, info)
    if args.ready_file:  # atomic: a reader never sees half of it
        atomic_write_text(args.ready_file, info.to_json())
    print(f"segment holder {endpoint}: {args.segment_mb} MB mounted", flush=True)
    while not stop.wait(1.0):
        if args.owner_pid and not _owner_alive(args.owner_pid):
            print(f"segment holder {endpoint}: owner pid {args.owner_pid} is gone", flush=True)
            break
    _metadata_request(f"{args.metadata_url}?key={info_key(endpoint)}", "DELETE")
    faults.point("holder.close")
    store.close()
    return 0


def _owner_alive(owner_pid: int) -> bool:
    """Our parent is still the owner (a dead owner's children are handed to init or a
    subreaper, and a recycled pid would not be our parent)."""
    return os.getppid() == owner_pid


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", required=True, help="address to advertise and bind")
    parser.add_argument("--master", required=True, help="mooncake_master host:port")
    parser.add_argument("--metadata-url", required=True, help="http://host:port/metadata")
    parser.add_argument("--segment-mb", type=int, required=True)
    parser.add_argument("--protocol", default="tcp", help="Mooncake transport: tcp | rdma")
    parser.add_argument("--device-name", default="", help="RDMA NICs, comma-separated")
    parser.add_argument("--ready-file", help="where to write SegmentInfo JSON once mounted")
    parser.add_argument("--owner-pid", type=int, default=0, help="exit when this parent is gone")
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
