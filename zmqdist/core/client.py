"""The client machine: pending requests, deadlines, resend after broker restart or failover. Sans-IO.

Rules of this module:
1. Every submitted request ends in exactly one :class:`Completed`: a reply, or a local timeout at its
   deadline. A second reply for the same request id is dropped (counted), never reported.
2. Requests keep their id for life. When the broker is found to be a new run (incarnation changed) or
   the client fails over to another endpoint, every pending request is sent again with the same id
   and the time budget it has left; brokers absorb the copies of one still in progress.
3. The budget sent is a little shorter than the local deadline so that the broker's TIMEOUT, which
   says why (no worker registered, or all busy), normally arrives before the local one.
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import NamedTuple

from zmqdist import protocol as p
from zmqdist.config import HeartbeatSettings
from zmqdist.core.link import BrokerLink, Connect, Problem


class Completed(NamedTuple):
    """Event: request ``rid`` ended with ``status`` (a ``protocol.ST_*`` code)."""

    rid: int
    status: int
    message: str
    payload: bytes


ClientOut = p.Message | Completed | Connect | Problem


class _Pending:
    __slots__ = ("deadline", "payload", "service", "trace")

    def __init__(self, service: str, payload: bytes, deadline: float, trace: str = "") -> None:
        self.service = service
        self.payload = payload
        self.deadline = deadline
        self.trace = trace


def budget_margin(timeout_s: float) -> float:
    """Seconds by which the budget sent undercuts the local deadline."""
    return min(0.05, timeout_s * 0.1)


class ClientCore:
    """Sans-IO client: feed it submissions, broker messages and time."""

    def __init__(self, endpoints: tuple[str, ...], name: str, hb: HeartbeatSettings, now: float) -> None:
        self.name = name
        self.link = BrokerLink(endpoints, hb, now)
        self.pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int]] = []
        self.counters = {
            "sent": 0,
            "resent": 0,
            "duplicates": 0,
            "timeouts": 0,
            "failovers": 0,
            "broker_restarts": 0,
            "fenced": 0,
        }

    def start(self, now: float) -> list[ClientOut]:
        """Connect to the first endpoint and say HELLO."""
        return [self.link.connect_next(now, "start"), self._hello()]

    def submit(
        self, rid: int, service: str, payload: bytes, timeout_s: float, now: float, trace: str = ""
    ) -> list[ClientOut]:
        """Start request ``rid``; return the REQUEST to send (or its immediate completion)."""
        if rid in self.pending:
            return [Completed(rid, p.ST_INVALID, f"request id {rid} is already pending", b"")]
        deadline = now + timeout_s
        if timeout_s <= 0:
            return [Completed(rid, p.ST_TIMEOUT, "timeout must be positive", b"")]
        self.pending[rid] = _Pending(service, payload, deadline, trace)
        heappush(self._deadlines, (deadline, rid))
        if len(self._deadlines) > 2 * len(self.pending) + 1024:
            self._deadlines = [(d, r) for d, r in self._deadlines if r in self.pending]
            self._deadlines.sort()
        self.counters["sent"] += 1
        return [self._request(rid, self.pending[rid], now, margin=budget_margin(timeout_s))]

    def cancel(self, rid: int) -> None:
        """Forget ``rid``; a reply that still comes is dropped."""
        self.pending.pop(rid, None)

    def receive(self, msg: p.Message, now: float) -> list[ClientOut]:
        """Handle one message from the broker."""
        link = self.link
        link.last_heard = now
        match msg:
            case p.Reply():
                pend = self.pending.pop(msg.rid, None)
                if pend is None:
                    self.counters["duplicates"] += 1
                    return []
                return [Completed(msg.rid, msg.status, msg.message, msg.payload)]
            case p.Heartbeat():
                if (why := link.fenced(link.broker, link.peer, msg.epoch)) is not None:
                    self.counters["fenced"] += 1
                    return [Problem(why), *self._failover(now, why)]
                if link.restarted(msg.incarnation):
                    self.counters["broker_restarts"] += 1
                    link.incarnation = msg.incarnation
                    return self._resend_all(now)
                return []
            case p.Welcome():
                if (why := link.fenced(msg.broker, msg.peer, msg.epoch)) is not None:
                    self.counters["fenced"] += 1
                    return [Problem(why), *self._failover(now, why)]
                if link.welcome(msg):
                    self.counters["broker_restarts"] += 1
                    return self._resend_all(now)
                return []
            case p.Reconnect():
                return [self._hello(), *self._resend_all(now)]
            case p.Bye():
                link.learn(msg.broker, msg.active)
                return self._failover(now, f"broker said bye: {msg.reason}", to=msg.active)
            case p.Error():
                return [Problem(f"broker refused a message: {msg.message}")]
        return [Problem(f"unexpected {type(msg).__name__} from broker ignored")]

    def tick(self, now: float) -> list[ClientOut]:
        """Time out pending requests, heartbeat, fail over from a silent broker."""
        out: list[ClientOut] = []
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, rid = heappop(dl)
            pend = self.pending.get(rid)
            if pend is not None and pend.deadline <= now:
                del self.pending[rid]
                self.counters["timeouts"] += 1
                out.append(
                    Completed(
                        rid,
                        p.ST_TIMEOUT,
                        f"no reply for service {pend.service!r} before the deadline "
                        f"(broker {self.link.broker or self.link.endpoint})",
                        b"",
                    )
                )
        link = self.link
        if link.silent(now):
            out += self._failover(now, f"broker at {link.endpoint} silent for {now - link.last_heard:.2f}s")
        elif link.heartbeat_due(now):
            out.append(p.Heartbeat(p.ROLE_CLIENT, link.incarnation or "", 0, ()))
        return out

    def resumed(self, seconds: float, now: float) -> None:
        """The client did not run for ``seconds`` (SIGSTOP, a stall): see ``BrokerLink.paused``."""
        self.link.paused(seconds, now)

    def next_deadline(self) -> float | None:
        """Return when ``tick`` has something to do next."""
        d = self.link.next_deadline()
        if self._deadlines:
            d = min(d, self._deadlines[0][0])
        return d

    def _hello(self) -> p.Hello:
        return p.Hello(p.ROLE_CLIENT, self.name, (), 0, round(self.link.hb_s * 1000), self.link.top_epoch)

    def _request(self, rid: int, pend: _Pending, now: float, margin: float) -> p.Request:
        budget_ms = p.budget_ms_left(pend.deadline - margin, now, floor=0)
        return p.Request(rid, pend.service, budget_ms, (), pend.payload, pend.trace)

    def _resend_all(self, now: float) -> list[ClientOut]:
        self.counters["resent"] += len(self.pending)
        return [self._request(rid, pend, now, 0.0) for rid, pend in self.pending.items() if pend.deadline > now]

    def _failover(self, now: float, reason: str, to: str = "") -> list[ClientOut]:
        """Connect elsewhere (to broker ``to`` if a BYE named it), say HELLO, resend what is pending."""
        self.counters["failovers"] += 1
        return [self.link.connect_named(to, now, reason), self._hello(), *self._resend_all(now)]
