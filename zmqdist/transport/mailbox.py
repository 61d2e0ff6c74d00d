"""A cross-thread mailbox: a deque plus a self-pipe that a poller can wait on.

Any thread may ``post``; only the owning I/O thread ``drain``s. A self-pipe (not an inproc zmq
socket) so that foreign threads, executor callbacks included, can post without owning a socket.
Only the first post after a drain writes a wake-up byte, so a busy loop pays no syscall per item.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any, Final

# os.read as a C static: compiled, ``os.read`` is a module getattr at every call (about 330
# instructions), and a mailbox reads at every wake-up of its thread. (A post's write stays
# ``os.write``: a test watches it, and only the first post after a drain writes.)
_read: Final = os.read


class Mailbox:
    """Thread-safe inbox for one I/O thread."""

    def __init__(self) -> None:
        self._q: deque[Any] = deque()
        self._append = self._q.append  # bound once (see drain)
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._armed = False
        self._closed = False
        # Held by a wake-up write and by close: a post that saw the mailbox open cannot write
        # its byte after close() gave the descriptor numbers back (another file may have them).
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """The descriptor that becomes readable when items wait."""
        return self._r

    def post(self, item: Any) -> None:
        """Queue ``item`` and wake the owner (from any thread). Ignored once the mailbox is closed:
        its descriptor numbers may already belong to another file."""
        if self._closed:
            return
        self._append(item)
        if not self._armed:
            self._arm()

    def post_all(self, items: list[Any]) -> None:
        """Queue ``items`` in order, with one wake-up of the owner for all of them (a thread that
        posts a batch of outcomes wakes the owner once, when the batch is whole)."""
        if self._closed:
            return
        self._q.extend(items)
        if not self._armed:
            self._arm()

    def _arm(self) -> None:
        """The first post after a drain: write the wake-up byte."""
        self._armed = True
        # Only the first post after a drain pays for the lock. acquire and release by name, not
        # ``with``: compiled, ``with`` looks __enter__ and __exit__ up on the type and calls them
        # generically (about 400 instructions more, once per handler thread's task).
        lock = self._lock
        lock.acquire()
        try:
            if not self._closed:
                os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full: the owner wakes anyway
        finally:
            lock.release()

    def pending(self) -> bool:
        """Whether items wait (a glance from any thread: a post may follow at once)."""
        return bool(self._q)

    def drain(self) -> list[Any]:
        """Return every queued item (owner thread only)."""
        try:
            _read(self._r, 65536)
        except (BlockingIOError, OSError):
            pass
        self._armed = False  # disarm before draining: a post racing with us re-arms and wakes
        q = self._q
        pop = q.popleft  # bound once: by name, each item's call looks the method up again
        items = []
        while q:
            items.append(pop())
        return items

    def close(self) -> None:
        """Release the pipe (owner thread, after its loop ended)."""
        with self._lock:  # waits for a wake-up write in progress
            if not self._closed:
                self._closed = True
                os.close(self._r)
                os.close(self._w)
