"""The poll loop of an I/O thread, written once for the broker, worker and client runtimes.

One turn: read the clock; run the machine's timers (only once every message that has arrived is
read: a heartbeat waiting in a socket must not let a live peer expire after a long batch or a
stall); wait for a socket, the mailbox or the next deadline; read what is ready, in bounded
batches; drain the mailbox. Sockets are given as functions that return the current one, because a
DEALER is replaced at every failover.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from zmqdist.clock import Clock
from zmqdist.transport.mailbox import Mailbox
from zmqdist.transport.sockets import poll_timeout_ms

RETRY_MS = 20  # how soon a loop with unsent messages (no connection yet) tries again
PAUSE_S = 0.2  # a wait that ends this much later than asked for: the thread did not run (SIGSTOP)

Pollable = Callable[[], Any]  # returns a zmq socket, a file descriptor, or None (nothing to watch now)
Reader = Callable[[float], bool]  # reads a bounded batch at ``now``; True when messages may still wait


class Loop:
    """Drives one thread's sockets and mailbox (see the module docstring)."""

    def __init__(self, clock: Clock, mailbox: Mailbox) -> None:
        self._clock = clock
        self._mailbox = mailbox
        self._sources: list[tuple[Pollable, Reader]] = []
        self._polled: list[Any] = []
        self._poller: zmq.Poller | None = None
        self._stopped = False

    def watch(self, pollable: Pollable, read: Reader) -> None:
        """Call ``read(now)`` when what ``pollable()`` returns is readable."""
        self._sources.append((pollable, read))
        self._poller = None

    def stop(self) -> None:
        """End :meth:`run` after the current turn (call from the loop's own thread)."""
        self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _poll_set(self) -> tuple[zmq.Poller, list[Any]]:
        current = [get() for get, _ in self._sources]
        if self._poller is None or any(a is not b for a, b in zip(current, self._polled, strict=True)):
            poller = zmq.Poller()
            for s in current:
                if s is not None:
                    poller.register(s, zmq.POLLIN)
            poller.register(self._mailbox.fileno(), zmq.POLLIN)
            self._poller, self._polled = poller, current
        return self._poller, current

    def run(
        self,
        tick: Callable[[float], float | None],
        mail: Callable[[list[Any], float], None],
        stuck: Callable[[], bool] | None = None,
        after: Callable[[float], None] | None = None,
        paused: Callable[[float, float], None] | None = None,
    ) -> None:
        """Turn until :meth:`stop`. ``tick(now)`` runs the timers and returns the next deadline;
        ``mail(items, now)`` handles the mailbox; ``stuck()`` says messages wait for a connection
        (retry soon); ``after(now)`` runs after every wake-up (a pair's replication flush);
        ``paused(seconds, now)`` is told when a wait ended much later than asked (the thread was
        stopped), before anything that arrived meanwhile is read."""
        clock = self._clock
        mailbox_fd = self._mailbox.fileno()
        backlog = False
        while not self._stopped:
            now = clock.now()
            timeout = 0
            if not backlog:
                timeout = poll_timeout_ms(tick(now), now)
                if self._stopped:
                    return
            if stuck is not None and stuck():
                timeout = min(timeout, RETRY_MS)
            poller, current = self._poll_set()
            t0 = clock.now()
            events = dict(poller.poll(timeout))
            if paused is not None and (late := clock.now() - t0 - timeout / 1000) > PAUSE_S:
                paused(late, clock.now())
            backlog = False
            for sock, (_, read) in zip(current, self._sources, strict=True):
                if sock is not None and sock in events and read(clock.now()):
                    backlog = True
            if after is not None:
                after(clock.now())
            if mailbox_fd in events:
                mail(self._mailbox.drain(), clock.now())
