"""A proxy's link to its upstream broker: sessions, registration with jittered backoff. Sans-IO.

Rules of this module:
1. A *session* is one registration with one upstream broker run. Work the upstream handed down in a
   session is answered in that session only; when the session ends (silence, BYE, RECONNECT, a new
   upstream run) the upstream has requeued it, so later answers are void.
2. After a session ends the proxy waits a random pause before it registers again ("full jitter":
   uniform in [0, min(backoff_max, backoff * 2**(failures-1))]), so that a recovering master is not
   flooded by every proxy at the same instant. The pause resets once a registration succeeds.
3. Credit both ways. The upstream advertises to each proxy what it offers it: its spare capacity
   outside that proxy's own subtree (split horizon, so no capacity is counted twice) plus the
   proxy's requests it holds. The proxy's credit is that offer less its requests in flight there,
   so every answer frees credit at once; it forwards a request only within credit, unless nothing
   below the proxy serves the service at all.
4. The link only keeps state and decides *when*; :class:`~zmqdist.core.broker.BrokerCore` decides
   what to send.
"""

from __future__ import annotations

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
        "last_spare",
        "link",
        "losses",
        "move",
        "name",
        "out_n",
        "reason",
        "registered",
        "rng",
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
        self.advert_at = -1.0  # when the last advert went out
        self.last_spare: tuple[tuple[str, int], ...] | None = None
        # Credit from the upstream: its offer, and our requests in flight there, per service.
        self.spare: dict[str, int] = {}
        self.out_n: dict[str, int] = {}
        self.adverts = 0  # adverts received (a request the upstream returned waits for a newer one)

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
