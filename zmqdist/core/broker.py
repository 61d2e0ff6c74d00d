"""The broker machine: least-loaded dispatch with credit, worker liveness, requeue, deadlines.

Rules of this module:
1. Everything that decides where a request goes or when it ends lives here; the runtime only moves
   frames. ``receive``/``tick``/``send_failed`` return ``[(peer, message), ...]`` to send.
2. A request ends exactly once: one Reply leaves for each accepted Request, whatever happens to the
   workers (OK, FAILED, TIMEOUT, LOST); BUSY and INVALID end it at once. Duplicates of a request that
   is still in progress (same client, same rid) are absorbed.
3. A worker never holds more tasks than its capacity; an expired worker gets no more tasks and what
   it held is requeued (front of the queue) with one attempt spent, up to ``max_attempts``.
4. A queued request whose deadline has come is answered TIMEOUT and never dispatched.
5. Time is ``now`` passed in; a peer is alive while ``now - last_seen <= ttl``.

Cost per request is O(log workers): per-service heaps with lazy invalidation (entries carry the
worker's version; stale ones are skipped and the heap is rebuilt when mostly stale).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from heapq import heapify, heappop, heappush, heapreplace
from typing import Any

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.errors import RemoteProtocolError

Out = tuple[bytes, p.Message]
EPSILON = 1e-6  # timers fire just past a boundary: alive at ttl, expired at ttl + EPSILON

QUEUED, ASSIGNED = 0, 1
_COUNTER_OF = {p.ST_OK: "replies_ok", p.ST_FAILED: "replies_failed", p.ST_LOST: "lost", p.ST_TIMEOUT: "timeouts"}
STATUS_SERVICE = "zmqdist.status"
_NONE: list[Out] = []  # shared empty result; callers never mutate returned lists


class _Worker:
    __slots__ = (
        "alive",
        "capacity",
        "ident",
        "inflight",
        "last_used",
        "name",
        "seen",
        "seq",
        "serial",
        "served",
        "services",
        "version",
    )

    def __init__(self, ident: bytes, name: str, services: tuple[str, ...], capacity: int, serial: int, now: float):
        self.ident = ident
        self.name = name
        self.services = services
        self.capacity = capacity
        self.inflight: dict[int, int] = {}  # ticket -> seq of the task that carried it
        self.last_used = -1
        self.serial = serial
        self.version = 0
        self.seen = now
        self.alive = True
        self.served = 0
        self.seq = 0


class _Req:
    __slots__ = (
        "attempt",
        "client",
        "deadline",
        "key",
        "payload",
        "rid",
        "service",
        "state",
        "ticket",
        "tried",
        "worker",
    )

    def __init__(
        self,
        ticket: int,
        client: bytes,
        rid: int,
        service: str,
        payload: bytes,
        deadline: float,
    ) -> None:
        self.ticket = ticket
        self.client = client
        self.rid = rid
        self.service = service
        self.payload = payload
        self.deadline = deadline
        self.attempt = 0
        self.worker: _Worker | None = None
        self.tried: list[bytes] | None = None
        self.state = QUEUED
        self.key = ""


class _Pool:
    """Workers of one service (a heap by load, then least recently used) and its FIFO queue."""

    __slots__ = ("heap", "name", "queue", "workers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.heap: list[tuple[float, int, int, int, _Worker]] = []
        self.queue: deque[int] = deque()
        self.workers: set[_Worker] = set()


class BrokerCore:
    """Sans-IO broker: feed it messages and time, send what it returns."""

    def __init__(self, settings: BrokerSettings, incarnation: str, now: float) -> None:
        self.settings = settings
        self.incarnation = incarnation
        self.started = now
        self._ttl = settings.heartbeat.ttl_s
        self._welcome = p.Welcome(
            settings.name,
            incarnation,
            max(1, round(settings.heartbeat.heartbeat_s * 1000)),
            settings.heartbeat.liveness,
        )
        self._pong = p.Heartbeat(p.ROLE_BROKER, incarnation, 0, ())
        self._workers: dict[bytes, _Worker] = {}
        self._pools: dict[str, _Pool] = {}
        self._reqs: dict[int, _Req] = {}
        self._by_key: dict[tuple[bytes, int], int] = {}
        self._next_ticket = 1
        self._seq = 0
        self._serial = 0
        self._queued = 0
        self._queued_bytes = 0
        self._deadlines: list[tuple[float, int]] = []
        self._expiry: list[tuple[float, int, _Worker]] = []
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "requests",
                "replies_ok",
                "replies_failed",
                "busy",
                "timeouts",
                "lost",
                "invalid",
                "requeues",
                "refused",
                "duplicates",
                "late_results",
                "bogus_results",
                "workers_registered",
                "workers_expired",
                "workers_unreachable",
                "workers_left",
                "bad_input",
                "send_drops",
                "lost_in_transit",
            ),
            0,
        )
        self.status_hook: Callable[[], dict[str, Any]] | None = None  # runtime facts (CPU) for status
        self._handlers: dict[type, Callable[[bytes, _Worker | None, Any, float], list[Out]]] = {
            p.Request: self._on_request,
            p.Result: self._on_result,
            p.Heartbeat: self._on_heartbeat,
            p.Hello: self._on_hello,
            p.Credit: self._on_credit,
            p.Bye: self._on_bye,
        }

    # --- inputs ---------------------------------------------------------------------------------

    def receive(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        """Handle one message from ``peer``; return the messages to send."""
        w = self._workers.get(peer)
        if w is not None:
            w.seen = now
        handler = self._handlers.get(type(msg))
        if handler is None:
            self.counters["bad_input"] += 1
            return [(peer, p.Error(p.E_COMMAND, f"{type(msg).__name__} is not accepted by a broker"))]
        return handler(peer, w, msg, now)

    def bad_input(self, peer: bytes, err: RemoteProtocolError, head: bytes) -> list[Out]:
        """Count a message that failed to decode; return the error answer to send."""
        self.counters["bad_input"] += 1
        if err.rid is not None and head[3:4] == bytes([p.CMD_OF[p.Request]]):
            self.counters["invalid"] += 1
            return [(peer, p.Reply(err.rid, p.ST_INVALID, str(err), b""))]
        return [(peer, p.Error(err.code or p.E_HEADER, str(err)))]

    def send_failed(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        """The transport could not send ``msg`` to ``peer`` (gone, or its queue full)."""
        self.counters["send_drops"] += 1
        if type(msg) is p.Task:
            w = self._workers.get(peer)
            if w is not None:
                # The worker is unreachable: treat it as dead so its tasks (this one too) requeue.
                self.counters["workers_unreachable"] += 1
                return self._drop_worker(w, now, "unreachable", spend_attempt=False)
        return _NONE

    def tick(self, now: float) -> list[Out]:
        """Expire silent workers and queued requests past their deadline."""
        out: list[Out] = []
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, serial, w = expiry[0]
            if not w.alive:
                heappop(expiry)
            elif now - w.seen > self._ttl:
                heappop(expiry)
                self.counters["workers_expired"] += 1
                out += self._drop_worker(w, now, "expired", spend_attempt=True)
            else:
                heapreplace(expiry, (w.seen + self._ttl + EPSILON, serial, w))
        dl = self._deadlines
        reqs = self._reqs
        while dl and dl[0][0] <= now:
            _, ticket = heappop(dl)
            req = reqs.get(ticket)
            if req is not None and req.state == QUEUED and req.deadline <= now:
                out.append(self._expire(req))
        return out

    def next_deadline(self) -> float | None:
        """Return the earliest time at which ``tick`` has something to do, or None."""
        times = []
        if self._expiry:
            times.append(self._expiry[0][0])
        if self._deadlines:
            times.append(self._deadlines[0][0])
        return min(times) if times else None

    def shutdown(self) -> list[Out]:
        """Say BYE to every worker so they move on at once instead of waiting out the ttl."""
        return [(w.ident, p.Bye("broker shutting down")) for w in self._workers.values()]

    # --- handlers -------------------------------------------------------------------------------

    def _on_request(self, peer: bytes, w: _Worker | None, m: p.Request, now: float) -> list[Out]:
        c = self.counters
        c["requests"] += 1
        service = m.service
        if service.startswith(p.RESERVED_PREFIX):
            return [(peer, self._internal(m, now))]
        key = (peer, m.rid)
        if key in self._by_key:
            c["duplicates"] += 1
            return _NONE
        if m.budget_ms <= 0:
            c["timeouts"] += 1
            return [(peer, p.Reply(m.rid, p.ST_TIMEOUT, "request arrived with its time budget spent", b""))]
        size = len(m.payload)
        if self._queued >= self.settings.max_queue or self._queued_bytes + size > self.settings.max_queue_bytes:
            c["busy"] += 1
            return [
                (
                    peer,
                    p.Reply(
                        m.rid,
                        p.ST_BUSY,
                        f"broker {self.settings.name} is busy: {self._queued} requests "
                        f"({self._queued_bytes} bytes) queued, limit {self.settings.max_queue}",
                        b"",
                    ),
                )
            ]
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        req = _Req(ticket, peer, m.rid, service, m.payload, now + m.budget_ms / 1000.0)
        self._reqs[ticket] = req
        self._by_key[key] = ticket
        pool = self._pools.get(service)
        if pool is None:
            pool = self._pools[service] = _Pool(service)
        pool.queue.append(ticket)
        self._queued += 1
        self._queued_bytes += size
        out: list[Out] = []
        if pool.heap:
            self._pump(pool, now, out)
        if req.state == QUEUED:
            heappush(self._deadlines, (req.deadline, ticket))
            if len(self._deadlines) > 2 * self._queued + 1024:
                self._compact_deadlines()
        return out

    def _on_result(self, peer: bytes, w: _Worker | None, m: p.Result, now: float) -> list[Out]:
        ticket = m.ticket
        req = self._reqs.get(ticket)
        out: list[Out] = []
        if w is None:
            out.append((peer, p.Reconnect("unknown worker: register again")))
        elif ticket in w.inflight:
            del w.inflight[ticket]
            self._offer(w)
        if req is None:
            self.counters["late_results"] += 1
        else:
            holder = req.worker
            from_holder = holder is not None and holder.ident == peer
            if not from_holder and not (req.tried is not None and peer in req.tried):
                self.counters["bogus_results"] += 1
            elif m.status == p.RS_REFUSED:
                if from_holder:
                    self.counters["refused"] += 1
                    req.attempt -= 1
                    self._requeue(req, now)
            else:
                # A former holder may finish after it was given up: deliver its reply rather than
                # run the request again. The current holder keeps the slot until it answers.
                if req.state == QUEUED:
                    self._queued -= 1
                    self._queued_bytes -= len(req.payload)
                if w is not None:
                    w.served += 1
                out.append(self._finish(req, p.ST_OK if m.status == p.RS_OK else p.ST_FAILED, "", m.payload))
        if w is not None:
            self._pump_services(w, now, out)
        elif req is not None and req.state == QUEUED and req.ticket in self._reqs:
            self._pump(self._pools[req.service], now, out)
        return out

    def _on_heartbeat(self, peer: bytes, w: _Worker | None, m: p.Heartbeat, now: float) -> list[Out]:
        if w is None:
            if m.role == p.ROLE_WORKER:
                return [(peer, p.Reconnect("unknown worker: register again"))]
            return [(peer, self._pong)]
        out: list[Out] = [(peer, p.Heartbeat(p.ROLE_BROKER, self.incarnation, w.seq, ()))]
        if w.inflight and m.seq:
            self._reconcile(w, m.seq, m.held, now, out)
        return out

    def _reconcile(self, w: _Worker, seen: int, held: tuple[int, ...], now: float, out: list[Out]) -> None:
        """Requeue tasks the worker has seen past (by seq) but does not hold: lost in transit.

        Messages on one connection arrive in order and a worker sends every RESULT before the
        heartbeat that no longer lists it, so this is exact, not a timing guess.
        """
        keep = set(held)
        lost = [t for t, s in w.inflight.items() if s <= seen and t not in keep]
        if not lost:
            return
        for ticket in lost:
            del w.inflight[ticket]
            req = self._reqs.get(ticket)
            if req is not None and req.worker is w:
                self.counters["lost_in_transit"] += 1
                req.attempt -= 1
                self._requeue(req, now)
        self._offer(w)
        self._pump_services(w, now, out)

    def _on_hello(self, peer: bytes, w: _Worker | None, m: p.Hello, now: float) -> list[Out]:
        out: list[Out] = []
        if m.role == p.ROLE_CLIENT:
            return [(peer, self._welcome)]
        if m.role != p.ROLE_WORKER:
            self.counters["bad_input"] += 1
            return [(peer, p.Error(p.E_ROLE, "this broker accepts clients and workers only"))]
        reserved = [s for s in m.services if s.startswith(p.RESERVED_PREFIX)]
        if reserved or not m.services:
            self.counters["bad_input"] += 1
            why = f"service names starting with {p.RESERVED_PREFIX!r} are reserved" if reserved else "no services"
            return [(peer, p.Error(p.E_HEADER, f"registration refused: {why}"))]
        if w is not None:
            # The worker began a new session (it thinks we restarted): what it held is void.
            out += self._drop_worker(w, now, "re-registered", spend_attempt=False)
        self._serial += 1
        nw = _Worker(peer, m.name, tuple(dict.fromkeys(m.services)), m.capacity, self._serial, now)
        self._workers[peer] = nw
        self.counters["workers_registered"] += 1
        heappush(self._expiry, (now + self._ttl + EPSILON, nw.serial, nw))
        for s in nw.services:
            pool = self._pools.get(s)
            if pool is None:
                pool = self._pools[s] = _Pool(s)
            pool.workers.add(nw)
        out.append((peer, self._welcome))
        self._offer(nw)
        self._pump_services(nw, now, out)
        return out

    def _on_credit(self, peer: bytes, w: _Worker | None, m: p.Credit, now: float) -> list[Out]:
        if w is None:
            return [(peer, p.Reconnect("unknown worker: register again"))]
        w.capacity = m.capacity
        out: list[Out] = []
        self._offer(w)
        self._pump_services(w, now, out)
        return out

    def _on_bye(self, peer: bytes, w: _Worker | None, m: p.Bye, now: float) -> list[Out]:
        if w is None:
            return _NONE
        self.counters["workers_left"] += 1
        return self._drop_worker(w, now, "left", spend_attempt=True)

    # --- dispatch -------------------------------------------------------------------------------

    def _offer(self, w: _Worker) -> None:
        """Re-enter ``w`` in its services' heaps after its load changed."""
        w.version += 1
        n = len(w.inflight)
        if n < w.capacity and w.alive:
            entry = (n / w.capacity, w.last_used, w.serial, w.version, w)
            for s in w.services:
                pool = self._pools[s]
                heap = pool.heap
                heappush(heap, entry)
                if len(heap) > 4 * len(pool.workers) + 64:
                    pool.heap = [e for e in heap if e[3] == e[4].version and e[4].alive]
                    heapify(pool.heap)

    def _pump(self, pool: _Pool, now: float, out: list[Out]) -> None:
        """Dispatch queued requests of ``pool`` while it has workers with free slots."""
        queue = pool.queue
        heap = pool.heap
        reqs = self._reqs
        while queue and heap:
            _, _, _, version, w = heap[0]
            if version != w.version or not w.alive:
                heappop(heap)
                continue
            ticket = queue.popleft()
            req = reqs.get(ticket)
            if req is None or req.state != QUEUED:
                continue
            self._queued -= 1
            self._queued_bytes -= len(req.payload)
            if req.deadline <= now:
                out.append(self._expire(req, dequeued=True))
                continue
            heappop(heap)
            # assign
            req.state = ASSIGNED
            req.worker = w
            req.attempt += 1
            w.seq += 1
            w.inflight[ticket] = w.seq
            w.last_used = self._seq
            self._seq += 1
            self._offer(w)
            heap = pool.heap
            key = req.key
            if not key:
                key = req.key = f"{req.client.hex()}:{req.rid}"
            out.append(
                (
                    w.ident,
                    p.Task(
                        ticket,
                        req.service,
                        max(1, int((req.deadline - now) * 1000)),
                        req.attempt,
                        key,
                        w.seq,
                        req.payload,
                    ),
                )
            )

    def _pump_services(self, w: _Worker, now: float, out: list[Out]) -> None:
        """Dispatch what waits for any service of ``w`` (it has just gained free capacity)."""
        for s in w.services:
            pool = self._pools[s]
            if pool.queue:
                self._pump(pool, now, out)

    def _requeue(self, req: _Req, now: float) -> None:
        pool = self._pools[req.service]
        req.state = QUEUED
        req.worker = None
        pool.queue.appendleft(req.ticket)
        self._queued += 1
        self._queued_bytes += len(req.payload)
        heappush(self._deadlines, (req.deadline, req.ticket))

    def _drop_worker(self, w: _Worker, now: float, why: str, *, spend_attempt: bool) -> list[Out]:
        """Forget ``w``; requeue what it held (or answer LOST past the attempt cap)."""
        out: list[Out] = []
        w.alive = False
        w.version += 1
        if self._workers.get(w.ident) is w:
            del self._workers[w.ident]
        for s in w.services:
            pool = self._pools.get(s)
            if pool is not None:
                pool.workers.discard(w)
        touched: set[str] = set()
        for ticket in sorted(w.inflight, reverse=True):  # appendleft: oldest ends up first
            req = self._reqs.get(ticket)
            if req is None or req.worker is not w:
                continue
            if req.tried is None:
                req.tried = []
            req.tried.append(w.ident)
            if not spend_attempt:
                req.attempt -= 1
            if req.attempt >= self.settings.max_attempts:
                out.append(
                    self._finish(
                        req,
                        p.ST_LOST,
                        f"request lost: {req.attempt} workers of service {req.service!r} died while "
                        f"holding it (attempt cap {self.settings.max_attempts}; last: {w.name} {why})",
                        b"",
                    )
                )
            else:
                self.counters["requeues"] += 1
                self._requeue(req, now)
                touched.add(req.service)
        w.inflight.clear()
        for s in touched:
            self._pump(self._pools[s], now, out)
        return out

    def _expire(self, req: _Req, dequeued: bool = False) -> Out:
        if not dequeued:
            self._queued -= 1
            self._queued_bytes -= len(req.payload)
        pool = self._pools.get(req.service)
        if pool is None or not pool.workers:
            why = f"no worker for service {req.service!r} was registered at broker {self.settings.name}"
        else:
            why = f"all {len(pool.workers)} workers of service {req.service!r} stayed busy"
        return self._finish(req, p.ST_TIMEOUT, f"deadline passed before dispatch: {why}", b"")

    def _finish(self, req: _Req, status: int, message: str, payload: bytes) -> Out:
        del self._reqs[req.ticket]
        del self._by_key[(req.client, req.rid)]
        self.counters[_COUNTER_OF[status]] += 1
        pool = self._pools.get(req.service)
        if pool is not None and not pool.workers:
            queue = pool.queue
            reqs = self._reqs
            while queue and ((r := reqs.get(queue[0])) is None or r.state != QUEUED):
                queue.popleft()
            if not queue:
                del self._pools[req.service]  # services nobody serves must not accumulate
        return (req.client, p.Reply(req.rid, status, message, payload))

    def _compact_deadlines(self) -> None:
        reqs = self._reqs
        self._deadlines = [(d, t) for d, t in self._deadlines if (r := reqs.get(t)) is not None and r.state == QUEUED]
        heapify(self._deadlines)

    # --- internal services ----------------------------------------------------------------------

    def _internal(self, m: p.Request, now: float) -> p.Reply:
        if m.service == STATUS_SERVICE:
            return p.Reply(m.rid, p.ST_OK, "", p.pack_value(self.status(now)))
        self.counters["invalid"] += 1
        return p.Reply(m.rid, p.ST_INVALID, f"unknown internal service {m.service!r}", b"")

    def status(self, now: float) -> dict[str, Any]:
        """Return a snapshot for ``zmqdist status``: workers, services, queues, counters."""
        workers = [
            {
                "name": w.name,
                "id": w.ident.hex(),
                "services": list(w.services),
                "capacity": w.capacity,
                "inflight": len(w.inflight),
                "served": w.served,
                "silent_s": round(now - w.seen, 3),
            }
            for w in self._workers.values()
        ]
        services = {
            name: {
                "workers": len(pool.workers),
                "capacity": sum(w.capacity for w in pool.workers),
                "inflight": sum(len(w.inflight) for w in pool.workers),
                "queued": sum(1 for t in pool.queue if (r := self._reqs.get(t)) and r.state == QUEUED),
            }
            for name, pool in sorted(self._pools.items())
        }
        return {
            "broker": self.settings.name,
            "incarnation": self.incarnation,
            "uptime_s": round(now - self.started, 3),
            "heartbeat_s": self.settings.heartbeat.heartbeat_s,
            "liveness": self.settings.heartbeat.liveness,
            "queued": self._queued,
            "queued_bytes": self._queued_bytes,
            "requests_open": len(self._reqs),
            "workers": workers,
            "services": services,
            "counters": dict(self.counters),
            **(self.status_hook() if self.status_hook is not None else {}),
        }

    # --- introspection for tests and invariants -------------------------------------------------

    def worker_load(self) -> dict[bytes, tuple[int, int]]:
        """Return ``{worker id: (in-flight, capacity)}`` for live workers."""
        return {i: (len(w.inflight), w.capacity) for i, w in self._workers.items()}

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return self._queued

    @property
    def open_requests(self) -> int:
        """Requests accepted and not yet answered."""
        return len(self._reqs)
