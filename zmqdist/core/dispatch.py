"""Dispatch: the request table and the pools of members. Sans-IO.

Rules of this module:
1. It owns the request table (tickets, the keys of open requests, the quota count per client), the
   pools (members per service and their FIFO queues), the members, and the timers of both
   (deadlines of queued requests, liveness of members). Nothing else writes them.
2. A request ends exactly once: :meth:`Dispatcher.finish` forgets it and appends its one reply.
3. Least-loaded dispatch: a pool's heap orders its members by load fraction, then least recently
   used; entries carry the member's version and stale ones are skipped (lazy invalidation), so a
   request costs O(log members). A member never holds more than it may take (``free``). A worker
   that refuses a task is full by its own count: it counts so until its CREDIT or HELLO says more.
4. A member that dies: what it held is requeued at the front with one attempt spent (none when it
   was not its fault), up to ``max_attempts``, then answered LOST.
5. When no member can take a queued request, dispatch asks its :class:`Overflow` hook (a proxy's
   upstream, in :mod:`zmqdist.core.tiers`; the hooks' bases are in :mod:`zmqdist.core.hooks`);
   dispatch knows nothing of upstreams.
6. With ``ops`` set (the active broker of a pair), every change to the table is recorded as a
   replication op, in order.
7. A service whose last member left, with nothing queued, is forgotten ``forget_service_s`` later
   (unless a member comes back), so a long-running broker with short-lived services stays small.
8. Requests with a lifecycle (a caller key, a stream window, a retry policy) are told to its
   :class:`Watcher` (:mod:`zmqdist.core.lifecycle`), which owns the streams, the delayed retries
   and the joins by caller key; dispatch knows none of them.
"""

from __future__ import annotations

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.heaps import heapify, heappop, heappush, heapreplace
from zmqdist.core.hooks import EWMA, KEEP, SKIP, WAIT, Overflow, Watcher, away
from zmqdist.core.link import Pauses
from zmqdist.core.metrics import Hist
from zmqdist.core.records import (
    ASSIGNED,
    EPSILON,
    FORWARDED,
    QUEUED,
    BrokerMember,
    Caller,
    Counters,
    Deadlines,
    Dest,
    HeapEntry,
    Keys,
    Member,
    Out,
    Pool,
    Queue,
    Req,
    WorkerMember,
)


def live_top(heap: list[HeapEntry]) -> Member | None:
    """The member of ``heap``'s first live entry, left in the heap; the stale entries above it are
    popped (the member's load changed, or it died, since they were pushed)."""
    while heap:
        entry = heap[0]
        w = entry[4]
        if entry[3] == w.version and w.alive:
            return w
        heappop(heap)
    return None


class Dispatcher:
    """The request table and pools of one broker run (see the module rules)."""

    def __init__(self, settings: BrokerSettings, counters: Counters, now: float, first_ticket: int = 1) -> None:
        self.settings = settings
        self.name = settings.name
        self.counters = counters
        self.ttl = settings.heartbeat.ttl_s
        self.members: dict[bytes, Member] = {}
        self.brokers = 0  # members that are downstream brokers
        self.pools: dict[str, Pool] = {}
        self.reqs: dict[int, Req] = {}
        self.keys = Keys()  # (origin, its request id) -> ticket
        self.next_ticket = first_ticket
        self.seq = 0
        self.queued = 0
        self.queued_bytes = 0
        self.callers: dict[Dest, Caller] = {}  # callers with requests open: their quota counts
        self.unclaimed: set[tuple[Dest, int]] = set()  # restored at a takeover, not yet sent again: see restored
        self.changes = 0  # bumped whenever spare capacity may have changed
        self.deadlines = Deadlines(self.reqs)
        self.expiry: list[tuple[float, int, Member]] = []
        self.pauses = Pauses()  # the broker's own: a peer's silence in them proves nothing
        self.serial = 0
        self.overflow = Overflow()
        self.watcher = Watcher()  # the request lifecycle (rule 8)
        self.join_same_key = settings.join_same_key
        self.ops: list[p.ReplicationOp] | None = None  # replication ops to send (the active of a pair)
        self.idle: dict[str, float] = {}  # services with no member and nothing queued, since when
        self.h_wait: Hist | None = None  # latency histograms, when enabled
        self.h_service: Hist | None = None
        self.h_e2e: Hist | None = None
        self.now = now  # the time of the input being handled (for histograms at the end of a request)
        # refill(): the common case of offer then pump_services in one step. Off, the general path
        # alone runs: the reference the tests hold the fast one to.
        self.fast_refill = True

    def new_ticket(self) -> int:
        """A ticket never used before in this run."""
        t = self.next_ticket
        self.next_ticket = t + 1
        return t

    # --- members ----------------------------------------------------------------------------------

    def register(self, m: Member, now: float) -> None:
        """Add member ``m`` (a new registration) to the table and to its services' pools."""
        self.members[m.ident] = m
        if isinstance(m, BrokerMember):
            self.brokers += 1
        heappush(self.expiry, (now + m.ttl + EPSILON, m.serial, m))
        self.join(m, m.services)

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def join(self, m: Member, services: tuple[str, ...]) -> None:
        """``m`` serves ``services`` (in addition to what it served)."""
        for s in services:
            pool = self.pools.get(s)
            if pool is None:
                pool = self.pools[s] = Pool(s)
            if m not in pool.members:
                pool.members.add(m)
                if type(m) is WorkerMember:
                    pool.local += m.capacity
            if pool.idle_since is not None:
                pool.idle_since = None
                self.idle.pop(s, None)

    def leave(self, m: Member, services: set[str], now: float) -> None:
        """``m`` no longer serves ``services``."""
        for s in services:
            pool = self.pools.get(s)
            if pool is not None and m in pool.members:
                pool.members.discard(m)
                if type(m) is WorkerMember:
                    pool.local -= m.capacity
                if not pool.members and not pool.queue and pool.idle_since is None:
                    pool.idle_since = self.idle[s] = now

    def set_capacity(self, w: Member, capacity: int) -> None:
        """Member ``w`` now has ``capacity`` slots (a worker's CREDIT)."""
        if type(w) is WorkerMember:
            for s in w.services:
                pool = self.pools.get(s)
                if pool is not None and w in pool.members:
                    pool.local += capacity - w.capacity
        w.capacity = capacity
        self.offer(w)

    def sweep(self, now: float) -> None:
        """Forget the services idle for ``forget_service_s`` (rule 7)."""
        grace = self.settings.forget_service_s
        for name, since in list(self.idle.items()):
            if since + grace > now:  # as next_deadline adds it: (since + grace) - since may be < grace
                continue
            del self.idle[name]
            pool = self.pools.get(name)
            if pool is not None and pool.idle_since == since and not pool.members:
                reqs = self.reqs
                if not any((r := reqs.get(t)) is not None and r.state == QUEUED for t in pool.queue):
                    del self.pools[name]

    def offer(self, w: Member) -> None:
        """Re-enter ``w`` in its services' heaps after its load changed."""
        w.version += 1
        self.changes += 1
        if not w.alive:
            return
        for s in w.services:
            entry = w.entry(s)
            if entry is None:
                continue
            pool = self.pools[s]
            heap = pool.heap
            heappush(heap, entry)
            if len(heap) > 4 * len(pool.members) + 64:
                pool.heap = [e for e in heap if e[3] == e[4].version and e[4].alive]
                heapify(pool.heap)

    def take(self, pool: Pool, req: Req) -> Member | None:
        """Pop and return the least-loaded member of ``pool`` that may take ``req`` (or None). A
        request whose last run failed (``avoid``) goes to that member only if no other can take it."""
        heap = pool.heap
        skipped = None
        found = None
        hops = req.hops
        avoid = req.avoid
        while (w := live_top(heap)) is not None:
            entry = heappop(heap)
            if (hops and not w.may_take(hops)) or (avoid is not None and w.ident == avoid):
                if skipped is None:
                    skipped = []
                skipped.append(entry)
                continue
            found = w
            break
        if skipped:
            if found is None and avoid is not None:
                for i, e in enumerate(skipped):
                    if e[4].ident == avoid and (not hops or e[4].may_take(hops)):
                        found = skipped.pop(i)[4]  # no other member is free: the same one again
                        break
            for e in skipped:
                heappush(heap, e)
        return found

    def drop_member(self, w: Member, now: float, why: str, *, spend_attempt: bool) -> list[Out]:
        """Forget ``w``; requeue what it held (or answer LOST past the attempt cap)."""
        out: list[Out] = []
        w.alive = False
        w.version += 1
        self.changes += 1
        if self.members.get(w.ident) is w:
            del self.members[w.ident]
            if isinstance(w, BrokerMember):
                self.brokers -= 1
        self.leave(w, set(w.services), now)
        touched: set[str] = set()
        kind = w.kind()
        for ticket in sorted(w.inflight, reverse=True):  # appendleft: oldest ends up first
            req = self.reqs.get(ticket)
            if req is None or req.worker is not w:
                continue
            if req.tried is None:
                req.tried = []
            req.tried.append(w.ident)
            if not spend_attempt:
                req.attempt -= 1
            self.retry(
                req,
                f"{len(req.tried)} {kind} serving {req.service!r} lost while holding it",  # unreachable too
                f"{w.name} {why}",
                now,
                out,
                touched,
            )
        w.clear()
        if isinstance(w, BrokerMember):
            self.abandon_from(w.ident)
            self.watcher.member_lost(w, now, out)
        for s in touched:
            if s in self.pools:
                self.pump(self.pools[s], now, out)
        return out

    def expire_members(self, now: float, out: list[Out]) -> None:
        """Drop members silent past their ttl (less our own pauses); void adverts that outlived theirs."""
        expiry = self.expiry
        since = self.pauses.since
        while expiry and expiry[0][0] <= now:
            _, serial, w = expiry[0]
            if not w.alive:
                heappop(expiry)
            elif now - (seen := since(w.seen)) > w.ttl:
                heappop(expiry)
                self.counters.workers_expired += 1
                out += self.drop_member(w, now, "expired", spend_attempt=True)
            else:
                if isinstance(w, BrokerMember) and w.spare and now - w.adv_at > w.ttl:
                    w.spare = {}  # its advert outlived its ttl: no more tasks until the next one
                    self.offer(w)
                heapreplace(expiry, (seen + w.ttl + EPSILON, serial, w))

    def reconcile(self, w: Member, seen: int, held: tuple[int, ...], now: float, out: list[Out]) -> None:
        """Requeue tasks the member has seen past (by seq) but does not hold: lost in transit.

        Messages on one connection arrive in order and a member sends every answer before the
        heartbeat that no longer lists it, so this is exact, not a timing guess.
        """
        keep = set(held)
        lost = [t for t, s in w.inflight.items() if s <= seen and t not in keep]
        if not lost:
            return
        for ticket in lost:
            w.release(ticket)
            req = self.reqs.get(ticket)
            if req is not None and req.worker is w:
                self.counters.lost_in_transit += 1
                req.attempt -= 1
                self.requeue(req, now)
        self.offer(w)
        self.pump_services(w, now, out)

    # --- requests ---------------------------------------------------------------------------------

    def accept(
        self,
        peer: bytes,
        via: Member | None,
        rid: p.Boxed,
        service: str,
        deadline: float,
        hops: tuple[str, ...],
        trace: str,
        payload: bytes,
        now: float,
        out: list[Out],
        key: str = "",
        window: int = 0,
        retry: p.RetrySpec = (),
    ) -> None:
        """Take in a request that passed every check (counted in the client's quota already):
        dispatch it at once to the least-loaded member, or queue it; or, with ``join_same_key``,
        join the open run of the same service and caller ``key``."""
        if key and self.join_same_key and not window and self.watcher.join(peer, rid, service, key):
            return
        n = self.next_ticket
        self.next_ticket = n + 1
        ticket: p.Boxed = n  # boxed here, once (see p.Boxed)
        req = Req(ticket, peer, rid, service, payload, deadline, hops)
        req.t_in = now
        req.trace = trace
        if key or window or retry:
            req.key, req.window, req.retry = key, window, retry
            self.watcher.opened(req)
        if via is not None:
            req.via = via  # counted in what we offer that member until it ends (a downstream broker)
            via.requests_held(service, 1)
        self.reqs[ticket] = req
        self.keys.put(peer, rid, ticket)
        ops = self.ops
        if ops is not None:
            ops.append(p.OpAccepted(ticket, peer, rid, service, deadline, hops, trace, key, 0, payload, window, retry))
        self.changes += 1
        pool = self.pools.get(service)
        if pool is None:
            pool = self.pools[service] = Pool(service)
        elif not pool.queue and not hops and deadline > now:
            # Nothing waits ahead of it: the least-loaded member takes it now (what pump would do),
            # unless that is a downstream broker and a slot here frees sooner: then it queues.
            w = live_top(pool.heap)
            if w is not None and not (type(w) is BrokerMember and pool.local and not self.worth_away(pool, w.rtt, 0)):
                heappop(pool.heap)
                self.assign(req, w, now, out)
                return
        pool.queue.append(ticket)
        self.queued += 1
        self.queued_bytes += len(payload)
        if pool.heap or self.overflow.active():
            self.pump(pool, now, out)
        if req.state == QUEUED:
            self.push_deadline(req)

    def push_deadline(self, req: Req) -> None:
        """Watch ``req``'s deadline (queued or forwarded up); sweep out dead entries once they doubled."""
        dl = self.deadlines
        dl.push(req)
        if len(dl) > 2 * dl.swept + 1024:  # (not the queue: a proxy's forwarded ones live here too)
            dl.sweep()

    def pump(self, pool: Pool, now: float, out: list[Out]) -> None:
        """Dispatch ``pool``'s queue to its members' free slots; ask the overflow hook about what none can take."""
        queue = pool.queue
        reqs = self.reqs
        overflow = self.overflow
        aside: list[p.Boxed] | None = None
        while queue:
            ticket: p.Boxed = queue.first()  # (annotated: inferred, a Boxed is an int, boxed again)
            req = reqs.get(ticket)
            if req is None or req.state != QUEUED:
                queue.popleft()
                continue
            w = self.take(pool, req) if pool.heap else None
            if w is not None and type(w) is BrokerMember and pool.local and overflow.waits_here(req):
                # No worker here is free, a downstream broker is: worth it for the last queued?
                last = len(queue) - 1
                if not self.worth_away(pool, w.rtt, last):
                    entry = w.entry(pool.name)  # back in the heap as it was: a slot here frees sooner
                    if entry is not None:
                        heappush(pool.heap, entry)
                    w = None
                elif last:
                    last_ticket: p.Boxed = queue.last()
                    tail = reqs.get(last_ticket)
                    if (
                        tail is not None
                        and tail.state == QUEUED
                        and w.may_take(tail.hops)
                        and tail.deadline > now
                        and overflow.waits_here(tail)
                    ):
                        queue.pop()  # the one that would wait longest here goes
                        self.dequeued(tail)
                        self.assign(tail, w, now, out)
                        continue
            if w is None:
                verdict = overflow.place(req, pool, now, 0)
                if verdict == WAIT:
                    break  # wait for a member's slot, or for credit elsewhere
                if verdict == KEEP:
                    self.send_on_last(pool, now, out)
                    break
                queue.popleft()
                if verdict == SKIP:
                    if aside is None:
                        aside = []
                    aside.append(ticket)  # this one may not go: others behind may
                    continue
                self.dequeued(req)
                overflow.take(req, verdict, now, out)
                continue
            queue.popleft()
            self.dequeued(req)
            if req.deadline <= now:
                self.offer(w)
                self.expire(req, out, dequeued=True)
                continue
            self.assign(req, w, now, out)
        if aside:
            queue.put_back(aside)

    def send_on_last(self, pool: Pool, now: float, out: list[Out]) -> None:
        """The head of ``pool``'s queue is served sooner here (KEEP): offer the overflow hook the
        requests at the back, the last first, while it takes them."""
        queue = pool.queue
        reqs = self.reqs
        overflow = self.overflow
        while len(queue) > 1:
            last: p.Boxed = queue.last()
            req = reqs.get(last)
            if req is None or req.state != QUEUED:
                queue.pop()
                continue
            verdict = overflow.place(req, pool, now, len(queue) - 1)
            if verdict in (WAIT, SKIP, KEEP):
                return
            queue.pop()
            self.dequeued(req)
            overflow.take(req, verdict, now, out)

    def worth_away(self, pool: Pool, rtt: float, ahead: int) -> bool:
        """Is a request with ``ahead`` requests queued before it served sooner by another broker,
        over a link of round trip ``rtt``, than by a worker's slot here? The expected wait here is
        (ahead + 1) x service time / slots; away, the round trip plus the service time there (our
        own until measured) plus the bias. True when we cannot tell (no workers, nothing measured):
        then credit alone decides, as with ``overflow="credit"``."""
        if pool.local <= 0 or pool.svc <= 0.0 or self.settings.overflow != "latency":
            return True
        away = pool.away if pool.away >= 0.0 else pool.svc
        return (ahead + 1) * pool.svc / pool.local > rtt + away + self.settings.overflow_bias_ms / 1000

    def pump_services(self, w: Member, now: float, out: list[Out]) -> None:
        """Dispatch what waits for any service of ``w`` (it has just gained free capacity), the
        longest-waiting first: tickets count arrivals, so a busy service never starves another."""
        pools = [pool for s in w.services if (pool := self.pools[s]).queue]
        if len(pools) > 1:
            pools.sort(key=lambda q: q.queue.first())
        for pool in pools:
            self.pump(pool, now, out)

    def refill(self, w: Member, now: float, out: list[Out]) -> bool:
        """The common case of :meth:`offer` then :meth:`pump_services`, for a worker of one service
        (no overflow hook: a proxy weighs the rest of its queue) that has just freed a slot while
        the queue waits: when no member of the pool has a live entry in its heap (none other can
        take anything), the pump would pop the worker's new entry and give it the head of the
        queue; give it at once instead (least-loaded dispatch decides the same: with no other
        member free, a worker takes a request whatever its hops, and one that avoids it too). False,
        having changed nothing the general path looks at, where that path weighs more: the head
        ended or past its deadline, another member free."""
        if not w.alive:
            return False
        pool = self.pools.get(w.services[0])
        if pool is None or not pool.queue:
            return False
        queue = pool.queue
        head: p.Boxed = queue.first()  # (annotated: see pump)
        req = self.reqs.get(head)
        if req is None or req.state != QUEUED or req.deadline <= now:
            return False  # (the pump skips or expires these)
        if live_top(pool.heap) is not None:
            return False
        name = pool.name
        if w.free(name) <= 0:
            return False  # full after all (its capacity went down)
        queue.popleft()
        self.dequeued(req)
        self.assign(req, w, now, out)  # offers it again: its entry is back while it has room
        self.drop_ended(queue)  # as the pump's next turn would
        if queue and w.free(name) > 0:
            self.pump(pool, now, out)
        return True

    def drop_ended(self, queue: Queue) -> None:
        """Drop the tickets at the head of ``queue`` whose requests ended while queued."""
        reqs = self.reqs
        while queue:
            head: p.Boxed = queue.first()  # (annotated: see pump)
            r = reqs.get(head)
            if r is not None and r.state == QUEUED:
                return
            queue.popleft()

    def pump_all(self, now: float, out: list[Out]) -> None:
        """Dispatch what waits in every pool (capacity elsewhere changed)."""
        for pool in list(self.pools.values()):
            if pool.queue:
                self.pump(pool, now, out)

    def dequeued(self, req: Req) -> None:
        self.queued -= 1
        self.queued_bytes -= len(req.payload)

    def assign(self, req: Req, w: Member, now: float, out: list[Out]) -> None:
        """Send ``req`` to member ``w`` (whose heap entry the caller has popped)."""
        if self.h_wait is not None:
            self.h_wait.observe(now - req.t_in)
        req.t_out = now
        req.state = ASSIGNED
        req.worker = w
        req.attempt += 1
        w.seq += 1
        seq: p.Boxed = w.seq
        w.hold(req.ticket, seq, req.service)
        w.last_used = self.seq
        self.seq += 1
        if not req.key:
            client = req.client
            req.key = p.default_key(client if type(client) is bytes else b"", req.rid)
        task = w.task(req, seq, now, self.name)
        self.offer(w)
        out.append((w.ident, task))
        if self.ops is not None:
            self.ops.append(p.OpSent(req.ticket, w.ident, req.attempt))

    def requeue(self, req: Req, now: float) -> None:
        """Put ``req`` back at the front of its queue."""
        pool = self.pools.get(req.service)
        if pool is None:
            pool = self.pools[req.service] = Pool(req.service)
        req.state = QUEUED
        req.worker = None
        if self.ops is not None:
            self.ops.append(p.OpRequeued(req.ticket))
        pool.queue.appendleft(req.ticket)
        self.queued += 1
        self.queued_bytes += len(req.payload)
        self.changes += 1
        self.deadlines.push(req)

    def retry(self, req: Req, lost: str, last: str, now: float, out: list[Out], touched: set[str]) -> None:
        """Requeue ``req`` after its holder was lost, or end it LOST at the attempt cap (runs ended
        by a retry policy do not count against it); a cancelled one just ends; a stream that had
        sent parts ends INTERRUPTED (running it again would repeat them)."""
        cap = self.settings.max_attempts
        if req.cancelled:
            self.finish(req, p.ST_CANCELLED, "cancelled", b"", out)
        elif req.parts:
            why = f"stream interrupted after {req.parts} parts: {lost} ({last})"
            self.finish(req, p.ST_INTERRUPTED, why, b"", out)
        elif req.attempt - req.retries >= cap:
            self.finish(req, p.ST_LOST, f"request lost: {lost} (attempt cap {cap}; last: {last})", b"", out)
        else:
            self.counters.requeues += 1
            self.requeue(req, now)
            touched.add(req.service)

    def settle(
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
        delay_ms: int = -1,
        parts: int = 0,
    ) -> None:
        """``peer`` (member ``w``, or a member we forgot) answered ``ticket``: free its slot, then
        end, requeue or ignore the request. ``delay_ms`` >= 0: the run failed with what its retry
        policy retries (run it again then); ``parts``: a stream's end, after that many parts."""
        req = self.reqs.get(ticket)
        deferred = False  # w's entry goes back in its heap at the end (refill), not now
        if w is not None and ticket in w.inflight:
            w.release(ticket)
            # Only a plain outcome defers it: nothing below pumps then (a refusal or a retry requeues
            # and may pump at once, with w's slot in the heap, as it always was).
            deferred = (
                self.fast_refill
                and not refused
                and delay_ms < 0
                and type(w) is WorkerMember
                and len(w.services) == 1
                and not self.overflow.active()
            )
            if not deferred:
                self.offer(w)
        if req is None:
            self.counters.late_results += 1
        else:
            holder = req.worker
            from_holder = holder is not None and holder.ident == peer
            if not from_holder and not (req.tried is not None and peer in req.tried):
                self.counters.bogus_results += 1
            elif refused:
                if from_holder:
                    self.counters.refused += 1
                    req.attempt -= 1
                    if type(w) is WorkerMember:  # rule 3: offered again at once, it would refuse again
                        self.set_capacity(w, w.load())
                    self.requeue(req, now)
            elif delay_ms >= 0 and not from_holder:
                self.counters.late_results += 1  # a former holder's failed run: it runs elsewhere now
            else:
                # A former holder may finish after it was given up: deliver its reply rather than
                # run the request again. The current holder keeps the slot until it answers.
                if req.state == QUEUED:
                    self.dequeued(req)
                elif req.state == FORWARDED:
                    self.overflow.recall(req)
                if w is not None:
                    w.served += 1
                    if status == p.ST_FAILED:
                        w.failed += 1
                    if from_holder:
                        took = now - req.t_out
                        w.busy_s += took
                        pool = self.pools.get(req.service)
                        if pool is not None and status != p.ST_CANCELLED:
                            if type(w) is WorkerMember:
                                pool.svc = took if pool.svc <= 0.0 else pool.svc + EWMA * (took - pool.svc)
                            elif type(w) is BrokerMember:
                                away(pool, took - w.rtt)
                if self.h_service is not None and from_holder:
                    self.h_service.observe(now - req.t_out)
                if delay_ms < 0 or req.cancelled or req.parts or not self.watcher.run_again(req, w, delay_ms, now, out):
                    if status == p.ST_CANCELLED and not req.cancelled:
                        status, message = p.ST_TIMEOUT, "the handler was stopped at the request's deadline"
                    self.finish(req, status, message, payload, out, parts)
        if w is not None:
            if deferred:
                if self.refill(w, now, out):
                    return
                self.offer(w)
            self.pump_services(w, now, out)
        elif req is not None and req.state == QUEUED and req.ticket in self.reqs:
            self.pump(self.pools[req.service], now, out)

    def abandon_from(self, client: Dest) -> None:
        """Forget queued requests of a departed member: no one can take the reply."""
        for req in [r for r in self.reqs.values() if r.client == client and r.state == QUEUED]:
            self.counters.abandoned += 1
            self.dequeued(req)
            self.forget(req)

    def expire_queued(self, now: float, out: list[Out]) -> None:
        """End queued requests whose deadline has come (TIMEOUT); ask the overflow hook about
        forwarded ones (their answer was lost with a connection)."""
        dl = self.deadlines
        reqs = self.reqs
        while (ticket := dl.pop_due(now)) is not None:
            req = reqs.get(ticket)
            if req is None or req.deadline > now:
                continue
            if req.state == QUEUED:
                self.expire(req, out)
            elif req.state == FORWARDED:
                # The upstream answers TIMEOUT before this (its budget was shorter); past it, the
                # request or its answer was lost with a connection.
                self.overflow.recall(req)
                self.finish(req, p.ST_TIMEOUT, "deadline passed with no answer from the upstream broker", b"", out)

    def expire(self, req: Req, out: list[Out], dequeued: bool = False) -> None:
        """End queued ``req`` TIMEOUT: its deadline came before any member could take it."""
        if not dequeued:
            self.dequeued(req)
        self.changes += 1
        pool = self.pools.get(req.service)
        if pool is None or not pool.members:
            why = f"no worker for service {req.service!r} was registered at broker {self.name}"
            why += self.overflow.unserved()
        else:
            why = f"all {len(pool.members)} workers of service {req.service!r} stayed busy"
        self.finish(req, p.ST_TIMEOUT, f"deadline passed before dispatch: {why}", b"", out)

    def forget(self, req: Req) -> None:
        """Remove ``req`` from the tables (its ticket may linger in a queue; pumps skip it)."""
        del self.reqs[req.ticket]
        client = req.client
        if not req.cancelled:  # a cancelled one was released from its caller and replicated then
            if self.ops is not None:
                self.ops.append(p.OpEnded(req.ticket))
            self.release_caller(client, req.rid, req.ticket)
        if req.also:
            for c, rid in req.also:
                self.release_caller(c, rid, req.ticket)
        if req.window or (req.key and self.join_same_key):
            self.watcher.closed(req)
        if type(client) is not bytes:
            self.overflow.forgotten(req)
        if req.via is not None:
            req.via.requests_held(req.service, -1)
            req.via = None
        pool = self.pools.get(req.service)
        if pool is not None and not pool.members:
            queue = pool.queue
            self.drop_ended(queue)
            if not queue:
                del self.pools[req.service]  # services nobody serves must not accumulate

    def enter(self, req: Req) -> None:
        """Put ``req`` (handed down by an upstream) in the table; its key waits for :meth:`enter_key`."""
        self.reqs[req.ticket] = req
        if req.window:
            self.watcher.opened(req)

    def enter_key(self, req: Req) -> None:
        self.keys.put(req.client, req.rid, req.ticket)

    def add_caller(self, req: Req, caller: Dest, rid: int) -> None:
        """Request ``rid`` of ``caller`` joins ``req``'s run: it gets the same reply."""
        if req.also is None:
            req.also = []
        req.also.append((caller, rid))
        self.keys.put(caller, rid, req.ticket)

    def restored(self, req: Req, held: bool) -> None:
        """Put a request of a replicated table in (after a takeover): queued, or ``held`` by a
        member that has not registered here yet (ASSIGNED with no holder)."""
        ticket = req.ticket
        self.reqs[ticket] = req
        if req.window or (req.key and self.join_same_key):
            self.watcher.opened(req)
        self.keys.put(req.client, req.rid, ticket)
        # in no quota until its caller sends it again: the old active one may have answered it since
        self.unclaimed.add((req.client, req.rid))
        pool = self.pools.get(req.service)
        if pool is None:
            pool = self.pools[req.service] = Pool(req.service)
        if held:
            req.state = ASSIGNED
        else:
            pool.queue.append(ticket)
            self.queued += 1
            self.queued_bytes += len(req.payload)
            self.deadlines.push(req)

    def release_caller(self, client: Dest, rid: p.Boxed, ticket: p.Boxed) -> None:
        """Caller ``client`` no longer waits for ``rid``: its quota count and its key go."""
        self.keys.drop(client, rid, ticket)
        if self.unclaimed and (key := (client, rid)) in self.unclaimed:  # (empty but after a takeover)
            self.unclaimed.discard(key)
            return
        callers = self.callers
        rec = callers.get(client)
        if rec is not None:
            rec.open -= 1
            if rec.open <= 0:
                del callers[client]

    def finish(self, req: Req, status: int, message: str, payload: bytes, out: list[Out], parts: int = 0) -> None:
        """End ``req``: forget it and append its one reply (to each caller that joined it too). A
        cancelled request has no caller left: only a broker above that handed it down is told."""
        self.forget(req)
        if self.h_e2e is not None:
            self.h_e2e.observe(self.now - req.t_in)
        client = req.client
        if req.cancelled:
            if type(client) is not bytes:
                self.overflow.reply(req, p.Reply(req.rid, p.ST_CANCELLED, "cancelled", b""), out)
            return
        self.counters.ended(status)
        if type(client) is bytes:
            out.append((client, p.message(p.REPLY_CLS, (req.rid, status, message, payload, parts))))
        else:
            self.overflow.reply(req, p.Reply(req.rid, status, message, payload, parts), out)
        if req.also:
            for c, rid in req.also:
                if type(c) is bytes:
                    out.append((c, p.Reply(rid, status, message, payload, parts)))

    def next_deadline(self) -> float | None:
        """The earliest member expiry, queued deadline, or forgetting of an idle service."""
        d: float | None = None
        if self.expiry:
            d = self.expiry[0][0]
        due = self.deadlines.first()
        if due is not None and (d is None or due < d):
            d = due
        if self.idle:
            t = min(self.idle.values()) + self.settings.forget_service_s
            d = t if d is None or t < d else d
        return d
