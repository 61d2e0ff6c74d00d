"""Proxy tiers: a proxy's upstream link, credit both ways, split horizon, overflow. Sans-IO.

Rules of this module:
1. A downstream broker (a proxy) registers like a worker (HELLO with the broker role) and joins the
   pool of every service it advertises (ADVERT), with the spare capacity it advertised less the
   tasks sent since; it answers each TASK with a REPLY.
2. A broker with ``upstream`` set is a proxy: it serves with its own pool first and forwards what
   that cannot take (REQUEST, answered by REPLY) through :class:`Tiers`, the dispatcher's overflow
   hook; what its upstream hands down is served locally or refused with BUSY, never sent back up.
   A request is never sent to a broker named in its hops, and each hop spends at least
   ``HOP_MARGIN_MS`` of its budget.
3. A *session* is one registration with one upstream broker run. Work the upstream handed down in a
   session is answered in that session only; when the session ends (silence, BYE, RECONNECT, a new
   upstream run) the upstream has requeued it, so later answers are void.
4. After a session ends the proxy waits a random pause before it registers again ("full jitter":
   uniform in [0, min(backoff_max, backoff * 2**(failures-1))]), so that a recovering master is not
   flooded by every proxy at the same instant. The pause resets once a registration succeeds.
5. Credit both ways. A broker advertises to each proxy below it what it offers that proxy: its
   spare capacity outside the proxy's own subtree (split horizon, so no capacity is counted twice)
   plus the proxy's requests it holds. The proxy's credit is that offer less its requests in flight
   there, so every answer frees credit at once; it forwards a request only within credit, unless
   nothing below the proxy serves the service at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.dispatch import Dispatcher
from zmqdist.core.hooks import KEEP, SKIP, WAIT, Overflow, away
from zmqdist.core.lifecycle import Lifecycle
from zmqdist.core.link import BrokerLink, Problem
from zmqdist.core.records import (
    ASSIGNED,
    FORWARDED,
    HOP_MARGIN_MS,
    QUEUED,
    UPSTREAM,
    BrokerMember,
    Counters,
    Out,
    Pool,
    Req,
)

# Verdicts of Tiers.place (beside dispatch's WAIT and SKIP).
UP: Final = 3  # forward it to the upstream broker
REFUSE_UP: Final = 4  # handed down by our upstream and nothing here can take it: give it back (BUSY)
RETURN: Final = 5  # from a downstream broker that serves it itself: give it back (BUSY) rather than hold it
TOO_BIG: Final = 6  # over the upstream's message limit and nothing here serves it: fail it (INVALID), saying so


def half() -> float:
    """The default 'random' source: deterministic middle of the jitter window."""
    return 0.5


class Upstream:
    """State of the link from a proxy to its upstream broker (see the module rules)."""

    __slots__ = (
        "advert_at",
        "adverts",
        "failures",
        "last_spare",
        "link",
        "losses",
        "max_message",
        "move",
        "name",
        "out_n",
        "ping_at",
        "reason",
        "registered",
        "rng",
        "rtt",
        "seq_seen",
        "session",
        "settings",
        "spare",
        "wait_until",
    )

    def __init__(self, settings: BrokerSettings, rng: Callable[[], float], now: float) -> None:
        self.settings = settings
        self.link = BrokerLink(settings.upstream, settings.heartbeat, now)
        self.rng = rng
        self.session = 0
        self.registered = False
        self.seq_seen = 0  # highest task seq this session (task arrivals and the upstream's heartbeats)
        self.failures = 0
        self.losses = 0
        self.wait_until: float | None = now  # register at once at start
        self.move = True  # the next registration goes to the next endpoint (False: same connection)
        self.reason = "start"
        self.name = ""  # the upstream broker's name once welcomed (for loop prevention)
        self.max_message = 0  # its --max-message-size (WELCOME; 0: not said): larger stays here
        self.advert_at = -1.0  # when the last advert went out
        self.last_spare: tuple[tuple[str, int], ...] | None = None
        # Credit from the upstream: its offer, and our requests in flight there, per service.
        self.spare: dict[str, int] = {}
        self.out_n: dict[str, int] = {}
        self.adverts = 0  # adverts received (a request the upstream returned waits for a newer one)
        # The link's round trip: a HELLO or HEARTBEAT sent at ping_at, answered by WELCOME or the
        # upstream's HEARTBEAT (it answers each at once); a recent average, 0.0 until measured.
        self.rtt = 0.0
        self.ping_at: float | None = None

    def pinged(self, now: float) -> None:
        """A HELLO or HEARTBEAT went out (the first one not yet answered is timed)."""
        if self.ping_at is None:
            self.ping_at = now

    def ponged(self, now: float) -> None:
        """The upstream answered: one more round-trip sample."""
        if self.ping_at is not None:
            sample = now - self.ping_at
            self.rtt = sample if self.rtt <= 0.0 else self.rtt + 0.25 * (sample - self.rtt)
            self.ping_at = None

    def credit(self, service: str) -> int:
        """Requests of ``service`` the upstream can take from us now."""
        return self.spare.get(service, 0) - self.out_n.get(service, 0)

    def forwarded(self, service: str, n: int = 1) -> None:
        """Count a request sent upstream (``n=-1``: it came back or ended)."""
        self.out_n[service] = self.out_n.get(service, 0) + n

    def advert(self, offer: tuple[tuple[str, int], ...]) -> None:
        """The upstream's advert: what it offers us, our requests it holds included."""
        self.spare = dict(offer)
        self.adverts += 1

    def lose(self, now: float, reason: str, *, move: bool) -> None:
        """End the session; schedule the next registration after a jittered pause."""
        self.session += 1
        self.registered = False
        self.seq_seen = 0
        self.failures += 1
        self.losses += 1
        self.last_spare = None
        self.spare = {}
        self.out_n = {}
        self.ping_at = None
        s = self.settings
        window = min(s.backoff_max_s, s.backoff_s * 2 ** min(self.failures - 1, 30))
        self.wait_until = now + window * self.rng()
        self.move = move
        self.reason = reason

    def welcomed(self, broker: str, max_message: int) -> None:
        """Registration accepted: the pause resets."""
        self.registered = True
        self.failures = 0
        self.name = broker
        self.max_message = max_message

    def advert_due(self, now: float, dirty: bool) -> bool:
        """Return True when an advert may go out: on change (at most every advert interval) or as
        a refresh once per heartbeat interval."""
        # The same sums as next_deadline, so that a wake-up at that deadline always finds it due.
        return (
            dirty and now >= self.advert_at + self.settings.advert_interval_s
        ) or now >= self.advert_at + self.link.hb_s

    def next_deadline(self, dirty: bool) -> float:
        """The earliest time at which the link has something to do."""
        if self.wait_until is not None:
            return self.wait_until
        if not self.registered:  # waiting for WELCOME: only the silence check is due
            return self.link.last_heard + self.link.ttl_s + 1e-6
        d = self.link.next_deadline()
        gap = self.settings.advert_interval_s if dirty else self.link.hb_s
        return min(d, self.advert_at + gap)


class Tiers(Overflow):
    """A broker's place in a tree of brokers: its upstream link (a proxy) and its downstream
    brokers' credit (any broker). The dispatcher's overflow hook."""

    def __init__(
        self,
        settings: BrokerSettings,
        dispatcher: Dispatcher,
        lifecycle: Lifecycle,
        counters: Counters,
        now: float,
        rng: Callable[[], float],
        serving: bool = True,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.d = dispatcher
        self.life = lifecycle
        self.counters = counters
        self.up = Upstream(settings, rng, now) if settings.upstream and serving else None
        self.from_up: dict[int, Req] = {}  # local ticket -> request handed down by upstream
        self.sent_up: dict[int, Req] = {}  # local ticket -> request forwarded upstream, unanswered
        self.up_mark = -1  # dispatcher.changes when the last advert went upstream
        self.down_mark = -1  # dispatcher.changes when the last adverts went to downstream brokers
        self.down_at = -1.0
        # Answers an internal service the upstream asked of us (status, tree): set by the broker.
        self.internal: Callable[[p.Task, int, float, list[Out]], None] | None = None

    # --- the dispatcher's overflow hook ---------------------------------------------------------

    def active(self) -> bool:
        return self.up is not None

    def place(self, req: Req, pool: Pool, now: float, ahead: int) -> int:
        # Only the head of a queue is handed back (REFUSE_UP, RETURN): one behind it may still get
        # a slot here first; from the back of the queue only a forward up is taken (KEEP's scan).
        if type(req.client) is not bytes:
            return REFUSE_UP if not ahead else SKIP
        up = self.up
        # The upstream refuses a request over its limit (over twice it, libzmq drops it unseen).
        too_big = up is not None and 0 < up.max_message < len(req.payload)
        # Upstream within its credit (or always, for a service nothing below us serves).
        can_up = not too_big and up is not None and up.registered and (up.credit(req.service) > 0 or not pool.members)
        # A request its retry policy runs again stays where its runs are counted while workers here
        # serve it: sent up, the upstream would count them afresh.
        stays = req.retries > 0 and pool.local > 0
        if (
            can_up
            and not stays
            and up is not None
            and req.up_block < up.adverts
            and self._may_forward(req, up.name, now)
        ):
            if pool.local and not self.d.worth_away(pool, up.rtt, ahead):
                return KEEP  # a slot here frees before an answer from upstream could come back
            return UP
        if self._returnable(req):
            return RETURN if not ahead else SKIP
        if too_big and not pool.members:
            return TOO_BIG if not ahead else SKIP
        return SKIP if can_up else WAIT

    def take(self, req: Req, verdict: int, now: float, out: list[Out]) -> None:
        if verdict == UP:
            self._forward_up(req, now, out)
        elif verdict == REFUSE_UP:
            self._refuse_up(req, now, out)
        elif verdict == TOO_BIG and self.up is not None:
            why = (
                f"a request of {len(req.payload)} bytes is over upstream broker {self.up.name}'s limit of "
                f"{self.up.max_message} bytes (--max-message-size), and no worker at {self.name} serves {req.service!r}"
            )
            self.d.finish(req, p.ST_INVALID, why, b"", out)
        else:
            self.counters.returned += 1
            self.d.finish(req, p.ST_BUSY, f"{self.name} has no spare capacity for it now", b"", out)

    def reply(self, req: Req, reply: p.Reply, out: list[Out]) -> None:
        up = self.up
        if up is not None and req.session == up.session:
            if 0 < up.max_message < len(reply.payload):  # the upstream would refuse it: say why instead
                why = (
                    f"the result of {len(reply.payload)} bytes, from proxy {self.name}, is over upstream broker "
                    f"{up.name}'s limit of {up.max_message} bytes (--max-message-size)"
                )
                reply = p.Reply(reply.rid, p.ST_FAILED, "", p.result_too_large(why), reply.parts)
            out.append((UPSTREAM, reply))

    def relay(self, req: Req, msg: p.Part | p.Progress, out: list[Out]) -> None:
        # Work handed down: its parts go up as a worker's would, numbered by the upstream's ticket.
        up = self.up
        if up is None or req.session != up.session:
            return
        if 0 < up.max_message < len(msg.payload):  # the upstream would refuse it (over twice: drop it unseen)
            if type(msg) is p.Part:
                self._part_too_large(req, msg, up, out)
            return  # a progress report is advisory: it stays here
        out.append((UPSTREAM, msg))

    def _part_too_large(self, req: Req, part: p.Part, up: Upstream, out: list[Out]) -> None:
        """End a stream handed down at a part its upstream would refuse, with the failure that says
        why, and stop its run here: the upstream, told it ended, will not cancel it."""
        why = (
            f"part {part.seq + 1} of the stream ({len(part.payload)} bytes), from proxy {self.name}, is over "
            f"upstream broker {up.name}'s limit of {up.max_message} bytes (--max-message-size)"
        )
        self.counters.ended(p.ST_FAILED)
        out.append((UPSTREAM, p.Reply(req.rid, p.ST_FAILED, "", p.result_too_large(why), part.seq)))
        req.session = -1  # detached: nothing more of it goes up (nor the CANCELLED its run ends with)
        self.life.cancel_run(req, self.d.now, out)

    def send_on(self, req: Req, msg: p.Cancel | p.Ack, out: list[Out]) -> None:
        if self.up is not None and req.ticket in self.sent_up:
            out.append((UPSTREAM, msg))  # the upstream knows it by our ticket (its request id)

    def recall(self, req: Req) -> None:
        del self.sent_up[req.ticket]
        if self.up is not None:
            self.up.forwarded(req.service, -1)

    def forgotten(self, req: Req) -> None:
        self.from_up.pop(req.ticket, None)

    def waits_here(self, req: Req) -> bool:
        if type(req.client) is not bytes:
            return False  # handed down by our upstream: refused back up if no slot is free
        return not self._returnable(req)

    def _returnable(self, req: Req) -> bool:
        """Did ``req`` come from a downstream broker that serves its service itself (RETURN gives it
        back)? Not one that callers joined: they asked nothing of that broker, so it waits here. Nor
        one that has run here while workers here serve it: its runs are counted here (a retry
        policy's attempts, the cap of --max-attempts), and sent again from below it would start
        that count afresh."""
        client = req.client
        if type(client) is not bytes:
            return False
        d = self.d.members.get(client)
        if not (isinstance(d, BrokerMember) and req.service in d.services and not req.also):
            return False
        if req.attempt:
            pool = self.d.pools.get(req.service)
            return pool is None or not pool.local
        return True

    def unserved(self) -> str:
        if self.up is None:
            return ""
        return " and its upstream could not take it" if self.up.registered else " and its upstream is down"

    # --- forwarding up ----------------------------------------------------------------------------

    def _may_forward(self, req: Req, upstream_name: str, now: float) -> bool:
        hops = req.hops
        return (
            len(hops) < p.MAX_HOPS
            and upstream_name not in hops
            and p.budget_ms_left(req.deadline, now, HOP_MARGIN_MS, floor=0) >= 1
        )

    def _forward_up(self, req: Req, now: float, out: list[Out]) -> None:
        up = self.up
        assert up is not None
        req.state = FORWARDED
        req.went_up = True
        req.t_out = now
        req.attempt += 1
        self.sent_up[req.ticket] = req
        self.counters.forwarded_up += 1
        up.forwarded(req.service)
        self.d.push_deadline(req)
        budget = p.budget_ms_left(req.deadline, now, HOP_MARGIN_MS)
        hops = (*req.hops, self.name)
        out.append(
            (
                UPSTREAM,
                p.Request(
                    req.ticket, req.service, budget, hops, req.payload, req.trace, req.key, req.window, req.retry
                ),
            )
        )

    def _refuse_up(self, req: Req, now: float, out: list[Out]) -> None:
        """Hand work back to the upstream (BUSY: it requeues without spending an attempt), with a
        fresh advert first so that it does not offer us the same work again."""
        self.counters.refused_up += 1
        self._advert(now, out, force=True)
        self.d.finish(req, p.ST_BUSY, f"proxy {self.name} has no free capacity for {req.service!r}", b"", out)

    # --- what the upstream sends ------------------------------------------------------------------

    def receive(self, msg: p.Message, now: float) -> list[Out]:
        """Handle one message from the upstream link; return what to send."""
        up = self.up
        if up is None:
            return []
        out: list[Out] = []
        if up.wait_until is not None:
            return out  # between sessions: whatever the old connection still delivers is void
        link = up.link
        link.last_heard = now
        match msg:
            case p.Task():
                self._on_up_task(msg, now, out)
            case p.Reply():
                self._on_up_reply(msg, now, out)
            case p.Part() | p.Progress():
                # A part (or progress) of a request we forwarded, numbered by our ticket.
                req = self.d.reqs.get(msg.id)
                if req is not None and req.state == FORWARDED and not req.cancelled:
                    if type(msg) is p.Part:
                        self.life.relay(req, p.Part(req.rid, msg.seq, msg.payload), out)
                    else:
                        self.life.relay(req, p.Progress(req.rid, msg.payload), out)
            case p.Cancel():
                if up.registered:
                    self.life.cancel(UPSTREAM, msg.id, now, out)  # work it handed down to us
            case p.Ack():
                if up.registered:
                    self.life.ack(UPSTREAM, msg.id, msg.seq, out)
            case p.Heartbeat():
                if link.restarted(msg.incarnation):
                    self._lose_upstream(now, "upstream broker restarted", False, out)
                elif (why := link.fenced(link.broker, "", msg.epoch)) is not None:
                    self._lose_upstream(now, why, True, out)
                else:
                    up.seq_seen = max(up.seq_seen, msg.seq)
                    up.ponged(now)
            case p.Welcome():
                if (why := link.fenced(msg.broker, msg.peer, msg.epoch)) is not None:
                    self._lose_upstream(now, why, True, out)
                    return out
                link.welcome(msg)
                up.welcomed(msg.broker, msg.max_message)
                up.ponged(now)
                self._advert(now, out, force=True)
                self.d.pump_all(now, out)
            case p.Advert():
                up.advert(msg.offer)
                self.d.changes += 1  # what we offer our own downstream brokers includes this credit
                self.d.pump_all(now, out)
            case p.Reconnect():
                self._lose_upstream(now, "upstream broker does not know us", False, out)
            case p.Bye():
                self._lose_upstream(now, f"upstream said bye: {msg.reason}", True, out)
            case p.Error():
                out.append((UPSTREAM, Problem(f"upstream refused a message: {msg.message}")))
                if not up.registered:
                    self._lose_upstream(now, f"registration refused: {msg.message}", True, out)
            case _:
                self.counters.bad_input += 1
                out.append((UPSTREAM, Problem(f"unexpected {type(msg).__name__} from upstream ignored")))
        return out

    def _on_up_task(self, m: p.Task, now: float, out: list[Out]) -> None:
        """Work handed down by the upstream: serve it with our own pool, or refuse it (BUSY)."""
        up = self.up
        assert up is not None
        if not up.registered:
            return  # from a registration we replaced: the upstream has requeued it
        up.seq_seen = max(up.seq_seen, m.seq)
        if p.internal(m.service):  # answered here, never dispatched
            if self.internal is not None:
                self.internal(m, up.session, now, out)
            return
        self.counters.tasks_from_up += 1
        d = self.d
        if d.keys.ticket(UPSTREAM, m.ticket) is not None:
            self.counters.duplicates += 1
            return
        ticket = d.new_ticket()
        req = Req(ticket, UPSTREAM, m.ticket, m.service, m.payload, p.deadline_at(now, m.budget_ms), m.hops)
        req.t_in = now
        req.trace = m.trace
        req.session = up.session
        req.key = m.key
        req.window, req.retry = m.window, m.retry
        d.enter(req)
        if self.name in m.hops:
            self.counters.loops += 1
            d.finish(req, p.ST_INVALID, f"request looped: it has passed {self.name} already", b"", out)
            return
        pool = d.pools.get(m.service)
        w = d.take(pool, req) if pool is not None and pool.heap else None
        if w is None:
            self._refuse_up(req, now, out)
            return
        d.enter_key(req)
        self.from_up[ticket] = req
        d.assign(req, w, now, out)

    def _on_up_reply(self, m: p.Reply, now: float, out: list[Out]) -> None:
        """The upstream's answer to a request we forwarded: it ends the request, wherever it is."""
        d = self.d
        req = d.reqs.get(m.rid)
        if req is None or not req.went_up:
            self.counters.late_results += 1
            return
        if m.status == p.ST_BUSY:
            # The upstream could not place it now: it waits here (for a member of ours, or for a
            # newer advert before it goes up again), within its deadline. A BUSY for a request
            # that is no longer with the upstream (taken back after a lost session) is stale.
            if req.state != FORWARDED:
                self.counters.late_results += 1
                return
            up = self.up
            assert up is not None
            self.recall(req)
            self.counters.returned_from_up += 1
            req.attempt -= 1
            req.up_block = up.adverts
            d.requeue(req, now)
            d.pump(d.pools[req.service], now, out)
            return
        if req.state == QUEUED:
            d.dequeued(req)
        elif req.state == FORWARDED:
            self.recall(req)
            pool = d.pools.get(req.service)
            if pool is not None and self.up is not None and m.status != p.ST_CANCELLED:
                away(pool, now - req.t_out - self.up.rtt)
        d.finish(req, m.status, m.message, m.payload, out, m.parts)
        pool = d.pools.get(req.service)
        if pool is not None and pool.queue:
            d.pump(pool, now, out)  # the answer freed a unit of credit upstream

    def _lose_upstream(self, now: float, reason: str, move: bool, out: list[Out]) -> None:
        """The upstream session ended: void what it handed down, take back what we sent it."""
        up = self.up
        assert up is not None
        up.lose(now, reason, move=move)
        self.counters.upstream_losses += 1
        out.append((UPSTREAM, Problem(f"upstream link lost ({reason}); registering again")))
        d = self.d
        for req in list(self.from_up.values()):
            if req.window and req.state == ASSIGNED and not req.cancelled:
                self.life.cancel_run(req, now, out)  # a stream nobody acknowledges any more: stop it
            d.keys.drop(UPSTREAM, req.rid, req.ticket)
            if req.state == QUEUED:
                d.dequeued(req)
                d.forget(req)
        touched: set[str] = set()
        for ticket in sorted(self.sent_up, reverse=True):
            req = self.sent_up.pop(ticket)
            d.retry(
                req, f"its upstream broker was lost {req.attempt} times while holding it", reason, now, out, touched
            )
        for s in touched:
            d.pump(d.pools[s], now, out)

    # --- timers -----------------------------------------------------------------------------------

    def start(self, now: float, out: list[Out]) -> None:
        """A proxy connects and registers upstream at once."""
        if self.up is not None:
            self._tick_upstream(now, out)

    def tick(self, now: float, out: list[Out]) -> None:
        """Run the upstream link (registration, heartbeats, adverts) and the adverts downstream."""
        if self.up is not None:
            self._tick_upstream(now, out)
        if self.d.brokers and self._down_advert_due(now):
            self._advert_down(now, out)

    def next_deadline(self) -> float | None:
        d: float | None = None
        if self.up is not None:
            d = self.up.next_deadline(self.d.changes != self.up_mark)
        if self.d.brokers:
            gap = (
                self.settings.advert_interval_s
                if self.d.changes != self.down_mark
                else self.settings.heartbeat.heartbeat_s
            )
            t = self.down_at + gap
            d = t if d is None else min(d, t)
        return d

    def _tick_upstream(self, now: float, out: list[Out]) -> None:
        up = self.up
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
            out.append((UPSTREAM, p.Hello(p.ROLE_BROKER, self.name, (), 0, hb_ms, link.top_epoch, p.MAX_BATCH)))
            up.pinged(now)
            return
        if link.silent(now):
            self._lose_upstream(now, f"upstream at {link.endpoint} silent for {now - link.last_heard:.2f}s", True, out)
            return
        if up.registered:
            if link.heartbeat_due(now):
                held = tuple(r.rid for r in self.from_up.values() if r.session == up.session)
                rtt_us = round(up.rtt * 1e6)
                out.append((UPSTREAM, p.Heartbeat(p.ROLE_BROKER, link.incarnation or "", up.seq_seen, held, 0, rtt_us)))
                up.pinged(now)
            if up.advert_due(now, self.d.changes != self.up_mark):
                self._advert(now, out)

    def shutdown(self, reason: str, out: list[Out]) -> None:
        """Tell the upstream we leave (if registered)."""
        if self.up is not None and self.up.registered:
            out.append((UPSTREAM, p.Bye(reason)))

    # --- adverts ----------------------------------------------------------------------------------

    def spare(self) -> tuple[tuple[str, int], ...]:
        """What this broker offers its upstream, per service it can serve below it: free slots less
        what is queued, plus the upstream's tasks it holds (so each answer frees upstream credit)."""
        up = self.up
        held: dict[str, int] = {}
        for r in self.from_up.values():
            if up is not None and r.session == up.session:
                held[r.service] = held.get(r.service, 0) + 1
        budget = p.MAX_CAPACITY  # held tickets and offer stay within what a heartbeat may list
        out = []
        pools = self.d.pools
        for name in sorted(pools):
            pool = pools[name]
            if not pool.members:
                continue
            free = sum(w.free(name) for w in pool.members)
            n = max(0, min(free - len(pool.queue) + held.get(name, 0), budget))
            budget -= n
            out.append((name, n))
        return tuple(out)

    def _advert(self, now: float, out: list[Out], force: bool = False) -> None:
        up = self.up
        if up is None or not up.registered:
            return
        self.up_mark = self.d.changes
        spare = self.spare()
        if force or spare != up.last_spare or now >= up.advert_at + up.link.hb_s:
            up.last_spare = spare
            up.advert_at = now
            out.append((UPSTREAM, p.Advert(spare)))

    def _spare_totals(self) -> dict[str, int]:
        """Per service: free slots of every member plus upstream credit, less what is queued."""
        totals: dict[str, int] = {}
        for name, pool in self.d.pools.items():
            totals[name] = sum(w.free(name) for w in pool.members) - len(pool.queue)
        up = self.up
        if up is not None and up.registered:
            for name in up.spare:
                totals[name] = totals.get(name, 0) + max(0, up.credit(name))
        return totals

    def _advert_to(self, d: BrokerMember, totals: dict[str, int], out: list[Out], force: bool) -> None:
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
        if self.d.changes != self.down_mark and now >= self.down_at + self.settings.advert_interval_s:
            return True
        return now >= self.down_at + self.settings.heartbeat.heartbeat_s

    def _advert_down(self, now: float, out: list[Out]) -> None:
        refresh = now >= self.down_at + self.settings.heartbeat.heartbeat_s
        self.down_mark = self.d.changes
        self.down_at = now
        totals = self._spare_totals()
        for w in self.d.members.values():
            if isinstance(w, BrokerMember):
                self._advert_to(w, totals, out, force=refresh)

    def registered(self, d: BrokerMember, out: list[Out]) -> None:
        """A downstream broker registered: tell it at once what we offer it."""
        self._advert_to(d, self._spare_totals(), out, force=True)

    def on_advert(self, w: BrokerMember, m: p.Advert, now: float, out: list[Out]) -> None:
        """A downstream broker's advert: what it can take now, per service."""
        w.spare = dict(m.offer)
        w.adv_at = now
        services = tuple(w.spare)
        if services != w.services:
            self.d.leave(w, set(w.services) - set(services), now)
            w.services = services
            self.d.join(w, services)
        self.d.offer(w)
        self.d.pump_services(w, now, out)

    # --- what status shows ------------------------------------------------------------------------

    def status(self) -> dict[str, object] | None:
        """The upstream link's part of ``zmqdist status`` (None for a broker with no upstream)."""
        up = self.up
        if up is None:
            return None
        return {
            "endpoint": up.link.endpoint if up.link.index >= 0 else None,
            "broker": up.name or None,
            "registered": up.registered,
            "forwarded": len(self.sent_up),
            "held": sum(1 for r in self.from_up.values() if r.session == up.session),
            "losses": up.losses,
            "rtt_ms": round(up.rtt * 1000, 3),
        }

    def serves(self, service: str) -> bool:
        """Does the upstream offer ``service`` (for MMI)?"""
        return self.up is not None and self.up.registered and service in self.up.spare
