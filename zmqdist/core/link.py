"""A peer's link to its broker: endpoint failover order, heartbeats, broker liveness. Sans-IO.

Rules: the link only decides *when* (heartbeat due, broker silent past ttl, which endpoint next);
the worker and client machines decide *what* to send. A broker is alive while
``now - last_heard <= ttl``, counting only time the link itself was running: after a pause of its
own (SIGSTOP, a stall the poll loop saw) the broker's silence proves nothing, so :meth:`paused`
moves the silence clock on by the pause and the link heartbeats at once.

Pairs. WELCOME names the broker and the other broker of its pair; a BYE from a broker of a pair
names the sender and the broker to go to. The link remembers at which endpoint each broker answered.
Moving on from a broker, it tries the other broker of that one's pair first (wherever it sits in the
list), then the next endpoint of the list not tried since the last WELCOME (wrapping, and starting
over when every one was tried); a BYE that names a broker whose endpoint is known goes there.

Fencing: brokers of a backup pair announce an epoch (WELCOME, HEARTBEAT). The link remembers the
highest epoch seen per broker name, and for the other broker of its pair too, and refuses a
broker whose epoch is lower (a primary that came back after its backup took over).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple

from zmqdist import protocol as p
from zmqdist.config import HeartbeatSettings

EPSILON: Final = 1e-6


PAUSES_KEPT: Final = 32  # a live peer is heard between any two of them: only older ones are dropped


class Pauses:
    """The spells a broker did not run (SIGSTOP, a stalled host, a starved thread), newest last.

    A peer's silence in them proves nothing: the peer may have stopped with us (a stalled host),
    and what it sent meanwhile is read only after. So a peer's silence counts the time since it was
    last heard less the pauses since (:meth:`since`), as :meth:`BrokerLink.paused` does for a
    link. It once counted from the last resume instead; a broker paused more often than once a ttl
    then never found a dead peer gone (a dead worker kept its tasks, a dead active broker was never
    taken over). Moved on by the pauses, a dead peer is gone after a ttl of time the broker ran.
    """

    __slots__ = ("spells",)

    def __init__(self) -> None:
        self.spells: list[tuple[float, float]] = []  # (end, seconds), disjoint, in order

    def note(self, seconds: float, now: float) -> None:
        """We did not run for ``seconds`` until ``now`` (clipped to the last spell's end)."""
        spells = self.spells
        if spells:
            seconds = min(seconds, now - spells[-1][0])
        if seconds <= 0.0:
            return
        spells.append((now, seconds))
        if len(spells) > PAUSES_KEPT:
            del spells[0]

    def since(self, seen: float) -> float:
        """When the silence of a peer last heard at ``seen`` counts from: ``seen`` moved on by our
        pauses since (a spell ``seen`` falls in counts only its part after ``seen``)."""
        spells = self.spells
        if not spells or spells[-1][0] <= seen:
            return seen
        moved = 0.0
        for i in range(len(spells) - 1, -1, -1):
            end, seconds = spells[i]
            if end <= seen:
                break
            moved += min(seconds, end - seen)
        return seen + moved


class Connect(NamedTuple):
    """Action: (re)create the socket to the broker and connect it to ``endpoint``."""

    endpoint: str
    reason: str


class Stopped(NamedTuple):
    """Action: the machine is finished; the runtime should close its socket and exit."""

    reason: str


class Problem(NamedTuple):
    """Event: something for the runtime to log. ``key`` groups messages a peer can trigger at will,
    so that the runtime rate-limits them ("" for rare events, always logged)."""

    message: str
    key: str = ""


class BrokerLink:
    """Heartbeat and failover bookkeeping shared by the worker and client machines."""

    __slots__ = (
        "broker",
        "connects",
        "endpoints",
        "epochs",
        "hb_s",
        "incarnation",
        "index",
        "last_heard",
        "names",
        "next_hb",
        "pairs",
        "peer",
        "tried",
        "ttl_s",
    )

    def __init__(self, endpoints: tuple[str, ...], hb: HeartbeatSettings, now: float) -> None:
        self.endpoints = endpoints
        self.index = -1
        self.hb_s = hb.heartbeat_s
        self.ttl_s = hb.ttl_s
        self.last_heard = now
        self.next_hb = now + self.hb_s
        self.incarnation: str | None = None
        self.broker = ""
        self.peer = ""  # the other broker of the current broker's pair ("" if it has none)
        self.connects = 0
        self.epochs: dict[str, int] = {}  # highest epoch seen per broker name
        self.names: dict[str, int] = {}  # broker name -> the endpoint (index) where it answered
        self.pairs: dict[str, str] = {}  # broker name -> the other broker of its pair
        self.tried: set[int] = set()  # endpoints moved away from since the last WELCOME

    @property
    def endpoint(self) -> str:
        """The endpoint currently used."""
        return self.endpoints[self.index]

    def connect_next(self, now: float, reason: str) -> Connect:
        """Move on from the current endpoint (to the first one at start): see the module rules."""
        return self._move(self._next_index(), now, reason)

    def connect_named(self, name: str, now: float, reason: str) -> Connect:
        """Go to broker ``name`` (a BYE named it) if its endpoint is known, else move on."""
        j = self.names.get(name) if name else None
        if j is None or j == self.index:
            return self.connect_next(now, reason)
        self.tried.add(self.index)
        return self._move(j, now, reason)

    def connect_to(self, index: int, now: float, reason: str) -> Connect:
        """Go to endpoint ``index`` (home, after a look there found it healthy and active)."""
        self.tried.clear()
        return self._move(index, now, reason)

    def _next_index(self) -> int:
        cur = self.index
        if cur < 0:
            return 0
        self.tried.add(cur)
        other = self.pairs.get(self.name_at(cur), "")
        j = self.names.get(other) if other else None
        if j is not None and j not in self.tried:
            return j  # the other broker of the current one's pair first
        n = len(self.endpoints)
        for k in range(1, n + 1):
            if (cur + k) % n not in self.tried:
                return (cur + k) % n
        self.tried.clear()  # every endpoint was tried since the last WELCOME: round again
        return (cur + 1) % n

    def _move(self, index: int, now: float, reason: str) -> Connect:
        self.index = index
        self.last_heard = now
        self.next_hb = now + self.hb_s
        self.incarnation = None
        self.connects += 1
        return Connect(self.endpoints[index], reason)

    def name_at(self, index: int) -> str:
        """The name of the broker last seen at endpoint ``index`` ("" if none answered there)."""
        for name, i in self.names.items():
            if i == index:
                return name
        return ""

    def learn(self, broker: str, peer: str) -> None:
        """``broker`` answered at the current endpoint; ``peer`` is the other broker of its pair."""
        if broker and self.index >= 0:
            for name in [n for n, i in self.names.items() if i == self.index and n != broker]:
                del self.names[name]  # another broker runs there now
            self.names[broker] = self.index
            if peer:
                self.pairs[broker] = peer
                self.pairs[peer] = broker

    def welcome(self, m: p.Welcome) -> bool:
        """Adopt the broker's heartbeat settings; return True if this is a different broker run.

        The next heartbeat moves up to the broker's interval: one scheduled by a longer interval of
        our own would leave us silent past the broker's ttl, and the broker would take us for dead.
        """
        hb_s = m.heartbeat_ms / 1000.0
        if hb_s < self.hb_s:
            self.next_hb -= self.hb_s - hb_s
        self.hb_s = hb_s
        self.ttl_s = self.hb_s * m.liveness
        changed = self.incarnation is not None and self.incarnation != m.incarnation
        self.incarnation = m.incarnation
        self.broker = m.broker
        self.peer = m.peer
        self.learn(m.broker, m.peer)
        self.tried.clear()
        return changed

    @property
    def top_epoch(self) -> int:
        """The highest epoch seen from any broker (HELLO carries it, so that a lone active broker
        whose epoch its peers have outgrown can move above it; see core.ha)."""
        return max(self.epochs.values(), default=0)

    def fenced(self, broker: str, peer: str, epoch: int) -> str | None:
        """Return why broker ``broker`` (of a pair with ``peer``) at ``epoch`` must be refused,
        or None (and remember the epoch). Epoch 0: not part of a pair, never refused."""
        if not epoch:
            return None
        known = max(self.epochs.get(broker, 0), self.epochs.get(peer, 0) if peer else 0)
        if epoch < known:
            return (
                f"broker {broker} announces epoch {epoch} but epoch {known} of its pair was seen: "
                "it was replaced by its backup; refused"
            )
        for name in (broker, peer):
            if name and self.epochs.get(name, 0) < epoch:
                self.epochs[name] = epoch
        return None

    def restarted(self, incarnation: str) -> bool:
        """Return True if a heartbeat shows the broker behind this endpoint is a new run."""
        return self.incarnation is not None and incarnation != self.incarnation

    def heartbeat_due(self, now: float) -> bool:
        """Return True (and schedule the next) when a heartbeat should be sent now."""
        if now >= self.next_hb:
            self.next_hb = now + self.hb_s
            return True
        return False

    def silent(self, now: float) -> bool:
        """Return True once the broker has been silent for longer than the ttl."""
        return now - self.last_heard > self.ttl_s

    def paused(self, seconds: float, now: float) -> None:
        """We did not run for ``seconds`` (until ``now``): that time does not count as the broker's
        silence (it sent nothing because we sent nothing). Heartbeat at once."""
        self.last_heard = min(now, self.last_heard + seconds)
        self.next_hb = now

    def next_deadline(self) -> float:
        """The earliest time at which a heartbeat or the silence check is due."""
        return min(self.next_hb, self.last_heard + self.ttl_s + EPSILON)


class Probe(NamedTuple):
    """Action: on a separate connection to ``endpoint``, send ``message`` and report what comes back
    (``probe_receive``) until the machine says :class:`EndProbe`."""

    endpoint: str
    message: p.Message


class EndProbe(NamedTuple):
    """Action: close the probe connection."""


PROBE_FIRST_S: Final = 1.0  # the first look home after leaving it (jittered, and at least 4 heartbeats)
PROBE_MAX_S: Final = 30.0  # looks home back off to this after failures


class Homing:
    """Going back to the first choice. A peer's *home* is the first endpoint of its list and the
    other broker of the pair there (once WELCOME named it). Away from home, it looks home now and
    then (jittered, backing off to ``PROBE_MAX_S``): a client HEARTBEAT on a separate connection,
    which an active broker answers and a passive one does not (it redirects, or counts a vote).
    An answer from an active broker whose epoch is not stale means home is healthy: the machine
    then moves there at a quiet moment (nothing in flight), so nothing runs twice."""

    __slots__ = ("backoff_s", "due", "probing", "rng", "sent_at")

    def __init__(self, rng: Callable[[], float]) -> None:
        self.rng = rng
        self.backoff_s = 0.0
        self.due: float | None = None  # when to look home next (None: at home)
        self.probing: int | None = None  # the endpoint being looked at
        self.sent_at = 0.0

    def home(self, link: BrokerLink) -> list[int]:
        """The endpoints of home: the first one, and the other broker of its pair if known."""
        out = [0]
        other = link.pairs.get(link.name_at(0), "")
        j = link.names.get(other) if other else None
        if j is not None and j != 0:
            out.append(j)
        return out

    def tick(self, link: BrokerLink, registered: bool, now: float) -> list[Probe | EndProbe]:
        """A probe to send, or the end of one that got no answer within the ttl."""
        # (index 0 is always home: the common case asks nothing more, at every tick of every peer)
        if not registered or link.index <= 0 or link.index in self.home(link):
            self.due = None
            self.backoff_s = 0.0
            return [EndProbe()] if self._stop() else []
        if self.probing is not None:
            if now - self.sent_at > link.ttl_s:  # no answer: not there, or passive and we voted
                self._stop()
                self._failed(link, now)
                return [EndProbe()]
            return []
        if self.due is None:
            self._failed(link, now, first=True)
            return []
        if now < self.due:
            return []
        homes = self.home(link)
        self.probing = homes[int(self.rng() * len(homes)) % len(homes)]
        self.sent_at = now
        return [Probe(link.endpoints[self.probing], p.Heartbeat(p.ROLE_CLIENT, "", 0, ()))]

    def answer(self, link: BrokerLink, msg: p.Message, now: float) -> tuple[int | None, list[EndProbe]]:
        """What the probed broker said: (the endpoint to move to, if home is healthy and active, and
        the end of the probe)."""
        if self.probing is None:
            return None, []
        j = self.probing
        self._stop()
        if type(msg) is p.Heartbeat and msg.role == p.ROLE_BROKER:
            homes = [link.name_at(i) for i in self.home(link)]
            known = max([link.epochs.get(n, 0) for n in homes if n], default=0)
            if msg.epoch >= known or not msg.epoch:
                return j, [EndProbe()]
        elif type(msg) is p.Bye and msg.broker:
            link.names[msg.broker] = j  # the passive one of home's pair: look at the other next
            if msg.active:
                link.pairs[msg.broker] = msg.active
                link.pairs[msg.active] = msg.broker
        self._failed(link, now)
        return None, [EndProbe()]

    def cancel(self) -> list[EndProbe]:
        """Stop a look home in progress (the peer is moving anyway)."""
        return [EndProbe()] if self._stop() else []

    def next_deadline(self, link: BrokerLink) -> float | None:
        if self.probing is not None:
            return self.sent_at + link.ttl_s + EPSILON
        return self.due

    def _stop(self) -> bool:
        was = self.probing is not None
        self.probing = None
        return was

    def _failed(self, link: BrokerLink, now: float, first: bool = False) -> None:
        base = max(PROBE_FIRST_S, 4 * link.hb_s)
        self.backoff_s = base if first else min(PROBE_MAX_S, max(base, self.backoff_s * 2))
        self.due = now + self.backoff_s * (0.5 + self.rng())
