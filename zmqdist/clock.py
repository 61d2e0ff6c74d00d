"""Clocks. The only module of zmqdist that reads time; the I/O loops ask a :class:`Clock`.

Core machines never read a clock: they are handed ``now`` (float seconds, monotonic).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of monotonic time in float seconds."""

    def now(self) -> float:
        """Return the current time in seconds; never goes backwards."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic``."""

    def now(self) -> float:
        return time.monotonic()


def thread_cpu_time() -> float:
    """Return the calling thread's CPU seconds (a broker reports its loop thread's in status)."""
    return time.thread_time()
