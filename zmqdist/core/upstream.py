"""A proxy's link to its upstream broker: sessions, registration with jittered backoff. Sans-IO.

Rules of this module:
1. A *session* is one registration with one upstream broker run. Work the upstream handed down in a
   session is answered in that session only; when the session ends (silence, BYE, RECONNECT, a new
   upstream run) the upstream has requeued it, so later answers are void.
2. After a session ends the proxy waits a random pause before it registers again ("full jitter":
   uniform in [0, min(backoff_max, backoff * 2**(failures-1))]), so that a recovering master is not
   flooded by every proxy at the same instant. The pause resets once a registration succeeds.
3. Credit both ways. The upstream advertises to each proxy what it can take from it (its spare
   capacity outside that proxy's own subtree: split horizon, so no capacity is counted twice);
   the proxy forwards a request upstream only within that credit, less the requests it sent after
   the ones the advert had counted (ADVERT ``seq`` = requests received from the proxy this
   session), unless nothing below the proxy serves the service at all.
4. The link only keeps state and decides *when*; :class:`~zmqdist.core.broker.BrokerCore` decides
   what to send.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from zmqdist.config import BrokerSettings
from zmqdist.core.link import BrokerLink


def half() -> float:
    """The default 'random' source: deterministic middle of the jitter window."""
    return 0.5


class Upstream:
    """State of the link from a proxy to its upstream broker (see the module rules)."""

    __slots__ = (
        "advert_at",
        "adverts",
        "failures",
        "last_seq",
        "last_spare",
        "link",
        "losses",
        "move",
        "name",
        "reason",
        "registered",
        "rng",
        "sent",
        "seq_seen",
        "session",
        "settings",
        "spare",
        "unseen",
        "unseen_n",
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
        self.advert_at = -1.0  # when the last advert went out
        self.last_spare: tuple[tuple[str, int], ...] | None = None
        self.last_seq = -1
        # Credit from the upstream: its advert, and the requests sent since (index, service).
        self.spare: dict[str, int] = {}
        self.adverts = 0  # adverts received (a request the upstream returned waits for a newer one)
        self.sent = 0
        self.unseen: deque[tuple[int, str]] = deque()
        self.unseen_n: dict[str, int] = {}

    def credit(self, service: str) -> int:
        """Requests of ``service`` the upstream can take from us now."""
        return self.spare.get(service, 0) - self.unseen_n.get(service, 0)

    def forwarded(self, service: str) -> None:
        """Count a request sent upstream against the credit."""
        self.sent += 1
        self.unseen.append((self.sent, service))
        self.unseen_n[service] = self.unseen_n.get(service, 0) + 1

    def advert(self, seq: int, spare: tuple[tuple[str, int], ...]) -> None:
        """The upstream's advert: ``spare`` as of our first ``seq`` requests."""
        unseen = self.unseen
        counts = self.unseen_n
        while unseen and unseen[0][0] <= seq:
            counts[unseen.popleft()[1]] -= 1
        self.spare = dict(spare)
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
        self.sent = 0
        self.unseen.clear()
        self.unseen_n.clear()
        s = self.settings
        window = min(s.backoff_max_s, s.backoff_s * 2 ** min(self.failures - 1, 30))
        self.wait_until = now + window * self.rng()
        self.move = move
        self.reason = reason

    def welcomed(self, broker: str) -> None:
        """Registration accepted: the pause resets."""
        self.registered = True
        self.failures = 0
        self.name = broker

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
        if self.registered:
            gap = self.settings.advert_interval_s if dirty else self.link.hb_s
            d = min(d, self.advert_at + gap)
        return d
