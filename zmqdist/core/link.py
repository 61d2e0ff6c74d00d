"""A peer's link to its broker: endpoint failover order, heartbeats, broker liveness. Sans-IO.

Rules: the link only decides *when* (heartbeat due, broker silent past ttl, which endpoint next);
the worker and client machines decide *what* to send. A broker is alive while
``now - last_heard <= ttl``; the first silence past that moves to the next endpoint in the list
(wrapping around), and the new connection gets a full ttl before it is judged.
"""

from __future__ import annotations

from typing import NamedTuple

from zmqdist import protocol as p
from zmqdist.config import HeartbeatSettings

EPSILON = 1e-6


class Connect(NamedTuple):
    """Action: (re)create the socket to the broker and connect it to ``endpoint``."""

    endpoint: str
    reason: str


class Stopped(NamedTuple):
    """Action: the machine is finished; the runtime should close its socket and exit."""

    reason: str


class Problem(NamedTuple):
    """Event: the broker refused something; the runtime should log ``message``."""

    message: str


class BrokerLink:
    """Heartbeat and failover bookkeeping shared by the worker and client machines."""

    __slots__ = ("broker", "connects", "endpoints", "hb_s", "incarnation", "index", "last_heard", "next_hb", "ttl_s")

    def __init__(self, endpoints: tuple[str, ...], hb: HeartbeatSettings, now: float) -> None:
        self.endpoints = endpoints
        self.index = -1
        self.hb_s = hb.heartbeat_s
        self.ttl_s = hb.ttl_s
        self.last_heard = now
        self.next_hb = now + self.hb_s
        self.incarnation: str | None = None
        self.broker = ""
        self.connects = 0

    @property
    def endpoint(self) -> str:
        """The endpoint currently used."""
        return self.endpoints[self.index]

    def connect_next(self, now: float, reason: str) -> Connect:
        """Move to the next endpoint (the first one at start) and forget the broker's identity."""
        self.index = (self.index + 1) % len(self.endpoints)
        self.last_heard = now
        self.next_hb = now + self.hb_s
        self.incarnation = None
        self.connects += 1
        return Connect(self.endpoints[self.index], reason)

    def welcome(self, m: p.Welcome) -> bool:
        """Adopt the broker's heartbeat settings; return True if this is a different broker run."""
        self.hb_s = m.heartbeat_ms / 1000.0
        self.ttl_s = self.hb_s * m.liveness
        changed = self.incarnation is not None and self.incarnation != m.incarnation
        self.incarnation = m.incarnation
        self.broker = m.broker
        return changed

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

    def next_deadline(self) -> float:
        """The earliest time at which a heartbeat or the silence check is due."""
        return min(self.next_hb, self.last_heard + self.ttl_s + EPSILON)
