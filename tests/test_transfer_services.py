"""Mooncake services and the store client against a real master, metadata server and holder."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from spec_core.config import TransferConfig
from spec_core.errors import ConfigError, ServiceError
from spec_core.transfer.mooncake import MissingDataError, StoreFullError, master_metrics
from spec_core.transfer.records import TensorMeta
from spec_core.transfer.services import ServiceAddresses, start_services

SEGMENT_MB = 256


@pytest.fixture(scope="module")
def cfg() -> TransferConfig:
    return TransferConfig(
        global_segment_mb=SEGMENT_MB, byte_budget_mb=64, put_timeout_s=1.0, connect_timeout_s=5.0
    )


@pytest.fixture(scope="module")
def services(cfg, tmp_path_factory):
    handle = start_services(cfg, "test-services", tmp_path_factory.mktemp("svc-logs"))
    yield handle
    handle.stop()


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on, from /proc (no tools needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            if v6:
                addr = "::" if set(hex_addr) == {"0"} else hex_addr
            else:
                addr = ".".join(str(int(hex_addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
            out.append((addr, int(hex_port, 16)))
    return out


def test_servers_listen_on_loopback_only(services):
    by_name = {p.name: p.pid for p in services.processes}
    a = services.addresses
    for name in ("mooncake-metadata", "mooncake-master"):
        socks = _listening(by_name[name])
        assert socks, name
        assert all(addr == "127.0.0.1" for addr, _ in socks), (name, socks)
    master_port = int(a.master.rsplit(":", 1)[1])
    assert ("127.0.0.1", master_port) in _listening(by_name["mooncake-master"])
    # The key-queue TCPStore master lives in this process.
    queue_port = int(a.queue.rsplit(":", 1)[1])
    mine = [s for s in _listening(os.getpid()) if s[1] == queue_port]
    assert mine == [("127.0.0.1", queue_port)]
    # The holder opens only Mooncake transfer-engine listeners. Mooncake 0.3.13 (and its source
    # upstream) binds them to every interface: MC_TCP_BIND_ADDRESS, which the holder is given,
    # only chooses the address it advertises (README §security-notes; hence unshare -n in tests).
    # If this starts failing, Mooncake learned to bind one address: use it and flip the test.
    holder = by_name["mooncake-holder"]
    environ = Path(f"/proc/{holder}/environ").read_bytes().split(b"\0")
    assert b"MC_TCP_BIND_ADDRESS=127.0.0.1" in environ
    holder_socks = _listening(holder)
    assert holder_socks and {addr for addr, _ in holder_socks} <= {"0.0.0.0", "::"}


def test_addresses_round_trip_as_json_dict(services):
    a = services.addresses
    assert ServiceAddresses.from_dict(a.to_dict()) == a
    with pytest.raises(ConfigError, match="unknown fields"):
        ServiceAddresses.from_dict({**a.to_dict(), "bogus": 1})


@pytest.mark.parametrize("mode", ["shm", "tcp"])
def test_round_trip_bit_identical_and_force_remove(services, cfg, mode):
    client = services.addresses.connect_store(dataclasses.replace(cfg, client_mode=mode))
    assert client.mode == mode
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{mode}/a": torch.randn(37, 3 * 64, generator=g),
        f"{mode}/b": torch.randn(5, 64, generator=g).to(torch.bfloat16),
        f"{mode}/c": torch.randint(0, 49152, (37,), generator=g),
        f"{mode}/d": torch.randint(0, 2, (37,), generator=g).to(torch.uint8),
        f"{mode}/e": torch.randn(3000, 576, generator=g),  # 6.9 MB: grows the staging buffer
    }
    try:
        client.put(list(tensors.items()))
        metas = [
            TensorMeta(k, tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for k, t in tensors.items()
        ]
        for (key, want), got in zip(tensors.items(), client.get(metas), strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want), key
        # A lease follows every read; force removal must still delete the objects.
        assert client.remove(list(tensors)) == len(tensors)
        assert not client.exists(f"{mode}/a")
        with pytest.raises(MissingDataError):
            client.get(metas[:1])
    finally:
        client.close()


def test_zero_copy_stage_put_and_get_views(services, cfg):
    client = services.addresses.connect_store(cfg)
    try:
        sizes = [1000, 4 * 37]
        a, b = client.stage(["zc/a", "zc/b"], sizes)
        a.copy_(torch.arange(1000, dtype=torch.int64).to(torch.uint8))
        want = torch.linspace(-1, 1, 37)
        b.copy_(want.view(torch.uint8))
        client.put_staged(["zc/a", "zc/b"])
        got_a, got_b = client.get_staged(
            [TensorMeta("zc/a", (1000,), "uint8"), TensorMeta("zc/b", (37,), "float32")]
        )
        assert torch.equal(got_b, want) and got_a[999] == 999 % 256
        assert got_b.data_ptr() != want.data_ptr()  # a view of the client's buffer, not ours
    finally:
        client.remove(["zc/a", "zc/b"])
        client.close()


def test_shm_client_maps_the_holders_segment_and_interoperates_with_tcp(services, cfg):
    shm = services.addresses.connect_store(cfg)  # auto: same host -> shm
    tcp = services.addresses.connect_store(dataclasses.replace(cfg, client_mode="tcp"))
    assert (shm.mode, tcp.mode) == ("shm", "tcp")
    g = torch.Generator().manual_seed(1)
    # Odd sizes first: Mooncake packs objects at any byte offset, so later float32/int64 objects
    # land misaligned for a typed view.
    tensors = {
        "mix/odd": torch.randint(0, 255, (37,), dtype=torch.uint8, generator=g),
        "mix/f32": torch.randn(41, 64, generator=g),
        "mix/odd2": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
        "mix/i64": torch.randint(0, 49152, (41,), generator=g),
    }
    metas = [
        TensorMeta(k, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for k, t in tensors.items()
    ]
    try:
        for writer, reader in ((shm, tcp), (tcp, shm), (shm, shm)):
            writer.put(list(tensors.items()))
            for fetch in (reader.get, reader.get_staged):
                for (key, want), got in zip(tensors.items(), fetch(metas), strict=True):
                    assert got.dtype == want.dtype and torch.equal(got, want), (key, fetch)
            writer.remove(list(tensors))
        # The shm path really is the holder's memory: a staged write shows through a view.
        (view,) = shm.stage(["mix/live"], [8])
        view.copy_(torch.arange(8, dtype=torch.uint8))
        shm.put_staged(["mix/live"])
        (seen,) = shm.get_staged([TensorMeta("mix/live", (8,), "uint8")])
        assert seen.data_ptr() == view.data_ptr()
        assert torch.equal(
            tcp.get([TensorMeta("mix/live", (8,), "uint8")])[0], torch.arange(8).byte()
        )
    finally:
        shm.remove(list(tensors) + ["mix/live"])
        shm.close()
        tcp.close()


def test_shm_mode_without_a_mappable_holder_is_one_clear_error(services, cfg):
    elsewhere = dataclasses.replace(services.addresses, holder="127.0.0.1:9")  # no segment info
    with pytest.raises(ServiceError, match="cannot map the segment of holder 127.0.0.1:9"):
        elsewhere.connect_store(dataclasses.replace(cfg, client_mode="shm"))
    client = elsewhere.connect_store(cfg)  # auto falls back to tcp
    try:
        assert client.mode == "tcp"
    finally:
        client.close()


def test_every_read_is_size_checked(services, cfg):
    client = services.addresses.connect_store(cfg)
    try:
        client.put([("sized", torch.zeros(100, dtype=torch.float32))])
        with pytest.raises(ServiceError, match="expected 200 bytes"):
            client.get([TensorMeta("sized", (50,), "float32")])  # ref claims fewer bytes
        with pytest.raises(ServiceError, match="expected 800 bytes"):
            client.get([TensorMeta("sized", (200,), "float32")])  # ref claims more bytes
    finally:
        client.remove(["sized"])
        client.close()


def test_store_full_is_a_bounded_wait_then_one_error(services, cfg):
    client = services.addresses.connect_store(cfg)
    chunk = torch.ones(60 * (1 << 20), dtype=torch.uint8)
    keys = []
    try:
        for i in range(SEGMENT_MB // 60):  # fill the segment: 4 x 60 MB of 256 MB
            client.put([(f"fill/{i}", chunk)])
            keys.append(f"fill/{i}")
        t0 = time.monotonic()
        with pytest.raises(StoreFullError, match="byte_budget_mb"):
            client.put([("fill/overflow", chunk)])
        assert 0.9 <= time.monotonic() - t0 < 10
        metrics = master_metrics(services.addresses.metrics_url)
        assert all(client.exists(k) for k in keys)  # nothing evicted to make room
        assert metrics["master_allocated_bytes"] == len(keys) * chunk.numel()
        assert metrics.get("master_evicted_key_count", 0) == 0
    finally:
        client.remove(keys)
        client.close()


def test_put_waits_for_room_instead_of_failing(services, cfg):
    import threading

    client = services.addresses.connect_store(dataclasses.replace(cfg, put_timeout_s=20.0))
    other = services.addresses.connect_store(cfg)
    chunk = torch.ones(60 * (1 << 20), dtype=torch.uint8)
    keys = [f"room/{i}" for i in range(SEGMENT_MB // 60)]
    try:
        for k in keys:
            client.put([(k, chunk)])
        timer = threading.Timer(1.0, lambda: other.remove(keys[:1]))
        timer.start()
        t0 = time.monotonic()
        client.put([("room/late", chunk)])  # succeeds once the other client frees space
        assert time.monotonic() - t0 >= 0.8
        timer.join()
    finally:
        client.remove(keys + ["room/late"])
        client.close()
        other.close()


def test_bad_addresses_fail_fast_with_one_clear_error(services, cfg, tmp_path):
    quick = dataclasses.replace(cfg, connect_timeout_s=1.0)
    dead = "127.0.0.1:1"
    bad = dataclasses.replace(services.addresses, master=dead, holder=dead)
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match="not reachable"):
        bad.connect_store(quick)
    with pytest.raises(ServiceError, match="mooncake_master at 127.0.0.1:1 is not reachable"):
        bad.connect_store(dataclasses.replace(quick, client_mode="tcp"))
    with pytest.raises(ServiceError, match="key-queue TCPStore"):
        dataclasses.replace(services.addresses, queue=dead).connect_queue(1.0)
    assert time.monotonic() - t0 < 15
    # External services that are not running: start_services says so instead of hanging.
    external = dataclasses.replace(
        quick,
        master_address=dead,
        metadata_server="http://127.0.0.1:1/metadata",
        queue_address=dead,
    )
    with pytest.raises(ServiceError, match="mooncake_master at 127.0.0.1:1"):
        start_services(external, "ext", tmp_path)
    with pytest.raises(ConfigError, match="missing transfer.metadata_server"):
        start_services(dataclasses.replace(quick, master_address=dead), "ext", tmp_path)
    with pytest.raises(ConfigError, match="host:port"):
        dataclasses.replace(services.addresses, holder="nonsense").connect_store(quick)


def test_attach_to_external_services(services, cfg, tmp_path):
    a = services.addresses
    external = dataclasses.replace(
        cfg,
        master_address=a.master,
        metadata_server=a.metadata_url,
        queue_address=a.queue,
        holder_address=a.holder,
    )
    with start_services(external, "attached", tmp_path) as handle:
        assert handle.processes == []
        client = handle.addresses.connect_store(external)
        client.put([("attached/x", torch.arange(10))])
        assert torch.equal(
            client.get([TensorMeta("attached/x", (10,), "int64")])[0], torch.arange(10)
        )
        client.remove(["attached/x"])
        client.close()
        assert handle.addresses.connect_queue().gate_open()


def test_stop_ends_every_process_it_started(cfg, tmp_path):
    handle = start_services(cfg, "stop-me", tmp_path)
    pids = [p.pid for p in handle.processes]
    assert len(pids) == 3 and all(p.alive() for p in handle.processes)
    handle.stop()
    handle.stop()  # idempotent
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    assert (tmp_path / "mooncake-master.log").stat().st_size > 0  # logs captured


def _children() -> list[tuple[int, str]]:
    """Live (not zombie) child processes of this test process: (pid, command line)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            status = (p / "status").read_text()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if int(fields.get("PPid", "0")) == os.getpid() and not fields.get("State", "").startswith(
            "Z"
        ):
            out.append((int(p.name), cmd))
    return out


def test_failure_during_startup_stops_what_was_started(tmp_path):
    # A holder that cannot get its memory dies at startup; master + metadata must not leak.
    huge = TransferConfig(global_segment_mb=1 << 30, byte_budget_mb=64, connect_timeout_s=5.0)
    before = set(_children())
    with pytest.raises(ServiceError, match="holder"):
        start_services(huge, "doomed", tmp_path)
    leaked = [c for c in _children() if c not in before and "mooncake" in c[1]]
    assert not leaked


def test_close_waits_for_the_client_lock_only_until_its_deadline(services, cfg):
    client = services.addresses.connect_store(dataclasses.replace(cfg, close_timeout_s=0.3))
    held, release = threading.Event(), threading.Event()

    def stuck_reader():  # a prefetch thread inside a store call that does not return
        with client.lock:
            held.set()
            release.wait(30)

    reader = threading.Thread(target=stuck_reader)
    reader.start()
    try:
        assert held.wait(10)
        with pytest.raises(ServiceError, match=r"held its lock for 0s.*transfer.close_timeout_s"):
            client.close()
    finally:
        release.set()
        reader.join(10)
    client.close()  # the lock is free now: the store really closes
    client.close()  # and again is a no-op
    assert client._closed
