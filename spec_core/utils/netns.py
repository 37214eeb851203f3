"""Simulated hosts on one machine: Linux network namespaces joined by a private bridge.

Why: multi-host behaviour (rendezvous across hosts, bytes crossing a network, a host dying) has to
be shown without a cluster. Each simulated host is a network namespace of its own with one veth
interface (``eth0``) plugged into a bridge that lives in a further namespace (the "switch"), so
traffic between hosts really crosses veth pairs and the switch-side interface counters count every
byte a host sent or received. Nothing touches the caller's own namespace: the addresses are used
only inside the namespaces this class creates, and everything is deleted on exit (processes still
running inside a host are killed by PID first). See docs/architecture.md §simulated-hosts.

Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and the ``ip`` tool; ``available()`` says whether
this machine can, and why not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from typing import Optional

# 10.77.0.0/24 lives only inside namespaces we create; hosts get .1, .2, ...
SUBNET_PREFIX = "10.77.0."
HOST_IFACE = "eth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def available() -> tuple[bool, str]:
    """(True, "") when namespaces can be created here, else (False, the reason)."""
    if shutil.which("ip") is None:
        return False, "the `ip` tool (iproute2) is not installed"
    probe = f"sf-probe-{uuid.uuid4().hex[:8]}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return False, f"`ip netns add` failed: {result.stderr.strip() or result.returncode}"
    _ip("netns", "del", probe, check=False)
    return True, ""


@dataclass
class SimHost:
    """One simulated host: its namespace, its address on the bridge, and the switch-side port."""

    name: str
    netns: str
    address: str
    switch_port: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host (``ip netns exec`` execs it: the PID is the command's)."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class SimCluster:
    """A bridge plus ``hosts``; use as a context manager so teardown always runs."""

    host_names: list[str]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: dict[str, SimHost] = field(default_factory=dict)
    _created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"sf-{self.tag}-sw"

    def __enter__(self) -> SimCluster:
        try:
            self._add_netns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for index, name in enumerate(self.host_names, start=1):
                self.hosts[name] = self._add_host(name, index)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_netns(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._created.append(netns)

    def _add_host(self, name: str, index: int) -> SimHost:
        netns = f"sf-{self.tag}-{name}"
        port = f"p{index}-{self.tag}"  # switch-side veth; names are limited to 15 characters
        address = f"{SUBNET_PREFIX}{index}"
        self._add_netns(netns)
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", HOST_IFACE,
            "netns", netns)  # fmt: skip
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", HOST_IFACE)
        _ip("-n", netns, "link", "set", HOST_IFACE, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        return SimHost(name=name, netns=netns, address=address, switch_port=port)

    def port_bytes(self) -> dict[str, dict[str, int]]:
        """Per host: bytes it sent (``tx``) and received (``rx``), read on the switch side."""
        out = _ip("-n", self.switch, "-s", "-j", "link", "show").stdout
        by_port = {link["ifname"]: link.get("stats64", {}) for link in json.loads(out)}
        counts = {}
        for name, host in self.hosts.items():
            stats = by_port.get(host.switch_port, {})
            # The switch port receives what the host sends, and transmits what the host receives.
            counts[name] = {
                "tx": int(stats.get("rx", {}).get("bytes", 0)),
                "rx": int(stats.get("tx", {}).get("bytes", 0)),
            }
        return counts

    def pids(self, host: SimHost) -> list[int]:
        result = _ip("netns", "pids", host.netns, check=False)
        return [int(p) for p in result.stdout.split() if p.strip().isdigit()]

    def close(self) -> None:
        """Kill whatever still runs inside our hosts (by PID), then delete every namespace."""
        for netns in self._created:
            result = _ip("netns", "pids", netns, check=False)
            for pid_text in result.stdout.split():
                _kill(int(pid_text))
        for netns in reversed(self._created):
            _ip("netns", "del", netns, check=False)
        self._created.clear()


def _kill(pid: int) -> None:
    if pid == os.getpid():
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def host_env(host: SimHost, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Environment for processes on ``host``: gloo and our servers use its bridge interface."""
    env = dict(os.environ if base is None else base)
    env["GLOO_SOCKET_IFNAME"] = HOST_IFACE
    return env
