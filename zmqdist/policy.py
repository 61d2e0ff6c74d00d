"""Retry policies: which failures run a request again, how often, and how long to wait between.

A :class:`Retry` is given per service on the worker (``@worker.service("x", retry=Retry(...))``)
or per call on the client (``client.call("x", v, retry=Retry(...))``, which overrides the
service's). The worker decides (it has the exception); the broker carries it out: it queues the
request again after the delay, within the request's deadline, on another worker where one is free.
A client-side policy that lists :class:`~zmqdist.errors.Busy` also makes the client send again a
request a full broker refused, with the same backoff, within the deadline. See docs/semantics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from zmqdist.errors import Busy, ConfigError

MAX_ATTEMPTS = 1000
MAX_NAMES = 32  # exception names a policy may list (protocol.MAX_RETRY_NAMES)

ExceptionSpec = type[BaseException] | str


def _name(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def exception_names(exc: BaseException) -> tuple[str, ...]:
    """Every name an exception answers to in a policy: each class of its MRO as ``qualname`` and
    as ``module.qualname`` (so ``"OSError"``, ``"builtins.OSError"`` and ``ConnectionError``'s
    bases all match a ``ConnectionResetError``)."""
    names: list[str] = []
    for cls in type(exc).__mro__:
        if cls is object or not issubclass(cls, BaseException):
            continue
        names += (cls.__qualname__, _name(cls))
    return tuple(names)


@dataclass(frozen=True)
class Retry:
    """Run a request again when its handler raises one of ``on`` (exception classes, or names as
    ``"OSError"`` / ``"mymod.MyError"``; subclasses match), at most ``attempts`` runs in all,
    waiting ``backoff`` seconds before the second run, doubling up to ``max_backoff``, each delay
    jittered to between half and all of it (``jitter=False``: exact). Every run counts, including
    one cut short by a worker's death (the broker's ``--max-attempts`` caps those separately)."""

    on: tuple[ExceptionSpec, ...] = (Exception,)
    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 5.0
    jitter: bool = True
    _names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        on = self.on
        if isinstance(on, (type, str)):
            on = (on,)
            object.__setattr__(self, "on", on)
        if not isinstance(on, tuple) or not on or len(on) > MAX_NAMES:
            raise ConfigError(f"Retry(on=...) must list 1 to {MAX_NAMES} exception classes or names, got {on!r}")
        names = set()
        for e in on:
            if isinstance(e, str) and 0 < len(e) <= 255:
                names.add(e)
            elif isinstance(e, type) and issubclass(e, BaseException):
                names.add(_name(e))
            else:
                raise ConfigError(f"Retry(on=...) takes exception classes or their names, got {e!r}")
        object.__setattr__(self, "_names", frozenset(names))
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigError(f"Retry(attempts=...) must be a whole number, got {self.attempts!r}")
        if not 1 <= self.attempts <= MAX_ATTEMPTS:
            raise ConfigError(f"Retry(attempts=...) must be from 1 to {MAX_ATTEMPTS}, got {self.attempts}")
        for what in ("backoff", "max_backoff"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600:
                raise ConfigError(f"Retry({what}=...) must be seconds from 0 to 3600, got {v!r}")
        if self.max_backoff < self.backoff:
            raise ConfigError(f"Retry: max_backoff ({self.max_backoff}) is below backoff ({self.backoff})")

    def matches(self, exc: BaseException) -> bool:
        """Does the policy retry ``exc``?"""
        return any(n in self._names for n in exception_names(exc))

    def delay(self, attempt: int, rng: Callable[[], float]) -> float:
        """Seconds to wait after run number ``attempt`` (1-based) failed."""
        base = min(float(self.max_backoff), self.backoff * 2.0 ** min(max(attempt - 1, 0), 30))
        return base * (0.5 + 0.5 * rng()) if self.jitter else base

    def decide(self, exc: BaseException, attempt: int, rng: Callable[[], float]) -> int | None:
        """Milliseconds to wait before running again after run ``attempt`` raised ``exc``, or None
        when the policy does not retry it (not listed, or the last attempt)."""
        if attempt >= self.attempts or not self.matches(exc):
            return None
        return round(self.delay(attempt, rng) * 1000)

    @property
    def retries_busy(self) -> bool:
        """Does the policy list :class:`~zmqdist.errors.Busy` (a client sends again what a full
        broker refused)?"""
        return _name(Busy) in self._names or "Busy" in self._names

    def spec(self) -> tuple[()] | tuple[int, int, int, tuple[str, ...]]:
        """The policy as it travels with a request (() when it lists nothing a handler raises)."""
        names = tuple(sorted(n for n in self._names if n not in ("Busy", _name(Busy))))
        if not names:
            return ()
        return (self.attempts, round(self.backoff * 1000), round(self.max_backoff * 1000), names)

    @classmethod
    def from_spec(cls, spec: tuple[int, int, int, Iterable[str]]) -> Retry:
        """The policy a request carried (see :meth:`spec`)."""
        attempts, backoff_ms, max_ms, names = spec
        return cls(tuple(names), attempts, backoff_ms / 1000, max(backoff_ms, max_ms) / 1000)
