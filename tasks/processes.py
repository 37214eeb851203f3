"""What a flow run started, so its hooks can stop it, and its processes' logs, forwarded to Prefect.

Tasks start services, producers and torchrun as separate processes and stop them in ``finally``.
That does not run when the flow run is cancelled or crashes while a coroutine is suspended, so
each handle is also registered here and the flows' ``on_failure`` / ``on_cancellation`` /
``on_crashed`` hooks stop whatever is left - by process group id, through the handle's own
``stop()`` (``spec_core.utils.procs.ProcessGroup`` for the processes we spawn).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from prefect import flow

from spec_core.utils.logs import line_level


class Stoppable(Protocol):
    def stop(self) -> Any: ...


class OwnedProcesses:
    """Handles with ``stop()``, grouped by the flow run that started them (this process only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_run: dict[str, list[Stoppable]] = {}

    def add(self, flow_run_id: str, handle: Stoppable) -> None:
        with self._lock:
            self._by_run.setdefault(flow_run_id, []).append(handle)

    def discard(self, flow_run_id: str, handle: Stoppable) -> None:
        with self._lock:
            handles = self._by_run.get(flow_run_id, [])
            if handle in handles:
                handles.remove(handle)

    def stop_run(self, flow_run_id: str) -> int:
        """Stop what ``flow_run_id`` registered, newest first; returns how many."""
        with self._lock:
            handles = self._by_run.pop(flow_run_id, [])
        for handle in reversed(handles):
            handle.stop()
        return len(handles)

    def stop_all(self) -> int:
        with self._lock:
            runs = list(self._by_run)
        return sum(self.stop_run(run) for run in runs)

    def count(self) -> int:
        with self._lock:
            return sum(len(h) for h in self._by_run.values())


OWNED = OwnedProcesses()


class LogTail:
    """Forwards the new complete lines of a process's log file to a logger, on each ``pump()``:
    native lines at their own level, Mooncake's start-up noise and glog INFO not at all
    (``spec_core.utils.logs.line_level``)."""

    def __init__(self, path: Path, logger: logging.Logger | logging.LoggerAdapter, prefix: str):
        self.path = Path(path)
        self.logger = logger
        self.prefix = prefix
        self._offset = 0
        self._partial = ""

    def pump(self, final: bool = False) -> int:
        try:
            with self.path.open("r", encoding="utf-8", errors="replace", newline="") as fh:
                fh.seek(self._offset)
                text = fh.read()
                self._offset = fh.tell()
        except FileNotFoundError:
            return 0
        text = self._partial + text
        lines = text.split("\n")
        self._partial = "" if final else lines.pop()
        sent = 0
        for line in lines:
            line = line.rsplit("\r", 1)[-1].rstrip()  # progress bars: keep the last redraw
            level = line_level(line)
            if level is not None:
                self.logger.log(level, "%s%s", self.prefix, line)
                sent += 1
        return sent


def stop_owned_by_run(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (failure, cancellation, crash): stop what this flow run started."""
    OWNED.stop_run(str(flow_run.id))


def stop_all_owned(flow: Any, flow_run: Any, state: Any) -> None:
    """Parent flow hook: stop everything this process started, its subflows' processes too."""
    OWNED.stop_all()


def process_owning_flow(
    stop: Callable[[Any, Any, Any], None],
    extra_hooks: tuple[Callable[[Any, Any, Any], None], ...] | list = (),
    **options: Any,
) -> Any:
    """``@flow`` for a run that starts processes: its JSON result persisted, and ``stop`` (one of
    the hooks above), then ``extra_hooks``, run on failure, cancellation and crash alike."""
    hooks = [stop, *extra_hooks]
    return flow(
        persist_result=True,
        result_serializer="json",
        on_failure=hooks,
        on_cancellation=hooks,
        on_crashed=hooks,
        **options,
    )
