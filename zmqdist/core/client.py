"""The client machine: pending requests, pacing, deadlines, resend after failover, going home. Sans-IO.

Rules of this module:
1. Every submitted request ends in exactly one :class:`Completed`: a reply, or a local timeout at its
   deadline. A second reply for the same request id is dropped (counted), never reported.
2. Pacing: a client never has more requests open at its broker than the broker allows it (WELCOME
   says its quota; before the first WELCOME one request of up to ``EARLY_BYTES`` goes): the rest
   wait here, in order, and go as replies free room. Their deadlines count
   from ``submit``; one that expires while it waits ends as a local timeout, never sent.
3. Requests keep their id for life. When the broker is found to be a new run (incarnation changed) or
   the client fails over to another endpoint, every request it had sent is sent again with the same
   id and the time budget it has left, once that broker's WELCOME has said its quota and message
   limit (oldest first, within them: rule 2, rule 5; status requests at once, as a passive broker
   answers them); brokers absorb the copies of one still in progress. HELLOs
   are numbered per connection and WELCOME says which it answers: the first WELCOME of a connection
   that answers a later HELLO means the first was lost, and what went with it too (libzmq 4.3.5
   drops what waits on a socket whose connect failed with no route to the host, as on a client
   whose own link is down), so every request sent is sent again then.
4. The budget sent is a little shorter than the local deadline so that the broker's TIMEOUT, which
   says why (no worker registered, or all busy), normally arrives before the local one.
5. A payload larger than the broker's message limit (WELCOME says it) fails at once, not at its
   deadline: the broker's socket would drop it, and the connection with it; so does one that
   waited, or is to go again, when the broker it goes to has a smaller limit.
6. The request lifecycle. A cancel (or a deadline passing) forgets the request here and tells the
   broker (CANCEL) if it was sent; a reply that comes anyway is dropped. A stream's parts must
   arrive in order, numbered from 0, and its end says how many went: a gap, a repeat, or a
   failover after a part arrived ends it INTERRUPTED, never silently. The consumer's progress
   goes back as ACK (every half window). A request whose retry policy lists Busy is sent again
   after its backoff when a full broker refuses it, within its deadline.
7. Away from its first choice (after a failover), the client looks home now and then
   (:class:`~zmqdist.core.link.Homing`); once home answers as a healthy active broker, it stops
   sending, lets what it has in flight end (a bounded wait), and moves there with what waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from zmqdist import protocol as p
from zmqdist.config import HeartbeatSettings
from zmqdist.core.heaps import Due, heappop, heappush
from zmqdist.core.link import BrokerLink, Connect, EndProbe, Homing, Probe, Problem

DEFAULT_QUOTA: Final = 2500  # open requests at a broker that did not say its quota (a broker's default)
NO_BROKER: Final = 100  # a Completed status of this client's own: the deadline passed and no broker ever answered
MOVE_WAIT_S: Final = 10.0  # longest wait for the requests in flight to end before moving home (else later)
# Before a broker's first WELCOME says its quota and message limit, one request at most, this
# small, goes with the HELLO (the rest waits for it).
EARLY_BYTES: Final = 1024


class Completed(NamedTuple):
    """Event: request ``rid`` ended with ``status`` (a ``protocol.ST_*`` code)."""

    rid: int
    status: int
    message: str
    payload: bytes


COMPLETED_CLS: Final = Completed  # a C static, as protocol.REQUEST_CLS and the others


class PartIn(NamedTuple):
    """Event: the next part (``seq``) of stream ``rid`` arrived."""

    rid: int
    seq: int
    payload: bytes


class Progressed(NamedTuple):
    """Event: the handler of ``rid`` reported progress."""

    rid: int
    payload: bytes


ClientOut = p.Message | Completed | PartIn | Progressed | Connect | Problem | Probe | EndProbe

# What travels with a request besides its value: (caller key, stream window, retry policy).
Options = tuple[str, int, p.RetrySpec]
NO_OPTIONS: Final[Options] = ("", 0, ())


class _Pending:
    __slots__ = (
        "acked",
        "again",
        "busy",
        "busy_tries",
        "deadline",
        "margin",
        "options",
        "parts",
        "payload",
        "sent",
        "service",
        "submitted",
        "trace",
    )

    def __init__(
        self,
        service: str,
        payload: bytes,
        deadline: float,
        margin: float,
        trace: str = "",
        submitted: float = 0.0,
        options: Options = NO_OPTIONS,
        busy: tuple[int, float, float] | None = None,
    ) -> None:
        self.submitted = submitted
        self.service = service
        self.payload = payload
        self.deadline = deadline
        self.margin = margin
        self.trace = trace
        self.sent = False  # at the broker (counted in its quota), or still waiting here
        self.again = False  # taken back from a broker that lost it: waits to be sent again
        self.options = options
        self.busy = busy  # (attempts, backoff_s, max_backoff_s): send again when Busy
        self.busy_tries = 1
        self.parts = 0  # stream parts received
        self.acked = 0  # stream parts acknowledged


def budget_margin(timeout_s: float) -> float:
    """Seconds by which the budget sent undercuts the local deadline."""
    return min(0.05, timeout_s * 0.1)


def _half() -> float:
    return 0.5


class ClientCore:
    """Sans-IO client: feed it submissions, broker messages and time."""

    def __init__(
        self,
        endpoints: tuple[str, ...],
        name: str,
        hb: HeartbeatSettings,
        now: float,
        rng: Callable[[], float] = _half,
    ) -> None:
        self.name = name
        self.batch = p.MAX_BATCH  # BATCH frames this client reads (said in HELLO; 0: none)
        self.link = BrokerLink(endpoints, hb, now)
        self.pending: dict[p.Boxed, _Pending] = {}
        self.waiting: deque[p.Boxed] = deque()  # submitted, not sent yet (pacing, or a move home)
        self.sent = 0  # requests at the broker now
        # Until the first WELCOME says the broker's quota, one request may go ahead of it (every
        # quota allows one): a burst right after start must not trip a quota not yet known.
        self.quota = self._quota_said = 1
        self.max_message = 0  # the broker's message limit (0: not known)
        self.registered = False
        self._hellos = 0  # HELLOs said on this connection (numbered: rule 3)
        self.heard_at = -1.0  # when any broker last sent us anything
        self.homing = Homing(rng)
        self._moving: int | None = None  # the home endpoint we are moving to once nothing is in flight
        self._move_until = 0.0
        self._deadlines = Due(self.pending, 1024)  # of pending requests, by id
        self._again: list[tuple[float, int]] = []  # (when, rid): Busy requests to send again
        self._rng = rng
        self.counters = {
            "sent": 0,
            "resent": 0,
            "duplicates": 0,
            "timeouts": 0,
            "failovers": 0,
            "broker_restarts": 0,
            "fenced": 0,
            "held": 0,
            "homecomings": 0,
            "cancelled": 0,
            "interrupted": 0,
            "busy_retries": 0,
            "lost_hellos": 0,
            "too_large": 0,  # sent requests a broker failed over to would not take (its smaller limit)
            "over_quota": 0,  # BUSY over the quota for a request sent within it: sent again
        }

    def start(self, now: float) -> list[ClientOut]:
        """Connect to the first endpoint and say HELLO."""
        return [self.link.connect_next(now, "start"), self._hello(first=True)]

    def submit(
        self,
        rid: p.Boxed,
        service: str,
        payload: bytes,
        timeout_s: float,
        now: float,
        trace: str = "",
        options: Options = NO_OPTIONS,
        busy: tuple[int, float, float] | None = None,
    ) -> list[ClientOut]:
        """Start request ``rid``; return the REQUEST to send (or its immediate completion, or
        nothing when it waits its turn here). ``options``: its caller key, stream window and retry
        policy; ``busy``: (attempts, backoff_s, max_backoff_s) to send it again when Busy."""
        if rid in self.pending:
            return [Completed(rid, p.ST_INVALID, f"request id {rid} is already pending", b"")]
        if timeout_s <= 0:
            return [Completed(rid, p.ST_TIMEOUT, "timeout must be positive", b"")]
        if self.max_message and len(payload) > self.max_message:
            limit = self.max_message
            why = f"payload of {len(payload)} bytes is larger than the broker's limit of {limit} bytes"
            return [Completed(rid, p.ST_INVALID, why, b"")]
        deadline = now + timeout_s
        pend = self.pending[rid] = _Pending(
            service, payload, deadline, budget_margin(timeout_s), trace, now, options, busy
        )
        self._deadlines.push(deadline, rid)
        # Before a broker's WELCOME has said its quota and limit: one small request at most.
        fits = self.registered or (not self.sent and len(payload) <= EARLY_BYTES)
        if self.sent < self.quota and self._moving is None and not self.waiting and fits:
            return [self._send(rid, pend, now)]
        self.waiting.append(rid)
        self.counters["held"] += 1
        return []

    def cancel(self, rid: int, now: float) -> list[ClientOut]:
        """Forget ``rid`` and tell the broker if it was sent; a reply that still comes is dropped."""
        pend = self.pending.pop(rid, None)
        if pend is None:
            return []
        self.counters["cancelled"] += 1
        if not pend.sent:
            # taken back at a failover, waiting for the WELCOME: a pair's new active broker may
            # hold a copy of it (its replicated table), which would run
            return [p.Cancel(rid)] if pend.again else []
        self.sent -= 1
        out: list[ClientOut] = [p.Cancel(rid)]
        if self.waiting:
            self._fill(now, out)
        return out

    def leave(self) -> list[ClientOut]:
        """The caller closes the client: cancel every request the broker holds for us, so that its
        workers stop them now, not once our silence has lasted the broker's ttl (which it logs as
        a client gone); forget the rest; and say BYE to a broker that registered us, so that it
        forgets us at once, not 10 of its ttls on (an older broker ignores a client's BYE)."""
        out: list[ClientOut] = [p.Cancel(rid) for rid, pend in self.pending.items() if pend.sent or pend.again]
        if self.registered:
            out.append(p.Bye("client closed"))
            self.registered = False
        self.pending.clear()
        self.waiting.clear()
        self.sent = 0
        return out

    def consumed(self, rid: int, n: int) -> list[ClientOut]:
        """The caller has taken ``n`` parts of stream ``rid``: acknowledge every half window."""
        pend = self.pending.get(rid)
        if pend is None or not pend.sent:
            return []
        window = pend.options[1]
        if n - pend.acked >= max(1, (window + 1) // 2):
            pend.acked = n
            return [p.Ack(rid, n)]
        return []

    def _interrupt(self, rid: int, pend: _Pending, why: str, out: list[ClientOut]) -> None:
        """End stream ``rid`` INTERRUPTED (and cancel it at the broker)."""
        del self.pending[rid]
        self.counters["interrupted"] += 1
        if pend.sent:
            self.sent -= 1
            out.append(p.Cancel(rid))
        out.append(Completed(rid, p.ST_INTERRUPTED, why, b""))

    def receive(self, msg: p.Message, now: float) -> list[ClientOut]:
        """Handle one message from the broker."""
        link = self.link
        link.last_heard = self.heard_at = now
        if type(msg) is p.REPLY_CLS:  # one per request: by a C static, before the match's lookups
            return self._on_reply(msg, now)
        match msg:
            case p.Part():
                pend = self.pending.get(msg.id)
                if pend is None or not pend.options[1]:
                    # A stream we no longer want (cancelled, interrupted, run again by a broker that
                    # took over): stop it, or its worker waits for our acknowledgements.
                    self.counters["duplicates"] += 1
                    return [p.Cancel(msg.id)] if pend is None else []
                if msg.seq != pend.parts:
                    out: list[ClientOut] = []
                    cut = f"part {msg.seq} arrived when part {pend.parts} was due: the stream's run was cut"
                    self._interrupt(msg.id, pend, cut, out)
                    return out
                pend.parts += 1
                return [PartIn(msg.id, msg.seq, msg.payload)]
            case p.Progress():
                return [Progressed(msg.id, msg.payload)] if msg.id in self.pending else []
            case p.Heartbeat():
                if (why := link.fenced(link.broker, link.peer, msg.epoch)) is not None:
                    self.counters["fenced"] += 1
                    return [Problem(why), *self._failover(now, why)]
                if link.restarted(msg.incarnation):
                    self.counters["broker_restarts"] += 1
                    link.incarnation = msg.incarnation
                    out = []
                    self._take_back(now, out)
                    self._fill(now, out)
                    return out
                if self.quota < self._quota_said:  # held back since a BUSY over the quota: go on
                    self.quota = self._quota_said
                    out = []
                    self._fill(now, out)
                    return out
                return []
            case p.Welcome():
                if (why := link.fenced(msg.broker, msg.peer, msg.epoch)) is not None:
                    self.counters["fenced"] += 1
                    return [Problem(why), *self._failover(now, why)]
                lost = not self.registered and msg.hello > 1  # the first HELLO and what went with it
                self.registered = True
                self.quota = self._quota_said = msg.quota or DEFAULT_QUOTA
                self.max_message = msg.max_message
                out = []
                if link.welcome(msg):
                    self.counters["broker_restarts"] += 1
                    self._take_back(now, out)
                elif lost:
                    self.counters["lost_hellos"] += 1
                    self._take_back(now, out)
                self._fill(now, out)  # within what this WELCOME says: its quota, its limit
                return out
            case p.Reconnect():
                out = [self._hello()]
                self._take_back(now, out)  # sent again at its WELCOME (a restart may change its limits)
                self._send_internal(now, out)
                return out
            case p.Bye():
                link.learn(msg.broker, msg.active)
                return self._failover(now, f"broker said bye: {msg.reason}", to=msg.active)
            case p.Error():
                return [Problem(f"broker refused a message: {msg.message}", "broker-input")]
        return [Problem(f"unexpected {type(msg).__name__} from broker ignored", "broker-input")]

    def _on_reply(self, msg: p.Reply, now: float) -> list[ClientOut]:
        """A REPLY ends its request (its Completed), unless a BUSY sends it again."""
        fields: tuple[Any, ...] = msg
        rid: p.Boxed = fields[0]  # the object read (p.Boxed: a NamedTuple's field is read as an int)
        pend = self.pending.pop(rid, None)
        if pend is None:
            self.counters["duplicates"] += 1
            return []
        out: list[ClientOut] = []
        if pend.sent:
            self.sent -= 1
        if msg.status == p.ST_BUSY and msg.payload == p.OVER_QUOTA and pend.sent:
            self._over_quota(rid, pend)
        elif msg.status == p.ST_BUSY and pend.busy is not None and self._send_again(rid, pend, now):
            pass
        elif pend.options[1] and msg.parts != pend.parts and msg.status in (p.ST_OK, p.ST_FAILED):
            gap = f"the stream ended after {msg.parts} parts but {pend.parts} arrived"
            self.counters["interrupted"] += 1
            out.append(Completed(rid, p.ST_INTERRUPTED, gap, b""))
        else:
            out.append(p.message(COMPLETED_CLS, (rid, msg.status, msg.message, msg.payload)))
        if self.waiting:
            self._fill(now, out)
        return out

    def probe_receive(self, msg: p.Message, now: float) -> list[ClientOut]:
        """What the broker at home answered on the probe connection."""
        go, out = self.homing.answer(self.link, msg, now)
        res: list[ClientOut] = [*out]
        if go is not None and self._moving is None:
            self._moving = go  # no more sends here; move once what is in flight has ended
            self._move_until = now + MOVE_WAIT_S
            res += self._try_move(now)
        return res

    def tick(self, now: float) -> list[ClientOut]:
        """Time out pending requests, heartbeat, fail over from a silent broker, look home."""
        out: list[ClientOut] = []
        dl = self._deadlines
        while True:
            rid: p.Boxed | None = dl.pop_due(now)
            if rid is None:
                break
            pend = self.pending.get(rid)
            if pend is not None and pend.deadline <= now:
                del self.pending[rid]
                if pend.sent:
                    self.sent -= 1
                    out.append(p.Cancel(rid))  # the broker (and its worker) can stop it too
                elif pend.again:
                    out.append(p.Cancel(rid))  # (a pair's new active broker may hold a copy)
                self.counters["timeouts"] += 1
                if self.heard_at < pend.submitted:
                    eps = ", ".join(self.link.endpoints)
                    why = (
                        f"no broker answered on any endpoint ({eps}) since the request was made: no broker "
                        "runs there, the address is wrong, the keys do not match (a plaintext client to "
                        "a CURVE broker, or a wrong server key), or the broker cannot accept more connections "
                        "(out of file descriptors: its log says so)"
                    )
                    out.append(Completed(rid, NO_BROKER, why, b""))
                    continue
                if pend.sent:
                    where = f"broker {self.link.broker or self.link.endpoint}"
                elif not self.registered:  # it waits for a WELCOME: its quota and limit (rule 3)
                    where = f"waiting here: the broker at {self.link.endpoint} has not welcomed this client"
                    where += " since it failed over" if self.counters["failovers"] else ""
                else:
                    where = "waiting here: the client had as many open as its broker allows"
                why = f"no reply for service {pend.service!r} before the deadline ({where})"
                out.append(Completed(rid, p.ST_TIMEOUT, why, b""))
        link = self.link
        if link.silent(now):
            out += self._failover(now, f"broker at {link.endpoint} silent for {now - link.last_heard:.2f}s")
        elif link.heartbeat_due(now):
            # Not welcomed yet (the HELLO was lost, say on a link cut then healed): say HELLO again,
            # or the client would heartbeat a broker that answers forever without learning its quota.
            out.append(
                self._hello() if not self.registered else p.Heartbeat(p.ROLE_CLIENT, link.incarnation or "", 0, ())
            )
        if self._moving is not None:
            out += self._try_move(now)
        else:
            out += self.homing.tick(link, self.registered, now)
        again = self._again
        while again and again[0][0] <= now:
            _, rid = heappop(again)
            pend = self.pending.get(rid)
            if pend is not None and not pend.sent:
                self.waiting.appendleft(rid)
        if self.waiting:
            self._fill(now, out)
        return out

    def _over_quota(self, rid: int, pend: _Pending) -> None:
        """The broker refused ``rid``, sent within our count of its quota: it counts more of ours
        than we do (a request we sent again crossed its reply; copies a pair's new active broker
        holds). Not the caller's failure: it goes again first, and nothing more is sent while as
        many are open as now (each reply frees room) until the broker's next heartbeat."""
        pend.sent = False
        self.pending[rid] = pend
        self.waiting.appendleft(rid)
        self.quota = self.sent
        self.counters["over_quota"] += 1

    def _send_again(self, rid: int, pend: _Pending, now: float) -> bool:
        """A full broker refused ``rid`` and its policy retries Busy: send it again after the
        backoff, if that leaves time before its deadline. False: it ends Busy."""
        assert pend.busy is not None
        attempts, backoff, cap = pend.busy
        if pend.busy_tries >= attempts:
            return False
        delay = min(cap, backoff * 2 ** min(pend.busy_tries - 1, 30)) * (0.5 + 0.5 * self._rng())
        if now + delay >= pend.deadline - pend.margin:
            return False
        pend.busy_tries += 1
        pend.sent = False
        self.pending[rid] = pend
        self.counters["busy_retries"] += 1
        heappush(self._again, (now + delay, rid))
        return True

    def resumed(self, seconds: float, now: float) -> None:
        """The client did not run for ``seconds`` (SIGSTOP, a stall): see ``BrokerLink.paused``."""
        self.link.paused(seconds, now)

    def next_deadline(self) -> float | None:
        """Return when ``tick`` has something to do next."""
        d = self.link.next_deadline()
        due = self._deadlines.first()
        if due is not None:
            d = min(d, due)
        h = self.homing.next_deadline(self.link) if self._moving is None else self._move_until
        if h is not None:
            d = min(d, h)
        if self._again:
            d = min(d, self._again[0][0])
        return d

    # --- internals --------------------------------------------------------------------------------

    def _hello(self, first: bool = False) -> p.Hello:
        """Our HELLO, numbered on its connection (``first``: a new connection's)."""
        self._hellos = 1 if first else self._hellos + 1
        hb_ms = round(self.link.hb_s * 1000)
        return p.Hello(p.ROLE_CLIENT, self.name, (), 0, hb_ms, self.link.top_epoch, self.batch, self._hellos)

    def _request(self, rid: p.Boxed, pend: _Pending, now: float, margin: float) -> p.Request:
        budget_ms = min(p.MAX_BUDGET_MS, p.budget_ms_left(pend.deadline - margin, now, floor=0))
        key, window, retry = pend.options
        fields = (rid, pend.service, budget_ms, (), pend.payload, pend.trace, key, window, retry)
        return p.message(p.REQUEST_CLS, fields)

    def _send(self, rid: p.Boxed, pend: _Pending, now: float) -> p.Request:
        pend.sent = True
        self.sent += 1
        if pend.again:  # taken back from a broker that lost it: the budget it has left
            pend.again = False
            self.counters["resent"] += 1
            return self._request(rid, pend, now, 0.0)
        self.counters["sent"] += 1
        return self._request(rid, pend, now, pend.margin)

    def _fill(self, now: float, out: list[ClientOut]) -> None:
        """Send what waits, in order, while the broker allows more (not while moving home); what
        is over this broker's limit (a smaller one than when it was made) ends INVALID."""
        waiting, pending = self.waiting, self.pending
        while waiting and self.sent < self.quota and self._moving is None and self.registered:
            rid = waiting.popleft()
            pend = pending.get(rid)
            # one whose budget is spent by the time it could go times out here, unsent (rule 2)
            if pend is not None and not pend.sent and p.budget_ms_left(pend.deadline - pend.margin, now, floor=0) > 0:
                if self.max_message and len(pend.payload) > self.max_message:
                    del pending[rid]
                    out.append(self._too_large(rid, pend, "not sent" if not pend.again else "not sent again there"))
                    continue
                out.append(self._send(rid, pend, now))

    def _too_large(self, rid: int, pend: _Pending, what: str) -> Completed:
        """The end of a request over the limit of the broker it was to go to."""
        self.counters["too_large"] += 1
        size, limit, broker = len(pend.payload), self.max_message, self.link.broker
        why = f"payload of {size} bytes is larger than broker {broker}'s limit of {limit} bytes: {what}"
        return Completed(rid, p.ST_INVALID, why, b"")

    def _take_back(self, now: float, out: list[ClientOut]) -> None:
        """What the broker had (a new run, another broker, a lost HELLO) goes again, in order and
        ahead of what waits, once a WELCOME says the broker's quota and message limit (a broker
        failed over to may take fewer, or smaller: sent blind, the rest were refused Busy, and one
        over twice its limit dropped by libzmq with the connection). A stream of which parts
        arrived cannot start over without repeating them: it ends INTERRUPTED."""
        again: list[int] = []
        for rid, pend in list(self.pending.items()):
            if not pend.sent or pend.deadline <= now:
                continue
            if pend.parts:
                # (its CANCEL goes to the broker we talk to now: a pair's new active one has a copy)
                self._interrupt(rid, pend, f"its broker was lost after {pend.parts} parts of the stream", out)
                continue
            pend.sent = False
            pend.again = True
            self.sent -= 1
            again.append(rid)
        self.waiting.extendleft(reversed(again))

    def _send_internal(self, now: float, out: list[ClientOut]) -> None:
        """Send what waits for a broker's internal services at once: any broker answers them, a
        passive one too (which sends no WELCOME)."""
        pending = self.pending
        internal = [(r, x) for r in self.waiting if (x := pending.get(r)) and x.service.startswith(p.INTERNAL_PREFIXES)]
        for rid, pend in internal:
            self.waiting.remove(rid)
            out.append(self._send(rid, pend, now))

    def _failover(self, now: float, reason: str, to: str = "") -> list[ClientOut]:
        """Connect elsewhere (to broker ``to`` if a BYE named it), say HELLO, resend what was sent."""
        self.counters["failovers"] += 1
        self.registered = False
        self._moving = None
        connect = self.link.connect_named(to, now, reason)
        out: list[ClientOut] = [connect, *self.homing.cancel(), self._hello(first=True)]
        self._take_back(now, out)  # sent again at its WELCOME, within its quota and limit
        self._send_internal(now, out)
        return out

    def _try_move(self, now: float) -> list[ClientOut]:
        """Moving home: go once nothing is in flight; give up for now after ``MOVE_WAIT_S``."""
        j = self._moving
        assert j is not None
        if self.sent == 0:
            self._moving = None
            self.registered = False
            self.counters["homecomings"] += 1
            connect = self.link.connect_to(j, now, "going back to the first choice: it is active again")
            return [connect, self._hello(first=True)]
        if now >= self._move_until:
            self._moving = None  # too busy to find a quiet moment: stay, look again later
            out: list[ClientOut] = []
            self._fill(now, out)
            return out
        return []
