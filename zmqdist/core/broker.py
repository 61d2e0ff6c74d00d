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
6. Tiers. A downstream broker (a proxy) registers like a worker (HELLO with the broker role) and
   joins the pool of every service it advertises (ADVERT), with the spare capacity it advertised
   less the tasks sent since; it answers each TASK with a REPLY. A broker with ``upstream`` set is
   a proxy: it serves with its own pool first and forwards what that cannot take at once
   (REQUEST, answered by REPLY); what its upstream hands down is served locally or refused with
   BUSY, never sent back up. A request is never sent to a broker named in its hops, and each hop
   spends at least ``HOP_MARGIN_MS`` of its budget.

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
from zmqdist.core.ha import (
    ACTIVE,
    BECOME_PASSIVE,
    HAND_OVER,
    PAIR,
    PASSIVE,
    PENDING,
    R_ATTEMPT,
    R_CLIENT,
    R_DEADLINE,
    R_HOPS,
    R_KEY,
    R_MEMBER,
    R_PAYLOAD,
    R_RID,
    R_SERVICE,
    R_TRACE,
    STEP_DOWN,
    TAKE_OVER,
    TICKET_GAP,
    Pair,
)
from zmqdist.core.link import Connect, Problem
from zmqdist.core.metrics import Hist
from zmqdist.core.upstream import Upstream, half
from zmqdist.errors import RemoteProtocolError

Out = tuple[bytes, p.Message | Connect | Problem]
UPSTREAM = b""  # the peer of messages to and from the upstream link; never a ROUTER identity
EPSILON = 1e-6  # timers fire just past a boundary: alive at ttl, expired at ttl + EPSILON
HOP_MARGIN_MS = 1  # budget every broker-to-broker hop spends at least (transit)

QUEUED, ASSIGNED, FORWARDED = 0, 1, 2
_COUNTER_OF = {
    p.ST_OK: "replies_ok",
    p.ST_FAILED: "replies_failed",
    p.ST_LOST: "lost",
    p.ST_TIMEOUT: "timeouts",
    p.ST_BUSY: "busy",
    p.ST_INVALID: "invalid",
}
STATUS_SERVICE = "zmqdist.status"
HANDOVER_SERVICE = "zmqdist.handover"  # the active broker of a pair hands the work to its peer
TREE_SERVICE = "zmqdist.tree"  # this broker's status with those of every broker below it
TREE_WAIT_S = 2.0  # longest a tree status waits for the brokers below
_CMD_RESULT = bytes([p.CMD_OF[p.Result]])
_NONE: list[Out] = []  # shared empty result; callers never mutate returned lists


class _Worker:
    """A pool member: a worker, or a downstream broker (``spare`` is not None)."""

    __slots__ = (
        "adopted",
        "adv_at",
        "alive",
        "busy_s",
        "capacity",
        "carried",
        "down_spare",
        "failed",
        "held_from",
        "ident",
        "inflight",
        "last_used",
        "load",
        "name",
        "seen",
        "seq",
        "serial",
        "served",
        "services",
        "spare",
        "svc_of",
        "ttl",
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
        self.failed = 0  # answers whose handler raised: a worker that keeps failing shows here
        self.busy_s = 0.0  # sum of dispatch-to-answer times of what it served
        self.seq = 0
        self.ttl = 0.0  # set by the broker at registration
        self.adopted = False  # holds requests adopted at a takeover, not yet confirmed by a heartbeat
        # Adopted tickets still held: the member runs them beside its declared capacity (it left
        # them out of it), so they do not count against that capacity.
        self.carried: set[int] = set()
        # Downstream brokers only: what it offers per service (its ADVERT), our tasks it holds per
        # service, its requests we hold per service, and our last advert to it.
        self.spare: dict[str, int] | None = None
        self.adv_at = now
        self.load: dict[str, int] = {}
        self.svc_of: dict[int, str] = {}
        self.held_from: dict[str, int] = {}
        self.down_spare: tuple[tuple[str, int], ...] | None = None

    def allowed(self, service: str) -> int:
        """Tasks of ``service`` this downstream broker can take now."""
        assert self.spare is not None
        return self.spare.get(service, 0) - self.load.get(service, 0)

    def free(self, service: str) -> int:
        """Tasks of ``service`` this member can take now (never negative)."""
        n = self.capacity - len(self.inflight) + len(self.carried) if self.spare is None else self.allowed(service)
        return n if n > 0 and self.alive else 0


class _Req:
    __slots__ = (
        "attempt",
        "client",
        "deadline",
        "hops",
        "key",
        "payload",
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
        hops: tuple[str, ...] = (),
    ) -> None:
        self.ticket = ticket
        self.client = client
        self.rid = rid
        self.service = service
        self.payload = payload
        self.deadline = deadline
        self.hops = hops
        self.attempt = 0
        self.worker: _Worker | None = None
        self.tried: list[bytes] | None = None
        self.state = QUEUED
        self.key = ""
        self.session = 0  # the upstream session a request handed down from upstream belongs to
        self.went_up = False  # forwarded upstream at least once: a reply from there completes it
        self.up_block = -1  # the upstream returned it: not forwarded again before a newer advert
        self.via: _Worker | None = None  # the downstream broker registration it came from
        self.t_in = 0.0  # accepted (for latency histograms)
        self.trace = ""  # the client's trace id, passed on to every broker and worker
        self.t_out = 0.0  # last dispatched


class _Gather:
    """A tree status being gathered: our own status, the answers of the brokers below so far."""

    __slots__ = ("answer_to", "below", "deadline", "gid", "mine", "rid", "session", "waiting")

    def __init__(
        self, gid: int, answer_to: bytes, rid: int, session: int, mine: dict[str, Any], deadline: float
    ) -> None:
        self.gid = gid
        self.answer_to = answer_to  # a client's identity, or UPSTREAM
        self.rid = rid
        self.session = session
        self.mine = mine
        self.deadline = deadline
        self.below: list[Any] = []
        self.waiting: dict[int, str] = {}  # ticket of our question -> name of the broker asked


class _Pool:
    """Members of one service (a heap by load, then least recently used) and its FIFO queue."""

    __slots__ = ("heap", "name", "queue", "workers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.heap: list[tuple[float, int, int, int, _Worker]] = []
        self.queue: deque[int] = deque()
        self.workers: set[_Worker] = set()


class BrokerCore:
    """Sans-IO broker: feed it messages and time, send what it returns.

    ``rng`` (uniform in [0, 1)) jitters a proxy's re-registration and picks a pair's first ticket;
    inject ``random.random`` in a runtime and a seeded source in simulations. ``epoch_floor``: a
    broker of a pair never takes over with an epoch below it (the runtime gives the wall clock in
    milliseconds; see :mod:`zmqdist.core.ha`).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        incarnation: str,
        now: float,
        rng: Callable[[], float] = half,
        epoch_floor: int = 0,
    ) -> None:
        self.settings = settings
        self._rng = rng
        self.name = settings.name
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
        self._serial = 0
        self._pair = Pair(settings, incarnation, now, epoch_floor) if settings.ha else None
        self._standby = self._pair is not None  # a broker of a pair that is not active refuses work
        self._ops: list[Any] | None = None  # the active broker of a pair: replication ops to send
        self._base_incarnation = incarnation
        self._epoch = 0  # our term as the active broker of a pair (0: not part of a pair)
        self._reset(now)
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
                "brokers_registered",
                "abandoned",
                "loops",
                "forwarded_up",
                "tasks_from_up",
                "refused_up",
                "returned",
                "returned_from_up",
                "upstream_losses",
                "over_quota",
                "refused_by_role",  # counted by the runtime: messages a secured peer's key may not send
                "handshakes_failed",  # counted by the runtime: CURVE handshakes that failed
                "redirected",  # a broker of a pair that is not active sent a peer to the active one
                "adopted",  # requests a new active broker found still held by their member
            ),
            0,
        )
        self.status_hook: Callable[[], dict[str, Any]] | None = None  # runtime facts (CPU) for status
        self.hist: dict[str, Hist] | None = None  # latency histograms, when enable_histograms() was called
        self._h_wait: Hist | None = None  # the same three, as attributes for the per-request path
        self._h_service: Hist | None = None
        self._h_e2e: Hist | None = None
        self._now = now  # the time of the input being handled (for histograms at the end of a request)
        self._handlers: dict[type, Callable[[bytes, _Worker | None, Any, float], list[Out]]] = {
            p.Request: self._on_request,
            p.Result: self._on_result,
            p.Heartbeat: self._on_heartbeat,
            p.Hello: self._on_hello,
            p.Credit: self._on_credit,
            p.Bye: self._on_bye,
            p.Advert: self._on_advert,
            p.Reply: self._on_reply,
        }

    def _reset(self, now: float) -> None:
        """Empty every table: at start, and when a broker of a pair steps down or takes over."""
        self._workers: dict[bytes, _Worker] = {}
        self._pools: dict[str, _Pool] = {}
        self._reqs: dict[int, _Req] = {}
        self._by_key: dict[tuple[bytes, int], int] = {}
        self._next_ticket = 1
        self._seq = 0
        self._queued = 0
        self._queued_bytes = 0
        self._deadlines: list[tuple[float, int]] = []
        self._expiry: list[tuple[float, int, _Worker]] = []
        serving = not self._standby
        self._up = Upstream(self.settings, self._rng, now) if self.settings.upstream and serving else None
        self._from_up: dict[int, _Req] = {}  # local ticket -> request handed down by upstream
        self._sent_up: dict[int, _Req] = {}  # local ticket -> request forwarded upstream, unanswered
        self._changes = 0  # bumped whenever spare capacity may have changed
        self._up_mark = -1  # _changes when the last advert went upstream
        self._down_mark = -1  # _changes when the last adverts went to downstream brokers
        self._down_at = -1.0
        self._brokers = 0  # downstream brokers registered
        self._open_by_client: dict[bytes, int] = {}  # open requests per client (quota)
        self._clients: dict[bytes, float] = {}  # clients by when last heard (HELLO, HEARTBEAT)
        self._clients_pruned = -1e9  # when _clients was last pruned
        self._gathers: dict[int, _Gather] = {}  # tree statuses being gathered, by our ticket
        self._gather_of: dict[int, int] = {}  # ticket of a question to a broker below -> its gather
        # A new active broker of a pair: requests the old one had dispatched, by member, waiting
        # for that member to register here (it may still run them, or have finished them).
        self._adopt: dict[bytes, list[int]] = {}
        self._adopt_until: float | None = None

    # --- inputs ---------------------------------------------------------------------------------

    def start(self, now: float) -> list[Out]:
        """Return what to send at start (a proxy connects and registers upstream)."""
        out: list[Out] = []
        if self._pair is not None:
            out.append((PAIR, self._pair.state_message(now)))
        if self._up is not None:
            self._tick_upstream(now, out)
        return out

    def enable_histograms(self) -> None:
        """Keep latency histograms (queue wait, service time, end to end): about 0.3 us a request."""
        self._h_wait, self._h_service, self._h_e2e = Hist(), Hist(), Hist()
        self.hist = {"queue_wait": self._h_wait, "service": self._h_service, "end_to_end": self._h_e2e}

    def receive(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        """Handle one message from ``peer`` (``UPSTREAM`` for the upstream link); return what to send."""
        self._now = now
        if not peer:
            return self._from_upstream(msg, now)
        if self._standby:
            return self._standby_receive(peer, msg, now)
        w = self._workers.get(peer)
        if w is not None:
            w.seen = now
        handler = self._handlers.get(type(msg))
        if handler is None:
            self.counters["bad_input"] += 1
            return [(peer, p.Error(p.E_COMMAND, f"{type(msg).__name__} is not accepted by a broker"))]
        return handler(peer, w, msg, now)

    def receive_plain(self, peer: bytes, head: bytes, payload: bytes, now: float, out: list[Out]) -> bool:
        """Handle the common case of the per-request path straight from its two frames.

        That is a client's REQUEST that passes every check, or a worker's RESULT for a task it
        holds. What to send is appended to ``out``. Anything else returns False having changed
        nothing, and the caller decodes the frames and calls :meth:`receive`, which handles every
        case. Same effects as :meth:`receive`, without building the message or passing through the
        general handlers: a property test runs random schedules both ways and compares every output.
        """
        if self._standby or not peer:
            return False
        if head[3:4] == _CMD_RESULT:
            return self._plain_result(peer, head, payload, now, out)
        return self._plain_request(peer, head, payload, now, out)

    def _plain_request(self, peer: bytes, head: bytes, payload: bytes, now: float, out: list[Out]) -> bool:
        """A client's REQUEST that passes every check (see ``receive_plain``)."""
        f = p.plain_request(head)
        if f is None:
            return False
        rid, service, budget_ms, trace = f
        if budget_ms <= 0 or service.startswith(p.INTERNAL_PREFIXES) or peer in self._workers:
            return False
        key = (peer, rid)
        if key in self._by_key:
            return False
        by_client = self._open_by_client
        mine = by_client.get(peer, 0)
        settings = self.settings
        if (
            mine >= settings.max_client_inflight
            or self._queued >= settings.max_queue
            or self._queued_bytes + len(payload) > settings.max_queue_bytes
        ):
            return False
        self._now = now
        self.counters["requests"] += 1
        by_client[peer] = mine + 1
        self._accept(peer, None, rid, service, now + budget_ms / 1000.0, (), trace, payload, now, out)
        return True

    def _plain_result(self, peer: bytes, head: bytes, payload: bytes, now: float, out: list[Out]) -> bool:
        """A worker's RESULT (OK or FAILED) for a task it holds (see ``receive_plain``)."""
        f = p.plain_result(head)
        if f is None:
            return False
        ticket, rstatus = f
        w = self._workers.get(peer)
        if rstatus == p.RS_REFUSED or w is None or w.spare is not None or w.carried:
            return False
        req = self._reqs.get(ticket)
        if req is None or req.worker is not w or req.state != ASSIGNED or ticket not in w.inflight:
            return False
        self._now = now
        w.seen = now
        self._release(w, ticket)
        self._offer(w)
        w.served += 1
        if rstatus == p.RS_OK:
            status = p.ST_OK
        else:
            status = p.ST_FAILED
            w.failed += 1
        w.busy_s += now - req.t_out
        if self._h_service is not None:
            self._h_service.observe(now - req.t_out)
        self._finish(req, status, "", payload, out)
        self._pump_services(w, now, out)
        return True

    def bad_input(self, peer: bytes, err: RemoteProtocolError, head: bytes) -> list[Out]:
        """Count a message that failed to decode; return the error answer to send."""
        self.counters["bad_input"] += 1
        if not peer:
            return [(peer, Problem(f"bad message from upstream dropped: {err}"))]
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
        """Expire silent workers and queued requests past their deadline; run the upstream link."""
        self._now = now
        out: list[Out] = []
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, serial, w = expiry[0]
            if not w.alive:
                heappop(expiry)
            elif now - w.seen > w.ttl:
                heappop(expiry)
                self.counters["workers_expired"] += 1
                out += self._drop_worker(w, now, "expired", spend_attempt=True)
            else:
                if w.spare and now - w.adv_at > w.ttl:
                    w.spare = {}  # its advert outlived its ttl: no more tasks until the next one
                    self._offer(w)
                heapreplace(expiry, (w.seen + w.ttl + EPSILON, serial, w))
        dl = self._deadlines
        reqs = self._reqs
        while dl and dl[0][0] <= now:
            _, ticket = heappop(dl)
            req = reqs.get(ticket)
            if req is None or req.deadline > now:
                continue
            if req.state == QUEUED:
                self._expire(req, out)
            elif req.state == FORWARDED:
                # The upstream answers TIMEOUT before this (its budget was shorter); past it, the
                # request or its answer was lost with a connection.
                self._unforward(req)
                self._finish(req, p.ST_TIMEOUT, "deadline passed with no answer from the upstream broker", b"", out)
        if self._up is not None:
            self._tick_upstream(now, out)
        if self._brokers and self._down_advert_due(now):
            self._advert_down(now, out)
        if self._gathers:
            for g in [g for g in self._gathers.values() if g.deadline <= now]:
                self._gather_done(g, out)
        if self._adopt_until is not None and now >= self._adopt_until:
            self._adopt_expired(now, out)
        if self._pair is not None:
            self._tick_pair(now, out)
        return out

    def next_deadline(self) -> float | None:
        """Return the earliest time at which ``tick`` has something to do, or None."""
        times = []
        if self._expiry:
            times.append(self._expiry[0][0])
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._up is not None:
            times.append(self._up.next_deadline(self._changes != self._up_mark))
        if self._gathers:
            times.append(min(g.deadline for g in self._gathers.values()))
        if self._pair is not None:
            times.append(self._pair.next_deadline())
        if self._adopt_until is not None:
            times.append(self._adopt_until)
        if self._brokers:
            gap = (
                self.settings.advert_interval_s
                if self._changes != self._down_mark
                else self.settings.heartbeat.heartbeat_s
            )
            times.append(self._down_at + gap)
        return min(times) if times else None

    def shutdown(self) -> list[Out]:
        """Say BYE to every worker and downstream broker (and upstream) so they move on at once."""
        out: list[Out] = []
        pair = self._pair
        if pair is not None and not self._standby and pair.peer_alive(self._now) and pair.peer_state != ACTIVE:
            # A graceful stop of the active broker of a pair hands over at once (no ttl of silence).
            self._hand_over(self._now, out)
            return out
        bye = p.Bye("broker shutting down")
        out += [(ident, bye) for ident in self._leavers()]
        if self._up is not None and self._up.registered:
            out.append((UPSTREAM, p.Bye("proxy shutting down")))
        return out

    def _heard_client(self, peer: bytes, now: float) -> None:
        """Note a client's HELLO or HEARTBEAT (a stopping broker tells it BYE). Bounded at twice
        the queue limit: when full, clients silent past the ttl are forgotten (at most once per
        ttl); a client that finds it still full gets no BYE and notices the silence instead."""
        clients = self._clients
        if peer not in clients and len(clients) >= 2 * self.settings.max_queue:
            if now - self._clients_pruned < self._ttl:
                return
            self._clients_pruned = now
            clients = self._clients = {c: t for c, t in clients.items() if now - t <= self._ttl}
            if len(clients) >= 2 * self.settings.max_queue:
                return
        clients[peer] = now

    def _leavers(self) -> list[bytes]:
        """Everyone to tell BYE when we stop serving: members, clients with open requests, and
        clients heard within the ttl (so they fail over now, not after a ttl of silence)."""
        now = self._now
        clients = {r.client for r in self._reqs.values() if r.client}
        clients.update(c for c, t in self._clients.items() if now - t <= self._ttl)
        return [*self._workers, *(clients - self._workers.keys())]

    # --- handlers -------------------------------------------------------------------------------

    def _on_request(self, peer: bytes, w: _Worker | None, m: p.Request, now: float) -> list[Out]:
        c = self.counters
        c["requests"] += 1
        service = m.service
        if service.startswith(p.INTERNAL_PREFIXES):
            if service == TREE_SERVICE:
                return self._gather_tree(peer, m.rid, 0, m.budget_ms, m.hops, now)
            if service == HANDOVER_SERVICE:
                return self._handover_service(peer, m.rid, now)
            return [(peer, self._internal(m, now))]
        key = (peer, m.rid)
        if key in self._by_key:
            c["duplicates"] += 1
            return _NONE
        if m.budget_ms <= 0:
            c["timeouts"] += 1
            return [(peer, p.Reply(m.rid, p.ST_TIMEOUT, "request arrived with its time budget spent", b""))]
        hops = m.hops
        if hops and self.name in hops:
            c["loops"] += 1
            c["invalid"] += 1
            return [(peer, p.Reply(m.rid, p.ST_INVALID, f"request looped: it has passed {self.name} already", b""))]
        size = len(m.payload)
        by_client = self._open_by_client
        mine = by_client.get(peer, 0)
        if mine >= self.settings.max_client_inflight and (w is None or w.spare is None):
            c["busy"] += 1
            c["over_quota"] += 1
            limit = self.settings.max_client_inflight
            return [
                (peer, p.Reply(m.rid, p.ST_BUSY, f"this client has {mine} requests open, its limit is {limit}", b""))
            ]
        if self._queued >= self.settings.max_queue or self._queued_bytes + size > self.settings.max_queue_bytes:
            c["busy"] += 1
            return [
                (
                    peer,
                    p.Reply(
                        m.rid,
                        p.ST_BUSY,
                        f"broker {self.name} is busy: {self._queued} requests "
                        f"({self._queued_bytes} bytes) queued, limit {self.settings.max_queue}",
                        b"",
                    ),
                )
            ]
        by_client[peer] = mine + 1
        out: list[Out] = []
        self._accept(peer, w, m.rid, service, now + m.budget_ms / 1000.0, hops, m.trace, m.payload, now, out)
        return out

    def _accept(
        self,
        peer: bytes,
        via: _Worker | None,
        rid: int,
        service: str,
        deadline: float,
        hops: tuple[str, ...],
        trace: str,
        payload: bytes,
        now: float,
        out: list[Out],
    ) -> None:
        """Take in a request that passed every check (counted in the client's quota already):
        dispatch it at once to the least-loaded member, or queue it."""
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        req = _Req(ticket, peer, rid, service, payload, deadline, hops)
        req.t_in = now
        req.trace = trace
        if via is not None and via.spare is not None:
            req.via = via  # counted in what we offer that broker until it ends
            via.held_from[service] = via.held_from.get(service, 0) + 1
        self._reqs[ticket] = req
        self._by_key[(peer, rid)] = ticket
        ops = self._ops
        if ops is not None:
            ops.append(["a", ticket, peer, rid, service, deadline, hops, trace, "", 0, payload])
        self._changes += 1
        pool = self._pools.get(service)
        if pool is None:
            pool = self._pools[service] = _Pool(service)
        elif not pool.queue and not hops and self._up is None and deadline > now:
            # Nothing waits ahead of it: the least-loaded member takes it now (what _pump would do).
            heap = pool.heap
            while heap:
                entry = heap[0]
                w = entry[4]
                if entry[3] == w.version and w.alive:
                    heappop(heap)
                    self._assign(req, w, now, out)
                    return
                heappop(heap)  # stale: the member's load changed or it died since
        pool.queue.append(ticket)
        self._queued += 1
        self._queued_bytes += len(payload)
        if pool.heap or self._up is not None:
            self._pump(pool, now, out)
        if req.state == QUEUED:
            heappush(self._deadlines, (req.deadline, ticket))
            if len(self._deadlines) > 2 * self._queued + 1024:
                self._compact_deadlines()

    def _on_result(self, peer: bytes, w: _Worker | None, m: p.Result, now: float) -> list[Out]:
        status = p.ST_OK if m.status == p.RS_OK else p.ST_FAILED
        return self._settle(peer, w, m.ticket, status, "", m.payload, m.status == p.RS_REFUSED, now)

    def _on_reply(self, peer: bytes, w: _Worker | None, m: p.Reply, now: float) -> list[Out]:
        """A downstream broker's answer to a task (BUSY: it could not take it, requeue)."""
        if w is None or w.spare is None:
            if w is None and m.rid in self._reqs:
                return [(peer, p.Reconnect("unknown broker: register again"))]
            self.counters["bad_input"] += 1
            return [(peer, p.Error(p.E_COMMAND, "REPLY is accepted from registered downstream brokers only"))]
        if m.rid in self._gather_of:
            return self._gathered(m, now)
        return self._settle(peer, w, m.rid, m.status, m.message, m.payload, m.status == p.ST_BUSY, now)

    def _settle(
        self,
        peer: bytes,
        w: _Worker | None,
        ticket: int,
        status: int,
        message: str,
        payload: bytes,
        refused: bool,
        now: float,
    ) -> list[Out]:
        """A member answered ``ticket``: free its slot, then end, requeue or ignore the request."""
        req = self._reqs.get(ticket)
        out: list[Out] = []
        if w is None:
            out.append((peer, p.Reconnect("unknown worker: register again")))
        elif ticket in w.inflight:
            self._release(w, ticket)
            self._offer(w)
        if req is None:
            self.counters["late_results"] += 1
        else:
            holder = req.worker
            from_holder = holder is not None and holder.ident == peer
            if not from_holder and not (req.tried is not None and peer in req.tried):
                self.counters["bogus_results"] += 1
            elif refused:
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
                elif req.state == FORWARDED:
                    self._unforward(req)
                if w is not None:
                    w.served += 1
                    if status == p.ST_FAILED:
                        w.failed += 1
                    if from_holder:
                        w.busy_s += now - req.t_out
                if self._h_service is not None and from_holder:
                    self._h_service.observe(now - req.t_out)
                self._finish(req, status, message, payload, out)
        if w is not None:
            self._pump_services(w, now, out)
        elif req is not None and req.state == QUEUED and req.ticket in self._reqs:
            self._pump(self._pools[req.service], now, out)
        return out

    def _on_heartbeat(self, peer: bytes, w: _Worker | None, m: p.Heartbeat, now: float) -> list[Out]:
        if w is None:
            if m.role != p.ROLE_CLIENT:
                who = "worker" if m.role == p.ROLE_WORKER else "broker"
                return [(peer, p.Reconnect(f"unknown {who}: register again"))]
            self._heard_client(peer, now)
            return [(peer, self._pong)]
        out: list[Out] = [(peer, p.Heartbeat(p.ROLE_BROKER, self.incarnation, w.seq, (), self._epoch))]
        adopted = w.adopted and m.incarnation == self.incarnation  # its first heartbeat since WELCOME
        if adopted:
            w.adopted = False
        if w.inflight and (m.seq or adopted):
            self._reconcile(w, m.seq, m.held, now, out)
        return out

    def _reconcile(self, w: _Worker, seen: int, held: tuple[int, ...], now: float, out: list[Out]) -> None:
        """Requeue tasks the member has seen past (by seq) but does not hold: lost in transit.

        Messages on one connection arrive in order and a member sends every answer before the
        heartbeat that no longer lists it, so this is exact, not a timing guess.
        """
        keep = set(held)
        lost = [t for t, s in w.inflight.items() if s <= seen and t not in keep]
        if not lost:
            return
        for ticket in lost:
            self._release(w, ticket)
            req = self._reqs.get(ticket)
            if req is not None and req.worker is w:
                self.counters["lost_in_transit"] += 1
                req.attempt -= 1
                self._requeue(req, now)
        self._offer(w)
        self._pump_services(w, now, out)

    def _on_hello(self, peer: bytes, w: _Worker | None, m: p.Hello, now: float) -> list[Out]:
        out: list[Out] = []
        if m.epoch > self._epoch and self._pair is not None:
            self._outgrown(m.epoch, now, out)
        if m.role == p.ROLE_CLIENT:
            self._heard_client(peer, now)
            return [(peer, self._welcome)]
        if m.role == p.ROLE_BROKER:
            if m.name == self.name:
                self.counters["bad_input"] += 1
                return [(peer, p.Error(p.E_ROLE, f"registration refused: {m.name!r} is this broker's own name"))]
            services: tuple[str, ...] = ()
            for other in [x for x in self._workers.values() if x.spare is not None and x.name == m.name]:
                if other.ident != peer:  # the same proxy on a new connection: the old one is gone
                    out += self._drop_worker(other, now, "replaced by a new registration", spend_attempt=False)
        else:
            reserved = [s for s in m.services if s.startswith(p.INTERNAL_PREFIXES)]
            if reserved or not m.services:
                self.counters["bad_input"] += 1
                why = f"service names starting with {' or '.join(map(repr, p.INTERNAL_PREFIXES))} are reserved"
                why = why if reserved else "no services"
                return [(peer, p.Error(p.E_HEADER, f"registration refused: {why}"))]
            services = tuple(dict.fromkeys(m.services))
        if w is not None:
            # The peer began a new session (it thinks we restarted): what it held is void.
            out += self._drop_worker(w, now, "re-registered", spend_attempt=False)
        self._serial += 1
        nw = _Worker(peer, m.name, services, m.capacity, self._serial, now)
        nw.ttl = self._ttl
        if m.role == p.ROLE_BROKER:
            nw.spare = {}
            self._brokers += 1
            self.counters["brokers_registered"] += 1
        else:
            self.counters["workers_registered"] += 1
        self._workers[peer] = nw
        heappush(self._expiry, (now + self._ttl + EPSILON, nw.serial, nw))
        self._join(nw, services)
        if self._adopt and (tickets := self._adopt.pop(peer, None)):
            self._adopt_member(nw, tickets, now)
        out.append((peer, self._welcome))
        if nw.spare is not None:
            self._advert_to(nw, self._spare_totals(), now, out, force=True)
        self._offer(nw)
        self._pump_services(nw, now, out)
        return out

    def _join(self, w: _Worker, services: tuple[str, ...]) -> None:
        for s in services:
            pool = self._pools.get(s)
            if pool is None:
                pool = self._pools[s] = _Pool(s)
            pool.workers.add(w)

    def _on_advert(self, peer: bytes, w: _Worker | None, m: p.Advert, now: float) -> list[Out]:
        if w is None:
            return [(peer, p.Reconnect("unknown broker: register again"))]
        if w.spare is None:
            self.counters["bad_input"] += 1
            return [(peer, p.Error(p.E_ROLE, "ADVERT is accepted from downstream brokers only"))]
        w.spare = dict(m.offer)
        w.adv_at = now
        services = tuple(w.spare)
        if services != w.services:
            gone = set(w.services) - set(services)
            for s in gone:
                pool = self._pools.get(s)
                if pool is not None:
                    pool.workers.discard(w)
            w.services = services
            self._join(w, services)
        self._offer(w)
        out: list[Out] = []
        self._pump_services(w, now, out)
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
        self._changes += 1
        if not w.alive:
            return
        spare = w.spare
        if spare is None:
            n = len(w.inflight)
            if w.carried:
                n -= len(w.carried)
            if n >= w.capacity:
                return
            entry = (n / w.capacity, w.last_used, w.serial, w.version, w)
        for s in w.services:
            if spare is not None:
                free = w.allowed(s)
                if free <= 0:
                    continue
                n = w.load.get(s, 0)
                entry = (n / (n + free), w.last_used, w.serial, w.version, w)
            pool = self._pools[s]
            heap = pool.heap
            heappush(heap, entry)
            if len(heap) > 4 * len(pool.workers) + 64:
                pool.heap = [e for e in heap if e[3] == e[4].version and e[4].alive]
                heapify(pool.heap)

    def _take(self, pool: _Pool, req: _Req) -> _Worker | None:
        """Pop and return the least-loaded member of ``pool`` that may take ``req`` (or None)."""
        heap = pool.heap
        skipped = None
        found = None
        while heap:
            entry = heap[0]
            w = entry[4]
            if entry[3] != w.version or not w.alive:
                heappop(heap)
                continue
            if req.hops and w.spare is not None and w.name in req.hops:
                if skipped is None:
                    skipped = []
                skipped.append(heappop(heap))  # never back to a broker the request has passed
                continue
            heappop(heap)
            found = w
            break
        if skipped:
            for e in skipped:
                heappush(heap, e)
        return found

    def _pump(self, pool: _Pool, now: float, out: list[Out]) -> None:
        """Dispatch queued requests of ``pool``: to its members while they have free slots, then
        (a proxy) upstream; a request handed down from upstream that no member can take is refused."""
        queue = pool.queue
        reqs = self._reqs
        up = self._up
        aside: list[int] | None = None
        while queue:
            ticket = queue[0]
            req = reqs.get(ticket)
            if req is None or req.state != QUEUED:
                queue.popleft()
                continue
            w = self._take(pool, req) if pool.heap else None
            if w is None:
                if not req.client:  # handed down by our upstream and no member can take it
                    queue.popleft()
                    self._dequeued(req)
                    self._refuse_up(req, now, out)
                    continue
                # Upstream within its credit (or always, for a service nothing below us serves).
                can_up = up is not None and up.registered and (up.credit(req.service) > 0 or not pool.workers)
                if can_up and up is not None and req.up_block < up.adverts and self._may_forward(req, up.name, now):
                    queue.popleft()
                    self._dequeued(req)
                    self._forward_up(req, now, out)
                    continue
                d = self._workers.get(req.client)
                if d is not None and d.spare is not None and req.service in d.services:
                    # From a downstream broker that serves this itself: give it back (BUSY)
                    # rather than hold it here, where it can never go back down to that broker.
                    queue.popleft()
                    self._dequeued(req)
                    self.counters["returned"] += 1
                    self._finish(req, p.ST_BUSY, f"{self.name} has no spare capacity for it now", b"", out)
                    continue
                if not can_up:
                    break  # wait for a member's slot, or for credit from upstream
                queue.popleft()  # this one may not go up (hops, returned): others behind may
                if aside is None:
                    aside = []
                aside.append(ticket)
                continue
            queue.popleft()
            self._dequeued(req)
            if req.deadline <= now:
                self._offer(w)
                self._expire(req, out, dequeued=True)
                continue
            self._assign(req, w, now, out)
        if aside:
            queue.extendleft(reversed(aside))

    def _dequeued(self, req: _Req) -> None:
        self._queued -= 1
        self._queued_bytes -= len(req.payload)

    def _assign(self, req: _Req, w: _Worker, now: float, out: list[Out]) -> None:
        """Send ``req`` to member ``w`` (whose heap entry the caller has popped)."""
        ticket = req.ticket
        if self._h_wait is not None:
            self._h_wait.observe(now - req.t_in)
        req.t_out = now
        req.state = ASSIGNED
        req.worker = w
        req.attempt += 1
        w.seq += 1
        seq = w.seq
        w.inflight[ticket] = seq
        w.last_used = self._seq
        self._seq += 1
        key = req.key
        if not key:
            key = req.key = f"{req.client.hex()}:{req.rid}"
        budget = int((req.deadline - now) * 1000)
        if w.spare is None:
            # tuple.__new__: a NamedTuple's own __new__ costs twice as much on this per-request path
            task = tuple.__new__(
                p.Task, (ticket, req.service, max(1, budget), req.attempt, key, seq, (), req.payload, req.trace)
            )
        else:
            s = req.service
            w.svc_of[ticket] = s
            w.load[s] = w.load.get(s, 0) + 1
            hops = (*req.hops, self.name)
            task = p.Task(
                ticket, s, max(1, budget - HOP_MARGIN_MS), req.attempt, key, seq, hops, req.payload, req.trace
            )
        self._offer(w)
        out.append((w.ident, task))
        if self._ops is not None:
            self._ops.append(["s", ticket, w.ident, req.attempt])

    def _release(self, w: _Worker, ticket: int) -> None:
        """``w`` no longer holds ``ticket``."""
        del w.inflight[ticket]
        if w.carried:
            w.carried.discard(ticket)
        if w.spare is not None:
            s = w.svc_of.pop(ticket)
            w.load[s] -= 1

    def _pump_services(self, w: _Worker, now: float, out: list[Out]) -> None:
        """Dispatch what waits for any service of ``w`` (it has just gained free capacity)."""
        for s in w.services:
            pool = self._pools[s]
            if pool.queue:
                self._pump(pool, now, out)

    def _requeue(self, req: _Req, now: float) -> None:
        pool = self._pools.get(req.service)
        if pool is None:
            pool = self._pools[req.service] = _Pool(req.service)
        req.state = QUEUED
        req.worker = None
        if self._ops is not None:
            self._ops.append(["q", req.ticket])
        pool.queue.appendleft(req.ticket)
        self._queued += 1
        self._queued_bytes += len(req.payload)
        self._changes += 1
        heappush(self._deadlines, (req.deadline, req.ticket))

    def _drop_worker(self, w: _Worker, now: float, why: str, *, spend_attempt: bool) -> list[Out]:
        """Forget ``w``; requeue what it held (or answer LOST past the attempt cap)."""
        out: list[Out] = []
        w.alive = False
        w.version += 1
        self._changes += 1
        if self._workers.get(w.ident) is w:
            del self._workers[w.ident]
            if w.spare is not None:
                self._brokers -= 1
        for s in w.services:
            pool = self._pools.get(s)
            if pool is not None:
                pool.workers.discard(w)
        touched: set[str] = set()
        kind = "workers" if w.spare is None else "brokers"
        for ticket in sorted(w.inflight, reverse=True):  # appendleft: oldest ends up first
            req = self._reqs.get(ticket)
            if req is None or req.worker is not w:
                continue
            if req.tried is None:
                req.tried = []
            req.tried.append(w.ident)
            if not spend_attempt:
                req.attempt -= 1
            self._retry(
                req,
                f"{req.attempt} {kind} serving {req.service!r} died while holding it",
                f"{w.name} {why}",
                now,
                out,
                touched,
            )
        w.inflight.clear()
        w.carried.clear()
        w.svc_of.clear()
        w.load.clear()
        if w.spare is not None:
            self._abandon_from(w.ident)
        for s in touched:
            if s in self._pools:
                self._pump(self._pools[s], now, out)
        return out

    def _retry(self, req: _Req, lost: str, last: str, now: float, out: list[Out], touched: set[str]) -> None:
        """Requeue ``req`` after its holder was lost, or end it LOST at the attempt cap."""
        cap = self.settings.max_attempts
        if req.attempt >= cap:
            self._finish(req, p.ST_LOST, f"request lost: {lost} (attempt cap {cap}; last: {last})", b"", out)
        else:
            self.counters["requeues"] += 1
            self._requeue(req, now)
            touched.add(req.service)

    def _abandon_from(self, client: bytes) -> None:
        """Forget queued requests a departed downstream broker forwarded: no one can take the reply."""
        for req in [r for r in self._reqs.values() if r.client == client and r.state == QUEUED]:
            self.counters["abandoned"] += 1
            self._dequeued(req)
            self._forget(req)

    def _expire(self, req: _Req, out: list[Out], dequeued: bool = False) -> None:
        if not dequeued:
            self._dequeued(req)
        self._changes += 1
        pool = self._pools.get(req.service)
        if pool is None or not pool.workers:
            why = f"no worker for service {req.service!r} was registered at broker {self.name}"
            if self._up is not None:
                why += " and its upstream could not take it" if self._up.registered else " and its upstream is down"
        else:
            why = f"all {len(pool.workers)} workers of service {req.service!r} stayed busy"
        self._finish(req, p.ST_TIMEOUT, f"deadline passed before dispatch: {why}", b"", out)

    def _forget(self, req: _Req) -> None:
        """Remove ``req`` from the tables (its ticket may linger in a queue; pumps skip it)."""
        del self._reqs[req.ticket]
        if self._ops is not None:
            self._ops.append(["e", req.ticket])
        client = req.client
        key = (client, req.rid)
        if self._by_key.get(key) == req.ticket:
            del self._by_key[key]
        n = self._open_by_client.get(client, 0) - 1
        if n > 0:
            self._open_by_client[client] = n
        else:
            self._open_by_client.pop(client, None)
        if not req.client:
            self._from_up.pop(req.ticket, None)
        if req.via is not None:
            req.via.held_from[req.service] -= 1
            req.via = None
        pool = self._pools.get(req.service)
        if pool is not None and not pool.workers:
            queue = pool.queue
            reqs = self._reqs
            while queue and ((r := reqs.get(queue[0])) is None or r.state != QUEUED):
                queue.popleft()
            if not queue:
                del self._pools[req.service]  # services nobody serves must not accumulate

    def _finish(self, req: _Req, status: int, message: str, payload: bytes, out: list[Out]) -> None:
        """End ``req``: forget it and append its one reply (none for void upstream work)."""
        self._forget(req)
        if self._h_e2e is not None:
            self._h_e2e.observe(self._now - req.t_in)
        self.counters[_COUNTER_OF[status]] += 1
        if req.client:
            out.append((req.client, tuple.__new__(p.Reply, (req.rid, status, message, payload))))
        elif self._up is not None and req.session == self._up.session:
            out.append((UPSTREAM, p.Reply(req.rid, status, message, payload)))

    def _compact_deadlines(self) -> None:
        reqs = self._reqs
        self._deadlines = [
            (d, t) for d, t in self._deadlines if (r := reqs.get(t)) is not None and r.state in (QUEUED, FORWARDED)
        ]
        heapify(self._deadlines)

    # --- the upstream link (proxies) ------------------------------------------------------------

    def _may_forward(self, req: _Req, upstream_name: str, now: float) -> bool:
        hops = req.hops
        return len(hops) < p.MAX_HOPS and upstream_name not in hops and (req.deadline - now) * 1000 >= HOP_MARGIN_MS + 1

    def _forward_up(self, req: _Req, now: float, out: list[Out]) -> None:
        up = self._up
        assert up is not None
        req.state = FORWARDED
        req.went_up = True
        req.attempt += 1
        self._sent_up[req.ticket] = req
        self.counters["forwarded_up"] += 1
        up.forwarded(req.service)
        heappush(self._deadlines, (req.deadline, req.ticket))
        budget = int((req.deadline - now) * 1000) - HOP_MARGIN_MS
        hops = (*req.hops, self.name)
        out.append((UPSTREAM, p.Request(req.ticket, req.service, budget, hops, req.payload, req.trace)))

    def _unforward(self, req: _Req) -> None:
        """``req`` is no longer with the upstream: it frees a unit of credit."""
        del self._sent_up[req.ticket]
        if self._up is not None:
            self._up.forwarded(req.service, -1)

    def _refuse_up(self, req: _Req, now: float, out: list[Out]) -> None:
        """Hand work back to the upstream (BUSY: it requeues without spending an attempt), with a
        fresh advert first so that it does not offer us the same work again."""
        self.counters["refused_up"] += 1
        self._advert(now, out, force=True)
        self._finish(req, p.ST_BUSY, f"proxy {self.name} has no free capacity for {req.service!r}", b"", out)

    def _from_upstream(self, msg: p.Message, now: float) -> list[Out]:
        up = self._up
        if up is None:
            return _NONE
        out: list[Out] = []
        if up.wait_until is not None:
            return out  # between sessions: whatever the old connection still delivers is void
        link = up.link
        link.last_heard = now
        t = type(msg)
        if t is p.Task:
            self._on_up_task(msg, now, out)  # type: ignore[arg-type]
        elif t is p.Reply:
            self._on_up_reply(msg, now, out)  # type: ignore[arg-type]
        elif t is p.Heartbeat:
            if link.restarted(msg.incarnation):  # type: ignore[union-attr]
                self._lose_upstream(now, "upstream broker restarted", False, out)
            elif (why := link.fenced(link.broker, "", msg.epoch)) is not None:  # type: ignore[union-attr]
                self._lose_upstream(now, why, True, out)
            else:
                up.seq_seen = max(up.seq_seen, msg.seq)  # type: ignore[union-attr]
        elif t is p.Welcome:
            if (why := link.fenced(msg.broker, msg.peer, msg.epoch)) is not None:  # type: ignore[union-attr]
                self._lose_upstream(now, why, True, out)
                return out
            link.welcome(msg)  # type: ignore[arg-type]
            up.welcomed(msg.broker)  # type: ignore[union-attr]
            self._advert(now, out, force=True)
            for pool in list(self._pools.values()):
                if pool.queue:
                    self._pump(pool, now, out)
        elif t is p.Advert:
            up.advert(msg.offer)  # type: ignore[union-attr]
            self._changes += 1  # what we offer our own downstream brokers includes this credit
            for pool in list(self._pools.values()):
                if pool.queue:
                    self._pump(pool, now, out)
        elif t is p.Reconnect:
            self._lose_upstream(now, "upstream broker does not know us", False, out)
        elif t is p.Bye:
            self._lose_upstream(now, f"upstream said bye: {msg.reason}", True, out)  # type: ignore[union-attr]
        elif t is p.Error:
            out.append((UPSTREAM, Problem(f"upstream refused a message: {msg.message}")))  # type: ignore[union-attr]
            if not up.registered:
                self._lose_upstream(now, f"registration refused: {msg.message}", True, out)  # type: ignore[union-attr]
        else:
            self.counters["bad_input"] += 1
            out.append((UPSTREAM, Problem(f"unexpected {t.__name__} from upstream ignored")))
        return out

    def _on_up_task(self, m: p.Task, now: float, out: list[Out]) -> None:
        """Work handed down by the upstream: serve it with our own pool, or refuse it (BUSY)."""
        up = self._up
        assert up is not None
        if not up.registered:
            return  # from a registration we replaced: the upstream has requeued it
        up.seq_seen = max(up.seq_seen, m.seq)
        if m.service.startswith(p.INTERNAL_PREFIXES):  # answered here, never dispatched
            if m.service == TREE_SERVICE:
                out += self._gather_tree(UPSTREAM, m.ticket, up.session, m.budget_ms, m.hops, now)
            else:
                r = self._internal(p.Request(m.ticket, m.service, m.budget_ms, m.hops, m.payload), now)
                out.append((UPSTREAM, r))
            return
        self.counters["tasks_from_up"] += 1
        key = (UPSTREAM, m.ticket)
        if key in self._by_key:
            self.counters["duplicates"] += 1
            return
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        req = _Req(ticket, UPSTREAM, m.ticket, m.service, m.payload, now + m.budget_ms / 1000.0, m.hops)
        req.t_in = now
        req.trace = m.trace
        req.session = up.session
        req.key = m.key
        if self.name in m.hops:
            self.counters["loops"] += 1
            self._reqs[ticket] = req
            self._finish(req, p.ST_INVALID, f"request looped: it has passed {self.name} already", b"", out)
            return
        pool = self._pools.get(m.service)
        w = self._take(pool, req) if pool is not None and pool.heap else None
        self._reqs[ticket] = req
        if w is None:
            self._refuse_up(req, now, out)
            return
        self._by_key[key] = ticket
        self._from_up[ticket] = req
        self._assign(req, w, now, out)

    def _on_up_reply(self, m: p.Reply, now: float, out: list[Out]) -> None:
        """The upstream's answer to a request we forwarded: it ends the request, wherever it is."""
        req = self._reqs.get(m.rid)
        if req is None or not req.went_up:
            self.counters["late_results"] += 1
            return
        if m.status == p.ST_BUSY:
            # The upstream could not place it now: it waits here (for a member of ours, or for a
            # newer advert before it goes up again), within its deadline. A BUSY for a request
            # that is no longer with the upstream (taken back after a lost session) is stale.
            if req.state != FORWARDED:
                self.counters["late_results"] += 1
                return
            up = self._up
            assert up is not None
            self._unforward(req)
            self.counters["returned_from_up"] += 1
            req.attempt -= 1
            req.up_block = up.adverts
            self._requeue(req, now)
            self._pump(self._pools[req.service], now, out)
            return
        if req.state == QUEUED:
            self._dequeued(req)
        elif req.state == FORWARDED:
            self._unforward(req)
        self._finish(req, m.status, m.message, m.payload, out)
        pool = self._pools.get(req.service)
        if pool is not None and pool.queue:
            self._pump(pool, now, out)  # the answer freed a unit of credit upstream

    def _lose_upstream(self, now: float, reason: str, move: bool, out: list[Out]) -> None:
        """The upstream session ended: void what it handed down, take back what we sent it."""
        up = self._up
        assert up is not None
        up.lose(now, reason, move=move)
        self.counters["upstream_losses"] += 1
        out.append((UPSTREAM, Problem(f"upstream link lost ({reason}); registering again")))
        for req in list(self._from_up.values()):
            key = (UPSTREAM, req.rid)
            if self._by_key.get(key) == req.ticket:
                del self._by_key[key]
            if req.state == QUEUED:
                self._dequeued(req)
                self._forget(req)
        touched: set[str] = set()
        for ticket in sorted(self._sent_up, reverse=True):
            req = self._sent_up.pop(ticket)
            self._retry(
                req, f"its upstream broker was lost {req.attempt} times while holding it", reason, now, out, touched
            )
        for s in touched:
            self._pump(self._pools[s], now, out)

    def _tick_upstream(self, now: float, out: list[Out]) -> None:
        up = self._up
        assert up is not None
        link = up.link
        if up.wait_until is not None:
            if now < up.wait_until:
                return
            up.wait_until = None
            if up.move:
                out.append((UPSTREAM, link.connect_next(now, up.reason)))
            else:
                link.last_heard = now
                link.next_hb = now + link.hb_s
                link.incarnation = None
            hb_ms = max(1, round(self.settings.heartbeat.heartbeat_s * 1000))
            out.append((UPSTREAM, p.Hello(p.ROLE_BROKER, self.name, (), 0, hb_ms, link.top_epoch)))
            return
        if link.silent(now):
            self._lose_upstream(now, f"upstream at {link.endpoint} silent for {now - link.last_heard:.2f}s", True, out)
            return
        if up.registered:
            if link.heartbeat_due(now):
                held = tuple(r.rid for r in self._from_up.values() if r.session == up.session)
                out.append((UPSTREAM, p.Heartbeat(p.ROLE_BROKER, link.incarnation or "", up.seq_seen, held)))
            if up.advert_due(now, self._changes != self._up_mark):
                self._advert(now, out)

    def spare(self) -> tuple[tuple[str, int], ...]:
        """What this broker offers its upstream, per service it can serve below it: free slots less
        what is queued, plus the upstream's tasks it holds (so each answer frees upstream credit)."""
        up = self._up
        held: dict[str, int] = {}
        for r in self._from_up.values():
            if up is not None and r.session == up.session:
                held[r.service] = held.get(r.service, 0) + 1
        budget = p.MAX_CAPACITY  # held tickets and offer stay within what a heartbeat may list
        out = []
        for name in sorted(self._pools):
            pool = self._pools[name]
            if not pool.workers:
                continue
            free = sum(w.free(name) for w in pool.workers)
            n = max(0, min(free - len(pool.queue) + held.get(name, 0), budget))
            budget -= n
            out.append((name, n))
        return tuple(out)

    def _advert(self, now: float, out: list[Out], force: bool = False) -> None:
        up = self._up
        if up is None or not up.registered:
            return
        self._up_mark = self._changes
        spare = self.spare()
        if force or spare != up.last_spare or now >= up.advert_at + up.link.hb_s:
            up.last_spare = spare
            up.advert_at = now
            out.append((UPSTREAM, p.Advert(spare)))

    def _spare_totals(self) -> dict[str, int]:
        """Per service: free slots of every member plus upstream credit, less what is queued."""
        totals: dict[str, int] = {}
        for name, pool in self._pools.items():
            totals[name] = sum(w.free(name) for w in pool.workers) - len(pool.queue)
        up = self._up
        if up is not None and up.registered:
            for name in up.spare:
                totals[name] = totals.get(name, 0) + max(0, up.credit(name))
        return totals

    def _advert_to(self, d: _Worker, totals: dict[str, int], now: float, out: list[Out], force: bool) -> None:
        """Tell downstream broker ``d`` what we offer it: our spare capacity outside its subtree plus
        its requests we hold (its credit is this less its requests in flight here)."""
        spare = []
        held = d.held_from
        for name in sorted(totals.keys() | held.keys()):
            n = totals.get(name, 0) - (max(0, d.allowed(name)) if name in d.services else 0) + held.get(name, 0)
            if n > 0:
                spare.append((name, min(n, p.MAX_CAPACITY)))
        t = tuple(spare)
        if force or t != d.down_spare:
            d.down_spare = t
            out.append((d.ident, p.Advert(t)))

    def _down_advert_due(self, now: float) -> bool:
        if self._changes != self._down_mark and now >= self._down_at + self.settings.advert_interval_s:
            return True
        return now >= self._down_at + self.settings.heartbeat.heartbeat_s

    def _advert_down(self, now: float, out: list[Out]) -> None:
        refresh = now >= self._down_at + self.settings.heartbeat.heartbeat_s
        self._down_mark = self._changes
        self._down_at = now
        totals = self._spare_totals()
        for w in self._workers.values():
            if w.spare is not None:
                self._advert_to(w, totals, now, out, force=refresh)

    def _gather_tree(
        self, answer_to: bytes, rid: int, session: int, budget_ms: int, hops: tuple[str, ...], now: float
    ) -> list[Out]:
        """Answer a tree status: ours, with the trees of the brokers below (asked now, waited for
        until they all answer or the deadline; the silent ones are listed as unreachable)."""
        out: list[Out] = []
        wait_s = min(TREE_WAIT_S, budget_ms / 1000.0 * 0.8)
        gid = self._next_ticket
        self._next_ticket += 1
        g = _Gather(gid, answer_to, rid, session, self.status(now), now + wait_s)
        self._gathers[gid] = g
        below = [w for w in self._workers.values() if w.spare is not None and w.name not in hops]
        child_ms = max(1, int(wait_s * 1000 * 0.8) - HOP_MARGIN_MS)
        for d in below:
            t = self._next_ticket
            self._next_ticket += 1
            g.waiting[t] = d.name
            self._gather_of[t] = gid
            task = p.Task(t, TREE_SERVICE, child_ms, 1, f"tree:{gid}", 0, (*hops, self.name), b"")
            out.append((d.ident, task))
        if not below:
            self._gather_done(g, out)
        return out

    def _gathered(self, m: p.Reply, now: float) -> list[Out]:
        gid = self._gather_of.pop(m.rid)
        g = self._gathers.get(gid)
        out: list[Out] = []
        if g is None:
            return out
        name = g.waiting.pop(m.rid, "?")
        try:
            sub = p.unpack_value(m.payload) if m.status == p.ST_OK else None
        except ValueError:
            sub = None
        g.below.append(sub if isinstance(sub, dict) else {"broker": name, "error": m.message or "bad answer"})
        if not g.waiting:
            self._gather_done(g, out)
        return out

    def _gather_done(self, g: _Gather, out: list[Out]) -> None:
        del self._gathers[g.gid]
        for t in g.waiting:
            self._gather_of.pop(t, None)
        tree = {**g.mine, "below": g.below, "unreachable": sorted(g.waiting.values())}
        reply = p.Reply(g.rid, p.ST_OK, "", p.pack_value(tree))
        if g.answer_to:
            out.append((g.answer_to, reply))
        elif self._up is not None and g.session == self._up.session:
            out.append((UPSTREAM, reply))

    # --- the backup pair ------------------------------------------------------------------------

    def pair_receive(self, msg: p.Message, now: float) -> list[Out]:
        """Handle a message from the other broker of our pair (the runtime's pair link)."""
        self._now = now
        pair = self._pair
        out: list[Out] = []
        if pair is None:
            self.counters["bad_input"] += 1
            return out
        t = type(msg)
        if t is p.PairState:
            pair.heard(msg, now)  # type: ignore[arg-type]
            self._decide(now, out)
        elif t is p.Replicate:
            problem = pair.apply(msg, now)  # type: ignore[arg-type]
            if problem is not None:
                out.append((PAIR, Problem(problem)))
        elif t is p.Handover:
            if self._standby and msg.epoch >= pair.epoch:  # type: ignore[union-attr]
                pair.peer_state = PASSIVE  # it stepped down as it sent this
                pair.peer_epoch = max(pair.peer_epoch, msg.epoch)  # type: ignore[union-attr]
                self._take_over(now, out, f"{pair.peer_name} handed over")
        else:
            self.counters["bad_input"] += 1
            out.append((PAIR, Problem(f"unexpected {t.__name__} on the pair link ignored")))
        return out

    def flush(self, now: float) -> list[Out]:
        """Return the replication message for the passive peer, if any (the runtime calls this
        after each batch of input, so one REPLICATE carries many requests)."""
        pair = self._pair
        if pair is None or self._standby:
            return _NONE
        m = pair.flush(now, self._snapshot)
        return [(PAIR, m)] if m is not None else _NONE

    def _tick_pair(self, now: float, out: list[Out]) -> None:
        pair = self._pair
        assert pair is not None
        self._decide(now, out)
        if now >= pair.next_beat:
            out.append((PAIR, pair.state_message(now)))
        if self._standby and pair.held and pair.peer_state == ACTIVE and pair.peer_fresh(now):
            self._redirect_held(out)
        out += self.flush(now)

    def _decide(self, now: float, out: list[Out]) -> None:
        pair = self._pair
        assert pair is not None
        action = pair.decide(now)
        if action is None:
            return
        if action == TAKE_OVER:
            if pair.peer_alive(now) and pair.state == PENDING:
                why = f"both started, {pair.peer_name} too: the primary serves"
            elif pair.peer_alive(now):
                why = f"{pair.peer_name} is {'restarting' if pair.peer_state == PENDING else 'passive'}"
            else:
                why = f"{pair.peer_name or 'the peer'} silent, {len(pair.votes)} peers came here"
            self._take_over(now, out, why)
        elif action == BECOME_PASSIVE:
            pair.deactivate(now, stepped_down=False)
            out.append((PAIR, Problem(f"{self.name} is passive: {pair.peer_name} is active (epoch {pair.epoch})")))
            self._redirect_held(out)
        elif action == STEP_DOWN:
            self._step_down(now, out, f"{pair.peer_name} is active with epoch {pair.peer_epoch} (ours {pair.epoch})")
        elif action == HAND_OVER:
            self._hand_over(now, out)

    def _redirect_held(self, out: list[Out]) -> None:
        pair = self._pair
        assert pair is not None
        bye = p.Bye(f"{self.name} is the passive broker of its pair; {pair.peer_name} is active")
        out += [(ident, bye) for ident in pair.held]
        self.counters["redirected"] += len(pair.held)
        pair.held.clear()

    def _standby_receive(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        """A message for a broker of a pair that is not active: answer status; send the peer to
        the active broker; or, when the active one looks dead, count a vote and wait."""
        pair = self._pair
        assert pair is not None
        t = type(msg)
        if t is p.Request and msg.service == STATUS_SERVICE:  # type: ignore[union-attr]
            return [(peer, self._internal(msg, now))]  # type: ignore[arg-type]
        if t is not p.Hello and t is not p.Request and t is not p.Heartbeat:
            return _NONE  # for a registration this broker does not hold: it was told to leave
        if pair.peer_state == ACTIVE and pair.peer_fresh(now):
            # One BYE per peer per heartbeat: a client that resends its pending requests must not
            # get a BYE for each of them (it would fail over once per BYE).
            if not pair.redirect_due(peer, now):
                return _NONE
            self.counters["redirected"] += 1
            return [(peer, p.Bye(f"{self.name} is the passive broker of its pair; {pair.peer_name} is active"))]
        pair.vote(peer, now)
        pair.held.add(peer)
        out: list[Out] = []
        self._decide(now, out)  # this vote may be what a takeover waited for
        return out

    def _outgrown(self, seen: int, now: float, out: list[Out]) -> None:
        """A peer has seen a higher epoch of our pair than ours: the other broker took over while
        we were cut off, then lost that state (it restarted cold). If it is alive on the pair link
        and not active, nobody else serves: move above that epoch, or every peer would refuse us
        for ever. If it is silent, it may be serving beyond a cut: stay fenced (peers refuse us),
        as fencing is for; if it is active, decide() makes one of us step down."""
        pair = self._pair
        assert pair is not None
        if not pair.peer_alive(now) or pair.peer_state == ACTIVE:
            return
        epoch = self._epoch = pair.raise_epoch(seen)
        self._welcome = self._welcome._replace(epoch=epoch)
        self._pong = self._pong._replace(epoch=epoch)
        out.append((PAIR, Problem(f"{self.name}: a peer has seen epoch {seen} of this pair; now epoch {epoch}")))
        out.append((PAIR, pair.state_message(now)))

    def _take_over(self, now: float, out: list[Out], why: str) -> None:
        """Become the active broker: a new epoch, and the replicated table as our own."""
        pair = self._pair
        assert pair is not None
        table, held = pair.table, list(pair.held)
        epoch = self._epoch = pair.activate(now)
        self._standby = False
        self.incarnation = f"{self._base_incarnation}.{epoch}"
        hb = self.settings.heartbeat
        self._welcome = p.Welcome(
            self.name, self.incarnation, max(1, round(hb.heartbeat_s * 1000)), hb.liveness, epoch, pair.peer_name
        )
        self._pong = p.Heartbeat(p.ROLE_BROKER, self.incarnation, 0, (), epoch)
        self._reset(now)
        self._ops = pair.ops
        top = max(pair.top, max(table, default=0))
        self._next_ticket = top + TICKET_GAP if top else 1 + int(self._rng() * 2**61)
        self._restore(table, now)
        pair.table = {}
        out.append(
            (PAIR, Problem(f"{self.name} is active, epoch {epoch} ({why}); {len(table)} open requests taken over"))
        )
        out.append((PAIR, pair.state_message(now)))
        reconnect = p.Reconnect(f"{self.name} is now the active broker of its pair: register again")
        out += [(ident, reconnect) for ident in held]
        if self._up is not None:
            self._tick_upstream(now, out)

    def _restore(self, table: dict[int, list[Any]], now: float) -> None:
        """Load the replicated request table: queued requests wait here; dispatched ones wait (a
        grace of one ttl and a heartbeat) for their member to register and say it still holds them."""
        for ticket in sorted(table):
            rec = table[ticket]
            client, service = rec[R_CLIENT], rec[R_SERVICE]
            req = _Req(ticket, client, rec[R_RID], service, rec[R_PAYLOAD], rec[R_DEADLINE], rec[R_HOPS])
            req.trace, req.key, req.attempt, req.t_in = rec[R_TRACE], rec[R_KEY], rec[R_ATTEMPT], now
            self._reqs[ticket] = req
            self._by_key[(client, req.rid)] = ticket
            self._open_by_client[client] = self._open_by_client.get(client, 0) + 1
            pool = self._pools.get(service)
            if pool is None:
                pool = self._pools[service] = _Pool(service)
            if rec[R_MEMBER] is not None:
                req.state = ASSIGNED
                self._adopt.setdefault(rec[R_MEMBER], []).append(ticket)
            else:
                pool.queue.append(ticket)
                self._queued += 1
                self._queued_bytes += len(req.payload)
                heappush(self._deadlines, (req.deadline, ticket))
        if self._adopt:
            self._adopt_until = now + self._ttl + self.settings.heartbeat.heartbeat_s

    def _adopt_member(self, w: _Worker, tickets: list[int], now: float) -> None:
        """``w`` registered with us after a takeover: it holds these requests (its first heartbeat
        confirms which; its results for them are delivered, not run again)."""
        for t in tickets:
            req = self._reqs.get(t)
            if req is None or req.state != ASSIGNED or req.worker is not None:
                continue
            req.worker = w
            req.t_out = now
            w.inflight[t] = 0  # seq 0: reconciled by its first heartbeat
            if w.spare is not None:
                w.svc_of[t] = req.service
                w.load[req.service] = w.load.get(req.service, 0) + 1
            else:
                w.carried.add(t)
            w.adopted = True
            self.counters["adopted"] += 1
            if self._ops is not None:
                self._ops.append(["s", t, w.ident, req.attempt])
        if not self._adopt:
            self._adopt_until = None

    def _adopt_expired(self, now: float, out: list[Out]) -> None:
        """Members that held requests at the takeover and did not come: requeue what they held
        (no attempt spent; a result they still send is delivered, see ``tried``)."""
        self._adopt_until = None
        touched: set[str] = set()
        for member, tickets in self._adopt.items():
            for t in tickets:
                req = self._reqs.get(t)
                if req is not None and req.state == ASSIGNED and req.worker is None:
                    if req.tried is None:
                        req.tried = []
                    req.tried.append(member)
                    self.counters["requeues"] += 1
                    self._requeue(req, now)
                    touched.add(req.service)
        self._adopt.clear()
        for s in touched:
            self._pump(self._pools[s], now, out)

    def _snapshot(self) -> list[Any]:
        """The whole request table as replication ops (for a passive peer that needs it)."""
        held_by = {t: m for m, ts in self._adopt.items() for t in ts}
        ops: list[Any] = []
        for t, r in self._reqs.items():
            if not r.client:
                continue  # work handed down by our upstream: it requeues that itself
            ops.append(["a", t, r.client, r.rid, r.service, r.deadline, r.hops, r.trace, r.key, r.attempt, r.payload])
            member = r.worker.ident if r.worker is not None else held_by.get(t)
            if r.state == ASSIGNED and member is not None:
                ops.append(["s", t, member, r.attempt])
        return ops

    def _step_down(self, now: float, out: list[Out], why: str) -> None:
        """Stop serving: tell every peer to go (to the other broker), empty the tables."""
        pair = self._pair
        assert pair is not None
        bye = p.Bye(f"{self.name} is now the passive broker of its pair: {why}")
        out += [(ident, bye) for ident in self._leavers()]
        if self._up is not None and self._up.registered:
            out.append((UPSTREAM, p.Bye(f"proxy {self.name} stepped down")))
        pair.deactivate(now, stepped_down=True)
        self._standby = True
        self._ops = None
        self._reset(now)
        out.append((PAIR, Problem(f"{self.name} stepped down to passive: {why}")))
        out.append((PAIR, pair.state_message(now)))

    def _hand_over(self, now: float, out: list[Out]) -> None:
        """Give the work to the passive peer: the last ops, HANDOVER, then step down (failback)."""
        pair = self._pair
        assert pair is not None
        out += self.flush(now)
        out.append((PAIR, p.Handover(pair.epoch)))
        pair.counters["handovers"] += 1
        self._step_down(now, out, f"handed over to {pair.peer_name}")
        pair.peer_state = ACTIVE  # as soon as it reads HANDOVER: send peers there meanwhile

    def _handover_service(self, peer: bytes, rid: int, now: float) -> list[Out]:
        """``zmqdist.handover``: an operator asks the active broker of a pair to hand over."""
        pair = self._pair
        if pair is None:
            why = "this broker is not part of a pair"
        elif not pair.peer_alive(now) or pair.peer_state != PASSIVE:
            why = f"its peer {pair.peer_name or ''} is not a live passive broker: nothing to hand over to"
        elif pair.peer_synced < 0:
            why = f"its peer {pair.peer_name} has no copy of the request table yet"
        else:
            done = {"handed_over_to": pair.peer_name, "epoch": pair.epoch}  # the peer's will be higher
            out: list[Out] = [(peer, p.Reply(rid, p.ST_OK, "", p.pack_value(done)))]
            self._hand_over(now, out)
            return out
        self.counters["invalid"] += 1
        return [(peer, p.Reply(rid, p.ST_INVALID, f"cannot hand over: {why}", b""))]

    # --- internal services ----------------------------------------------------------------------

    def _internal(self, m: p.Request, now: float) -> p.Reply:
        if m.service == STATUS_SERVICE:
            return p.Reply(m.rid, p.ST_OK, "", p.pack_value(self.status(now)))
        if m.service.startswith(p.MMI_PREFIX):
            return p.Reply(m.rid, p.ST_OK, "", p.pack_value(self._mmi(m)))
        self.counters["invalid"] += 1
        return p.Reply(m.rid, p.ST_INVALID, f"unknown internal service {m.service!r}", b"")

    def _mmi(self, m: p.Request) -> bytes:
        """RFC 8/MMI: ``mmi.service`` answers b"200" if the service named in the body is served
        here (a member of ours, or our upstream's offer lists it), b"404" if not; other ``mmi.``
        services b"501"."""
        if m.service != "mmi.service":
            return b"501"
        try:
            v = p.unpack_value(m.payload)
        except ValueError:
            return b"404"
        name = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        pool = self._pools.get(name)
        served = pool is not None and bool(pool.workers)
        if not served and self._up is not None and self._up.registered:
            served = name in self._up.spare
        return b"200" if served else b"404"

    def set_ttl(self, peer: bytes, ttl_s: float) -> None:
        """Give member ``peer`` its own liveness ttl (MDP workers heartbeat at their own pace)."""
        w = self._workers.get(peer)
        if w is not None:
            w.ttl = ttl_s

    def status(self, now: float) -> dict[str, Any]:
        """Return a snapshot for ``zmqdist status``: workers, brokers below, services, queues, counters."""
        workers = [
            {
                "name": w.name,
                "id": w.ident.hex(),
                "services": list(w.services),
                "capacity": w.capacity,
                "inflight": len(w.inflight),
                "served": w.served,
                "failed": w.failed,
                "mean_service_ms": round(1000 * w.busy_s / w.served, 3) if w.served else None,
                "silent_s": round(now - w.seen, 3),
            }
            for w in self._workers.values()
            if w.spare is None
        ]
        brokers = [
            {
                "name": w.name,
                "id": w.ident.hex(),
                "spare": {s: max(0, w.allowed(s)) for s in w.services},
                "inflight": len(w.inflight),
                "served": w.served,
                "silent_s": round(now - w.seen, 3),
            }
            for w in self._workers.values()
            if w.spare is not None
        ]
        services = {
            name: {
                "workers": len(pool.workers),
                "capacity": sum(w.capacity if w.spare is None else max(0, w.allowed(name)) for w in pool.workers),
                "inflight": sum(len(w.inflight) if w.spare is None else w.load.get(name, 0) for w in pool.workers),
                "queued": sum(1 for t in pool.queue if (r := self._reqs.get(t)) and r.state == QUEUED),
            }
            for name, pool in sorted(self._pools.items())
        }
        up = self._up
        upstream = None
        if up is not None:
            upstream = {
                "endpoint": up.link.endpoint if up.link.index >= 0 else None,
                "broker": up.name or None,
                "registered": up.registered,
                "forwarded": len(self._sent_up),
                "held": sum(1 for r in self._from_up.values() if r.session == up.session),
                "losses": up.losses,
            }
        return {
            "broker": self.name,
            "incarnation": self.incarnation,
            "uptime_s": round(now - self.started, 3),
            "heartbeat_s": self.settings.heartbeat.heartbeat_s,
            "liveness": self.settings.heartbeat.liveness,
            "queued": self._queued,
            "queued_bytes": self._queued_bytes,
            "requests_open": len(self._reqs),
            "workers": workers,
            "brokers": brokers,
            "upstream": upstream,
            "ha": self._pair.status(now) if self._pair is not None else None,
            "services": services,
            "counters": dict(self.counters),
            "histograms": {k: h.snapshot() for k, h in self.hist.items()} if self.hist is not None else {},
            **(self.status_hook() if self.status_hook is not None else {}),
        }

    # --- introspection for tests and invariants -------------------------------------------------

    def worker_load(self) -> dict[bytes, tuple[int, int]]:
        """Return ``{worker id: (in-flight, capacity)}`` for live workers (not downstream brokers)."""
        return {i: (len(w.inflight) - len(w.carried), w.capacity) for i, w in self._workers.items() if w.spare is None}

    def members(self) -> set[bytes]:
        """Identities of every live member: workers and downstream brokers."""
        return set(self._workers)

    @property
    def standby(self) -> bool:
        """True for a broker of a pair that is not active (it refuses work)."""
        return self._standby

    @property
    def epoch(self) -> int:
        """Our epoch as the active broker of a pair (0 if never active, or not paired)."""
        return self._epoch

    @property
    def pair(self) -> Pair | None:
        """The backup pair's state (None unless this broker is one of a pair)."""
        return self._pair

    @property
    def upstream(self) -> Upstream | None:
        """The upstream link's state (None unless this broker is a proxy)."""
        return self._up

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return self._queued

    @property
    def open_requests(self) -> int:
        """Requests accepted and not yet answered."""
        return len(self._reqs)
