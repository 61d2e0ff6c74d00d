"""The request context a handler can read: ``zmqdist.current_request()``."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from zmqdist.clock import Clock, MonotonicClock


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a handler may know about the request it serves.

    ``key`` is the idempotency key: the same for every attempt and every resend of one client
    request, different for every other request. ``deadline`` is in seconds of ``clock``, the
    worker's clock (``time.monotonic()`` unless the worker was given another).
    """

    key: str
    service: str
    attempt: int
    deadline: float
    trace: str = ""  # the client's trace id (in the logs of every broker and worker it passed)
    clock: Clock = field(default_factory=MonotonicClock, compare=False, repr=False)

    def remaining(self) -> float:
        """Seconds left before the client stops waiting (on the clock the deadline was made with)."""
        return self.deadline - self.clock.now()


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("zmqdist_request", default=None)


def current_request() -> RequestContext:
    """Return the context of the request being handled. Raises LookupError outside a handler."""
    ctx = _current.get()
    if ctx is None:
        raise LookupError("current_request() called outside a zmqdist handler")
    return ctx


def set_current(ctx: RequestContext | None) -> contextvars.Token[RequestContext | None]:
    """Set the context for the running handler (used by the worker runtime)."""
    return _current.set(ctx)


def reset_current(token: contextvars.Token[RequestContext | None]) -> None:
    """Restore the context that ``token`` replaced."""
    _current.reset(token)
