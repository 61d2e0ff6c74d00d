"""The replicated request table of a backup pair: the snapshot an active broker sends a passive peer
that needs the whole table, and what a broker that took over makes of the table it received. Sans-IO.

Rules of this module (docs/ha.md):
1. Every change of the table is replicated as it happens (the dispatcher appends its ops); a
   snapshot is the whole table as ops, for a passive peer that starts or lost track.
2. After a takeover, queued requests wait in their queues (an MDP client's are left out: it cannot
   send them again by their number; zmqdist/core/mdp.py rule 7); requests the old active broker had
   dispatched wait, for a grace of one ttl and a heartbeat, for their member to register here: it
   may still run them, or have finished them, and its results for them are delivered, not run
   again. What a member that does not come held is requeued then, with no attempt spent.
3. It owns only the adoption (which member held what, until when); the table is the dispatcher's,
   changed through its methods.
"""

from __future__ import annotations

from zmqdist import protocol as p
from zmqdist.core.dispatch import Dispatcher
from zmqdist.core.mdp import FIRST_RID
from zmqdist.core.records import ASSIGNED, Copy, Member, Out, Req


class Replica:
    """The replicated table of one broker run (see the module rules)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher
        # requests the old active broker had dispatched, by member, waiting for it to register here
        self.adopting: dict[bytes, list[int]] = {}
        self.until: float | None = None  # end of the adoption grace

    def restore(self, table: dict[int, Copy], now: float) -> None:
        """Load a replicated request table (rule 2)."""
        d = self.d
        for ticket in sorted(table):
            rec = table[ticket]
            a = rec.accepted
            if a.rid >= FIRST_RID:
                d.counters.mdp_not_taken_over += 1
                continue
            req = Req(ticket, a.client, a.rid, a.service, a.payload, a.deadline, a.hops)
            req.trace, req.key, req.attempt, req.t_in = a.trace, a.key, a.attempt, now
            req.window, req.retry = a.window, a.retry
            d.restored(req, held=rec.member is not None)
            if rec.member is not None:
                self.adopting.setdefault(rec.member, []).append(ticket)
        if self.adopting:
            self.until = now + d.ttl + d.settings.heartbeat.heartbeat_s

    def paused(self, seconds: float) -> None:
        """The broker did not run for ``seconds``: the members that held requests had no grace then
        (their HELLO waited to be read), so the grace ends that much later (rule 2)."""
        if self.until is not None:
            self.until += seconds

    def registered(self, w: Member, now: float) -> None:
        """``w`` registered with us: if it held requests at the takeover, it holds them here now
        (its first heartbeat confirms which)."""
        tickets = self.adopting.pop(w.ident, None)
        if not tickets:
            return
        d = self.d
        for t in tickets:
            req = d.reqs.get(t)
            if req is None or req.state != ASSIGNED or req.worker is not None:
                continue
            req.worker = w
            req.t_out = now
            w.adopt(t, req.service)
            w.adopted = True
            d.counters.adopted += 1
            if d.ops is not None:
                d.ops.append(p.OpSent(t, w.ident, req.attempt))
        if not self.adopting:
            self.until = None

    def not_carried(self, w: Member, now: float, out: list[Out]) -> None:
        """``w`` registered here but carries nothing from the old active broker (a Majordomo worker
        under the routing id of the one that held its requests): requeue what it was to hold, as at
        the grace's end."""
        w.adopted = False
        d = self.d
        again = []
        for t in [t for t, seq in w.inflight.items() if seq == 0]:  # adopted: task number 0
            w.release(t)
            req = d.reqs.get(t)
            if req is not None and req.state == ASSIGNED and req.worker is w:
                req.worker = None
                d.counters.adopted -= 1
                again.append(req)
        d.offer(w)
        self._requeue(again, now, out)

    def _requeue(self, reqs: list[Req], now: float, out: list[Out]) -> None:
        """Requeue ``reqs``, which no member holds after all, and dispatch their pools."""
        d = self.d
        for req in reqs:
            d.counters.requeues += 1
            d.requeue(req, now)
        for s in {req.service for req in reqs}:
            d.pump(d.pools[s], now, out)

    def tick(self, now: float, out: list[Out]) -> None:
        """At the end of the grace, requeue what the members that did not come held (no attempt
        spent; a result they still send is delivered, see ``tried``)."""
        if self.until is None or now < self.until:
            return
        self.until = None
        d = self.d
        again = []
        for member, tickets in self.adopting.items():
            for t in tickets:
                req = d.reqs.get(t)
                if req is not None and req.state == ASSIGNED and req.worker is None:
                    if req.tried is None:
                        req.tried = []
                    req.tried.append(member)
                    again.append(req)
        self.adopting.clear()
        self._requeue(again, now, out)

    def snapshot(self) -> list[p.ReplicationOp]:
        """The whole request table as replication ops (rule 1)."""
        held_by = {t: m for m, ts in self.adopting.items() for t in ts}
        ops: list[p.ReplicationOp] = []
        for t, r in self.d.reqs.items():
            client = r.client
            if type(client) is not bytes:
                continue  # work handed down by our upstream: it requeues that itself
            if r.cancelled:
                continue  # replicated as ended when it was cancelled
            ops.append(
                p.OpAccepted(
                    t,
                    client,
                    r.rid,
                    r.service,
                    r.deadline,
                    r.hops,
                    r.trace,
                    r.key,
                    r.attempt,
                    r.payload,
                    r.window,
                    r.retry,
                )
            )
            member = r.worker.ident if r.worker is not None else held_by.get(t)
            if r.state == ASSIGNED and member is not None:
                ops.append(p.OpSent(t, member, r.attempt))
        return ops
