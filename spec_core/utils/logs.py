"""What our child processes print, made fit for a terminal: native noise filtered, progress timed.

Mooncake logs through glog (``E1207 22:47:48.632809  9946 file.cpp:292] message``). Its clients
are quiet at ``MC_LOG_LEVEL=WARNING`` (Mooncake 0.3.13 reads it when the transfer engine loads its
config and sets glog's ``minloglevel``; it knows INFO, WARNING and ERROR only), but two lines
still come at every normal client start, written before glog is initialised: the client looks its
own segment up in the metadata server before it registers it, so the lookup answers 404 ("metadata
not found", an E line) and the engine says so again ("Failed to retrieve segment descriptor", a W
line). Those lines are dropped from what reaches the terminal and the Prefect UI (they stay in the
process's log file); every other native W/E/F line is forwarded at its own level, so a real error
still surfaces. HF progress bars in child processes are switched off the same way (their redraws
fill a log with half-lines).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Optional

# Environment for processes we start (producers, torchrun, Mooncake servers and holder).
CHILD_LOG_ENV = {"MC_LOG_LEVEL": "WARNING", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

_GLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")
_LEVELS = {"I": None, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
# Normal start-up of every Mooncake client (see the module docstring); matched on the message.
STARTUP_NOISE = (
    re.compile(r"^WARNING: Logging before InitGoogleLogging\(\) is written to STDERR$"),
    re.compile(r"transfer_metadata_plugin\.cpp:\d+\] GET \S+ http=404 body: metadata not found$"),
    re.compile(r"transfer_metadata\.cpp:\d+\] Failed to retrieve segment descriptor, name \S+$"),
)


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment with the quiet-logging settings (an explicit setting wins)."""
    return {**CHILD_LOG_ENV, **os.environ, **(extra or {})}


def line_level(line: str) -> Optional[int]:
    """The logging level to forward a child's output line at; None = drop it (glog INFO, the
    start-up noise above, blank lines)."""
    text = line.strip()
    if not text or any(p.search(text) for p in STARTUP_NOISE):
        return None
    native = _GLOG.match(text)
    if native:
        return _LEVELS[native.group(1)]
    return logging.INFO


def format_duration(seconds: float) -> str:
    """``1h02m``, ``12m05s``, ``42s``: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class RateMeter:
    """Rate and ETA of a counted job (steps, conversations) since the meter started; ``due``
    says when the next progress line is owed (every ``every`` units or ``every_s`` seconds)."""

    def __init__(
        self, total: int, start: int = 0, every: int = 0, every_s: float = 0.0, unit: str = "it"
    ) -> None:
        self.total, self.start, self.unit = total, start, unit
        self.every, self.every_s = every, every_s
        self.started = time.monotonic()
        self._last_count, self._last_time = start, self.started

    def due(self, done: int) -> bool:
        if done >= self.total and self._last_count < self.total:
            return True
        if done <= self._last_count:
            return False
        by_count = self.every > 0 and done // self.every > self._last_count // self.every
        by_time = self.every_s > 0 and time.monotonic() - self._last_time >= self.every_s
        return by_count or by_time

    def line(self, done: int) -> str:
        """``120/900 (13%) 2.41 steps/s ETA 5m24s``; marks the line as given."""
        now = time.monotonic()
        self._last_count, self._last_time = done, now
        rate = (done - self.start) / max(now - self.started, 1e-9)
        left = max(self.total - done, 0)
        eta = format_duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * done / max(self.total, 1)
        return f"{done}/{self.total} ({pct:.0f}%) {rate:.2f} {self.unit}/s ETA {eta}"
