"""The request context a handler can read: ``zmqdist.current_request()``."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from zmqdist.clock import Clock, MonotonicClock


class Flag(Protocol):
    """What tells a running handler it should stop (set by the worker's runtime)."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a handler may know about the request it serves.

    ``key`` is the idempotency key: the same for every attempt and every resend of one request,
    different for every other request unless the caller chose it (``call(..., key=...)``).
    ``attempt`` counts the runs of the request (1 for the first). ``deadline`` is in seconds of
    ``clock``, the worker's clock (``time.monotonic()`` unless the worker was given another).
    """

    key: str
    service: str
    attempt: int
    deadline: float
    trace: str = ""  # the client's trace id (in the logs of every broker and worker it passed)
    clock: Clock = field(default_factory=MonotonicClock, compare=False, repr=False)
    flag: Flag | None = field(default=None, compare=False, repr=False)
    report: Callable[[Any], None] | None = field(default=None, compare=False, repr=False)

    def remaining(self) -> float:
        """Seconds left before the client stops waiting (on the clock the deadline was made with)."""
        return self.deadline - self.clock.now()

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled the request or its deadline passed: a handler that
        checks it can stop early (its result is discarded; the slot frees when it returns)."""
        return self.flag is not None and self.flag.is_set()

    def progress(self, value: Any) -> None:
        """Tell the caller how far the handler got (any serialisable value; the latest wins: at
        most ten reports a second reach the caller)."""
        if self.report is not None:
            self.report(value)


# A context not made yet: the function that makes it and its arguments (see REQUEST_VAR).
Deferred = tuple[Callable[..., RequestContext], tuple[Any, ...]]
Current = RequestContext | Deferred | None

_current: contextvars.ContextVar[Current] = contextvars.ContextVar("zmqdist_request", default=None)


def current_request() -> RequestContext:
    """Return the context of the request being handled. Raises LookupError outside a handler."""
    ctx = _current.get()
    if ctx is None:
        raise LookupError("current_request() called outside a zmqdist handler")
    if type(ctx) is tuple:  # deferred: made at the first ask, then kept for the rest of the call
        make, args = ctx
        made = make(*args)
        _current.set(made)
        return made
    assert isinstance(ctx, RequestContext)
    return ctx


def set_current(ctx: RequestContext | None) -> contextvars.Token[Current]:
    """Set the context for the running handler (used by the worker runtime)."""
    return _current.set(ctx)


# The variable itself, for the worker's per-request path (compiled): it sets a deferred context
# with ``REQUEST_VAR.set((make, args))``, ``make(*args)`` called only if the handler asks for it:
# most handlers never do, and building it for every request cost the worker a tenth of its
# per-request work (measured, docs/performance.md). Calling a function of this module instead
# would cost an interpreted call per request.
REQUEST_VAR: Final = _current
