"""The poll loop of an I/O thread, written once for the broker, worker and client runtimes.

One turn: read the clock; run the machine's timers (only once every message that has arrived is
read: a heartbeat waiting in a socket must not let a live peer expire after a long batch or a
stall); wait for a socket, the mailbox or the next deadline; read what is ready, in bounded
batches; drain the mailbox. Sockets are given as functions that return the current one, because a
DEALER is replaced at every failover.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from zmqdist.clock import Clock, reader
from zmqdist.transport import wire
from zmqdist.transport.mailbox import Mailbox
from zmqdist.transport.sockets import poll_timeout_ms
from zmqdist.transport.wire import Poller

RETRY_MS: Final = 20  # how soon a loop with unsent messages (no connection yet) tries again
PAUSE_S: Final = 0.2  # a wait that ends this much later than asked for, or a turn's work this long: the
# thread did not run (SIGSTOP, or starved): its peers' silence meanwhile proves nothing
WATCH_MS: Final = 250  # the longest wait of a loop that watches for its own pauses: a stop inside a
# wait is seen only by how far it overran it. A broker with nothing due waited up to a second, and a
# stall of about a ttl (a VM's live migration) that ended just past a member's expiry went unseen:
# the member, stalled too, was expired on the resume (3 stalls in 60 of 0.7-1.3 s, its runs twice)
DEBUG_RECHECK_S: Final = 1.0  # how often a DebugCheck asks its logger again


Pollable = Callable[[], Any]  # returns a zmq socket, a file descriptor, or None (nothing to watch now)
Reader = Callable[[float], bool]  # reads a bounded batch at ``now``; True when messages may still wait


class DebugCheck:
    """Whether ``logger`` logs at DEBUG (a loop then traces every message), asked again at most
    every DEBUG_RECHECK_S: Logger.isEnabledFor is an interpreted call (about 1,500 instructions),
    and once per wake-up it was a cost of every synchronous request. A level changed at run time
    takes effect within that time."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self.on = logger.isEnabledFor(logging.DEBUG)
        self._at = 0.0

    def at(self, now: float) -> bool:
        """Whether DEBUG is on, asking the logger again if the last answer is old."""
        if now >= self._at:
            self.on = self._log.isEnabledFor(logging.DEBUG)
            self._at = now + DEBUG_RECHECK_S
        return self.on


class Loop:
    """Drives one thread's sockets and mailbox (see the module docstring)."""

    def __init__(self, clock: Clock, mailbox: Mailbox) -> None:
        self._clock = clock
        self._mailbox = mailbox
        self._sources: list[tuple[Pollable, Reader]] = []
        self._polled: list[Any] = []  # what each source returned when the poll set was built
        self._poller: Poller | None = None  # the current sockets, then the mailbox
        self._mail_only = wire.poller([mailbox.fileno()])  # a socket thread's wait while a caller drives
        self._readers: list[Reader] = []  # the reader of each of the poller's sockets, in order
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

    def _poll_set(self) -> Poller:
        """The poller of the current sockets and the mailbox (the last item), made again only when a
        source returns another socket (a failover)."""
        poller = self._poller
        sources = self._sources
        if poller is not None:
            polled = self._polled
            for i in range(len(sources)):
                if sources[i][0]() is not polled[i]:
                    poller = None
                    break
        if poller is None:
            current = [get() for get, _ in sources]
            items: list[Any] = []
            readers: list[Reader] = []
            for s, (_, read) in zip(current, sources, strict=True):
                if s is not None:
                    items.append(s)
                    readers.append(read)
            items.append(self._mailbox.fileno())
            poller = wire.poller(items)
            self._poller, self._polled, self._readers = poller, current, readers
        return poller

    def run(
        self,
        tick: Callable[[float], float | None],
        mail: Callable[[list[Any], float], None],
        stuck: Callable[[], bool] | None = None,
        after: Callable[[float], None] | None = None,
        paused: Callable[[float, float], None] | None = None,
        *,
        hold: threading.Lock | None = None,
        idle: Callable[[], bool] | None = None,
        until: Callable[[], bool] | None = None,
        before_wait: Callable[[], None] | None = None,
    ) -> None:
        """Turn until :meth:`stop`. ``tick(now)`` runs the timers and returns the next deadline;
        ``mail(items, now)`` handles the mailbox; ``stuck()`` says messages wait for a connection
        (retry soon); ``after(now)`` runs after every wake-up (a pair's replication flush);
        ``paused(seconds, now)`` is told when a wait ended much later than asked (the thread was
        stopped), before anything that arrived meanwhile is read, and when a turn's work took that
        long (stopped while it worked, or starved), before the next ``tick`` (or, for the timers'
        own work, before the wait); ``before_wait()``
        runs last before every wait (a worker wakes its handler threads there, so that they find
        the GIL free once the wait lets go of it).

        Two threads can take turns driving one loop (a client's socket thread, and a caller of
        ``Client.call`` that sends its request and waits for the reply itself: no thread hand-off).
        The socket thread holds ``hold`` while it drives; when ``idle()`` says nothing waits for an
        answer (and nothing waits for a connection), it lets go of it for its wait, which then
        watches only the mailbox and the next deadline, and once it holds it again reads every
        socket before the timers run. A caller that took ``hold`` runs the loop with ``until``: it
        returns once ``until()`` is true."""
        clock_now = reader(self._clock)
        mail_only = self._mail_only
        backlog = False
        mark = clock_now()  # when the last wait ended
        while not self._stopped:
            if until is not None and until():
                return
            now = clock_now()
            if paused is not None and now - mark > PAUSE_S:
                paused(now - mark, now)
            timeout = 0
            if not backlog:
                timeout = poll_timeout_ms(tick(now), now)
                if self._stopped:
                    return
                if timeout > WATCH_MS and paused is not None:
                    timeout = WATCH_MS
            waiting = stuck is not None and stuck()
            if waiting:
                timeout = min(timeout, RETRY_MS)
            if before_wait is not None:
                before_wait()
            t0 = clock_now() if paused is not None else now
            if paused is not None and t0 - now > PAUSE_S:
                # Stopped in the tick or before_wait(): neither the wait's lateness nor the next
                # turn's start sees it (the mark moves on at the wait's end). Unsaid, the next tick
                # took the pause for the broker's silence (a worker of a stalled host failed over).
                paused(t0 - now, t0)
            if hold is not None and idle is not None and not backlog and not waiting and idle():
                hold.release()  # a caller may drive the sockets during this wait
                try:
                    mail_only.poll(timeout)
                    late = clock_now() - t0 - timeout / 1000
                finally:
                    hold.acquire()
                mark = now = clock_now()
                if paused is not None and late > PAUSE_S:
                    paused(late, now)
                backlog = True  # read whatever came meanwhile before the next timers
                continue
            ready = self._poll_set().poll(timeout)
            now = clock_now()
            if paused is not None and (late := now - t0 - timeout / 1000) > PAUSE_S:
                paused(late, now)
            mark = now
            backlog = False
            mail_ready = False
            readers = self._readers
            for i in ready:
                if i < len(readers):
                    if readers[i](now):
                        backlog = True
                    now = clock_now()
                else:
                    mail_ready = True
            if after is not None:
                after(now)
            if mail_ready:
                mail(self._mailbox.drain(), now)
