"""The worker runtime: serve Python functions to a broker.

One thread owns the DEALER socket and drives :class:`WorkerCore`; handlers run on executor threads
(or an asyncio loop, or child processes with ``isolation="process"``) and report back through a
mailbox, so a busy handler never stops heartbeats.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import os
import pickle
import random
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, SupportsFloat, TypedDict, TypeVar, Unpack

import zmq

from zmqdist import protocol as p
from zmqdist._handlers import Executors, Handler, Service
from zmqdist.clock import Clock, checked
from zmqdist.codec import Codec
from zmqdist.config import HeartbeatSettings, check_endpoints, check_flag, check_seconds, take_options
from zmqdist.core.link import Connect, EndProbe, Probe, Problem, Stopped
from zmqdist.core.worker import EXECUTE_CLS, Abort, Window, WorkerCore, WorkerOut
from zmqdist.errors import ConfigError, ZmqdistError
from zmqdist.policy import Retry
from zmqdist.transport import DealerLink, Loop, Mailbox, RateLimitedLog, context_of
from zmqdist.transport.loop import DebugCheck
from zmqdist.transport.security import ClientKeys

log: Final = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
ISOLATIONS: Final = ("thread", "process")
NO_BROKER_S: Final = 5.0  # a worker that no broker accepted within this long says why it may be


def _check_takes_a_value(name: str, fn: Handler) -> None:
    """A handler is called with the request's value (None when the caller sends none): one that
    cannot take it would fail every call with a TypeError; say so when it is added instead."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # no signature to read (some builtins): the call will tell
    try:
        sig.bind(None)
    except TypeError as exc:
        raise ConfigError(
            f"handler for {name!r} must take one positional argument, the request's value (None when the "
            f"caller sends none): {exc}"
        ) from None


def _check_service_name(name: object) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= p.MAX_NAME:
        raise ConfigError(f"service name must be 1 to {p.MAX_NAME} characters, got {name!r}")
    if name.startswith(p.INTERNAL_PREFIXES):  # a broker refuses the whole registration
        reserved = " or ".join(map(repr, p.INTERNAL_PREFIXES))
        raise ConfigError(f"service names starting with {reserved} are reserved (brokers answer them)")


def _service_options(o: dict[str, object]) -> tuple[Retry | None, bool, bool]:
    """A service's retry, terminate_on_cancel and inline, checked."""
    retry = o["retry"]
    if retry is not None and not isinstance(retry, Retry):
        raise ConfigError(f"retry must be a zmqdist.Retry, got {retry!r}")
    return retry, check_flag(o["terminate_on_cancel"], "terminate_on_cancel"), check_flag(o["inline"], "inline")


class WorkerSettings(TypedDict, total=False):
    """The keyword options of :meth:`Worker.configure` (and of :class:`Worker`, with more)."""

    endpoints: str | Sequence[str] | None
    concurrency: int | None
    name: str | None
    heartbeat_s: float | None
    liveness: int | None
    isolation: str | None
    server_key: str | None
    key: str | None


class WorkerOptions(TypedDict, total=False):
    """The keyword options of :class:`Worker` (its docstring says each)."""

    concurrency: int
    name: str | None
    heartbeat_s: float
    liveness: int
    isolation: str
    server_key: str | None
    key: str | None
    clock: Clock | None
    context: zmq.Context[Any] | None
    codec: Codec | None


class ServiceOptions(TypedDict, total=False):
    """The keyword options of :meth:`Worker.add_service` and :meth:`Worker.service`."""

    retry: Retry | None
    terminate_on_cancel: bool
    inline: bool


# Each public call takes its options as **options (zmqdist.config.take_options says why): their
# defaults, which are also the names each call knows.
_WORKER_DEFAULTS: Final[dict[str, object]] = {
    "concurrency": 4,
    "name": None,
    "heartbeat_s": 0.25,
    "liveness": 4,
    "isolation": "thread",
    "server_key": None,
    "key": None,
    "clock": None,
    "context": None,
    "codec": None,
}
_SETTINGS_DEFAULTS: Final[dict[str, object]] = dict.fromkeys(  # (None: keep the setting as it is)
    ("endpoints", "concurrency", "name", "heartbeat_s", "liveness", "isolation", "server_key", "key")
)  # (not read from WorkerSettings: a compiled TypedDict keeps its keys only for a type checker)
_SERVICE_DEFAULTS: Final[dict[str, object]] = {"retry": None, "terminate_on_cancel": False, "inline": False}


class Worker:
    """Serves handlers to a broker. ``endpoints`` is the failover order; ``codec`` turns payloads
    into values and back (:class:`~zmqdist.Codec`: the same as the clients').

    Options (keywords; :class:`WorkerOptions`), each checked here (a :class:`ConfigError` naming
    it): ``concurrency`` (4 handlers at once), ``name``, ``heartbeat_s`` (0.25) and ``liveness`` (4)
    until the broker's WELCOME says its own, ``isolation`` (``"thread"`` or ``"process"``),
    ``server_key`` and ``key`` (CURVE certificate files), ``clock`` (tests), ``context`` (a
    ``zmq.Context``; default: the process's shared one) and ``codec``."""

    def __init__(self, endpoints: str | Sequence[str], **options: Unpack[WorkerOptions]) -> None:
        o = take_options(options, _WORKER_DEFAULTS, "Worker")
        codec, name = o["codec"], o["name"]
        if codec is not None and not isinstance(codec, Codec):
            raise ConfigError(f"codec must be a zmqdist.Codec, got {codec!r}")
        self.codec = codec
        self.endpoints: tuple[str, ...] = ()
        self.concurrency = 0
        self.name = ""
        self.isolation = ""
        self._hb = HeartbeatSettings()
        self._keys: tuple[object, object] = (None, None)  # the certificate files given (ClientKeys.load checks them)
        self._curve: ClientKeys | None = None
        self._runner: threading.Thread | None = None
        self._stop_asked = False  # stop() came (before start: start and run refuse, not serve nothing)
        self._configure(
            {
                **o,
                "endpoints": check_endpoints(endpoints, "worker", connect=True),  # (None: not "as it is")
                "name": f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}" if name in (None, "") else name,
            }
        )
        self._clock = checked(o["clock"], "worker")
        self._ctx = context_of(o["context"], "worker")
        self._handlers: dict[str, Service] = {}
        self._mailbox = Mailbox()
        self._ratelog = RateLimitedLog(log)  # the core's problems (keyed ones: rate-limited)
        self._done = threading.Event()
        self._up = threading.Event()  # the handlers can run (or the start failed: see error)
        self.stop_reason = ""
        self.error: BaseException | None = None
        self._loop: Loop | None = None
        self._executors: Executors | None = None  # (set by the socket thread as it starts)
        self._debug = DebugCheck(log)  # asked at ticks, not per task
        self._probe: DealerLink | None = None  # a look at the first choice while away from it

    def configure(self, **options: Unpack[WorkerSettings]) -> Worker:
        """Change settings before the worker starts; ``None`` (or leaving one out) keeps a setting
        as it is. The command line (``zmqdist worker MODULE:OBJECT``) uses this: a flag given
        overrides the object's own."""
        return self._configure(take_options(options, _SETTINGS_DEFAULTS, "configure"))

    def _configure(self, o: dict[str, object]) -> Worker:
        if self._runner is not None:
            raise ZmqdistError("configure a worker before it starts")
        endpoints, concurrency, name, isolation = o["endpoints"], o["concurrency"], o["name"], o["isolation"]
        heartbeat_s, liveness, server_key, key = o["heartbeat_s"], o["liveness"], o["server_key"], o["key"]
        eps = check_endpoints(endpoints, "worker", connect=True) if endpoints is not None else self.endpoints
        conc = self.concurrency if concurrency is None else concurrency
        if not isinstance(conc, int) or isinstance(conc, bool) or not 1 <= conc <= p.MAX_CAPACITY:
            raise ConfigError(f"concurrency must be a whole number from 1 to {p.MAX_CAPACITY}, got {conc!r}")
        iso = self.isolation if isolation is None else isolation
        if iso not in ISOLATIONS:
            raise ConfigError(f"isolation must be one of {ISOLATIONS}, got {iso!r}")
        hb = HeartbeatSettings.of(
            self._hb.heartbeat_s if heartbeat_s is None else heartbeat_s,
            self._hb.liveness if liveness is None else liveness,
        )
        keys = (server_key or self._keys[0], key or self._keys[1])
        # CURVE: the broker's public certificate and our secret one (docs/security.md)
        curve = ClientKeys.load(keys[0], keys[1], "worker") if keys != self._keys else self._curve
        if name is not None and not (isinstance(name, str) and 0 < len(name) <= p.MAX_NAME):
            raise ConfigError(f"worker name must be 1 to {p.MAX_NAME} characters, got {name!r}")
        self.endpoints, self.concurrency, self.isolation, self._hb = eps, conc, iso, hb
        self._keys, self._curve = keys, curve
        if name is not None:
            self.name = name
        return self

    # --- registration of handlers ----------------------------------------------------------------

    def service(self, name: str, **options: Unpack[ServiceOptions]) -> Callable[[F], F]:
        """Decorator: serve the function under ``name`` (see :meth:`add_service`)."""
        _check_service_name(name)  # (a wrong name or option: at the decorator, not the function)
        o = take_options(options, _SERVICE_DEFAULTS, "service")
        _service_options(o)

        def deco(fn: F) -> F:
            self._add_service(name, fn, o)
            return fn

        return deco

    def add_service(self, name: str, fn: Handler, **options: Unpack[ServiceOptions]) -> None:
        """Serve ``fn`` under service ``name``: a function, an ``async def``, or a generator (sync
        or async) whose values stream to a caller of ``Client.stream`` (a caller of ``call`` gets
        them as one list). ``retry``: run the request again when the handler raises what the
        policy lists. ``terminate_on_cancel`` (``isolation="process"``): a cancel kills the
        handler's process rather than setting ``current_request().cancelled``. ``inline``: a
        trivially fast sync handler (microseconds, never blocking) runs on the socket thread,
        without the hand-off to a handler thread and back; three calls in a row over 5 ms, or one
        over 100 ms, move the service to the threads for good (docs/worker.md)."""
        self._add_service(name, fn, take_options(options, _SERVICE_DEFAULTS, "add_service"))

    def _add_service(self, name: str, fn: Handler, o: dict[str, object]) -> None:
        retry, terminate_on_cancel, inline = _service_options(o)
        _check_service_name(name)
        if name in self._handlers:
            raise ConfigError(f"service {name!r} is already added to this worker (by {self._handlers[name].fn!r})")
        if not callable(fn):
            raise ConfigError(f"handler for {name!r} is not callable")
        _check_takes_a_value(name, fn)
        if self._runner is not None:
            raise ZmqdistError("add services before the worker starts")
        svc = Service(fn, retry, terminate_on_cancel, inline)
        if svc.inline and svc.is_async:
            raise ConfigError(f"inline is for sync handlers; {name!r} is async (it runs on the event loop already)")
        self._handlers[name] = svc

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self._handlers)

    # --- running --------------------------------------------------------------------------------

    def start(self) -> Worker:
        """Serve in a background thread; return once its handlers can run (with
        ``isolation="process"``, once every handler process is up), or raise why they cannot."""
        self._check_startable()
        self._runner = t = threading.Thread(target=self._main, name=f"zmqdist-worker-{self.name}", daemon=True)
        t.start()
        while not self._up.wait(0.1) and t.is_alive():
            pass
        if self.error is not None:
            raise self.error
        return self

    def run(self) -> None:
        """Serve in this thread until :meth:`stop`, SIGINT or SIGTERM (which drain first)."""
        self._check_startable()
        self._runner = threading.current_thread()
        restore = []

        def on_signal(signum: int, frame: object) -> None:
            self._mailbox.post(("drain", 30.0))

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                restore.append((sig, signal.signal(sig, on_signal)))
        try:
            self._main()
        finally:
            for sig, old in restore:
                signal.signal(sig, old)
        if self.error is not None:
            raise self.error

    def stop(self, drain: object = True, timeout: SupportsFloat = 30.0) -> None:
        """Stop taking work; with ``drain`` (True or False) finish what is in flight first (at most
        ``timeout`` s), and wait for that. Called from one of this worker's own handlers, it
        returns at once (the drain waits for that handler too: waiting for the drain there would
        wait for itself). ``drain`` is typed ``object`` and checked here: compiled, a ``bool``
        parameter refused anything else with a bare TypeError, and pure Python took ``"no"`` as
        true."""
        drain = check_flag(drain, "stop's drain")
        timeout = check_seconds(timeout, "stop's timeout")
        self._stop_asked = True
        self._mailbox.post(("drain", timeout) if drain else ("stop",))  # (a start racing this stops too)
        t = self._runner
        if t is None or t is threading.current_thread() or not t.is_alive():
            return
        executors = self._executors
        if executors is not None and executors.runs_here():
            return
        t.join(timeout + 5.0)

    def wait(self, timeout: SupportsFloat | None = None) -> bool:
        """Wait until the worker stopped (at most ``timeout`` seconds; None: for good); return True
        if it did."""
        return self._done.wait(None if timeout is None else check_seconds(timeout, "wait's timeout"))

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()  # drains: what it holds is finished first

    def _check_startable(self) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            raise ZmqdistError(
                "a Worker is starting in a process that multiprocessing spawned, as it imports the main "
                "module again (a handler process of isolation='process' does): start the worker under "
                '`if __name__ == "__main__":`'
            )
        if self._runner is not None:
            if self._done.is_set():
                raise ZmqdistError("worker has stopped: a Worker runs once, make a new one to start again")
            raise ZmqdistError("worker already started")
        if self._stop_asked:
            raise ZmqdistError("worker was stopped before it started: a Worker runs once, make a new one to start")
        if not self._handlers:
            raise ConfigError("worker has no services: add one with @worker.service(NAME)")
        inline = [n for n, s in self._handlers.items() if s.inline]
        if inline and self.isolation == "process":
            raise ConfigError(f"inline ({', '.join(inline)}) runs on the socket thread: not with isolation='process'")
        killing = [n for n, s in self._handlers.items() if s.terminate_on_cancel]
        if killing and self.isolation != "process":
            raise ConfigError(
                f"terminate_on_cancel ({', '.join(killing)}) needs isolation='process': a thread cannot be killed"
            )
        if self.isolation == "process":
            self._check_picklable()

    def _check_picklable(self) -> None:
        """A handler process gets each run's handler, retry policy and codec by pickling: one that
        cannot be pickled (a lambda, a nested function) is refused at start, not on every call."""
        for name, svc in self._handlers.items():
            for what, obj in (("handler", svc.fn), ("retry policy", svc.retry)):
                try:
                    pickle.dumps(obj)
                except Exception as exc:
                    raise ConfigError(
                        f"isolation='process': the {what} of {name!r} cannot be sent to a handler process "
                        f"({exc}); define it at module level, not as a lambda or inside a function"
                    ) from None
        try:
            pickle.dumps(self.codec)
        except Exception as exc:
            raise ConfigError(
                f"isolation='process': the codec cannot be sent to a handler process ({exc}); "
                "give it functions defined at module level"
            ) from None

    def _main(self) -> None:
        clock = self._clock
        try:  # the handlers first: handler processes that cannot start end the worker before any socket
            executors = Executors(self._handlers, self.concurrency, self.isolation, self._mailbox, clock, self.codec)
        except BaseException as exc:
            self.error = exc
            log.error("worker %s could not start: %s", self.name, exc, extra={"worker": self.name})
            self._mailbox.close()
            self._done.set()
            return
        finally:
            self._up.set()
        link = DealerLink(self._ctx, f"W-{secrets.token_hex(8)}".encode(), log, self._curve)
        probe = self._probe = DealerLink(
            self._ctx, f"P-{secrets.token_hex(8)}".encode(), log, self._curve, first_raises=False
        )
        core = WorkerCore(
            self.endpoints, self.services, self.concurrency, self.name, self._hb, clock.now(), random.random
        )
        loop = self._loop = Loop(clock, self._mailbox)
        self._executors = executors

        started = clock.now()
        # A worker no broker has accepted says so once, after NO_BROKER_S; one that was accepted
        # and then lost its broker never does (its failover logs say what happens instead).
        told = [False]

        def tick(now: float) -> float | None:
            self._debug.at(now)
            self._handle(link, executors, core.tick(now))
            answered(now)
            if not core.registered and not told[0] and now - started > NO_BROKER_S:
                told[0] = True
                log.warning(
                    "worker %s: no broker has accepted it after %.0fs (tried %s): no broker runs there, the "
                    "address is wrong, the keys do not match (CURVE: a plaintext worker to a CURVE broker, "
                    "a wrong server key, or a key not in the broker's allow-list), or the broker cannot accept "
                    "more connections (out of file descriptors: its log says so)",
                    self.name,
                    now - started,
                    ", ".join(self.endpoints),
                    extra={"worker": self.name},
                )
            return core.next_deadline()

        def read(now: float) -> bool:
            with link.corked():  # what the whole read makes goes out together (natural batching)
                for msg in link.recv_batch(now):
                    was = core.registered
                    self._handle(link, executors, core.receive(msg, now))
                    if core.registered and not was:
                        told[0] = True
                        log.info(
                            "worker %s registered with broker %s at %s (%s; concurrency %d)",
                            self.name,
                            core.link.broker,
                            link.endpoint,
                            ", ".join(self.services),
                            self.concurrency,
                            extra={"worker": self.name, "broker": core.link.broker},
                        )
                answered(now)  # what inline handlers answered goes out with the rest
            return link.more

        def apply(items: list[Any], now: float) -> None:
            for item in items:
                fields: tuple[Any, ...] = item  # (compiled: indexed natively, not through Python)
                kind: str = fields[0]
                if kind == "done":
                    done = core.task_done(fields[1], fields[2], fields[3], fields[4], now, fields[5])
                    self._handle(link, executors, done)
                elif kind == "part":
                    self._handle(link, executors, core.part(fields[1], fields[2], fields[3], now))
                elif kind == "progress":
                    self._handle(link, executors, core.progress(fields[1], fields[2], fields[3], now))
                elif kind == "drain":
                    self._handle(link, executors, core.drain(now, fields[1]))
                elif kind == "stop":
                    self._handle(link, executors, core.stop())

        def answered(now: float) -> None:
            """What inline handlers produced (on this thread) is handled like the mailbox's."""
            while executors.ready:
                apply(executors.take_ready(), now)

        def mail(items: list[Any], now: float) -> None:
            with link.corked():  # the results that are ready go out together
                apply(items, now)
                answered(now)

        def read_probe(now: float) -> bool:
            for msg in probe.recv_batch(now):
                self._handle(link, executors, core.probe_receive(msg, now))
            return probe.more

        loop.watch(lambda: link.sock, read)
        loop.watch(lambda: probe.sock, read_probe)
        try:
            self._handle(link, executors, core.start(clock.now()))
            log.info(
                "worker %s looking for a broker at %s (then %s)",
                self.name,
                link.endpoint,
                ", ".join(self.endpoints[1:]) or "the same again",
                extra={"worker": self.name},
            )
            loop.run(
                tick,
                mail,
                stuck=lambda: link.stuck() or probe.stuck(),
                paused=core.resumed,
                before_wait=executors.start,
            )
        except BaseException as exc:
            self.error = exc
            log.exception("worker %s failed", self.name)
        finally:
            link.flush()
            executors.shutdown(wait=False)
            link.close()
            probe.close()
            self._mailbox.close()
            self._done.set()
            log.info("worker %s stopped: %s", self.name, self.stop_reason or "error")

    def _handle(self, link: DealerLink, executors: Executors, outs: list[WorkerOut]) -> None:
        debug = self._debug.on
        sent = p.MESSAGE_TYPES
        for o in outs:
            if type(o) in sent:  # a message for the broker (a RESULT per request, CREDIT): the one send
                link.send(o)  # type: ignore[arg-type]
                continue
            if type(o) is EXECUTE_CLS:  # run a handler (one per request)
                if debug:
                    log.debug(
                        "worker %s runs %s attempt %d (trace %s)",
                        self.name,
                        o.service,
                        o.attempt,
                        o.trace,
                        extra={"worker": self.name, "trace": o.trace},
                    )
                executors.submit(o)
                continue
            match o:
                case Abort():
                    if debug:
                        log.debug("worker %s stops a handler: %s", self.name, o.reason, extra={"worker": self.name})
                    executors.abort(o)
                case Window():
                    executors.window(o)
                case Connect():
                    log.info("worker %s connecting to %s (%s)", self.name, o.endpoint, o.reason)
                    link.connect(o.endpoint)
                case Stopped():
                    self.stop_reason = o.reason
                    if self._loop is not None:
                        self._loop.stop()
                case Problem():  # keyed: one a broker can trigger at will, rate-limited
                    self._ratelog.warning(o.key, self._clock.now(), "worker %s: %s", self.name, o.message)
                case Probe():
                    if self._probe is not None:
                        self._probe.connect(o.endpoint)
                        self._probe.send(o.message)
                case EndProbe():
                    if self._probe is not None:
                        self._probe.close()
