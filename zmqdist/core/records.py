"""The records a broker machine is made of: requests, pools, members, destinations, counters. Pure.

Rules of this module:
1. Records keep state and answer questions about themselves; where a request goes, and when it
   ends, is decided in :mod:`zmqdist.core.dispatch` and :mod:`zmqdist.core.tiers`.
2. A member is a type: :class:`WorkerMember` (a worker: ``capacity`` slots) or :class:`BrokerMember`
   (a downstream broker: per-service credit from its adverts). Both answer ``free``, ``entry``,
   ``hold`` and ``release``; code that must tell them apart asks the type, never a flag.
3. A destination is a type too: a peer's ROUTER identity is ``bytes`` (1 to 255 bytes, whatever its
   length); the upstream link, the pair link and the log are :class:`Channel` objects.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from dataclasses import dataclass, fields
from typing import Any, Final

from zmqdist import protocol as p
from zmqdist.core.heaps import heapify, heappop, heappush, taken
from zmqdist.core.link import Connect, Problem

# Module constants are Final: compiled code inlines a Final literal and keeps any other Final in a
# C static, but reads a plain global from the module's dict at every use (about 100 instructions).
EPSILON: Final = 1e-6  # timers fire just past a boundary: alive at ttl, expired at ttl + EPSILON
HOP_MARGIN_MS: Final = 1  # budget every broker-to-broker hop spends at least (transit)
# Where a request is: waiting here, with a member, upstream, or waiting out a retry's backoff.
QUEUED: Final = 0
ASSIGNED: Final = 1
FORWARDED: Final = 2
DELAYED: Final = 3


class Channel:
    """A destination that is not a ROUTER peer: the upstream link, the pair link, the log."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


UPSTREAM: Final = Channel("upstream")  # a proxy's DEALER to its upstream broker
PAIR: Final = Channel("pair")  # the link to the other broker of a backup pair
LOG: Final = Channel("log")  # a Problem for the runtime to log (rate-limited by its key)

Dest = bytes | Channel
Out = tuple[Dest, p.Message | Connect | Problem]
NONE: Final[list[Out]] = []  # a shared empty result; callers never mutate returned lists


@dataclass(slots=True)
class Counters:
    """What a broker counts (``zmqdist status`` and the metrics show every field)."""

    requests: int = 0
    replies_ok: int = 0
    replies_failed: int = 0
    busy: int = 0
    timeouts: int = 0
    lost: int = 0
    invalid: int = 0
    requeues: int = 0
    refused: int = 0
    duplicates: int = 0
    late_results: int = 0
    bogus_results: int = 0
    workers_registered: int = 0
    workers_expired: int = 0
    workers_unreachable: int = 0
    workers_left: int = 0
    bad_input: int = 0
    send_drops: int = 0
    lost_in_transit: int = 0
    brokers_registered: int = 0
    abandoned: int = 0
    loops: int = 0
    forwarded_up: int = 0
    tasks_from_up: int = 0
    refused_up: int = 0
    returned: int = 0
    returned_from_up: int = 0
    upstream_losses: int = 0
    over_quota: int = 0
    refused_by_role: int = 0  # messages a secured peer's key may not send
    handshakes_failed: int = 0  # CURVE handshakes that failed (seen by the runtime's socket monitor)
    redirected: int = 0  # a broker of a pair that is not active sent a peer to the active one
    adopted: int = 0  # requests a new active broker found still held by their member
    mdp_not_taken_over: int = 0  # MDP clients' requests a new active broker left out (core/mdp.py rule 7)
    cancelled: int = 0  # requests their caller cancelled (or gave up on at its deadline) while open here
    interrupted: int = 0  # streams ended because their run was cut after parts had gone out
    restarted: int = 0  # streams run afresh: their caller sent them again holding none of their parts
    retried: int = 0  # runs scheduled again by a retry policy (the handler raised what it retries)
    parts: int = 0  # stream parts relayed
    joined: int = 0  # requests that joined an open one with the same caller key (dedup)
    batches_in: int = 0  # BATCH frames received (each holds several messages)
    batched_in: int = 0  # messages received inside those
    batches_out: int = 0  # BATCH frames made for peers that read them
    batched_out: int = 0  # messages sent inside those
    pauses: int = 0  # times the broker found it had not run for 0.2 s or more (stopped, stalled, starved)
    paused_ms: int = 0  # how long in all: its peers' silence then is not counted (core/link.py, Pauses)

    def ended(self, status: int) -> None:
        """Count a request that ended with ``status`` (a ``protocol.ST_*`` code)."""
        if status == p.ST_OK:
            self.replies_ok += 1
        elif status == p.ST_FAILED:
            self.replies_failed += 1
        elif status == p.ST_BUSY:
            self.busy += 1
        elif status == p.ST_TIMEOUT:
            self.timeouts += 1
        elif status == p.ST_LOST:
            self.lost += 1
        elif status == p.ST_INTERRUPTED:
            self.interrupted += 1
        elif status != p.ST_CANCELLED:  # a cancel is counted when it arrives
            self.invalid += 1

    def as_dict(self) -> dict[str, int]:
        """Every counter by name."""
        return {name: getattr(self, name) for name in COUNTER_NAMES}


COUNTER_NAMES: Final[tuple[str, ...]] = tuple(f.name for f in fields(Counters))

# A member's place in a service's heap: (load fraction, last used, serial, version, member).
HeapEntry = tuple[float, int, int, int, "Member"]


class Member:
    """What a pool holds: something that takes tasks. See :class:`WorkerMember` and :class:`BrokerMember`."""

    __slots__ = (
        "adopted",
        "alive",
        "busy_s",
        "capacity",
        "failed",
        "ident",
        "inflight",
        "last_used",
        "name",
        "seen",
        "seq",
        "serial",
        "served",
        "services",
        "ttl",
        "version",
    )

    def __init__(
        self, ident: bytes, name: str, services: tuple[str, ...], capacity: int, serial: int, now: float, ttl: float
    ) -> None:
        self.ident = ident
        self.name = name
        self.services = services
        self.capacity = capacity
        self.inflight: dict[p.Boxed, p.Boxed] = {}  # ticket -> seq of the task that carried it
        self.last_used = -1
        self.serial = serial
        self.version = 0  # bumped at every change of load: older heap entries are stale
        self.seen = now
        self.ttl = ttl
        self.alive = True
        self.served = 0
        self.failed = 0  # answers whose handler raised: a worker that keeps failing shows here
        self.busy_s = 0.0  # sum of dispatch-to-answer times of what it served
        self.seq = 0
        self.adopted = False  # holds requests adopted at a takeover, not yet confirmed by a heartbeat

    def kind(self) -> str:
        """What it is, plural, for messages ("workers", "brokers")."""
        raise NotImplementedError

    def free(self, service: str) -> int:
        """Tasks of ``service`` it can take now (never negative)."""
        raise NotImplementedError

    def entry(self, service: str) -> HeapEntry | None:
        """Its heap entry for ``service`` now, or None when it can take nothing of it."""
        raise NotImplementedError

    def may_take(self, hops: tuple[str, ...]) -> bool:
        """May it take a request that has passed the brokers ``hops``?"""
        return True

    def hold(self, ticket: p.Boxed, seq: p.Boxed, service: str) -> None:
        """It now holds ``ticket`` (of ``service``), sent with task number ``seq``."""
        raise NotImplementedError

    def adopt(self, ticket: int, service: str) -> None:
        """It holds ``ticket`` from before a takeover (its first heartbeat confirms it)."""
        raise NotImplementedError

    def release(self, ticket: p.Boxed) -> None:
        """It no longer holds ``ticket``."""
        raise NotImplementedError

    def clear(self) -> None:
        """It holds nothing (it died)."""
        self.inflight.clear()

    def task(self, req: Req, seq: p.Boxed, now: float, broker: str) -> p.Task:
        """The TASK that sends ``req`` to it from broker ``broker``."""
        raise NotImplementedError

    def requests_held(self, service: str, n: int) -> None:
        """``n`` more (or fewer) of its own requests of ``service`` are held by this broker."""


class WorkerMember(Member):
    """A worker: ``capacity`` slots. Requests adopted at a takeover (``carried``) run beside its
    declared capacity (it left them out of it), so they do not count against that capacity."""

    __slots__ = ("carried",)

    def __init__(
        self, ident: bytes, name: str, services: tuple[str, ...], capacity: int, serial: int, now: float, ttl: float
    ) -> None:
        super().__init__(ident, name, services, capacity, serial, now, ttl)
        self.carried: set[int] = set()

    def kind(self) -> str:
        return "workers"

    def free(self, service: str) -> int:
        n = self.capacity - len(self.inflight) + len(self.carried)
        return n if n > 0 and self.alive else 0

    def entry(self, service: str) -> HeapEntry | None:
        n = len(self.inflight)
        if self.carried:
            n -= len(self.carried)
        if n >= self.capacity:
            return None
        return (n / self.capacity, self.last_used, self.serial, self.version, self)

    def hold(self, ticket: p.Boxed, seq: p.Boxed, service: str) -> None:
        self.inflight[ticket] = seq

    def adopt(self, ticket: int, service: str) -> None:
        self.inflight[ticket] = 0  # seq 0: reconciled by its first heartbeat
        self.carried.add(ticket)

    def release(self, ticket: p.Boxed) -> None:
        del self.inflight[ticket]
        if self.carried:
            self.carried.discard(ticket)

    def clear(self) -> None:
        self.inflight.clear()
        self.carried.clear()

    def task(self, req: Req, seq: p.Boxed, now: float, broker: str) -> p.Task:
        budget = p.budget_ms_left(req.deadline, now)
        return p.message(
            p.TASK_CLS,
            (
                req.ticket,
                req.service,
                budget,
                req.attempt,
                req.key,
                seq,
                (),
                req.payload,
                req.trace,
                req.window,
                req.retry,
            ),
        )

    def load(self) -> int:
        """Tasks it runs against its declared capacity."""
        return len(self.inflight) - len(self.carried)


class BrokerMember(Member):
    """A downstream broker (a proxy): it takes tasks of a service within the spare capacity it
    advertised (``spare``, valid for one ttl) less the tasks sent since (``load``)."""

    __slots__ = ("adv_at", "down_spare", "held_from", "load", "rtt", "spare", "svc_of")

    def __init__(self, ident: bytes, name: str, serial: int, now: float, ttl: float) -> None:
        super().__init__(ident, name, (), 0, serial, now, ttl)
        self.spare: dict[str, int] = {}  # its ADVERT: what it offers per service
        self.adv_at = now
        self.load: dict[str, int] = {}  # our tasks it holds, per service
        self.svc_of: dict[int, str] = {}  # ticket -> service of our tasks it holds
        self.held_from: dict[str, int] = {}  # its requests we hold, per service
        self.down_spare: tuple[tuple[str, int], ...] | None = None  # our last advert to it
        self.rtt = 0.0  # the round trip of its link to us, as it measured it (its heartbeats say)

    def kind(self) -> str:
        return "brokers"

    def allowed(self, service: str) -> int:
        """Tasks of ``service`` its advert still allows (may be negative after a smaller advert)."""
        return self.spare.get(service, 0) - self.load.get(service, 0)

    def free(self, service: str) -> int:
        n = self.allowed(service)
        return n if n > 0 and self.alive else 0

    def entry(self, service: str) -> HeapEntry | None:
        free = self.allowed(service)
        if free <= 0:
            return None
        n = self.load.get(service, 0)
        # After every worker with a free slot (1 + its load): a free slot here is never farther.
        return (1.0 + n / (n + free), self.last_used, self.serial, self.version, self)

    def may_take(self, hops: tuple[str, ...]) -> bool:
        return self.name not in hops  # never back to a broker the request has passed

    def hold(self, ticket: p.Boxed, seq: p.Boxed, service: str) -> None:
        self.inflight[ticket] = seq
        self.svc_of[ticket] = service
        self.load[service] = self.load.get(service, 0) + 1

    def adopt(self, ticket: int, service: str) -> None:
        self.hold(ticket, 0, service)

    def release(self, ticket: p.Boxed) -> None:
        del self.inflight[ticket]
        self.load[self.svc_of.pop(ticket)] -= 1

    def clear(self) -> None:
        self.inflight.clear()
        self.svc_of.clear()
        self.load.clear()

    def task(self, req: Req, seq: p.Boxed, now: float, broker: str) -> p.Task:
        budget = p.budget_ms_left(req.deadline, now, HOP_MARGIN_MS)
        hops = (*req.hops, broker)
        return p.Task(
            req.ticket,
            req.service,
            budget,
            req.attempt,
            req.key,
            seq,
            hops,
            req.payload,
            req.trace,
            req.window,
            req.retry,
        )

    def requests_held(self, service: str, n: int) -> None:
        self.held_from[service] = self.held_from.get(service, 0) + n


class Req:
    """One accepted request, from arrival to its one reply."""

    __slots__ = (
        "also",
        "attempt",
        "avoid",
        "cancelled",
        "client",
        "deadline",
        "hops",
        "key",
        "parts",
        "payload",
        "retries",
        "retry",
        "rid",
        "service",
        "session",
        "state",
        "t_in",
        "t_out",
        "ticket",
        "trace",
        "tried",
        "up_block",
        "via",
        "went_up",
        "window",
        "worker",
    )

    def __init__(
        self,
        ticket: p.Boxed,
        client: Dest,
        rid: p.Boxed,
        service: str,
        payload: bytes,
        deadline: float,
        hops: tuple[str, ...] = (),
    ) -> None:
        self.ticket = ticket  # (both Boxed: each goes into several tables and messages)
        self.client = client  # a peer's identity, or UPSTREAM for work handed down by our upstream
        self.rid = rid
        self.service = service
        self.payload = payload
        self.deadline = deadline
        self.hops = hops
        self.attempt = 0
        self.worker: Member | None = None
        self.tried: list[bytes] | None = None  # members that held it before (their late answer counts)
        self.state = QUEUED
        self.key = ""
        self.session = 0  # the upstream session a request handed down from upstream belongs to
        self.went_up = False  # forwarded upstream at least once: a reply from there completes it
        self.up_block = -1  # the upstream returned it: not forwarded again before a newer advert
        self.via: Member | None = None  # the registered member it came from (a downstream broker)
        self.t_in = 0.0  # accepted (for latency histograms)
        self.trace = ""  # the client's trace id, passed on to every broker and worker
        self.t_out = 0.0  # last dispatched
        self.window = 0  # > 0: a stream (parts relayed, at most this many unacknowledged)
        self.retry: p.RetrySpec = ()  # the caller's retry policy, passed on to the worker
        self.parts = 0  # parts relayed to the client so far (a stream cut after one is not run again)
        self.retries = 0  # runs ended by the retry policy (not by a member's death: see max_attempts)
        self.avoid: bytes | None = None  # the member whose run failed: another one is preferred
        self.cancelled = False  # cancelled while a member (or the upstream) held it: no one to answer
        self.also: list[tuple[Dest, int]] | None = None  # callers that joined it (same key): (origin, rid)


class Caller:
    """What a broker keeps of a caller with requests open: how many (its quota count) and when the
    latest was accepted (a sign of life, rule 4 of core/lifecycle.py). One record, so a request
    costs one table lookup at each end, not a count's and a time's (and a float made each time)."""

    __slots__ = ("last_in", "open")

    def __init__(self, last_in: float) -> None:
        self.open = 0
        self.last_in = last_in


class Keys:
    """The open requests by origin, then the origin's request id: their tickets. Nested, not keyed
    by ``(origin, rid)``: a tuple key is built, hashed and compared item by item at each of a
    request's four lookups. An origin with no key left goes."""

    __slots__ = ("by_origin",)

    def __init__(self) -> None:
        self.by_origin: dict[Dest, dict[int, int]] = {}

    def ticket(self, origin: Dest, rid: p.Boxed) -> int | None:
        """The ticket of ``origin``'s open request ``rid``, or None."""
        rids = self.by_origin.get(origin)
        return None if rids is None else rids.get(rid)

    def put(self, origin: Dest, rid: p.Boxed, ticket: p.Boxed) -> None:
        """``origin``'s request ``rid`` is ``ticket`` now."""
        rids = self.by_origin.get(origin)
        if rids is None:
            self.by_origin[origin] = {rid: ticket}
        else:
            rids[rid] = ticket

    def drop(self, origin: Dest, rid: p.Boxed, ticket: p.Boxed) -> None:
        """``origin``'s request ``rid`` is no longer ``ticket`` (a key that names another request
        now stays)."""
        rids = self.by_origin.get(origin)
        if rids is not None and (held := rids.get(rid)) is not None and held == ticket:
            del rids[rid]
            if not rids:
                del self.by_origin[origin]

    def of(self, origins: Container[Dest]) -> list[tuple[Dest, int]]:
        """Every (origin, rid) of ``origins``, taken now (ending them changes the table)."""
        return [(c, rid) for c, rids in self.by_origin.items() if c in origins for rid in rids]


def _waits(reqs: dict[int, Req], req: Req) -> bool:
    """``req`` is still in the table, queued or forwarded: its deadline still matters."""
    return reqs.get(req.ticket) is req and req.state in (QUEUED, FORWARDED)


class Deadlines:
    """When the deadline of each queued or forwarded request of ``reqs`` (the dispatcher's table)
    comes. Most requests come with their deadlines in order (one budget for all): such a request
    goes at the end of a list, itself (no entry is made for it), and as each comes, up to two at
    the head that no longer wait are dropped. One with an earlier deadline than the last goes in
    a heap of (deadline, ticket), whose push and compares cost about 650 instructions. What no
    longer waits stays until its deadline or a :meth:`sweep` (its owner sweeps when they pile up)."""

    __slots__ = ("_fifo", "_head", "_heap", "_last", "_reqs", "sweeps", "swept")

    def __init__(self, reqs: dict[int, Req]) -> None:
        self._reqs = reqs
        self._fifo: list[Req] = []  # from _head on: in order of deadline
        self._head = 0
        self._last = -1.0  # the latest deadline in _fifo (deadlines are clock times: >= 0)
        self._heap: list[tuple[float, p.Boxed]] = []
        self.swept = 0  # entries kept by the last sweep
        self.sweeps = 0

    def __len__(self) -> int:
        return len(self._fifo) - self._head + len(self._heap)

    def __iter__(self) -> Iterator[tuple[float, p.Boxed]]:
        return iter([(r.deadline, r.ticket) for r in self._fifo[self._head :]] + self._heap)

    def push(self, req: Req) -> None:
        deadline = req.deadline
        if deadline < self._last:
            heappush(self._heap, (deadline, req.ticket))
            return
        fifo = self._fifo
        fifo.append(req)
        self._last = deadline
        head = self._head
        reqs = self._reqs
        if not _waits(reqs, fifo[head]):
            head += 1
            if head < len(fifo) and not _waits(reqs, fifo[head]):
                head += 1
            self._take(head)

    def _take(self, head: int) -> None:
        """The list's entries before ``head`` are gone."""
        self._head = taken(self._fifo, head)
        if not self._fifo:
            self._last = -1.0

    def first(self) -> float | None:
        """The earliest deadline, or None."""
        heap, fifo, head = self._heap, self._fifo, self._head
        d = heap[0][0] if heap else None
        if head < len(fifo) and (d is None or fifo[head].deadline < d):
            d = fifo[head].deadline
        return d

    def pop_due(self, now: float) -> Any:
        """Take out the earliest entry whose deadline is at or before ``now``: its ticket (a
        ``p.Boxed``: Any, see :meth:`Queue.first`), or None when none is due."""
        heap, fifo, head = self._heap, self._fifo, self._head
        if head < len(fifo):
            req = fifo[head]
            if req.deadline <= now and not (heap and heap[0][0] < req.deadline):
                self._take(head + 1)
                return req.ticket
        if heap and heap[0][0] <= now:
            return heappop(heap)[1]
        return None

    def sweep(self) -> None:
        """Keep only the entries of requests that still wait."""
        reqs = self._reqs
        self._fifo = [r for r in self._fifo[self._head :] if _waits(reqs, r)]
        self._head = 0
        self._last = self._fifo[-1].deadline if self._fifo else -1.0
        self._heap = [e for e in self._heap if (r := reqs.get(e[1])) is not None and r.state in (QUEUED, FORWARDED)]
        heapify(self._heap)
        self.swept = len(self)
        self.sweeps += 1


class Queue:
    """A pool's FIFO of tickets, used as a deque (append, popleft, pop, appendleft, first, last,
    len, iteration) but with methods compiled code calls directly: a deque's are found by name at
    each call, about 250 instructions each, and a request took two. A list and the index of its
    head; the front taken is cut off once it is at least half the list."""

    __slots__ = ("_head", "_items")

    def __init__(self) -> None:
        self._items: list[p.Boxed] = []
        self._head = 0

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __bool__(self) -> bool:
        return len(self._items) > self._head

    def __iter__(self) -> Iterator[p.Boxed]:
        return iter(self._items[self._head :])

    # first, last and popleft say Any, not p.Boxed: mypy makes a call's Boxed an int, and compiled
    # code would unbox the ticket and box it again; the caller's annotated local keeps the object.
    def first(self) -> Any:
        """The head (IndexError when empty, as ``deque[0]``)."""
        if self._head >= len(self._items):
            raise IndexError("the queue is empty")
        return self._items[self._head]

    def last(self) -> Any:
        if self._head >= len(self._items):
            raise IndexError("the queue is empty")
        return self._items[-1]

    def append(self, ticket: p.Boxed) -> None:
        self._items.append(ticket)

    def popleft(self) -> Any:
        items = self._items
        head = self._head
        if head >= len(items):
            raise IndexError("the queue is empty")
        ticket = items[head]
        self._head = taken(items, head + 1)
        return ticket

    def pop(self) -> p.Boxed:
        """Take the last one (IndexError when empty)."""
        if self._head >= len(self._items):
            raise IndexError("the queue is empty")
        ticket = self._items.pop()
        self._head = taken(self._items, self._head)
        return ticket

    def appendleft(self, ticket: p.Boxed) -> None:
        if self._head:
            self._head -= 1
            self._items[self._head] = ticket
        else:
            self._items.insert(0, ticket)

    def put_back(self, tickets: list[p.Boxed]) -> None:
        """Put ``tickets`` back at the front, in their order (a deque's extendleft of them reversed)."""
        for ticket in reversed(tickets):
            self.appendleft(ticket)


class Pool:
    """Members of one service (a heap by load, then least recently used) and its FIFO queue."""

    __slots__ = ("away", "heap", "idle_since", "local", "members", "name", "queue", "svc")

    def __init__(self, name: str) -> None:
        self.name = name
        self.heap: list[HeapEntry] = []
        self.queue = Queue()
        self.members: set[Member] = set()
        self.idle_since: float | None = None  # its last member left, nothing queued: forgotten later
        # For latency-aware overflow (docs/tiers.md): the slots of its workers (not brokers), the
        # recent service time of those workers, and the recent time a request spent at another
        # broker beyond the link's round trip (seconds; 0.0 / -1.0 while not measured).
        self.local = 0
        self.svc = 0.0
        self.away = -1.0


class Told:
    """Peers we do not know that were told RECONNECT, and when: each is told at most once a ttl
    until it registers. A broker back within a ttl finds what a peer sent meanwhile (heartbeats,
    results) queued in its connection; answering each message made a worker register once per
    message, each registration dropping and requeuing what the one before had just been sent. A
    lost RECONNECT costs a ttl: the peer hears nothing and fails over, or its next message after
    the ttl is answered. Bounded: when full, entries older than the ttl go, then all of them."""

    __slots__ = ("at", "ttl")
    LIMIT = 4096

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.at: dict[bytes, float] = {}

    def due(self, peer: bytes, now: float) -> bool:
        """Should ``peer`` be told RECONNECT now? (If so, it counts as told.)"""
        at = self.at
        last = at.get(peer)
        if last is not None and now - last <= self.ttl:
            return False
        if last is None and len(at) >= self.LIMIT:
            at = self.at = {c: t for c, t in at.items() if now - t <= self.ttl}
            if len(at) >= self.LIMIT:
                at.clear()
        at[peer] = now
        return True

    def registered(self, peer: bytes) -> None:
        """``peer`` registered: if it is forgotten later, it is told at once."""
        if self.at:
            self.at.pop(peer, None)


class Copy:
    """A passive broker's copy of one open request of the active broker's table."""

    __slots__ = ("accepted", "member")

    def __init__(self, accepted: p.OpAccepted, member: bytes | None = None) -> None:
        self.accepted = accepted  # as accepted (its deadline moved into our clock), attempt kept current
        self.member = member  # the member it was dispatched to, or None while queued
