"""Helpers shared by the unit tests that run real handler threads or an event loop."""

from __future__ import annotations

import select
import time
from typing import Any

from zmqdist.transport import Mailbox


def drained(mailbox: Mailbox, n: int, wait: float = 5.0) -> list[Any]:
    """Wait (at most ``wait`` s) for ``n`` items posted to ``mailbox``, on its descriptor (no sleep)."""
    items: list[Any] = []
    end = time.monotonic() + wait
    while len(items) < n and (left := end - time.monotonic()) > 0:
        select.select([mailbox.fileno()], [], [], left)
        items += mailbox.drain()
    return items
