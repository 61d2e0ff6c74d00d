"""heapq's functions as compiled code reaches them fastest, and :class:`Due`, the deadlines of a
table's entries.

Compiled code reads an imported name (``from heapq import heappush``) from the module's dict at
every call, about 100 instructions; a Final is a C static. The per-request code pushes and pops
a heap several times a request (deadlines, member loads, timers).
"""

from __future__ import annotations

import heapq
from typing import Any, Final

heapify: Final = heapq.heapify
heappop: Final = heapq.heappop
heappush: Final = heapq.heappush
heapreplace: Final = heapq.heapreplace


def taken(items: list[Any], head: int) -> int:
    """``items`` before ``head`` have been taken (a list used from the index of its head on, as
    :class:`Due`, ``records.Queue`` and ``records.Deadlines`` use theirs): the new head, once the
    front is cut off when it is at least half the list, or the whole list cleared when nothing is
    left."""
    if head == len(items):
        items.clear()
        return 0
    if head >= 64 and 2 * head >= len(items):
        del items[:head]
        return 0
    return head


class Due:
    """When each entry of ``live`` (a table by key: a worker's runs, a client's pending requests)
    is due, earliest first. Most entries come with their deadlines in order (one timeout for
    all): those go at the end of two lists (deadline, key), and each push drops up to two keys at
    the head that ``live`` no longer holds. Only an earlier deadline than the last goes in a heap
    of (deadline, key): a heap push, its tuple and its compares cost about 700 instructions, and
    a request made one. A key given out may no longer be live, or live again with another
    deadline: its owner checks. Swept when more than 2x ``live`` + ``slack`` entries are kept."""

    __slots__ = ("_head", "_heap", "_keys", "_last", "_live", "_slack", "_when")

    def __init__(self, live: dict[Any, Any], slack: int) -> None:
        self._live = live
        self._slack = slack
        self._when: list[float] = []  # from _head on: in order
        self._keys: list[Any] = []  # their keys
        self._head = 0
        self._last = float("-inf")  # the latest deadline in _when
        self._heap: list[tuple[float, Any]] = []

    def __len__(self) -> int:
        return len(self._keys) - self._head + len(self._heap)

    def push(self, deadline: float, key: Any) -> None:
        """``live[key]`` is due at ``deadline``."""
        if deadline < self._last:
            heappush(self._heap, (deadline, key))
        else:
            keys = self._keys
            self._when.append(deadline)
            keys.append(key)
            self._last = deadline
            head = self._head
            live = self._live
            if keys[head] not in live:
                head += 1
                if head < len(keys) and keys[head] not in live:
                    head += 1
                self._take(head)
        if len(self) > 2 * len(self._live) + self._slack:
            self.sweep()

    def _take(self, head: int) -> None:
        """The lists' entries before ``head`` are gone (cut off as :func:`taken` says)."""
        new = taken(self._keys, head)
        if new != head:  # the keys' front was cut off, or the list cleared: the deadlines' too
            if self._keys:
                del self._when[:head]
            else:
                self._when.clear()
                self._last = float("-inf")
        self._head = new

    def first(self) -> float | None:
        """The earliest deadline, or None."""
        heap, head = self._heap, self._head
        d = heap[0][0] if heap else None
        if head < len(self._keys):
            w = self._when[head]
            if d is None or w < d:
                d = w
        return d

    def pop_due(self, now: float) -> Any:
        """Take out the earliest entry due at or before ``now``: its key, or None when none is."""
        heap, head = self._heap, self._head
        if head < len(self._keys):
            w = self._when[head]
            if w <= now and not (heap and heap[0][0] < w):
                key = self._keys[head]
                self._take(head + 1)
                return key
        if heap and heap[0][0] <= now:
            return heappop(heap)[1]
        return None

    def sweep(self) -> None:
        """Keep only the entries whose keys ``live`` holds."""
        live, head = self._live, self._head
        kept = [(w, k) for w, k in zip(self._when[head:], self._keys[head:], strict=True) if k in live]
        self._when = [w for w, _ in kept]
        self._keys = [k for _, k in kept]
        self._head = 0
        self._last = self._when[-1] if kept else float("-inf")
        self._heap = [e for e in self._heap if e[1] in live]
        heapify(self._heap)
