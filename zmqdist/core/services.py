"""Internal services a broker answers itself: status, the tree status, MMI. Sans-IO.

Rules of this module:
1. Service names starting with ``zmqdist.`` or ``mmi.`` are internal: the broker answers them and
   never dispatches them. :data:`INTERNAL` is the table of those it knows; any other is INVALID.
2. ``zmqdist.status``: a snapshot of this broker (its members, services, queues, counters, and the
   parts others add: a pair's state, the runtime's facts).
3. ``zmqdist.tree``: this broker's status with those of every broker below it. The brokers below
   are asked at once; the answer goes when all have answered or at a deadline (the silent ones are
   listed as unreachable). A broker never asks one that the question has passed (hops).
4. ``mmi.service`` (RFC 8/MMI): "200" if the named service is served here (by a member, or by the
   upstream's offer), "404" if not; other ``mmi.`` services "501".
5. ``zmqdist.member``: is the downstream broker named in the payload registered here, and how long
   has it been silent? The passive broker of a proxy pair asks its upstream this about its silent
   peer (the upstream sees both brokers of the pair: it is the pair's witness, docs/ha.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.dispatch import Dispatcher
from zmqdist.core.metrics import Hist
from zmqdist.core.records import (
    HOP_MARGIN_MS,
    QUEUED,
    UPSTREAM,
    BrokerMember,
    Counters,
    Dest,
    Out,
    WorkerMember,
)
from zmqdist.core.tiers import Tiers

STATUS_SERVICE: Final = "zmqdist.status"
HANDOVER_SERVICE: Final = "zmqdist.handover"  # the active broker of a pair hands the work to its peer
TREE_SERVICE: Final = "zmqdist.tree"  # this broker's status with those of every broker below it
MEMBER_SERVICE: Final = "zmqdist.member"  # is a downstream broker registered here (a pair's witness)
INTERNAL: Final = (STATUS_SERVICE, TREE_SERVICE, HANDOVER_SERVICE, MEMBER_SERVICE, "mmi.service")
TREE_WAIT_S: Final = 2.0  # longest a tree status waits for the brokers below

StatusPart = Callable[[float], dict[str, object]]


class _Gather:
    """A tree status being gathered: our own status, the answers of the brokers below so far."""

    __slots__ = ("answer_to", "below", "deadline", "gid", "mine", "rid", "session", "waiting")

    def __init__(
        self, gid: int, answer_to: Dest, rid: int, session: int, mine: dict[str, object], deadline: float
    ) -> None:
        self.gid = gid
        self.answer_to = answer_to  # a client's identity, or UPSTREAM
        self.rid = rid
        self.session = session
        self.mine = mine
        self.deadline = deadline
        self.below: list[object] = []
        self.waiting: dict[int, str] = {}  # ticket of our question -> name of the broker asked


class Services:
    """The internal services of one broker run (see the module rules)."""

    def __init__(
        self,
        settings: BrokerSettings,
        incarnation: str,
        started: float,
        dispatcher: Dispatcher,
        tiers: Tiers,
        counters: Counters,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.incarnation = incarnation
        self.started = started
        self.d = dispatcher
        self.tiers = tiers
        self.counters = counters
        self.gathers: dict[int, _Gather] = {}  # tree statuses being gathered, by our ticket
        self.gather_of: dict[int, int] = {}  # ticket of a question to a broker below -> its gather
        self.hist: dict[str, Hist] | None = None
        self.parts: list[StatusPart] = []  # more of the status: a pair's state, the runtime's facts

    # --- answering --------------------------------------------------------------------------------

    def answer(
        self,
        peer: Dest,
        session: int,
        rid: int,
        service: str,
        budget_ms: int,
        hops: tuple[str, ...],
        payload: bytes,
        now: float,
        out: list[Out],
    ) -> None:
        """Answer internal service ``service`` asked by ``peer`` (a client, or UPSTREAM in ``session``)."""
        if service == TREE_SERVICE:
            self._gather_tree(peer, rid, session, budget_ms, hops, now, out)
            return
        if service == STATUS_SERVICE:
            reply = p.Reply(rid, p.ST_OK, "", p.pack_value(self.status(now)))
        elif service == HANDOVER_SERVICE:
            self.counters.invalid += 1
            reply = p.Reply(rid, p.ST_INVALID, "cannot hand over: this broker is not part of a pair", b"")
        elif service == MEMBER_SERVICE:
            reply = p.Reply(rid, p.ST_OK, "", p.pack_value(self._member(payload, now)))
        elif service.startswith(p.MMI_PREFIX):
            reply = p.Reply(rid, p.ST_OK, "", p.pack_value(self._mmi(service, payload)))
        else:
            self.counters.invalid += 1
            reply = p.Reply(rid, p.ST_INVALID, f"unknown internal service {service!r}", b"")
        self._send(peer, session, reply, out)

    def _send(self, peer: Dest, session: int, reply: p.Reply, out: list[Out]) -> None:
        if type(peer) is bytes:
            out.append((peer, reply))
        else:
            up = self.tiers.up
            if up is not None and session == up.session:
                out.append((UPSTREAM, reply))

    def answer_up(self, m: p.Task, session: int, now: float, out: list[Out]) -> None:
        """Answer an internal service the upstream asked of us (``Tiers.internal``)."""
        self.answer(UPSTREAM, session, m.ticket, m.service, m.budget_ms, m.hops, m.payload, now, out)

    def _member(self, payload: bytes, now: float) -> dict[str, object]:
        try:
            name = p.unpack_value(payload)
        except ValueError:
            name = None
        for m in self.d.members.values():
            if isinstance(m, BrokerMember) and m.name == name:
                return {"registered": True, "silent_s": now - m.seen}
        return {"registered": False, "silent_s": None}

    def _mmi(self, service: str, payload: bytes) -> bytes:
        if service != "mmi.service":
            return b"501"
        try:
            v = p.unpack_value(payload)
        except ValueError:
            return b"404"
        name = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        pool = self.d.pools.get(name)
        served = (pool is not None and bool(pool.members)) or self.tiers.serves(name)
        return b"200" if served else b"404"

    # --- the tree status --------------------------------------------------------------------------

    def _gather_tree(
        self, answer_to: Dest, rid: int, session: int, budget_ms: int, hops: tuple[str, ...], now: float, out: list[Out]
    ) -> None:
        wait_s = min(TREE_WAIT_S, budget_ms / 1000.0 * 0.8)
        gid = self.d.new_ticket()
        g = _Gather(gid, answer_to, rid, session, self.status(now), now + wait_s)
        self.gathers[gid] = g
        below = [w for w in self.d.members.values() if isinstance(w, BrokerMember) and w.name not in hops]
        child_ms = max(1, int(wait_s * 1000 * 0.8) - HOP_MARGIN_MS)
        for b in below:
            t = self.d.new_ticket()
            g.waiting[t] = b.name
            self.gather_of[t] = gid
            out.append((b.ident, p.Task(t, TREE_SERVICE, child_ms, 1, f"tree:{gid}", 0, (*hops, self.name), b"")))
        if not below:
            self._gather_done(g, out)

    def asked(self, ticket: int) -> bool:
        """Is ``ticket`` a question of ours to a broker below (its REPLY is an answer for a tree)?"""
        return ticket in self.gather_of

    def gathered(self, m: p.Reply, out: list[Out]) -> None:
        """A broker below answered our question ``m.rid``."""
        g = self.gathers.get(self.gather_of.pop(m.rid))
        if g is None:
            return
        name = g.waiting.pop(m.rid, "?")
        try:
            sub = p.unpack_value(m.payload) if m.status == p.ST_OK else None
        except ValueError:
            sub = None
        g.below.append(sub if isinstance(sub, dict) else {"broker": name, "error": m.message or "bad answer"})
        if not g.waiting:
            self._gather_done(g, out)

    def _gather_done(self, g: _Gather, out: list[Out]) -> None:
        del self.gathers[g.gid]
        for t in g.waiting:
            self.gather_of.pop(t, None)
        tree = {**g.mine, "below": g.below, "unreachable": sorted(g.waiting.values())}
        self._send(g.answer_to, g.session, p.Reply(g.rid, p.ST_OK, "", p.pack_value(tree)), out)

    def tick(self, now: float, out: list[Out]) -> None:
        if self.gathers:
            for g in [g for g in self.gathers.values() if g.deadline <= now]:
                self._gather_done(g, out)

    def next_deadline(self) -> float | None:
        return min(g.deadline for g in self.gathers.values()) if self.gathers else None

    # --- status -----------------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, object]:
        """Return a snapshot for ``zmqdist status``: workers, brokers below, services, queues, counters."""
        d = self.d
        members = d.members.values()
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
            for w in members
            if isinstance(w, WorkerMember)
        ]
        brokers = [
            {
                "name": w.name,
                "id": w.ident.hex(),
                "spare": {s: max(0, w.allowed(s)) for s in w.services},
                "inflight": len(w.inflight),
                "served": w.served,
                "silent_s": round(now - w.seen, 3),
                "rtt_ms": round(w.rtt * 1000, 3),
            }
            for w in members
            if isinstance(w, BrokerMember)
        ]
        services = {}
        for name, pool in sorted(d.pools.items()):
            capacity = inflight = 0
            for w in pool.members:
                if isinstance(w, BrokerMember):
                    capacity += max(0, w.allowed(name))
                    inflight += w.load.get(name, 0)
                else:
                    capacity += w.capacity
                    inflight += len(w.inflight)
            services[name] = {
                "workers": len(pool.members),
                "capacity": capacity,
                "inflight": inflight,
                "queued": sum(1 for t in pool.queue if (r := d.reqs.get(t)) and r.state == QUEUED),
                "local_slots": pool.local,
                "service_ms": round(pool.svc * 1000, 3),  # recent, of this broker's own workers
                "away_ms": round(pool.away * 1000, 3) if pool.away >= 0 else None,  # beyond the round trip
            }
        st: dict[str, object] = {
            "broker": self.name,
            "incarnation": self.incarnation,
            "uptime_s": round(now - self.started, 3),
            "heartbeat_s": self.settings.heartbeat.heartbeat_s,
            "liveness": self.settings.heartbeat.liveness,
            "queued": d.queued,
            "queued_bytes": d.queued_bytes,
            "requests_open": len(d.reqs),
            "workers": workers,
            "brokers": brokers,
            "upstream": self.tiers.status(),
            "ha": None,
            "services": services,
            "counters": self.counters.as_dict(),
            "histograms": {k: h.snapshot() for k, h in self.hist.items()} if self.hist is not None else {},
        }
        for part in self.parts:
            st.update(part(now))
        return st
