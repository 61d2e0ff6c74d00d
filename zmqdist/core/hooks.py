"""The hooks dispatch calls out to, and their neutral bases. Sans-IO.

Dispatch knows no upstream and no request lifecycle: when no member can take a queued request it
asks its :class:`Overflow` (a proxy's upstream, in :mod:`zmqdist.core.tiers`), and it tells its
:class:`Watcher` (:mod:`zmqdist.core.lifecycle`) of the requests with a lifecycle. These bases are
what a broker alone has: nowhere else to send work, no joins, no retries.
"""

from __future__ import annotations

from typing import Final

from zmqdist import protocol as p
from zmqdist.core.records import Dest, Member, Out, Pool, Req

WAIT: Final = 0  # Overflow.place's verdicts. WAIT: nothing can take it; stop this pool until capacity changes
SKIP: Final = 1  # this one may not go anywhere else (yet); requests behind it may
KEEP: Final = 2  # this one is served sooner here; the last in the queue may be worth sending on
# Any other value is the hook's own: dispatch takes the request out of the queue and calls take().
EWMA: Final = 0.2  # weight of the newest sample in the recent service times (latency-aware overflow)


class Overflow:
    """Where requests go that no member of this broker can take (a broker alone: nowhere)."""

    def active(self) -> bool:
        """Is there anywhere else to send work at all? (A queue with no member is pumped then.)"""
        return False

    def place(self, req: Req, pool: Pool, now: float, ahead: int) -> int:
        """WAIT, SKIP, KEEP, or a verdict of its own for :meth:`take`; ``ahead``: queued before ``req``."""
        return WAIT

    def take(self, req: Req, verdict: int, now: float, out: list[Out]) -> None:
        """Carry out ``verdict`` for ``req``, which has left the queue."""

    def reply(self, req: Req, reply: p.Reply, out: list[Out]) -> None:
        """Deliver the reply of a request that came from somewhere other than a peer."""

    def relay(self, req: Req, msg: p.Part | p.Progress, out: list[Out]) -> None:
        """Deliver a part or progress report of such a request."""

    def send_on(self, req: Req, msg: p.Cancel | p.Ack, out: list[Out]) -> None:
        """Tell the broker ``req`` was sent on to (FORWARDED) that it is cancelled, or acknowledged."""

    def recall(self, req: Req) -> None:
        """A request sent elsewhere (FORWARDED) is no longer there: answered, or given up."""

    def forgotten(self, req: Req) -> None:
        """A request that came from somewhere other than a peer left the table."""

    def unserved(self) -> str:
        """Words to add when a request expired because no member serves its service."""
        return ""

    def waits_here(self, req: Req) -> bool:
        """Would ``req`` wait here for a slot (not go back)? Only then is a downstream broker weighed."""
        return True


def away(pool: Pool, took: float) -> None:
    """Fold ``took`` (a request's time at another broker, less the round trip) into the pool's time away."""
    took = max(took, 0.0)
    pool.away = took if pool.away < 0.0 else pool.away + EWMA * (took - pool.away)


class Watcher:
    """Told of requests with a lifecycle (rule 8); this base has none: no joins, no retries."""

    def opened(self, req: Req) -> None:
        """``req`` entered the table with a caller key, a stream window or a retry policy."""

    def closed(self, req: Req) -> None:
        """``req`` (a stream, or one with a caller key) left the table."""

    def join(self, peer: Dest, rid: int, service: str, key: str) -> bool:
        """Let request ``rid`` of ``peer`` join the open run of ``service`` with caller ``key`` (False: none)."""
        return False

    def run_again(self, req: Req, w: Member | None, delay_ms: int, now: float, out: list[Out]) -> bool:
        """``req``'s run on ``w`` failed with what its policy retries after ``delay_ms``: False if it runs no more."""
        return False

    def member_lost(self, w: Member, now: float, out: list[Out]) -> None:
        """Downstream broker ``w`` left: what it asked for has nowhere to go."""
