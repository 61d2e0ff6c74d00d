"""The broker machine: the handlers of every message, the timers. Sans-IO.

Rules of this module:
1. The door for raw frames is :class:`~zmqdist.core.door.BrokerMachine`'s (core/door.py);
   :class:`BrokerCore` implements what is behind it.
2. :class:`BrokerCore` is one broker run: it owns the handlers and wires the rooms that own the
   state: :class:`~zmqdist.core.dispatch.Dispatcher` (requests, pools, members),
   :class:`~zmqdist.core.tiers.Tiers` (the upstream link, downstream credit; dispatch's overflow
   hook) and :class:`~zmqdist.core.services.Services` (status, tree, MMI).
3. A request ends exactly once: one Reply leaves for each accepted Request, whatever happens to the
   workers (OK, FAILED, TIMEOUT, LOST); BUSY and INVALID end it at once. Duplicates of a request that
   is still in progress (same client, same rid) are absorbed.
4. Time is ``now`` passed in; a peer is alive while ``now - last_seen <= ttl``.
5. A backup pair wraps a machine (:class:`~zmqdist.core.failover.PairedBroker`); a machine knows
   only its epoch and the name of its pair's other broker, for what it tells its peers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.dispatch import Dispatcher
from zmqdist.core.door import BrokerMachine
from zmqdist.core.lifecycle import Lifecycle
from zmqdist.core.metrics import Hist
from zmqdist.core.records import (
    ASSIGNED,
    EPSILON,
    FORWARDED,
    NONE,
    BrokerMember,
    Caller,
    Copy,
    Counters,
    Member,
    Out,
    Told,
    WorkerMember,
)
from zmqdist.core.replica import Replica
from zmqdist.core.services import Services, StatusPart
from zmqdist.core.tiers import Tiers, Upstream, half

__all__ = ["EPSILON", "BrokerCore", "BrokerMachine", "Out"]

GONE_SILENT: Final = "this client was silent past the ttl: its open requests were stopped, send them again"
# Clients silent past the ttl, with nothing open, are forgotten this often (in ttls): see tick().
FORGET_EVERY_TTLS: Final = 10


def _earlier(d: float | None, t: float | None) -> float | None:
    """The earlier of two deadlines (None: none)."""
    return t if t is not None and (d is None or t < d) else d


class BrokerCore(BrokerMachine):
    """One broker run: feed it messages and time, send what it returns.

    ``rng`` (uniform in [0, 1)) jitters a proxy's re-registration; inject ``random.random`` in a
    runtime and a seeded source in simulations. A pair's takeover builds a machine with its
    ``epoch``, ``peer`` (the pair's other broker), ``ops`` (the replication list), ``first_ticket``
    and the pair's ``counters``; a passive broker keeps one with ``serving=False`` (no upstream
    link) to answer status.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        incarnation: str,
        now: float,
        rng: Callable[[], float] = half,
        *,
        counters: Counters | None = None,
        started: float | None = None,
        epoch: int = 0,
        peer: str = "",
        ops: list[p.ReplicationOp] | None = None,
        first_ticket: int = 1,
        serving: bool = True,
    ) -> None:
        super().__init__(settings, counters if counters is not None else Counters())
        self.name = settings.name
        self.incarnation = incarnation
        self._ttl = settings.heartbeat.ttl_s
        self._hb_s = settings.heartbeat.heartbeat_s
        # the limits every request is checked against, as plain attributes (read per request)
        self._max_inflight = settings.max_client_inflight
        self._max_queue = settings.max_queue
        self._max_queue_bytes = settings.max_queue_bytes
        self._epoch = epoch
        hb = settings.heartbeat
        self._welcome = p.Welcome(
            settings.name,
            incarnation,
            max(1, round(hb.heartbeat_s * 1000)),
            hb.liveness,
            epoch,
            peer,
            settings.max_client_inflight,
            settings.max_message_size,
            p.MAX_BATCH,
        )
        self._pong = p.Heartbeat(p.ROLE_BROKER, incarnation, 0, (), epoch)
        self.d = d = Dispatcher(settings, self.counters, now, first_ticket)
        d.ops = ops
        self.life = life = Lifecycle(d)
        self.replica = Replica(d)
        self.tiers = tiers = Tiers(settings, d, life, self.counters, now, rng, serving)
        d.overflow = tiers
        self.services = Services(settings, incarnation, now if started is None else started, d, tiers, self.counters)
        tiers.internal = self.services.answer_up
        self._clients: dict[bytes, float] = {}  # clients by when last heard (HELLO, HEARTBEAT)
        self._clients_pruned = -1e9  # when _clients was last pruned
        self._told = Told(self._ttl)  # unknown peers told RECONNECT (once a ttl)

    # --- inputs -----------------------------------------------------------------------------------

    def start(self, now: float) -> list[Out]:
        out: list[Out] = []
        self.tiers.start(now, out)  # a proxy connects and registers upstream
        return out

    def receive(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        self.d.now = now
        w = self.d.members.get(peer)
        if w is not None:
            w.seen = now
        match msg:
            case p.Request():
                return self._on_request(peer, w, msg, now)
            case p.Result():
                return self._on_result(peer, w, msg, now, [])
            case p.Heartbeat():
                return self._on_heartbeat(peer, w, msg, now)
            case p.Hello():
                return self._on_hello(peer, w, msg, now)
            case p.Credit():
                return self._on_credit(peer, w, msg, now)
            case p.Bye():
                return self._on_bye(peer, w, msg, now)
            case p.Advert():
                return self._on_advert(peer, w, msg, now)
            case p.Reply():
                return self._on_reply(peer, w, msg, now)
            case p.Cancel():
                out: list[Out] = []
                self.life.cancel(peer, msg.id, now, out)
                return out
            case p.Ack():
                out = []
                self.life.ack(peer, msg.id, msg.seq, out)
                return out
            case p.Part():
                out = []
                self.life.part(peer, msg.id, msg.seq, msg.payload, out)
                return out
            case p.Progress():
                out = []
                self.life.progress(peer, msg.id, msg.payload, out)
                return out
        self.counters.bad_input += 1
        return [(peer, p.Error(p.E_COMMAND, f"{type(msg).__name__} is not accepted by a broker"))]

    def upstream_receive(self, msg: p.Message, now: float) -> list[Out]:
        self.d.now = now
        return self.tiers.receive(msg, now)

    def pair_receive(self, msg: p.Message, now: float) -> list[Out]:
        self.counters.bad_input += 1  # this broker is not part of a pair
        return NONE

    def receive_plain(self, peer: bytes, head: bytes, payload: bytes, now: float, out: list[Out]) -> bool:
        """The per-request fast path: a REQUEST (no hops, not for an internal service) or a RESULT
        is parsed straight from its frames and handled by the same admission and completion as
        the general path, without building the message or matching on its type. Anything else
        returns False having changed nothing. (A property test runs random schedules both ways
        and compares every output.)"""
        cmd = p.command_of(head)
        if cmd == p.CMD_REQUEST:
            rid, service, budget_ms, trace = p.plain_request(head)
            if not service:
                return False
            if p.internal(service):
                return False
            d = self.d
            d.now = now
            w = d.members.get(peer)
            if w is not None:
                w.seen = now
            self.counters.requests += 1
            self._admit(peer, w, rid, service, budget_ms, (), trace, payload, now, out)
            return True
        if cmd == p.CMD_RESULT:
            ticket, rstatus = p.plain_result(head)
            if rstatus < 0:
                return False
            d = self.d
            d.now = now
            w = d.members.get(peer)
            if w is not None:
                w.seen = now
            if rstatus in (p.RS_OK, p.RS_FAILED):
                status = p.ST_OK if rstatus == p.RS_OK else p.ST_FAILED
                self._settle(peer, w, ticket, status, "", payload, False, now, out)
            else:
                self._on_result(peer, w, p.Result(ticket, rstatus, payload), now, out)
            return True
        return False

    def send_failed(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        self.counters.send_drops += 1
        if type(msg) is p.Task:
            w = self.d.members.get(peer)
            if w is not None:
                # The member is unreachable: treat it as dead so its tasks (this one too) requeue.
                self.counters.workers_unreachable += 1
                return self.d.drop_member(w, now, "unreachable", spend_attempt=False)
        return NONE

    # --- timers -----------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Out]:
        """Expire silent members and queued requests past their deadline; run the tiers."""
        d = self.d
        d.now = now
        out: list[Out] = []
        d.expire_members(now, out)
        d.expire_queued(now, out)
        self.life.tick(now, self._clients, out)
        if now >= self._clients_pruned + FORGET_EVERY_TTLS * self._ttl:  # next_deadline()'s sum, exactly
            self._forget_gone_peers(now)
        self.tiers.tick(now, out)
        self.services.tick(now, out)
        self.replica.tick(now, out)
        if d.idle:
            d.sweep(now)
        return out

    def next_deadline(self) -> float | None:
        # pairwise, not a loop over a tuple of them: this runs at every wake-up
        d = _earlier(self.d.next_deadline(), self.life.next_deadline())
        d = _earlier(d, self.replica.until)
        d = _earlier(d, self.tiers.next_deadline())
        if self._clients or self.batching or self.mdp.peers:  # with no member too (_forget_gone_peers)
            d = _earlier(d, self._clients_pruned + FORGET_EVERY_TTLS * self._ttl)
        return _earlier(d, self.services.next_deadline())

    def flush(self, now: float) -> list[Out]:
        return NONE

    def shutdown(self) -> list[Out]:
        """Say BYE to every member and client (and upstream) so they move on at once."""
        bye = p.Bye("broker shutting down", self.name)
        out: list[Out] = [(ident, bye) for ident in self.leavers()]
        self.tiers.shutdown("proxy shutting down", out)
        return out

    def leavers(self) -> list[bytes]:
        """Everyone to tell BYE when we stop serving: members, clients with open requests, and
        clients heard within the ttl (so they fail over now, not after a ttl of silence)."""
        d = self.d
        now = d.now
        clients: set[bytes] = set()
        for r in d.reqs.values():
            if type(r.client) is bytes:
                clients.add(r.client)
        clients.update(c for c, t in self._clients.items() if now - t <= self._ttl)
        return [*d.members, *(clients - d.members.keys())]

    def _heard_client(self, peer: bytes, now: float) -> None:
        """Note a client's HELLO or HEARTBEAT (a stopping broker tells it BYE). Bounded at twice
        the queue limit: when full, the silent ones are forgotten at once (at most once per ttl,
        :meth:`_forget_gone_peers`); a client that finds it still full gets no BYE and notices
        the silence instead."""
        clients = self._clients
        if peer not in clients and len(clients) >= 2 * self.settings.max_queue:
            if now - self._clients_pruned < self._ttl:
                return
            self._forget_gone_peers(now)
            clients = self._clients
            if len(clients) >= 2 * self.settings.max_queue:
                return
        clients[peer] = now

    def _client_left(self, peer: bytes) -> None:
        """A client said BYE as it closed, after a CANCEL for each of its open requests: forget
        what is kept of it now rather than 10 ttls on (with many short-lived clients, the table
        stayed full of closed ones). One with a request still open stays until the forgetting
        after it ends (rule 4 of core/lifecycle.py stops it once the client is silent)."""
        if peer in self.d.callers or peer not in self._clients:
            return
        del self._clients[peer]
        self.batching.pop(peer, None)

    def _forget_gone_peers(self, now: float) -> None:
        """Forget what this broker keeps of peers that are gone: the clients silent past the ttl
        (less our own pauses) that hold nothing here; the batch limits of peers neither kept nor
        members (such a client, a worker gone, a peer refused); the MDP workers the bridge holds
        that are no members (:meth:`MdpBridge.forget_workers`). Each was kept until its table
        filled (2x and 4x --max-queue entries): with short-lived peers, hundreds of megabytes, and
        a full table forgot the live peers too. A client with requests open stays (rule 4 of
        core/lifecycle.py stops them). One that was only stalled is noted again at its next
        HEARTBEAT; its replies go unbatched until its next HELLO (a failover, or a RECONNECT),
        which is slower, never wrong."""
        self._clients_pruned = now
        d = self.d
        since, ttl, held, members = d.pauses.since, self._ttl, d.callers, d.members
        kept: dict[bytes, float] = {}
        for c, t in self._clients.items():
            if now - since(t) <= ttl or c in held:
                kept[c] = t
        self._clients = kept  # a new dict: one emptied in place keeps the size it grew to
        batching = self.batching  # shared with a pair's door (PairedBroker): emptied in place
        for b in [b for b in batching if b not in kept and b not in members]:
            del batching[b]
        if self.mdp.peers:
            self.mdp.forget_workers(members)

    def _reconnect(self, peer: bytes, now: float, why: str) -> list[Out]:
        """RECONNECT for a peer we do not know, unless it was told within the ttl (:class:`Told`)."""
        return [(peer, p.Reconnect(why))] if self._told.due(peer, now) else NONE

    # --- handlers ---------------------------------------------------------------------------------

    def _on_request(self, peer: bytes, w: Member | None, m: p.Request, now: float) -> list[Out]:
        self.counters.requests += 1
        out: list[Out] = []
        if p.internal(m.service):
            self.services.answer(peer, 0, m.rid, m.service, m.budget_ms, m.hops, m.payload, now, out)
        else:
            self._admit(peer, w, m.rid, m.service, m.budget_ms, m.hops, m.trace, m.payload, now, out, m)
        return out

    def _admit(
        self,
        peer: bytes,
        w: Member | None,
        rid: p.Boxed,
        service: str,
        budget_ms: int,
        hops: tuple[str, ...],
        trace: str,
        payload: bytes,
        now: float,
        out: list[Out],
        m: p.Request | None = None,
    ) -> None:
        """A request for a service: absorb a duplicate, refuse it at once (budget spent, loop,
        quota, full queue), or accept it. Both paths come here (the general one with the message,
        for its optional fields: a caller's key, a stream's window, a retry policy)."""
        c = self.counters
        d = self.d
        if (held := d.keys.ticket(peer, rid)) is not None:
            c.duplicates += 1
            # restored at a takeover and sent again by its caller: it counts now
            if d.unclaimed and (key := (peer, rid)) in d.unclaimed:
                d.unclaimed.discard(key)
                rec = d.callers.get(peer)
                if rec is None:
                    rec = d.callers[peer] = Caller(now)
                rec.open += 1
                rec.last_in = now
            req = d.reqs.get(held)
            if req is None or not req.window or req.state not in (ASSIGNED, FORWARDED):
                return
            # A stream sent again: its caller holds none of its parts (a zmqdist caller sends a
            # stream again only then), so what its run sent went astray (to a broker that died, on
            # a connection since replaced) and the run may wait for acknowledgements that never
            # come. It starts afresh; what the old run still sends is dropped.
            c.restarted += 1
            self.life.cancel_run(req, now, out)
        if budget_ms <= 0:
            c.timeouts += 1
            out.append((peer, p.Reply(rid, p.ST_TIMEOUT, "request arrived with its time budget spent", b"")))
            return
        if hops and self.name in hops:
            c.loops += 1
            c.invalid += 1
            out.append((peer, p.Reply(rid, p.ST_INVALID, f"request looped: it has passed {self.name} already", b"")))
            return
        rec = d.callers.get(peer)
        mine = 0 if rec is None else rec.open
        if mine >= self._max_inflight and not isinstance(w, BrokerMember):
            c.busy += 1
            c.over_quota += 1
            why = f"this client has {mine} requests open, its limit is {self._max_inflight}"
            out.append((peer, p.Reply(rid, p.ST_BUSY, why, p.OVER_QUOTA)))
            return
        if d.queued >= self._max_queue or d.queued_bytes + len(payload) > self._max_queue_bytes:
            c.busy += 1
            why = (
                f"broker {self.name} is busy: {d.queued} requests ({d.queued_bytes} bytes) queued, "
                f"limit {self._max_queue}"
            )
            out.append((peer, p.Reply(rid, p.ST_BUSY, why, b"")))
            return
        if rec is None:
            rec = d.callers[peer] = Caller(now)
        rec.open = mine + 1
        rec.last_in = now  # a sign of life (lifecycle rule 4)
        deadline = p.deadline_at(now, budget_ms)
        if m is None or not (m.key or m.window or m.retry):
            d.accept(peer, w, rid, service, deadline, hops, trace, payload, now, out)
        else:
            d.accept(peer, w, rid, service, deadline, hops, trace, payload, now, out, m.key, m.window, m.retry)

    def _on_result(self, peer: bytes, w: Member | None, m: p.Result, now: float, out: list[Out]) -> list[Out]:
        rs = m.status
        status = p.ST_OK if rs == p.RS_OK else p.ST_CANCELLED if rs == p.RS_CANCELLED else p.ST_FAILED
        delay = m.delay_ms if rs == p.RS_RETRY else -1
        if w is None:
            out += self._reconnect(peer, now, "unknown worker: register again")
        self.d.settle(peer, w, m.ticket, status, "", m.payload, rs == p.RS_REFUSED, now, out, delay, m.parts)
        return out

    def _on_reply(self, peer: bytes, w: Member | None, m: p.Reply, now: float) -> list[Out]:
        """A downstream broker's answer to a task (BUSY: it could not take it, requeue)."""
        if not isinstance(w, BrokerMember):
            if w is None and m.rid in self.d.reqs:
                return self._reconnect(peer, now, "unknown broker: register again")
            self.counters.bad_input += 1
            return [(peer, p.Error(p.E_COMMAND, "REPLY is accepted from registered downstream brokers only"))]
        out: list[Out] = []
        if self.services.asked(m.rid):
            self.services.gathered(m, out)
        else:
            self._settle(peer, w, m.rid, m.status, m.message, m.payload, m.status == p.ST_BUSY, now, out, m.parts)
        return out

    def _settle(
        self,
        peer: bytes,
        w: Member | None,
        ticket: p.Boxed,
        status: int,
        message: str,
        payload: bytes,
        refused: bool,
        now: float,
        out: list[Out],
        parts: int = 0,
    ) -> None:
        """A member answered ``ticket`` (both paths come here); an unknown peer is told to register."""
        if w is None:
            out += self._reconnect(peer, now, "unknown worker: register again")
        self.d.settle(peer, w, ticket, status, message, payload, refused, now, out, -1, parts)

    def _on_heartbeat(self, peer: bytes, w: Member | None, m: p.Heartbeat, now: float) -> list[Out]:
        if w is None:
            if m.role != p.ROLE_CLIENT:
                who = "worker" if m.role == p.ROLE_WORKER else "broker"
                return self._reconnect(peer, now, f"unknown {who}: register again")
            self._heard_client(peer, now)
            if self.life.left and self.life.left.pop(peer, None) is not None:
                return [(peer, p.Reconnect(GONE_SILENT))]  # it sends again what it waits for
            return [(peer, self._pong)]
        out: list[Out] = [(peer, p.Heartbeat(p.ROLE_BROKER, self.incarnation, w.seq, (), self._epoch))]
        if m.rtt_us and type(w) is BrokerMember:
            w.rtt = m.rtt_us / 1e6  # a proxy's own measure of its link to us
        adopted = w.adopted and m.incarnation == self.incarnation  # its first heartbeat since WELCOME
        if adopted:
            w.adopted = False
        if w.inflight and (m.seq or adopted):
            self.d.reconcile(w, m.seq, m.held, now, out)
        if m.held:
            reqs = self.d.reqs
            for t in m.held:  # a run of a request that ended here (cancelled or run afresh while
                if t not in reqs:  # its member was away, carried from a pair's takeover): stop it
                    out.append((peer, p.Cancel(t)))
        return out

    def _on_hello(self, peer: bytes, w: Member | None, m: p.Hello, now: float) -> list[Out]:
        # WELCOME says which HELLO it answers: a client whose first HELLO went unanswered sends its
        # requests again if the first was lost (with what went with it: core/client.py rule 3).
        welcome = self._welcome._replace(hello=m.seq) if m.seq else self._welcome
        if m.role == p.ROLE_CLIENT:
            self._heard_client(peer, now)
            if self.life.left:
                self.life.left.pop(peer, None)  # a client's HELLO sends again what it waits for
            return [(peer, welcome)]
        out: list[Out] = []
        d = self.d
        if m.role == p.ROLE_BROKER:
            if m.name == self.name:
                self.counters.bad_input += 1
                return [(peer, p.Error(p.E_ROLE, f"registration refused: {m.name!r} is this broker's own name"))]
            for other in [x for x in d.members.values() if isinstance(x, BrokerMember) and x.name == m.name]:
                if other.ident != peer:  # the same proxy on a new connection: the old one is gone
                    out += d.drop_member(other, now, "replaced by a new registration", spend_attempt=False)
        else:
            reserved = [s for s in m.services if s.startswith(p.INTERNAL_PREFIXES)]
            if reserved or not m.services:
                self.counters.bad_input += 1
                why = f"service names starting with {' or '.join(map(repr, p.INTERNAL_PREFIXES))} are reserved"
                why = why if reserved else "no services"
                return [(peer, p.Error(p.E_HEADER, f"registration refused: {why}"))]
        if w is not None:
            # The peer began a new session (it thinks we restarted): what it held is void.
            out += d.drop_member(w, now, "re-registered", spend_attempt=False)
        self._told.registered(peer)
        serial = d.next_serial()
        nw: Member
        if m.role == p.ROLE_BROKER:
            nw = BrokerMember(peer, m.name, serial, now, self._ttl)
            self.counters.brokers_registered += 1
        else:
            nw = WorkerMember(peer, m.name, tuple(dict.fromkeys(m.services)), m.capacity, serial, now, self._ttl)
            self.counters.workers_registered += 1
        d.register(nw, now)
        if self.replica.adopting:
            self.replica.registered(nw, now)
        out.append((peer, welcome))
        if isinstance(nw, BrokerMember):
            self.tiers.registered(nw, out)
        d.offer(nw)
        d.pump_services(nw, now, out)
        return out

    def _on_advert(self, peer: bytes, w: Member | None, m: p.Advert, now: float) -> list[Out]:
        if w is None:
            return self._reconnect(peer, now, "unknown broker: register again")
        if not isinstance(w, BrokerMember):
            self.counters.bad_input += 1
            return [(peer, p.Error(p.E_ROLE, "ADVERT is accepted from downstream brokers only"))]
        out: list[Out] = []
        self.tiers.on_advert(w, m, now, out)
        return out

    def _on_credit(self, peer: bytes, w: Member | None, m: p.Credit, now: float) -> list[Out]:
        if w is None:
            return self._reconnect(peer, now, "unknown worker: register again")
        out: list[Out] = []
        self.d.set_capacity(w, m.capacity)
        self.d.pump_services(w, now, out)
        return out

    def _on_bye(self, peer: bytes, w: Member | None, m: p.Bye, now: float) -> list[Out]:
        if w is None:
            self._client_left(peer)
            return NONE
        self.counters.workers_left += 1
        return self.d.drop_member(w, now, "left", spend_attempt=True)

    # --- what a pair does with a machine ----------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Our pair's epoch grew (a peer had seen a higher one): tell it to peers from now on."""
        self._epoch = epoch
        self._welcome = self._welcome._replace(epoch=epoch)
        self._pong = self._pong._replace(epoch=epoch)

    def restore(self, table: dict[int, Copy], now: float) -> None:
        """Take over a replicated request table (see :meth:`Replica.restore`)."""
        self.replica.restore(table, now)

    def snapshot(self) -> list[p.ReplicationOp]:
        """The request table as replication ops."""
        return self.replica.snapshot()

    # --- introspection ----------------------------------------------------------------------------

    def set_ttl(self, peer: bytes, ttl_s: float) -> None:
        w = self.d.members.get(peer)
        if w is not None:
            w.ttl = ttl_s

    def status(self, now: float) -> dict[str, object]:
        return self.services.status(now)

    def add_status_part(self, part: StatusPart) -> None:
        self.services.parts.append(part)

    def enable_histograms(self) -> None:
        self.use_histograms({"queue_wait": Hist(), "service": Hist(), "end_to_end": Hist()})

    def use_histograms(self, hist: dict[str, Hist]) -> None:
        """Record into these histograms (a pair keeps one set across its machines)."""
        d = self.d
        d.h_wait, d.h_service, d.h_e2e = hist["queue_wait"], hist["service"], hist["end_to_end"]
        self.services.hist = hist

    def worker_load(self) -> dict[bytes, tuple[int, int]]:
        return {i: (w.load(), w.capacity) for i, w in self.d.members.items() if isinstance(w, WorkerMember)}

    def members(self) -> set[bytes]:
        return set(self.d.members)

    def clients_heard(self) -> int:
        return len(self._clients)

    def carries_nothing(self, peer: bytes, now: float) -> list[Out]:
        w = self.d.members.get(peer)
        if w is None or not w.adopted:
            return NONE
        out: list[Out] = []
        self.replica.not_carried(w, now, out)
        return out

    def holds(self, peer: bytes, rid: int) -> bool:
        return self.d.keys.ticket(peer, rid) is not None

    def resumed(self, seconds: float, now: float) -> None:
        self.d.pauses.note(seconds, now)  # members' and clients' silence in it proves nothing
        c = self.counters
        c.pauses += 1
        c.paused_ms += round(seconds * 1000)
        self.replica.paused(seconds)
        up = self.tiers.up
        if up is not None:  # and the upstream's: a proxy paused with its master gave it up
            up.link.paused(seconds, now)

    @property
    def standby(self) -> bool:
        return False

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def upstream(self) -> Upstream | None:
        return self.tiers.up

    @property
    def queued(self) -> int:
        return self.d.queued

    @property
    def open_requests(self) -> int:
        return len(self.d.reqs)
