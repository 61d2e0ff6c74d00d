"""The client runtimes: :class:`Client` (threads and futures) and :class:`AsyncClient` (asyncio).

One thread owns the DEALER socket and drives :class:`ClientCore`; callers' threads encode their
values and post submissions through a mailbox, and get ``concurrent.futures.Future`` objects that
the socket thread resolves. While the client has nothing open, its socket thread waits on the
mailbox and its timers only, and a :meth:`Client.call` takes the sockets for its own thread: it
sends its request and reads the reply there, and drives everything else the socket thread would
meanwhile (other threads' mail, timers, heartbeats, failover). A synchronous call so crosses no
thread, as a raw socket loop's would not (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import queue
import random
import secrets
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, Final, SupportsFloat, TypedDict, Unpack

import zmq

from zmqdist import _aio
from zmqdist import protocol as p
from zmqdist.clock import Clock, checked
from zmqdist.codec import Codec
from zmqdist.config import HeartbeatSettings, check_endpoints, check_seconds, take_options
from zmqdist.core.client import COMPLETED_CLS, NO_BROKER, ClientCore, ClientOut, Completed, PartIn, Progressed
from zmqdist.core.link import Connect, EndProbe, Probe, Problem
from zmqdist.errors import (
    Busy,
    ClosedError,
    ConfigError,
    InvalidRequest,
    NoBroker,
    RemoteError,
    RequestError,
    RequestTimeout,
    StreamInterrupted,
    WorkerLost,
    ZmqdistError,
)
from zmqdist.policy import Retry
from zmqdist.transport import LINGER_MS, DealerLink, Loop, Mailbox, RateLimitedLog, context_of
from zmqdist.transport.security import ClientKeys

log: Final = logging.getLogger(__name__)

_ERRORS: Final[dict[int, type[RequestError]]] = {
    p.ST_BUSY: Busy,
    p.ST_TIMEOUT: RequestTimeout,
    p.ST_LOST: WorkerLost,
    p.ST_INVALID: InvalidRequest,
    p.ST_INTERRUPTED: StreamInterrupted,
}
DEFAULT_WINDOW: Final = 64  # stream parts a worker may send ahead of the consumer


def outcome(
    c: Completed, service: str, trace: str = "", endpoints: tuple[str, ...] = (), codec: Codec | None = None
) -> tuple[bool, Any]:
    """Return (True, value) for a success, or (False, the exception a caller should see)."""
    if c.status == p.ST_OK:
        try:
            return True, p.unpack_value(c.payload, codec)
        except ValueError as exc:
            return False, RequestError(f"reply to {service!r} could not be decoded: {exc}", c.rid, service)
    if c.status == p.ST_FAILED:
        t, m, tb = p.unpack_error(c.payload)
        return False, RemoteError(
            f"handler of {service!r} raised {t}: {m}" + (f" [trace {trace}]" if trace else ""),
            remote_type=t,
            remote_message=m,
            remote_traceback=tb,
            rid=c.rid,
            service=service,
            trace=trace,
        )
    if c.status == NO_BROKER:
        return False, NoBroker(f"{service!r}: {c.message}", c.rid, service, endpoints)
    cls = _ERRORS.get(c.status, RequestError)
    return False, cls(f"{service!r}: {c.message}", c.rid, service)


class RequestFuture(Future[Any]):
    """The future of one request (:meth:`Client.submit`). ``cancel()`` really cancels: the
    request leaves the broker's queue, or its handler is told to stop (``current_request().
    cancelled``, an async handler's task cancelled); it returns False only once the reply has
    arrived. ``progress`` is the handler's last progress report (None before the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.rid = 0
        self.progress: Any = None
        self._on_cancel: Callable[[int], object] | None = None
        self._progress_callbacks: list[Callable[[Any], object]] = []

    def running(self) -> bool:
        """True while the request is open (sent, or waiting its turn in the client)."""
        return not self.done()

    def cancel(self) -> bool:
        if self.cancelled():
            return True
        if not super().cancel():
            return False
        if self._on_cancel is not None:
            self._on_cancel(self.rid)
        return True

    def add_progress_callback(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn(value)`` (on the client's thread: keep it short) for each progress report."""
        if not callable(fn):  # (else found only at the first report, logged on the client's thread)
            raise ConfigError(f"a progress callback must be a function of one value, got {fn!r}")
        self._progress_callbacks.append(fn)

    def _progressed(self, value: Any) -> None:
        self.progress = value
        for fn in self._progress_callbacks:
            try:
                fn(value)
            except Exception:
                log.exception("a progress callback raised")


class _Sink:
    """Where a stream's parts and end go: a thread-safe queue (or an asyncio one, via its loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.sync: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.aio: asyncio.Queue[tuple[Any, ...]] | None = asyncio.Queue() if loop is not None else None

    def put(self, item: tuple[Any, ...]) -> None:
        if self.loop is None:
            self.sync.put(item)
        else:
            assert self.aio is not None
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody reads any more
                self.loop.call_soon_threadsafe(self.aio.put_nowait, item)


class Stream:
    """The parts of a streamed reply, in order (:meth:`Client.stream`). Iterate it; ``result``
    is what the handler returned once the stream is exhausted. Leaving a ``with`` block or calling
    :meth:`cancel` before the end cancels the request. Raises the request's error (a
    :class:`~zmqdist.errors.StreamInterrupted` if its run was cut) after the parts that arrived."""

    def __init__(self, client: Client, rid: int, sink: _Sink) -> None:
        self._client = client
        self.rid = rid
        self._sink = sink
        self._taken = 0
        self._ended = False
        self.result: Any = None

    def _take(self, item: tuple[Any, ...]) -> Any:
        if item[0] == "part":
            self._taken += 1
            self._client._consumed(self.rid, self._taken)
            return item[1]
        self._ended = True
        ok, value = item[1], item[2]
        if not ok:
            raise value
        self.result = value
        raise StopIteration

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        return self._take(self._sink.sync.get())

    def cancel(self) -> bool:
        """Cancel the request unless it has ended; return True if it was open."""
        if self._ended:
            return False
        self._ended = True
        return self._client._cancel(self.rid)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class AsyncStream(Stream):
    """The asyncio face of :class:`Stream`: ``async for part in stream``."""

    def __aiter__(self) -> AsyncStream:
        return self

    def __anext__(self) -> Coroutine[Any, Any, Any]:
        # the waiting is _aio's: a compiled coroutine must not await (see zmqdist/_aio.py)
        return _aio.next_part(self)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class _Slot:
    """Where one :meth:`Client.call`'s outcome goes: a held lock that the outcome releases. A
    Future costs its caller and the socket thread interpreted work a plain call has no use for
    (a Condition made per request, set_result, result(): docs/performance.md)."""

    __slots__ = ("_done", "outcome")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self.outcome: tuple[int, bool, Any] | None = None

    def done(self) -> bool:
        return self.outcome is not None

    def put(self, item: tuple[int, bool, Any]) -> None:
        if self.outcome is None:  # one outcome per request; a second would release an open lock
            self.outcome = item
            self._done.release()

    def wait(self) -> Any:
        """The reply value, or raise the request's error (blocks until the outcome is there)."""
        if self.outcome is None:  # (a call its caller drove has it already: no acquire to pay)
            self._done.acquire()
        assert self.outcome is not None
        _, ok, value = self.outcome
        if ok:
            return value
        raise value


# Forks of this process so far, in this process: a Client made before a fork has no socket thread
# in the child (threads do not survive a fork, and its ZeroMQ sockets must not be used there).
_forks: Final = [0]


def _forked() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_forked)

_WAKE: Final = ("wake",)  # a mailbox item that only wakes the socket thread (to read what a caller left open)
Outcomes = queue.SimpleQueue[list[tuple[p.Boxed, bool, Any]]]  # a map call's: (rid, ok, value) lists
Target = Future[Any] | Outcomes | _Sink | _Slot
MAX_TIMEOUT_S: Final = p.MAX_BUDGET_MS / 1000  # a week: the longest budget a request can carry ("no deadline")
# Builtins every request calls, as C statics: compiled, a builtin without a primitive of its own is
# looked up on the builtins module at every call (about 330 instructions).
_next: Final = next
_hex: Final = hex
_FUTURE: Final = Future  # (and the class every submit's outcome is checked against)
_OUTCOMES: Final = queue.SimpleQueue  # a map call's queue (checked per outcome)


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ConfigError(
            f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f} (a week), "
            f"or None on the Client for no deadline; got {timeout!r}"
        )
    return float(timeout)


def _deliver(target: Target, rid: int, ok: bool, value: Any) -> None:
    """Hand an outcome to a Future (submit), a map call's queue, or a stream."""
    if isinstance(target, _FUTURE):
        try:
            if ok:
                target.set_result(value)
            else:
                target.set_exception(value)
        except InvalidStateError:  # e.g. cancelled by its caller
            pass
    elif isinstance(target, _Sink):
        target.put(("end", ok, value))
    elif isinstance(target, _Slot):
        target.put((rid, ok, value))
    else:  # a map call's queue
        target.put([(rid, ok, value)])


class ClientOptions(TypedDict, total=False):
    """The keyword options of :class:`Client` and :class:`AsyncClient` (their docstring says each)."""

    timeout: float | None
    name: str | None
    heartbeat_s: float
    liveness: int
    server_key: str | None
    key: str | None
    backlog: int
    codec: Codec | None
    clock: Clock | None
    context: zmq.Context[Any] | None


class RequestOptions(TypedDict, total=False):
    """The keyword options of a request: :meth:`Client.submit`, :meth:`Client.call`..."""

    timeout: float | None
    trace: str | None
    key: str | None
    retry: Retry | None


class StreamOptions(RequestOptions, total=False):
    """The keyword options of :meth:`Client.stream`: a request's, and its window."""

    window: int


class TimeoutOption(TypedDict, total=False):
    """The one keyword option of :meth:`AsyncClient.gather`."""

    timeout: float | None


class MapOptions(TimeoutOption, total=False):
    """The keyword options of :meth:`Client.map`."""

    window: int


class AsyncCallOptions(RequestOptions, total=False):
    """The keyword options of :meth:`AsyncClient.call`: a request's, and a progress callback."""

    on_progress: Callable[[Any], None] | None


# Each public call takes its options as **options (zmqdist.config.take_options says why): their
# defaults, which are also the names each call knows.
_CLIENT_DEFAULTS: Final[dict[str, object]] = {
    "timeout": 5.0,
    "name": None,
    "heartbeat_s": 0.25,
    "liveness": 4,
    "server_key": None,
    "key": None,
    "backlog": 100_000,
    "codec": None,
    "clock": None,
    "context": None,
}
_REQUEST_DEFAULTS: Final[dict[str, object]] = {"timeout": None, "trace": None, "key": None, "retry": None}
_STREAM_DEFAULTS: Final[dict[str, object]] = {**_REQUEST_DEFAULTS, "window": DEFAULT_WINDOW}
_MAP_DEFAULTS: Final[dict[str, object]] = {"timeout": None, "window": 1000}
_TIMEOUT_DEFAULTS: Final[dict[str, object]] = {"timeout": None}
_ASYNC_CALL_DEFAULTS: Final[dict[str, object]] = {**_REQUEST_DEFAULTS, "on_progress": None}


_REQUEST_KEYS: Final = frozenset(_REQUEST_DEFAULTS)


def _checked_options(trace: object, key: object, retry: object) -> tuple[str | None, str | None, Retry | None]:
    """A request's trace, key and retry, or a ConfigError naming the wrong one."""
    if trace is not None and (not isinstance(trace, str) or len(trace) > p.MAX_NAME):
        raise ConfigError(f"trace must be a string of at most {p.MAX_NAME} characters, got {trace!r}")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= p.MAX_NAME):
        raise ConfigError(f"key must be a string of 1 to {p.MAX_NAME} characters, got {key!r}")
    if retry is not None and not isinstance(retry, Retry):
        raise ConfigError(f"retry must be a zmqdist.Retry, got {retry!r}")
    return trace, key, retry


def _request_options(options: Mapping[str, object], what: str) -> tuple[object, object, object, object]:
    """A request's timeout, trace, key and retry, as given (each is checked where it is used).
    Per request: no dict is built (a misspelt name is looked up only when there is one)."""
    if not options:  # the usual call
        return None, None, None, None
    if not options.keys() <= _REQUEST_KEYS:
        take_options(options, _REQUEST_DEFAULTS, what)  # raises, naming the option meant
    get = options.get
    return get("timeout"), get("trace"), get("key"), get("retry")


class Client:
    """Sends requests to a broker; ``endpoints`` is the failover order. Thread-safe.

    The client never has more requests open at its broker than the broker allows one client (its
    WELCOME says): it keeps the rest and sends them in order as replies free room, their deadlines
    counting from ``submit``. It holds at most ``backlog`` unanswered requests in all; past that,
    ``submit`` blocks until one ends, and raises :class:`~zmqdist.errors.Busy` if none does within
    the request's timeout. ``timeout`` is each request's deadline in seconds (``None``: no deadline,
    that is a week, the longest a request's budget can carry). A request that ends because no broker
    answered on any endpoint raises :class:`~zmqdist.errors.NoBroker` (a ``RequestTimeout``).
    ``codec`` turns values into payloads and back (:class:`~zmqdist.Codec`: the same as the
    workers').

    Options (keywords; :class:`ClientOptions`), each checked here (a :class:`ConfigError` naming it):
    ``timeout`` (5.0), ``name``, ``heartbeat_s`` (0.25) and ``liveness`` (4) until the broker's
    WELCOME says its own, ``server_key`` and ``key`` (CURVE certificate files), ``backlog``
    (100,000), ``codec``, ``clock`` (tests) and ``context`` (a ``zmq.Context``; default: the
    process's shared one)."""

    def __init__(self, endpoints: str | Sequence[str], **options: Unpack[ClientOptions]) -> None:
        o = take_options(options, _CLIENT_DEFAULTS, "Client")
        self.endpoints = check_endpoints(endpoints, "client", connect=True)
        backlog, codec, name, timeout = o["backlog"], o["codec"], o["name"], o["timeout"]
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ConfigError(f"backlog must be a whole number of at least 1, got {backlog!r}")
        if codec is not None and not isinstance(codec, Codec):
            raise ConfigError(f"codec must be a zmqdist.Codec, got {codec!r}")
        if name is not None and not (isinstance(name, str) and len(name) <= p.MAX_NAME):
            # (a broker refuses a longer name in HELLO: the client would run unregistered)
            raise ConfigError(f"client name must be a string of at most {p.MAX_NAME} characters, got {name!r}")
        self.codec = codec
        self.backlog = backlog
        self._fork = _forks[0]
        self._room = threading.Condition()  # submit waits on it while the backlog is full
        self._waiting_room = 0
        # CURVE: the broker's public certificate and our secret one (docs/security.md)
        self._curve = ClientKeys.load(o["server_key"], o["key"], "client")
        self.timeout = _check_timeout(MAX_TIMEOUT_S if timeout is None else timeout)
        self.name = name or f"client-{secrets.token_hex(3)}"
        self._hb = HeartbeatSettings.of(o["heartbeat_s"], o["liveness"])
        self._clock = checked(o["clock"], "client")
        self._ctx = context_of(o["context"], "client")
        self._mailbox = Mailbox()
        self._ratelog = RateLimitedLog(log)  # the core's problems (keyed ones: rate-limited)
        self._ids = itertools.count(1)
        self._futures: dict[int, tuple[Target, str, str]] = {}  # rid -> (target, service, trace)
        # Outcomes for map calls' queues made in this turn of the socket thread, handed over
        # together as it ends (_hand_held): a map caller woken by a turn's first outcome fought
        # the socket thread for the GIL over the rest of the turn.
        self._held: dict[Outcomes, list[tuple[p.Boxed, bool, Any]]] = {}
        self._trace_prefix = f"{secrets.token_hex(6)}-"  # trace ids: prefix + rid, unique without a syscall
        self._closed = False
        self._failed = ""  # why the socket thread stopped, if it failed (said in every ClosedError)
        self._core: ClientCore | None = None
        self._probe: DealerLink | None = None  # a look at the first choice while away from it
        # The sockets and the core: held by the socket thread, by a Client.call driving them
        # while the socket thread is idle (_drive, set once the loop runs), or by nobody.
        self._io = threading.Lock()
        self._drive: Callable[[tuple[Any, ...], _Slot], None] | None = None
        self._driver = 0  # the thread ident of a caller driving the sockets (0: none)
        self._runner = threading.Thread(target=self._main, name=f"zmqdist-client-{self.name}", daemon=True)
        self._runner.start()

    # --- public ---------------------------------------------------------------------------------

    def submit(self, service: str, value: Any = None, **options: Unpack[RequestOptions]) -> RequestFuture:
        """Send a request; return a :class:`RequestFuture` of the reply value (or of its error).

        ``trace`` (default: generated) travels with the request through every broker and worker and
        appears in their logs and in a :class:`RemoteError`. ``key`` is the request's idempotency
        key (``current_request().key`` on every attempt; default: one per request); brokers started
        with ``--join-same-key`` run one request per open key and service. ``retry`` overrides the
        service's retry policy; listing :class:`~zmqdist.errors.Busy` also sends the request again
        when a full broker refuses it. All within the request's timeout."""
        timeout, trace, key, retry = _request_options(options, "submit")
        return self._future(service, value, timeout, trace, key, retry)

    def _future(
        self, service: str, value: Any, timeout: object, trace: object, key: object, retry: object
    ) -> RequestFuture:
        fut = RequestFuture()
        fut._on_cancel = self._cancel
        fut.rid = self._submit(service, value, timeout, fut, trace, key, retry)
        return fut

    def _submit(
        self,
        service: str,
        value: Any,
        timeout: object,
        target: Target,
        trace: object = None,
        key: object = None,
        retry: object = None,
        window: int = 0,
    ) -> int:
        """Send a request whose outcome goes to ``target``; return its id."""
        item = self._request(service, value, timeout, target, trace, key, retry, window, True)
        rid: int = item[1]
        self._mailbox.post(item)
        if self._closed and self._futures.pop(rid, None) is not None:
            # closed while we posted: the loop may have finished its clean-up already
            _deliver(target, rid, False, ClosedError(f"client closed{self._failed}"))
        return rid

    def _request(
        self,
        service: str,
        value: Any,
        timeout: object,
        target: Target,
        trace: object,
        key: object,
        retry: object,
        window: int,
        wait: bool,
    ) -> tuple[Any, ...]:
        """Check and pack a request, and register its ``target``; return the socket thread's
        submit item. ``wait``: block while the backlog is full (a caller driving the sockets
        checked it itself: nobody would free room while it waits)."""
        t = self._checked(service, timeout)
        trace, key, retry = _checked_options(trace, key, retry)
        payload = p.pack_value(value, self.codec)
        options = (key or "", window, retry.spec() if retry is not None else ())
        busy = (retry.attempts, retry.backoff, retry.max_backoff) if retry is not None and retry.retries_busy else None
        if wait and len(self._futures) >= self.backlog:
            self._wait_for_room(t)
        rid = _next(self._ids)
        tr = trace if trace is not None else self._trace_prefix + _hex(rid)[2:]  # (rid > 0)
        self._futures[rid] = (target, service, tr)
        return ("submit", rid, service, payload, t, tr, options, busy)

    def _checked(self, service: str, timeout: object) -> float:
        """Refuse a call on a closed client, on a client made before this process forked, or with
        a bad service name; return its timeout."""
        if self._closed:
            raise ClosedError(f"client is closed{self._failed}")
        if self._fork != _forks[0]:
            raise ZmqdistError(
                "this Client was made before the process forked: a forked process (multiprocessing's "
                "fork start method, os.fork) must make its own Client, after the fork"
            )
        if not isinstance(service, str) or not 0 < len(service) <= p.MAX_NAME:
            raise ConfigError(f"service must be a name of 1 to {p.MAX_NAME} characters, got {service!r}")
        return self.timeout if timeout is None else _check_timeout(timeout)

    def _submit_many(self, service: str, values: list[Any], timeout: object, target: Target) -> list[p.Boxed]:
        """Send plain requests (no key, retry or stream) for ``values`` whose outcomes go to
        ``target``, checked once and posted to the socket thread as one item: what
        :meth:`map` sends per window refill. Returns their ids, in order."""
        if len(values) == 1 or len(self._futures) + len(values) > self.backlog:
            return [self._submit(service, v, timeout, target) for v in values]  # the backlog's wait
        t = self._checked(service, timeout)
        codec = self.codec
        payloads = [p.pack_value(v, codec) for v in values]  # a value that cannot be packed raises here
        ids = self._ids
        futures = self._futures
        prefix = self._trace_prefix
        batch: list[tuple[p.Boxed, bytes, str]] = []
        for payload in payloads:
            rid: p.Boxed = _next(ids)  # boxed once: it goes into two tables and the request
            tr = prefix + _hex(rid)[2:]  # not f"{rid:x}": compiled, a str.format call at 3x the cost
            futures[rid] = (target, service, tr)
            batch.append((rid, payload, tr))
        self._mailbox.post(("many", service, t, batch))
        if self._closed:
            for rid, _, _ in batch:
                if futures.pop(rid, None) is not None:
                    _deliver(target, rid, False, ClosedError(f"client closed{self._failed}"))
        return [rid for rid, _, _ in batch]

    def _cancel(self, rid: int) -> bool:
        """Cancel request ``rid`` (from its future, stream or map); True if it was open."""
        if self._futures.pop(rid, None) is None:
            return False
        self._mailbox.post(("cancel", rid))
        self._room_freed()
        return True

    def _consumed(self, rid: int, n: int) -> None:
        self._mailbox.post(("ack", rid, n))

    def _wait_for_room(self, timeout: float) -> None:
        """Block while the client holds ``backlog`` unanswered requests (at most ``timeout``)."""
        with self._room:
            self._waiting_room += 1
            try:
                ok = self._room.wait_for(lambda: len(self._futures) < self.backlog or self._closed, timeout)
            finally:
                self._waiting_room -= 1
        if self._closed:
            raise ClosedError(f"client is closed{self._failed}")
        if not ok:
            raise Busy(
                f"the client holds {self.backlog} unanswered requests (its backlog) and none ended in {timeout}s"
            )

    def _hand_held(self) -> None:
        """Hand every map call's queue the outcomes this turn made for it, in one put each."""
        if self._held:
            held, self._held = self._held, {}
            for sink, outcomes in held.items():
                sink.put(outcomes)

    def _room_freed(self) -> None:
        if self._waiting_room:
            with self._room:
                self._room.notify()

    def call(self, service: str, value: Any = None, **options: Unpack[RequestOptions]) -> Any:
        """Send a request and return its reply value; raise its error (see zmqdist.errors). Its
        options are :meth:`submit`'s.

        When the client has nothing else open, the calling thread sends the request and reads
        its reply itself (the module docstring); otherwise the socket thread does."""
        timeout, trace, key, retry = _request_options(options, "call")
        me = threading.get_ident()
        if me in (self._driver, self._runner.ident):
            raise ZmqdistError(
                "Client.call from a callback of this client's futures would wait for itself (the thread that "
                "runs the callback reads the reply): use submit() there"
            )
        slot = _Slot()
        drive = self._drive
        # (acquire(False): a keyword argument costs Lock.acquire a keyword parse, at every call)
        if drive is None or len(self._futures) >= self.backlog or not self._io.acquire(False):
            rid = self._submit(service, value, timeout, slot, trace, key, retry)
            try:
                return slot.wait()
            except BaseException:
                self._interrupted(slot, rid)
                raise
        rid = 0
        try:
            item = self._request(service, value, timeout, slot, trace, key, retry, 0, False)
            rid = item[1]
            self._driver = me
            drive(item, slot)
        except BaseException:
            self._interrupted(slot, rid)
            raise
        finally:
            self._driver = 0
            self._io.release()
            if self._futures:  # what others left open: the socket thread reads on
                self._mailbox.post(_WAKE)
        return slot.wait()

    def _interrupted(self, slot: _Slot, rid: int) -> None:
        """A call left by an exception before its outcome (KeyboardInterrupt, a signal handler's
        exception): cancel its request, as a cancelled future would; it must not hold its quota
        slot and a handler until its deadline, which may be a week away."""
        if rid and not slot.done():
            self._cancel(rid)

    def stream(self, service: str, value: Any = None, **options: Unpack[StreamOptions]) -> Stream:
        """Call a streaming service (a generator handler): iterate the returned :class:`Stream`
        for its values as they come. The worker runs at most ``window`` values ahead of you (it
        waits, the memory stays bounded; default 64); the timeout covers the whole stream. The
        other options are :meth:`submit`'s."""
        return self._stream(service, value, take_options(options, _STREAM_DEFAULTS, "stream"), None)

    def _stream(self, service: str, value: Any, o: dict[str, object], loop: asyncio.AbstractEventLoop | None) -> Stream:
        timeout, window, trace, key, retry = o["timeout"], o["window"], o["trace"], o["key"], o["retry"]
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= p.MAX_WINDOW:
            raise ConfigError(f"window must be a whole number from 1 to {p.MAX_WINDOW}, got {window!r}")
        sink = _Sink(loop)
        rid = self._submit(service, value, timeout, sink, trace, key, retry, window)
        return Stream(self, rid, sink) if loop is None else AsyncStream(self, rid, sink)

    def map(self, service: str, values: Iterable[Any], **options: Unpack[MapOptions]) -> Iterator[Any]:
        """Call ``service`` on every value, keeping up to ``window`` (default 1000) in flight;
        yield in input order. Closing the iterator early (or an error) cancels the requests still
        open. Bad arguments (and a closed client) raise here, as the built-in ``map`` does, not at
        the first value."""
        o = take_options(options, _MAP_DEFAULTS, "map")
        timeout, window = o["timeout"], o["window"]
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be a whole number of at least 1, got {window!r}")
        self._checked(service, timeout)
        try:
            it = iter(values)
        except TypeError:
            raise ConfigError(f"values must be an iterable of the values to send, got {values!r}") from None
        return self._map(service, it, timeout, window)

    def _map(self, service: str, it: Iterator[Any], timeout: object, window: int) -> Iterator[Any]:
        # One queue for the whole call instead of a Future per request: outcomes arrive as
        # (rid, ok, value); every request ends (reply, local timeout or close), so get() returns.
        # Natural batching: the window is refilled only after every outcome already there was
        # yielded, so the requests of one refill go to the socket thread as one item.
        sink: Outcomes = queue.SimpleQueue()
        order: deque[p.Boxed] = deque()  # (ids as objects: see protocol.Boxed)
        done: dict[p.Boxed, tuple[bool, Any]] = {}
        exhausted = False
        get, empty, popleft = sink.get, sink.empty, order.popleft  # bound once: called per request
        rid: p.Boxed  # (annotated: inferred from a call, a Boxed is an int, boxed again at each use)
        first: p.Boxed
        try:
            while True:
                if not exhausted and len(order) < window:
                    chunk = list(itertools.islice(it, window - len(order)))
                    exhausted = len(chunk) < window - len(order)
                    if chunk:
                        order.extend(self._submit_many(service, chunk, timeout, sink))
                if not order:
                    return
                first = order[0]
                while first not in done:
                    for rid, ok, value in get():
                        done[rid] = (ok, value)
                while not empty():  # whatever else arrived meanwhile: no wait
                    for rid, ok, value in get():
                        done[rid] = (ok, value)
                while order and (first := order[0]) in done:
                    popleft()
                    ok, value = done.pop(first)
                    if not ok:
                        raise value
                    yield value
        finally:
            for rid in order:
                self._cancel(rid)

    def close(self, timeout: SupportsFloat = 5.0) -> None:
        """Stop the client; requests still pending fail with ClosedError. Waits at most
        ``timeout`` seconds for its socket thread."""
        timeout = check_seconds(timeout, "close's timeout")
        if self._closed:
            return
        self._closed = True
        if self._fork != _forks[0]:
            return  # the parent's: nothing of it runs here (and its locks may be held for good)
        with self._room:
            self._room.notify_all()  # a submit waiting for room gives up
        self._mailbox.post(None)
        if self._runner is not threading.current_thread() and self._driver != threading.get_ident():
            self._runner.join(timeout)  # (not from a callback of the thread that drives: it must return first)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loop -------------------------------------------------------------------------------

    def _main(self) -> None:
        self._io.acquire()  # held for good, but in an idle wait: see Loop.run
        clock = self._clock
        link = DealerLink(self._ctx, f"C-{secrets.token_hex(8)}".encode(), log, self._curve)
        probe = self._probe = DealerLink(
            self._ctx, f"P-{secrets.token_hex(8)}".encode(), log, self._curve, first_raises=False
        )
        core = self._core = ClientCore(self.endpoints, self.name, self._hb, clock.now(), random.random)
        loop = Loop(clock, self._mailbox)

        def tick(now: float) -> float | None:
            self._handle(link, core.tick(now))
            self._hand_held()
            return core.next_deadline()

        def read(now: float) -> bool:
            with link.corked():  # what the whole read makes goes out together (natural batching)
                for msg in link.recv_batch(now):
                    self._handle(link, core.receive(msg, now))
            self._hand_held()
            return link.more

        def mail(items: list[Any], now: float) -> None:
            with link.corked():  # every request the mailbox holds goes out together
                for item in items:
                    if item is None:
                        loop.stop()
                        break
                    kind = item[0]
                    if kind == "submit":
                        _, rid, service, payload, t, tr, options, busy = item
                        self._handle(link, core.submit(rid, service, payload, t, now, tr, options, busy))
                    elif kind == "many":  # plain requests of one map refill
                        _, service, t, batch = item
                        for rid, payload, tr in batch:
                            self._handle(link, core.submit(rid, service, payload, t, now, tr))
                    elif kind == "cancel":
                        self._handle(link, core.cancel(item[1], now))
                    elif kind == "ack":
                        self._handle(link, core.consumed(item[1], item[2]))
            self._hand_held()

        def read_probe(now: float) -> bool:
            for msg in probe.recv_batch(now):
                self._handle(link, core.probe_receive(msg, now))
            self._hand_held()
            return probe.more

        def stuck() -> bool:
            return link.stuck() or probe.stuck()

        def idle() -> bool:
            return not self._futures

        def drive(item: tuple[Any, ...], slot: _Slot) -> None:
            """A caller's thread, holding the sockets: send what the mailbox holds, then its request
            (what was posted before this call goes first: a submit, a cancel of this thread's own
            would otherwise follow it), and turn until its outcome."""
            items = self._mailbox.drain() if self._mailbox.pending() else []  # (drain reads the pipe)
            items.append(item)
            mail(items, clock.now())
            loop.run(tick, mail, stuck=stuck, paused=core.resumed, until=slot.done)

        loop.watch(lambda: link.sock, read)
        loop.watch(lambda: probe.sock, read_probe)
        try:
            self._handle(link, core.start(clock.now()))
            self._drive = drive
            loop.run(tick, mail, stuck=stuck, paused=core.resumed, hold=self._io, idle=idle)
            self._handle(link, core.leave())  # closed: what the broker still holds for us stops now
            link.close(LINGER_MS)  # (the cancels go out after the socket is closed)
        except BaseException as exc:
            log.exception("client %s failed", self.name)
            self._failed = f": its socket thread failed ({type(exc).__name__}: {exc})"
            if isinstance(exc, zmq.ZMQError) and exc.errno == errno.EMFILE:
                self._failed += (
                    "; a process's Clients share one ZeroMQ context, of 1023 sockets by default: a Client "
                    "is thread-safe, share one"
                )
        finally:
            self._closed = True
            self._drive = None
            self._hand_held()  # outcomes of the last turn, or of one a failure cut short
            link.close()
            probe.close()
            for rid, (target, _, _) in list(self._futures.items()):
                _deliver(target, rid, False, ClosedError(f"client closed before the reply arrived{self._failed}"))
            self._futures.clear()
            for item in self._mailbox.drain():
                if item is None:
                    continue
                rids = [item[1]] if item[0] == "submit" else [b[0] for b in item[3]] if item[0] == "many" else []
                for rid in rids:
                    entry = self._futures.pop(rid, None)
                    if entry is not None:
                        _deliver(entry[0], rid, False, ClosedError(f"client closed{self._failed}"))
            self._mailbox.close()

    def _handle(self, link: DealerLink, outs: list[ClientOut]) -> None:
        sent = p.MESSAGE_TYPES
        for o in outs:
            if type(o) in sent:  # a message for the broker (a REQUEST per request): the one send
                link.send(o)  # type: ignore[arg-type]
                continue
            if type(o) is COMPLETED_CLS:  # a request ended (one per request)
                fields: tuple[Any, ...] = o
                rid: p.Boxed = fields[0]  # the object (p.Boxed), not o.rid: read as an int, boxed again
                entry = self._futures.pop(rid, None)
                if entry is not None:
                    target, service, trace = entry
                    ok, value = outcome(o, service, trace, self.endpoints, self.codec)
                    if type(target) is _OUTCOMES:  # a map call's: handed over as the turn ends
                        held = self._held.get(target)
                        if held is None:
                            self._held[target] = [(rid, ok, value)]
                        else:
                            held.append((rid, ok, value))
                    else:
                        _deliver(target, rid, ok, value)
                    self._room_freed()
                continue
            match o:
                case PartIn():
                    entry = self._futures.get(o.rid)
                    if entry is not None and isinstance(entry[0], _Sink):
                        try:
                            entry[0].put(("part", p.unpack_value(o.payload, self.codec)))
                        except ValueError as exc:
                            err = RequestError(f"a part of {entry[1]!r} could not be decoded: {exc}", o.rid)
                            self._futures.pop(o.rid, None)
                            _deliver(entry[0], o.rid, False, err)
                            self._handle(link, self._core.cancel(o.rid, self._clock.now()) if self._core else [])
                case Progressed():
                    entry = self._futures.get(o.rid)
                    if entry is not None and isinstance(entry[0], RequestFuture):
                        with contextlib.suppress(ValueError):  # an undecodable report is skipped
                            entry[0]._progressed(p.unpack_value(o.payload, self.codec))
                case Connect():
                    log.info("client %s connecting to %s (%s)", self.name, o.endpoint, o.reason)
                    link.connect(o.endpoint)
                case Problem():  # keyed: one a broker can trigger at will, rate-limited
                    self._ratelog.warning(o.key, self._clock.now(), "client %s: %s", self.name, o.message)
                case Probe():
                    if self._probe is not None:
                        self._probe.connect(o.endpoint)
                        self._probe.send(o.message)
                case EndProbe():
                    if self._probe is not None:
                        self._probe.close()


class AsyncClient:
    """The asyncio face of :class:`Client`: ``await ac.call(...)``; same arguments. Cancelling
    the task that awaits a call cancels the request (its handler is told to stop)."""

    def __init__(self, endpoints: str | Sequence[str], **options: Unpack[ClientOptions]) -> None:
        self._client = Client(endpoints, **options)

    # Each awaitable method returns a coroutine of zmqdist/_aio.py rather than being a compiled
    # coroutine itself: a compiled one would pass a thrown exception on in the form Python 3.12
    # deprecated (that module says why it matters).

    def call(self, service: str, value: Any = None, **options: Unpack[AsyncCallOptions]) -> Coroutine[Any, Any, Any]:
        """Send a request and await its reply value; raise its error. ``on_progress(value)`` is
        called (on this loop) with each progress report of the handler; the other options are
        :meth:`Client.submit`'s. The request goes out when the returned coroutine first runs."""
        o = take_options(options, _ASYNC_CALL_DEFAULTS, "call")
        timeout, trace, key, retry, on_progress = o["timeout"], o["trace"], o["key"], o["retry"], o["on_progress"]
        if on_progress is not None and not callable(on_progress):
            raise ConfigError(f"on_progress must be a function of one value, got {on_progress!r}")
        client = self._client
        client._checked(service, timeout)  # bad arguments raise here, not when the coroutine runs
        _checked_options(trace, key, retry)
        return _aio.call(lambda: client._future(service, value, timeout, trace, key, retry), on_progress)

    def gather(
        self, service: str, values: Iterable[Any], **options: Unpack[TimeoutOption]
    ) -> Coroutine[Any, Any, list[Any]]:
        """Call ``service`` on every value concurrently; return the results in order. Its one
        option is ``timeout``."""
        timeout = take_options(options, _TIMEOUT_DEFAULTS, "gather")["timeout"]
        client = self._client
        client._checked(service, timeout)  # bad arguments raise here, not when the coroutine runs
        return _aio.gather(lambda v: client._future(service, v, timeout, None, None, None), values)

    def stream(self, service: str, value: Any = None, **options: Unpack[StreamOptions]) -> AsyncStream:
        """Call a streaming service: ``async for part in ac.stream(...)`` (see :meth:`Client.stream`).
        Call it from a coroutine: the parts arrive on the running loop."""
        loop = asyncio.get_running_loop()
        s = self._client._stream(service, value, take_options(options, _STREAM_DEFAULTS, "stream"), loop)
        assert isinstance(s, AsyncStream)
        return s

    def close(self) -> Coroutine[Any, Any, None]:
        """Stop the client (awaitable: the wait for its socket thread runs in a thread)."""
        return asyncio.to_thread(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    def __aexit__(self, *exc: object) -> Coroutine[Any, Any, None]:
        return self.close()
