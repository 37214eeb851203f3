"""A local Prefect stack for the deployments mode: server, work pools, one worker per pool, and
the deployments of ``prefect.yaml`` - started together, stopped together, by PID.

    python deployments/local_stack.py start   # make serve
    python deployments/local_stack.py stop    # make stop
    python deployments/local_stack.py status

``start`` returns once everything answers and leaves the processes running (in their own process
groups, logs under the state dir); ``stop`` stops exactly the processes recorded by ``start`` -
each checked against its recorded start time, so a reused PID is never signalled. Python callers
(tests) use ``start_stack(...)`` and the returned ``LocalStack.stop()``.

Everything binds 127.0.0.1. ``PREFECT_HOME`` is the caller's (default ``~/.prefect``), so runs of
``make demo`` (Prefect's ephemeral server, same database) also show up in this UI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from spec_core.utils.procs import ProcessGroup, group_alive, signal_group

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO / "outputs" / "prefect-stack"
STATE_FILE = "stack.json"


class StackError(RuntimeError):
    """The stack could not be started (the message names the failing step and its log)."""


@dataclass
class Proc:
    name: str
    pid: int
    start_ticks: Optional[int]  # /proc/<pid>/stat field 22: tells a reused PID apart
    log: str
    stop_signal: int


@dataclass
class LocalStack:
    api_url: str
    state_dir: str
    pools: list[str]
    deployments: list[str]
    processes: list[Proc] = field(default_factory=list)

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def env(self) -> dict[str, str]:
        """Environment for clients of this stack (CLI, tests)."""
        return stack_env(self.api_url)

    def save(self) -> Path:
        path = Path(self.state_dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, state_dir: Path) -> Optional[LocalStack]:
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data["processes"] = [Proc(**p) for p in data["processes"]]
        return cls(**data)

    def stop(self, timeout_s: float = 15.0) -> list[str]:
        """Stop each recorded process's whole group (its children too), all at once; SIGKILL
        what is left after ``timeout_s``. Returns the names of the processes stopped.

        Only groups whose leader is alive and is still the process we started are signalled:
        from then on the group id stays ours for as long as any member lives."""
        ours = [proc for proc in self.processes if _alive(proc)]
        for proc in ours:
            signal_group(proc.pid, proc.stop_signal)
        deadline = time.monotonic() + timeout_s
        for proc in ours:
            while group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if group_alive(proc.pid):
                signal_group(proc.pid, signal.SIGKILL)
        (Path(self.state_dir) / STATE_FILE).unlink(missing_ok=True)
        return [proc.name for proc in ours]


def stack_env(api_url: str, worker_poll_s: float = 2.0) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": str(worker_poll_s),
        "PYTHONUNBUFFERED": "1",
    }


def _start_ticks(pid: int) -> Optional[int]:
    """Start time of a live process (None when gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _alive(proc: Proc) -> bool:
    ticks = _start_ticks(proc.pid)
    if ticks is None:
        return False
    if proc.start_ticks is not None and ticks != proc.start_ticks:
        return False  # the PID now belongs to another process
    return True


def _spawn(
    name: str, argv: list[str], env: dict[str, str], log_dir: Path, stop_signal: int
) -> Proc:
    log = log_dir / f"{name}.log"
    with log.open("ab") as fh:
        group = ProcessGroup.start(
            argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Proc(name, group.pid, _start_ticks(group.pid), str(log), stop_signal)


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.read().strip() == b"true"
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(api_url: str, server: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _healthy(api_url):
            return
        if not _alive(server):
            raise StackError(f"prefect server exited during startup; log: {server.log}")
        time.sleep(0.5)
    raise StackError(f"prefect server did not answer within {timeout_s:.0f}s; log: {server.log}")


def project_pools_and_deployments(prefect_yaml: Path) -> tuple[list[str], list[str]]:
    """Work pools and ``flow/deployment`` names declared in prefect.yaml."""
    spec = yaml.safe_load(prefect_yaml.read_text())
    pools, names = [], []
    for dep in spec["deployments"]:
        pool = dep["work_pool"]["name"]
        if pool not in pools:
            pools.append(pool)
        names.append(dep["name"])
    return pools, names


def create_pools(api_url: str, pools: list[str]) -> None:
    """Process work pools with Prefect's default process job template (idempotent)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    async def create() -> None:
        template = ProcessWorker.get_default_base_job_template()
        async with get_client() as client:
            for name in pools:
                pool = WorkPoolCreate(name=name, type="process", base_job_template=template)
                try:
                    await client.create_work_pool(pool)
                except ObjectAlreadyExists:
                    pass

    with temporary_settings({PREFECT_API_URL: api_url}):
        asyncio.run(create())


def _run_checked(argv: list[str], api_url: str, what: str) -> None:
    proc = subprocess.run(
        argv, cwd=REPO, env=stack_env(api_url), capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise StackError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def start_stack(
    state_dir: Path = DEFAULT_STATE_DIR,
    port: int = 4200,
    worker_poll_s: float = 2.0,
    prefect_yaml: Path = REPO / "prefect.yaml",
    timeout_s: float = 120.0,
) -> LocalStack:
    """Server, pools, workers and deployments; on any failure, stops what it started."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = LocalStack.load(state_dir)
    if existing is not None and any(_alive(p) for p in existing.processes):
        raise StackError(f"a stack is already running ({existing.ui_url}); stop it first")
    api_url = f"http://127.0.0.1:{port}/api"
    env = stack_env(api_url, worker_poll_s)
    pools, deployments = project_pools_and_deployments(prefect_yaml)
    stack = LocalStack(api_url, str(state_dir), pools, deployments)
    try:
        server = _spawn(
            "server",
            _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port)),
            env,
            state_dir,
            signal.SIGTERM,
        )
        stack.processes.append(server)
        stack.save()
        _wait_healthy(api_url, server, timeout_s)
        create_pools(api_url, pools)
        for pool in pools:
            stack.processes.append(
                _spawn(
                    f"worker-{pool}",
                    _prefect(
                        "worker",
                        "start",
                        "--pool",
                        pool,
                        "--type",
                        "process",
                        "--name",
                        f"specflow-{pool}",
                    ),
                    env,
                    state_dir,
                    signal.SIGINT,  # workers ignore SIGTERM for a long while
                )
            )
        stack.save()
        _run_checked(
            _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_yaml)),
            api_url,
            "prefect deploy --all",
        )
    except BaseException:
        stack.stop()
        raise
    return stack


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--worker-poll-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.command == "start":
        try:
            stack = start_stack(args.state_dir, args.port, args.worker_poll_s)
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"Prefect UI: {stack.ui_url}")
        print(f"work pools: {', '.join(stack.pools)}; deployments: {', '.join(stack.deployments)}")
        print(f"logs: {stack.state_dir}")
        print(f"use it:  export PREFECT_API_URL={stack.api_url}")
        print(
            "run:     prefect deployment run speculative-training/speculative-training "
            "-p config_path=configs/smollm2-chitchat.yaml --watch"
        )
        return 0
    stack = LocalStack.load(args.state_dir)
    if stack is None:
        print("no local stack recorded in", args.state_dir)
        return 0
    if args.command == "status":
        for proc in stack.processes:
            print(f"{proc.name:<24} pid {proc.pid:<8} {'running' if _alive(proc) else 'gone'}")
        print(f"UI: {stack.ui_url}")
        return 0
    stopped = stack.stop()
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
