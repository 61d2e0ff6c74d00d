"""The request lifecycle: cancellation, streams, retries after a delay, joins by caller key. Sans-IO.

Rules of this module (docs/semantics.md):
1. It owns what only requests with a lifecycle have: the open streams (whose callers' silence
   stops them), the retries waiting out their backoff, and the open runs by caller key
   (``join_same_key``). It changes the request table only through :class:`Dispatcher`'s methods;
   dispatch tells it of such requests through the :class:`Watcher` hooks it implements.
2. A cancelled request leaves the queue at once; one a member (or the upstream) holds is told
   CANCEL and keeps that slot until the holder lets go, but has no caller any more (its quota frees
   at once). Exactly one outcome reaches each caller.
3. A run that failed with what its retry policy retries goes back to the queue after its delay,
   only if it can start before its deadline, preferring another member.
4. A stream's parts are relayed from its current holder only; a stream whose caller is silent past
   the ttl (a client or a downstream broker that died) is stopped: nobody would acknowledge its
   parts, so its worker would wait until the deadline. So is every request of a client silent past
   the ttl (no HEARTBEAT, no request: it died, or its host is cut off), as if it had cancelled
   them: its workers would run them for nobody, ahead of live callers (so is what a downstream
   broker asked for when it is lost: a dead proxy's runs). Only clients that said
   HELLO or HEARTBEAT are judged (a Majordomo client never does), and silence counts from the
   broker's own last pause. A client heard again after that is told RECONNECT: it sends again
   what it still waits for (core/client.py rule 3).
5. Requests with the same caller key and service may join one open run (``join_same_key``): one
   execution, every caller gets its reply; a joiner that cancels leaves the run, which goes on.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Final

from zmqdist import protocol as p
from zmqdist.core.dispatch import Dispatcher
from zmqdist.core.heaps import heappop, heappush
from zmqdist.core.hooks import Watcher
from zmqdist.core.link import Problem
from zmqdist.core.records import ASSIGNED, DELAYED, EPSILON, FORWARDED, LOG, QUEUED, Dest, Member, Out, Req

MAX_LEFT: Final = 100_000  # clients remembered as stopped for their silence (rule 4), at most


class Lifecycle(Watcher):
    """The lifecycle of the requests of one dispatcher (see the module rules)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher
        self.counters = dispatcher.counters
        self.join_same_key = dispatcher.settings.join_same_key
        hb = dispatcher.settings.heartbeat
        self.ttl = hb.ttl_s
        self.streams: dict[int, Req] = {}  # open streams, by ticket
        self.delayed: list[tuple[float, int]] = []  # (when, ticket): retries waiting out their backoff
        self.by_caller: dict[tuple[str, str], int] = {}  # (service, caller key) -> ticket
        # When a caller may first have been silent past the ttl (rule 4): none heard before now is.
        self.callers_due = dispatcher.now + self.ttl + EPSILON
        self.left: dict[Dest, float] = {}  # clients whose requests rule 4 stopped -> their latest deadline
        dispatcher.watcher = self

    # --- what dispatch tells us (Watcher) ---------------------------------------------------------

    def opened(self, req: Req) -> None:
        if req.window:
            self.streams[req.ticket] = req
        elif req.key and self.join_same_key:
            self.by_caller[(req.service, req.key)] = req.ticket

    def closed(self, req: Req) -> None:
        if req.window:
            self.streams.pop(req.ticket, None)
        elif req.key and self.by_caller.get((req.service, req.key)) == req.ticket:
            del self.by_caller[(req.service, req.key)]

    def join(self, peer: Dest, rid: int, service: str, key: str) -> bool:
        """Join the open run of ``service`` with caller key ``key``, if there is one (rule 5)."""
        d = self.d
        ticket = self.by_caller.get((service, key))
        req = d.reqs.get(ticket) if ticket is not None else None
        if req is None or req.cancelled or req.key != key:
            return False
        d.add_caller(req, peer, rid)
        self.counters.joined += 1
        return True

    def run_again(self, req: Req, w: Member | None, delay_ms: int, now: float, out: list[Out]) -> bool:
        """The run of ``req`` failed with what its retry policy retries: queue it again after
        ``delay_ms`` (another member preferred). False if that would not start before its deadline."""
        delay = delay_ms / 1000.0
        if now + delay >= req.deadline:
            return False
        d = self.d
        req.retries += 1
        req.worker = None
        req.avoid = w.ident if w is not None else None
        self.counters.retried += 1
        if delay <= 0:
            d.requeue(req, now)
            d.pump(d.pools[req.service], now, out)
            return True
        req.state = DELAYED
        if d.ops is not None:
            d.ops.append(p.OpRequeued(req.ticket))  # a broker taking over runs it at once
        heappush(self.delayed, (now + delay, req.ticket))
        return True

    def member_lost(self, w: Member, now: float, out: list[Out]) -> None:
        """Downstream broker ``w`` is gone (dispatch forgot what of its requests waited): stop what
        still runs for it, as for a client gone (rule 4); nobody would take the replies."""
        self._abandon((w.ident,), None, now, out)

    def _abandon(self, callers: Container[Dest], left: dict[Dest, float] | None, now: float, out: list[Out]) -> None:
        """End everything ``callers`` have open as if each had cancelled it: nobody takes the replies
        (``left``: remember each caller until the latest deadline of what was stopped)."""
        d = self.d
        for c, rid in d.keys.of(callers):
            ticket = d.keys.ticket(c, rid)  # gone already if leaving an earlier one ended it
            req = d.reqs.get(ticket) if ticket is not None else None
            if req is not None:
                self.counters.abandoned += 1
                if left is not None and (c in left or len(left) < MAX_LEFT):
                    left[c] = max(left.get(c, now), req.deadline)
                self._leave(req, c, rid, now, out)

    # --- messages ---------------------------------------------------------------------------------

    def cancel(self, origin: Dest, rid: int, now: float, out: list[Out]) -> None:
        """Caller ``origin`` cancels its request ``rid`` (unknown or ended: nothing to do)."""
        d = self.d
        ticket = d.keys.ticket(origin, rid)
        req = d.reqs.get(ticket) if ticket is not None else None
        if req is None:
            return
        self.counters.cancelled += 1
        self._leave(req, origin, rid, now, out)

    def _leave(self, req: Req, origin: Dest, rid: int, now: float, out: list[Out]) -> None:
        """Caller ``origin`` no longer waits for its request ``rid`` (``req``): a joiner leaves the
        run, the first joiner takes a leaving first caller's place, else the run stops."""
        d = self.d
        if req.client != origin or req.rid != rid:
            if req.also is not None and (origin, rid) in req.also:  # a joiner leaves; the run goes on
                req.also.remove((origin, rid))
                d.release_caller(origin, rid, req.ticket)
            return
        if req.also:
            d.release_caller(req.client, req.rid, req.ticket)  # the first that joined takes its place
            req.client, req.rid = req.also.pop(0)
            return
        self.cancel_run(req, now, out)

    def cancel_run(self, req: Req, now: float, out: list[Out]) -> None:
        """Stop ``req``'s run: out of the queue now, or tell its holder (which keeps the slot until
        it lets go; the caller is released at once, so its quota frees now)."""
        d = self.d
        state = req.state
        if state in (QUEUED, DELAYED, FORWARDED):
            if state == QUEUED:
                d.dequeued(req)
            elif state == FORWARDED:  # the upstream stops it; we forget it now (its late answers are void)
                d.overflow.send_on(req, p.Cancel(req.ticket), out)
                d.overflow.recall(req)
            d.forget(req)
            if type(req.client) is not bytes:
                d.overflow.reply(req, p.Reply(req.rid, p.ST_CANCELLED, "cancelled", b""), out)
            return
        if req.cancelled:
            return
        if state == ASSIGNED and req.worker is None:  # adopted at a takeover, its member not back yet
            d.forget(req)
            return
        req.cancelled = True
        d.release_caller(req.client, req.rid, req.ticket)
        if d.ops is not None:
            d.ops.append(p.OpEnded(req.ticket))  # a broker taking over must not run it again
        if req.worker is not None:
            out.append((req.worker.ident, p.Cancel(req.ticket)))

    def part(self, peer: bytes, ticket: int, seq: int, payload: bytes, out: list[Out]) -> None:
        """A part of ``ticket``'s stream from member ``peer`` (only its current holder's count)."""
        req = self.d.reqs.get(ticket)
        holder = req.worker if req is not None else None
        if req is None or holder is None or holder.ident != peer or req.cancelled:
            self.counters.late_results += 1
            return
        self.relay(req, p.message(p.PART_CLS, (req.rid, seq, payload)), out)

    def progress(self, peer: bytes, ticket: int, payload: bytes, out: list[Out]) -> None:
        """A progress report for ``ticket`` from member ``peer`` (its current holder only)."""
        req = self.d.reqs.get(ticket)
        holder = req.worker if req is not None else None
        if req is not None and holder is not None and holder.ident == peer and not req.cancelled:
            self.relay(req, p.Progress(req.rid, payload), out)

    def relay(self, req: Req, msg: p.Part | p.Progress, out: list[Out]) -> None:
        """Pass a part or a progress report of ``req`` on to its caller(s)."""
        if type(msg) is p.Part:
            req.parts += 1
            self.counters.parts += 1
        client = req.client
        if type(client) is bytes:
            out.append((client, msg))
        else:
            self.d.overflow.relay(req, msg, out)
        if req.also and type(msg) is p.Progress:
            for c, rid in req.also:
                if type(c) is bytes:
                    out.append((c, p.Progress(rid, msg.payload)))

    def ack(self, origin: Dest, rid: int, seq: int, out: list[Out]) -> None:
        """The caller of stream ``rid`` has taken ``seq`` parts: tell whoever runs it."""
        d = self.d
        ticket = d.keys.ticket(origin, rid)
        req = d.reqs.get(ticket) if ticket is not None else None
        if req is None or req.cancelled or not req.window:
            return
        if req.state == ASSIGNED and req.worker is not None:
            out.append((req.worker.ident, p.Ack(req.ticket, seq)))
        elif req.state == FORWARDED:
            d.overflow.send_on(req, p.Ack(req.ticket, seq), out)

    # --- timers -----------------------------------------------------------------------------------

    def tick(self, now: float, clients: dict[bytes, float], out: list[Out]) -> None:
        """Queue again the retries whose delay is over; stop what callers silent past the ttl have
        open (rule 4; ``clients``: when each client last said HELLO or HEARTBEAT)."""
        if self.delayed and self.delayed[0][0] <= now:
            self._release_delayed(now, out)
        if now >= self.callers_due and (self.streams or self.d.callers):
            self._silent_callers(now, clients, out)

    def _release_delayed(self, now: float, out: list[Out]) -> None:
        """Queue again the retries whose delay is over (at the front: they waited longest)."""
        d = self.d
        delayed = self.delayed
        touched: set[str] = set()
        while delayed and delayed[0][0] <= now:
            _, ticket = heappop(delayed)
            req = d.reqs.get(ticket)
            if req is not None and req.state == DELAYED:
                d.requeue(req, now)
                touched.add(req.service)
        for name in touched:
            d.pump(d.pools[name], now, out)

    def _silent_callers(self, now: float, clients: dict[bytes, float], out: list[Out]) -> None:
        """Stop what callers silent past the ttl have open (rule 4); note when the next may be."""
        d = self.d
        members = d.members
        ttl = self.ttl
        since = d.pauses.since  # less the broker's own pauses (SIGSTOP, a stall): silence then proves nothing
        callers = d.callers
        first = now  # the oldest sign of life of a caller still heard (one heard later is younger)
        gone: dict[bytes, float] = {}  # -> its last sign of life
        for c, rec in callers.items():
            if type(c) is not bytes or c in members or (heard := clients.get(c)) is None:
                continue  # a downstream broker (a member: its expiry), or not a client that beats
            sign = since(max(heard, rec.last_in))
            if now - sign > ttl:
                gone[c] = sign
            elif sign < first:
                first = sign
        for req in list(self.streams.values()):  # a stream's caller may be a downstream broker too
            c = req.client
            if type(c) is not bytes or req.cancelled or c in gone:
                continue
            m = members.get(c)
            heard = m.seen if m is not None else clients.get(c)
            if heard is not None:
                r = callers.get(c)
                sign = since(heard if r is None else max(heard, r.last_in))
                if now - sign > ttl:
                    self.counters.cancelled += 1
                    self.cancel_run(req, now, out)
                elif sign < first:
                    first = sign
        self.callers_due = first + ttl + EPSILON
        if gone:
            self._abandon(gone, self.left, now, out)
            for c, sign in gone.items():
                why = f"client {c.hex()} silent for {now - sign:.2f}s: taken for gone, its open requests stopped"
                out.append((LOG, Problem(f"{why} (it sends them again if it is back)", "gone")))
        for c in [c for c, t in self.left.items() if t <= now]:
            del self.left[c]

    def next_deadline(self) -> float | None:
        """The end of the earliest retry's delay, or the next check of the callers' silence (rule 4)."""
        d: float | None = self.delayed[0][0] if self.delayed else None
        if self.streams or self.d.callers:
            check = self.callers_due
            d = check if d is None or check < d else d
        return d
