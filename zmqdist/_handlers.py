"""Running handlers off the socket thread: threads, an asyncio loop, or child processes.

Executors report to the worker's mailbox (the socket thread turns each into a message):

- ``("done", ticket, session, ok, payload, retry_ms)``: a handler finished; ``retry_ms`` is None,
  or the delay its retry policy asks before the request runs again;
- ``("part", ticket, session, payload)``: a streaming handler's next value;
- ``("progress", ticket, session, payload)``: ``current_request().progress(value)``.

The socket thread tells them :meth:`Executors.abort` (stop a handler: the request's
``cancelled`` flag for sync handlers, task cancellation for async ones, and for
``isolation="process"`` the flag in the child, or the child killed if the service asked for it)
and :meth:`Executors.window` (a stream's consumer took more parts). A streaming handler never runs
ahead of its consumer by more than the window: the next value is asked of the generator only when
it may be sent. Handlers run off the socket thread, so heartbeats keep flowing while they work
(see docs/worker.md for C code that holds the GIL), except a service declared ``inline``: a
trivially fast handler, run on the socket thread itself with no hand-off, its result sent with the
others of the same read. A guard moves it to the threads for good after ``INLINE_STRIKES`` calls in
a row longer than ``INLINE_BUDGET_S``, or one longer than ``INLINE_LIMIT_S`` (a thread descheduled
by a busy machine makes one call look slow, rarely three in a row).

Child processes (``isolation="process"``): one per slot, each with its own pipe, so a task can be
stopped (or its process killed) without touching the others. A child dies with its worker, even a
SIGKILLed one (Linux's parent-death signal). A child that dies (a crash, ``os._exit``, a signal) is
replaced at once; the request it ran ends in a clear error, the others go on.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import os
import queue
import random
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from zmqdist import _aio
from zmqdist import protocol as p
from zmqdist.clock import Clock
from zmqdist.codec import Codec
from zmqdist.context import REQUEST_VAR, RequestContext
from zmqdist.core.worker import Abort, Execute, Window
from zmqdist.errors import ZmqdistError
from zmqdist.policy import Retry
from zmqdist.transport import Mailbox, RateLimitedLog

log: Final = logging.getLogger(__name__)
INLINE_BUDGET_S: Final = 0.005  # an inline handler's call longer than this is a strike against it...
INLINE_STRIKES: Final = 3  # ... this many in a row (a descheduled thread is one, rarely three) moves it to the threads,
INLINE_LIMIT_S: Final = 0.1  # ... as does one call longer than this
REPLACE_RETRY_S: Final = 1.0  # a handler process that could not be replaced is tried again this much later
UNREPLACED_LOG_S: Final = 30.0  # ... and said so at most this often
Handler = Callable[[Any], Any]
Post = Callable[[tuple[Any, ...]], None]


@dataclass(frozen=True)
class Service:
    """A handler and how the worker runs it."""

    fn: Handler
    retry: Retry | None = None  # the service's retry policy (a caller's own overrides it)
    terminate_on_cancel: bool = False  # isolation="process": a cancel kills the handler's process
    inline: bool = False  # trivially fast: run on the socket thread (see the module docstring)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn) or inspect.isasyncgenfunction(self.fn)


_GATE_LOCK: Final = threading.Lock()  # makes a Gate's condition once, whichever thread asks first


class Gate:
    """A running task's cancel flag and, for a stream, its window (thread side).

    Its condition is made only when a thread first waits on it or must be woken: most tasks never
    stream nor get cancelled, and ``threading.Condition()`` is about 6,700 instructions (an RLock
    and bound methods, interpreted) that every task on a handler thread paid. Writers change the
    state first and then wake a waiter if a condition exists; a waiter makes the condition before it
    reads the state under it, so a change is either seen by that read or woken."""

    def __init__(self, window: int) -> None:
        self._cond: threading.Condition | None = None
        self.window = window
        self.acked = 0
        self.cancelled = False
        self._on_cancel: Callable[[], None] | None = None  # see on_cancel

    def on_cancel(self, fn: Callable[[], None] | None) -> None:
        """Call ``fn`` (from the thread that cancels) at a cancel from now on, or at once if one
        came: an async handler run here cancels its task so (``_aio.await_it``). Set before the
        flag is read, as a cancel sets the flag before it reads this: one of the two sees the other."""
        self._on_cancel = fn
        if fn is not None and self.cancelled:
            fn()

    def _condition(self) -> threading.Condition:
        c = self._cond
        if c is None:
            with _GATE_LOCK:
                c = self._cond
                if c is None:
                    c = self._cond = threading.Condition()
        return c

    def _wake(self) -> None:
        c = self._cond
        if c is not None:
            with c:
                c.notify_all()

    def is_set(self) -> bool:
        """The ``cancelled`` flag a :class:`~zmqdist.context.RequestContext` reads."""
        return self.cancelled

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()
        fn = self._on_cancel
        if fn is not None:
            fn()

    def open(self, acked: int) -> None:
        """The consumer acknowledged parts up to ``acked`` (the socket thread only)."""
        if acked > self.acked:
            self.acked = acked
            self._wake()

    def wait(self, seq: int, timeout: float) -> bool:
        """Wait until part ``seq`` may be sent; False if the task was stopped (or ``timeout``)."""
        c = self._condition()
        with c:
            c.wait_for(lambda: self.cancelled or seq < self.acked + self.window, max(0.0, timeout))
            return not self.cancelled and seq < self.acked + self.window


class AsyncGate:
    """The same for a task on the asyncio loop (opened from the socket thread, thread-safely)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.acked = 0
        self.cancelled = False
        self._event: asyncio.Event | None = None  # made by the first wait: most tasks never stream

    def is_set(self) -> bool:
        return self.cancelled

    def open(self, acked: int) -> None:  # on the loop
        if acked > self.acked:
            self.acked = acked
            if self._event is not None:
                self._event.set()

    def wait_for(self, seq: int) -> Awaitable[bool] | None:
        """None if part ``seq`` may go now; else what to await before asking again (the waiting
        itself is _aio's: a compiled coroutine must not await, see zmqdist/_aio.py)."""
        if seq < self.acked + self.window:
            return None
        event = self._event
        if event is None:
            event = self._event = asyncio.Event()
        event.clear()
        return event.wait()


def _text(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in if the exception's own ``__str__`` raises: a handler's odd
    exception must still become a failure for its caller, not kill the thread that ran it."""
    try:
        return str(exc)
    except BaseException as why:  # whatever __str__ raised
        return f"<str() of the exception raised {type(why).__name__}>"


def _failure(exc: BaseException) -> bytes:
    return p.pack_error(type(exc).__qualname__, _text(exc), "".join(traceback.format_exception(exc)))


def _raised(task: Execute, exc: BaseException, retry_ms: int | None = None) -> bytes:
    """Log a handler's exception (with its traceback; trace and service as log fields; a run its
    retry policy runs again at INFO, without) and return the failure payload for the client."""
    if retry_ms is not None:
        log.info(
            "handler of %s raised %s: %s (run %d; it runs again in %d ms; trace %s)",
            task.service,
            type(exc).__name__,
            _text(exc),
            task.attempt,
            retry_ms,
            task.trace,
            extra={"trace": task.trace, "service": task.service},
        )
        return _failure(exc)
    log.warning(
        "handler of %s raised %s: %s (trace %s)",
        task.service,
        type(exc).__name__,
        _text(exc),
        task.trace,
        exc_info=exc,
        extra={"trace": task.trace, "service": task.service},
    )
    return _failure(exc)


def _retry_ms(svc: Service, task: Execute, exc: BaseException, stopped: bool) -> int | None:
    """The delay the request's retry policy (the caller's, else the service's) asks, or None."""
    if stopped:
        return None
    policy = Retry.from_spec(task.retry) if task.retry else svc.retry
    return policy.decide(exc, task.attempt, random.random) if policy is not None else None


def _context(task: Execute, clock: Clock, flag: Gate | AsyncGate, report: Callable[[Any], None]) -> RequestContext:
    return RequestContext(task.key, task.service, task.attempt, task.deadline, task.trace, clock, flag, report)


def _reporter(task: Execute, codec: Codec | None, post: Post) -> Callable[[Any], None]:
    """What ``current_request().progress(value)`` calls: post the report for the socket thread."""
    ticket, session = _run_key(task)

    def report(value: Any) -> None:
        post(("progress", ticket, session, p.pack_value(value, codec)))

    return report


def _deferred_context(
    task: Execute, clock: Clock, gate: Gate | AsyncGate, codec: Codec | None, post: Post
) -> RequestContext:
    return _context(task, clock, gate, _reporter(task, codec, post))


# What a handler returns most often: values that are neither awaitable nor a generator, known by
# their exact type (inspect's checks go through the ABCs' isinstance, slow for every result).
_PLAIN_RESULTS: Final = frozenset({bytes, str, int, float, bool, type(None), list, dict, tuple})
# What every task sets, under Final names: C statics, where an imported name or a function taken
# as a value is read from the module's dict at every use (and a method looked up at every call).
_set_request: Final = REQUEST_VAR.set
_reset_request: Final = REQUEST_VAR.reset
_DEFERRED: Final = _deferred_context
# asyncio.Task as a C static, called directly: loop.create_task is an interpreted method that adds
# only checks this worker's own loop does not need (not closed while it runs tasks, no task factory)
_Task: Final = asyncio.Task
# Python 3.12+: a task can run its first step as it is made (eager_start), as its own current task
# and in its own context. A handler that does not wait ends there: no step scheduled through the
# loop's interpreted call_soon, and no second turn of the loop for it. (A flag, not an ``if`` on
# sys.version_info: mypy, and so mypyc, would drop that branch as unreachable for python 3.11.)
_EAGER: Final = sys.version_info >= (3, 12)


def _run_key(task: Execute) -> tuple[Any, Any]:
    """(ticket, session) of ``task`` as the objects it holds: compiled, reading them as its int
    fields unboxes them, and each use as a key or message field boxes them again (see
    protocol.Boxed)."""
    fields: tuple[Any, ...] = task
    return fields[0], fields[1]


def run_task(svc: Service, task: Execute, clock: Clock, codec: Codec | None, post: Post, gate: Gate) -> None:
    """Run a sync handler (decode, call, stream or encode) and post what it produced. Never raises."""
    ticket, session = _run_key(task)
    token = _set_request((_DEFERRED, (task, clock, gate, codec, post)))
    retry: int | None = None
    try:
        result = svc.fn(p.unpack_value(task.payload, codec))
        special = type(result) not in _PLAIN_RESULTS
        if special and inspect.isawaitable(result):
            result = asyncio.run(_aio.await_it(result, gate))
        elif special and inspect.isasyncgen(result):  # (in a handler process: async handlers run here)
            result = _aio.iterate(result, gate)
        if special and inspect.isgenerator(result):
            result = _drain(result, task, clock, codec, post, gate)
        elif task.window:
            post(("part", ticket, session, p.pack_value(result, codec)))  # a stream of one value
            result = None
        ok, payload = True, p.pack_value(result, codec)
    except BaseException as exc:  # a handler may raise anything; the worker must survive it
        retry = _retry_ms(svc, task, exc, gate.cancelled)
        ok, payload = False, _raised(task, exc, retry)
    finally:
        _reset_request(token)
    post(("done", ticket, session, ok, payload, retry))


def _drain(gen: Iterator[Any], task: Execute, clock: Clock, codec: Codec | None, post: Post, gate: Gate) -> Any:
    """Run a generator handler: its values as parts of a stream (each asked for only when it may be
    sent), or, for a caller that did not ask for a stream, as one list. Returns what it returns."""
    if not task.window:
        values = []
        for v in gen:
            if gate.cancelled:
                break
            values.append(v)
        return values
    seq = 0
    try:
        while True:
            if not gate.wait(seq, task.deadline - clock.now() + 1.0):
                return None  # stopped (cancelled, or the deadline passed): the result is CANCELLED
            try:
                value = next(gen)
            except StopIteration as stop:
                return stop.value
            post(("part", task.ticket, task.session, p.pack_value(value, codec)))
            seq += 1
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()


class _Live:
    """A task on the asyncio loop: its gate, its asyncio task, and whether that has started."""

    __slots__ = ("future", "gate", "started")

    def __init__(self, gate: AsyncGate) -> None:
        self.gate = gate
        self.future: Any = None
        self.started = False


class _Hand:
    """One handler thread's wake-up: the thread sleeps in ``sleep()`` until a ``wake(True)``. Its
    own queue, so a wake-up wakes that thread and no other."""

    def __init__(self) -> None:
        inbox: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self.sleep = inbox.get  # bound once: by name, each call looks the method up again
        self.wake = inbox.put


class Executors:
    """Owns the threads / loop / processes that run handlers for one worker.

    Thread tasks wait in one deque. A turn's tasks wake at most one idle thread, the one idle
    last (its memory still in the caches), through its own queue; a thread that takes a task while
    more wait wakes the next, so threads join only as long as tasks wait for them, one at a time.
    A shared queue woke a second idle thread at every task only for it to find nothing (two
    context switches and a GIL hand-over per request), and waking a thread per task at once had
    all of them fight for the GIL over a batch. No lock: the deque, the idle list and the flag
    change only in single C calls (atomic under the GIL, compiled or not), in an order that never
    leaves a task waiting while a thread sleeps (see _thread_main).
    """

    def __init__(
        self,
        services: dict[str, Service],
        concurrency: int,
        isolation: str,
        mailbox: Mailbox,
        clock: Clock,
        codec: Codec | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._services = services
        self._timer = timer  # times inline calls (the guard); a test gives a fake one
        self._clock = clock  # the worker's: a task's deadline was made with it
        self._mailbox = mailbox
        self._codec = codec
        self._turn: list[tuple[Execute, Gate]] = []  # thread tasks not handed to a thread yet: start()
        self._idle: list[_Hand] = []  # threads asleep, the last one idle at the end
        self._waiting: deque[tuple[Execute, Gate] | None] = deque()  # tasks for the threads; None: stop
        self._waking = False  # a thread was woken and has not looked at the tasks yet
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._gates: dict[tuple[int, int], Gate] = {}  # (ticket, session) of thread tasks
        self._live: dict[tuple[int, int], _Live] = {}  # (ticket, session) of asyncio tasks
        self._starting: list[tuple[Service, Execute, _Live]] = []  # async tasks not started yet: start()
        # async outcomes of this turn of the loop, posted together (_flush): one wake-up of the
        # socket thread for a batch, not one at its first outcome and a GIL fight for the rest
        self._outcomes: list[tuple[Any, ...]] = []
        self._flush_due = False  # a _flush is scheduled on the loop
        self._procs: Processes | None = None
        self.ready: list[tuple[Any, ...]] = []  # what inline handlers produced, for the socket thread
        self._demoted: set[str] = set()  # inline services whose handler turned out slow
        self._strikes: dict[str, int] = {}  # inline services: calls over the budget in a row
        self._inline_gate = Gate(0)  # never cancelled: nothing can arrive while an inline call runs
        # services run on the event loop, known once (Service.is_async inspects the function)
        self._async = frozenset(name for name, s in services.items() if s.is_async)
        if isolation == "process":
            self._procs = Processes(concurrency, mailbox, clock, codec)
        else:
            try:
                for i in range(concurrency):
                    t = threading.Thread(
                        target=self._thread_main, args=(_Hand(),), name=f"zmqdist-handler-{i}", daemon=True
                    )
                    t.start()
                    self._threads.append(t)
                if self._async:
                    self._loop = asyncio.new_event_loop()
                    self._loop_thread = threading.Thread(
                        target=self._loop.run_forever, name="zmqdist-asyncio", daemon=True
                    )
                    self._loop_thread.start()
            except RuntimeError as exc:  # "can't start new thread": out of memory, or of ulimit -u
                total = concurrency + (1 if self._async else 0)  # (async handlers: their event loop's)
                started = len(self._threads)
                loop = self._loop
                if loop is not None and self._loop_thread is not None and not self._loop_thread.is_alive():
                    self._loop = self._loop_thread = None  # (its thread did not start: nothing to stop)
                    loop.close()
                self.shutdown(wait=True)  # the threads started so far end (they were left idle for good)
                raise ZmqdistError(
                    f"cannot start the handler threads ({exc}): {started} of {total} started. The process is "
                    "out of threads or memory (ulimit -u, ulimit -v, the container's pids limit): lower concurrency"
                ) from exc

    @property
    def pools_replaced(self) -> int:
        """Handler processes replaced after they died."""
        return self._procs.replaced if self._procs is not None else 0

    def submit(self, task: Execute) -> None:
        """Run ``task``: at once if inline, else from the next :meth:`start`; what it produces
        arrives through the mailbox."""
        svc = self._services.get(task.service)
        if svc is None:
            err = LookupError(f"this worker has no handler for service {task.service!r}")
            self._mailbox.post(("done", task.ticket, task.session, False, _failure(err), None))
        elif self._procs is not None:
            self._procs.submit(svc, task)
        elif svc.inline and not task.window and task.service not in self._demoted:
            self._run_inline(svc, task)
        elif self._loop is not None and task.service in self._async:
            live = self._live[_run_key(task)] = _Live(AsyncGate(task.window))
            self._starting.append((svc, task, live))
        else:
            gate = self._gates[_run_key(task)] = Gate(task.window)
            self._turn.append((task, gate))  # handed to a thread by start(), with the rest of this turn

    def runs_here(self) -> bool:
        """True on a thread that runs this worker's handlers (a handler thread or the asyncio loop)."""
        t = threading.current_thread()
        return t is self._loop_thread or t in self._threads

    def start(self) -> None:
        """Start the tasks submitted since the last call: each thread task handed to its thread,
        and the async ones with one wake-up of the event loop for all of them (each
        call_soon_threadsafe writes to the loop's wake-up pipe). The socket thread calls it right
        before it waits, so a woken thread finds the GIL free instead of sleeping again on it
        while the socket thread ends its turn."""
        if self._turn:
            turn, self._turn = self._turn, []
            self._hand(turn)
        if self._starting and self._loop is not None:
            batch, self._starting = self._starting, []
            self._loop.call_soon_threadsafe(self._start_batch, batch)

    def _start_batch(self, batch: list[tuple[Service, Execute, _Live]]) -> None:
        """On the event loop: a task for each; one aborted before it started just ends."""
        loop = self._loop
        assert loop is not None
        for svc, task, live in batch:
            if live.gate.cancelled:
                self._ended(task, False, b"", None)
                continue
            # no done callback: run_handler posts the outcome itself, always once (a callback
            # costs every task a scheduled call on the loop)
            coro = _aio.run_handler(self, svc, task, live)
            if _EAGER:
                live.future = _Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
            else:
                live.future = _Task(coro, loop=loop)
        if _EAGER:  # the tasks that did not wait have ended: their outcomes go now
            self._flush()
        elif not self._flush_due:  # after the tasks' first steps, in the loop's next turn
            self._flush_due = True
            loop.call_soon(self._flush)

    def _cancel_live(self, live: _Live) -> None:
        """On the event loop: cancel a started async task (a task not started yet sees its gate)."""
        if live.future is not None and live.started:
            live.future.cancel()  # (one not started yet sees its gate cancelled and ends at once)

    def _run_inline(self, svc: Service, task: Execute) -> None:
        """Run ``task`` here, on the socket thread; move its service to the threads if it was slow."""
        t0 = self._timer()
        run_task(svc, task, self._clock, self._codec, self.ready.append, self._inline_gate)
        took = self._timer() - t0
        if took <= INLINE_BUDGET_S:
            if self._strikes:
                self._strikes.pop(task.service, None)
            return
        strikes = self._strikes[task.service] = self._strikes.get(task.service, 0) + 1
        if strikes >= INLINE_STRIKES or took > INLINE_LIMIT_S:
            self._demoted.add(task.service)
            log.warning(
                "the inline handler of %r took %.1f ms on the socket thread (budget %.1f ms): it runs on the "
                "handler threads from now on",
                task.service,
                took * 1000,
                INLINE_BUDGET_S * 1000,
                extra={"service": task.service, "trace": task.trace},
            )

    def take_ready(self) -> list[tuple[Any, ...]]:
        """What inline handlers produced since the last call (socket thread only)."""
        ready, self.ready = self.ready, []
        return ready

    def abort(self, a: Abort) -> None:
        """Stop the handler of ``a.ticket`` (see the module docstring)."""
        key = (a.ticket, a.session)
        gate = self._gates.get(key)
        if gate is not None:
            gate.cancel()
        live = self._live.get(key)
        if live is not None and self._loop is not None:
            live.gate.cancelled = True
            self._loop.call_soon_threadsafe(self._cancel_live, live)
        if self._procs is not None:
            self._procs.abort(a.ticket, a.session, self._services)

    def window(self, w: Window) -> None:
        """The consumer of ``w.ticket``'s stream took ``w.acked`` parts."""
        key = (w.ticket, w.session)
        gate = self._gates.get(key)
        if gate is not None:
            gate.open(w.acked)
        live = self._live.get(key)
        if live is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(live.gate.open, w.acked)
        if self._procs is not None:
            self._procs.send(w.ticket, w.session, ("window", w.ticket, w.acked))

    def _hand(self, items: Sequence[tuple[Execute, Gate] | None]) -> None:
        """Queue ``items`` (None: a thread stops) and wake the thread idle last, unless a thread
        is waking already: it takes them, and wakes the next if more wait."""
        self._waiting.extend(items)  # before the flag is read: see _thread_main
        if not self._waking:
            self._wake()

    def _wake(self) -> None:
        """Wake the thread idle last, if one is (each busy thread looks at the deque when it ends)."""
        idle = self._idle
        if idle:
            try:
                hand = idle.pop()
            except IndexError:  # (another thread took the last one meanwhile)
                return
            self._waking = True
            hand.wake(True)

    def _thread_main(self, hand: _Hand) -> None:
        """Take tasks from the deque until it is empty, then sleep in the idle list.

        Why no task waits while a thread sleeps: a queuing thread appends to the deque, then reads
        the flag; a woken thread clears the flag, then looks at the deque. So a queuer that saw the
        flag set (and woke nobody) queued before the waking thread looks. A thread going idle
        appends itself to the idle list, then looks at the deque once more: a task queued before
        that found no thread to wake, and the thread takes it itself (unless a waker took the
        thread from the list meanwhile: its wake-up is on the way)."""
        idle = self._idle
        waiting = self._waiting
        sleep = hand.sleep
        post = self._mailbox.post
        while True:
            got = False
            if waiting:
                try:
                    item = waiting.popleft()
                    got = True
                except IndexError:  # (another thread took it meanwhile)
                    pass
            if not got:
                idle.append(hand)
                if waiting:
                    try:
                        idle.remove(hand)  # nobody took this thread to wake it: take the task itself
                        continue
                    except ValueError:
                        pass  # a waker took it: its wake-up is on the way
                sleep()
                self._waking = False
                continue
            if waiting and not self._waking:  # more wait: the next thread joins
                self._wake()
            if item is None:
                return
            task, gate = item
            if gate.cancelled:  # cancelled before a thread was free to start it
                self._gates.pop(_run_key(task), None)
                post(("done", task.ticket, task.session, False, b"", None))
                continue
            try:
                run_task(self._services[task.service], task, self._clock, self._codec, post, gate)
            finally:
                self._gates.pop(_run_key(task), None)

    def _begin_async(self, svc: Service, task: Execute, live: _Live) -> Any:
        """On the event loop, as an async task's first step (zmqdist/_aio.py's run_handler):
        call its handler and return what it returned, to be awaited there; _aio.NOT_RUN if the
        task was aborted before. A task cancelled before its first step never runs the coroutine
        at all: _cancel_live leaves those to see their gate here instead."""
        live.started = True
        if live.gate.cancelled:
            return _aio.NOT_RUN
        # deferred, as on the threads (run_task): made only if the handler asks for it; the
        # variable is this task's own (each asyncio task runs in a copy of the context)
        _set_request((_DEFERRED, (task, self._clock, live.gate, self._codec, self._mailbox.post)))
        return svc.fn(p.unpack_value(task.payload, self._codec))

    def _post_part(self, task: Execute) -> Callable[[Any], None]:
        """What posts an async stream's parts, one value each."""
        codec, post = self._codec, self._mailbox.post
        ticket, session = _run_key(task)
        return lambda value: post(("part", ticket, session, p.pack_value(value, codec)))

    def _end_async(self, svc: Service, task: Execute, live: _Live, result: Any, error: BaseException | None) -> None:
        """An async task's outcome, posted exactly once whatever happens: its result packed, or
        its error (CancelledError included: the outcome is CANCELLED then)."""
        ok, payload, retry = False, b"", None  # what goes if the code below itself fails
        try:
            if error is None:
                try:
                    if task.window and not inspect.isasyncgenfunction(svc.fn):
                        self._post_part(task)(result)  # a stream of one value
                        result = None
                    ok, payload = True, p.pack_value(result, self._codec)
                except BaseException as exc:  # a value that cannot be packed fails its request
                    error = exc
            if error is not None:
                retry = _retry_ms(svc, task, error, live.gate.cancelled)
                payload = _raised(task, error, retry) if not live.gate.cancelled else b""
        finally:
            self._ended(task, ok, payload, retry)

    def _ended(self, task: Execute, ok: bool, payload: bytes, retry: int | None) -> None:
        """An async task's one outcome: it leaves the live tasks and goes to the socket thread."""
        self._live.pop(_run_key(task), None)
        self._outcomes.append(("done", task.ticket, task.session, ok, payload, retry))
        if not self._flush_due and self._loop is not None:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """On the event loop: post the async outcomes gathered so far, with one wake-up."""
        self._flush_due = False
        if self._outcomes:
            outcomes, self._outcomes = self._outcomes, []
            self._mailbox.post_all(outcomes)

    def shutdown(self, wait: bool) -> None:
        """Stop the threads (after running tasks when ``wait``) and every child process."""
        for gate in list(self._gates.values()):
            gate.cancel()  # a stream waiting for its consumer stops
        self._hand([None] * len(self._threads))
        if wait:
            for t in self._threads:
                t.join(5.0)
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5.0)
            if not self._loop.is_running():
                self._loop.close()
        if self._procs is not None:
            self._procs.shutdown()


# --- child processes ---------------------------------------------------------------------------


def _child_init(parent: int) -> None:
    """In each handler process: die with the worker, even if it is SIGKILLed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # another system: an orphan exits when its pipe closes
        pass
    if os.getppid() != parent:  # the worker died before that took effect
        os._exit(1)


class ChildTask:
    """A handler process's running task, as its reader thread sees it. A cancel can arrive
    before the task has started (the worker sends it right after the run, and the main thread has
    not taken the run yet): it is kept and applied at the start, where it was dropped before and the
    handler ran to its end. Only the next task can be cancelled early (the worker sends a run only
    once the last one is done), so one start clears what was kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ticket = -1
        self._gate: Gate | None = None
        self._early: set[int] = set()  # cancels of a task not started yet (or just ended)

    def start(self, ticket: int, gate: Gate) -> None:
        with self._lock:
            self._ticket, self._gate = ticket, gate
            if ticket in self._early:
                gate.cancel()
            self._early.clear()

    def end(self) -> None:
        with self._lock:
            self._gate = None

    def cancel(self, ticket: int) -> None:
        with self._lock:
            if self._gate is not None and self._ticket == ticket:
                self._gate.cancel()
            else:
                self._early.add(ticket)

    def window(self, ticket: int, acked: int) -> None:
        with self._lock:
            gate = self._gate if self._ticket == ticket else None
        if gate is not None:
            gate.open(acked)


def child_main(conn: Any, parent: int) -> None:
    """A handler process: run one task at a time from the worker; a reader thread takes the
    worker's window updates and cancels while the task runs. Only this thread sends."""
    _child_init(parent)
    conn.send(("ready",))  # the main module imported, and this function reached: see Processes
    incoming: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    current = ChildTask()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the worker is gone
            except Exception:  # a message that does not unpickle: say why, and die (the worker replaces us)
                traceback.print_exc()
                os._exit(3)
            kind = msg[0]
            if kind == "run":
                incoming.put(msg)
            elif kind == "stop":
                incoming.put(None)
                return
            elif kind == "window":
                current.window(msg[1], msg[2])
            elif kind == "cancel":
                current.cancel(msg[1])

    threading.Thread(target=reader, name="zmqdist-child-reader", daemon=True).start()
    send = conn.send
    while True:
        item = incoming.get()
        if item is None:
            return
        _, fn, retry, task, clock, codec = item
        svc = Service(fn, retry)
        gate = Gate(task.window)
        current.start(task.ticket, gate)
        run_task(svc, task, clock, codec, send, gate)
        current.end()


class _Slot:
    """One handler process, its pipe and the thread that reads it."""

    def __init__(self, ctx: Any, owner: Processes) -> None:
        here, there = ctx.Pipe()
        try:
            self.proc = ctx.Process(target=child_main, args=(there, os.getpid()), daemon=True)
            self.proc.start()
        except BaseException:  # (out of descriptors, processes or memory: nothing of it is kept)
            here.close()
            there.close()
            raise
        there.close()
        self.conn = here
        self.gone = False  # its process ended: no task is given to it (its replacement takes them)
        self.lock = threading.Lock()  # the socket thread sends; a replacement closes
        self.task: Execute | None = None
        self.sending: tuple[Service, Execute] | None = None  # a task not known to be in the pipe yet
        self.killed: Execute | None = None  # the task whose cancel killed the process on purpose
        self.ready = threading.Event()  # the process said it is ready (see Processes)
        self.reader = threading.Thread(target=owner.read, args=(self,), name="zmqdist-child", daemon=True)
        try:
            self.reader.start()
        except BaseException:  # (no thread to be had: the process goes too)
            self.proc.kill()
            self.proc.join(1.0)
            here.close()
            raise

    def send(self, msg: tuple[Any, ...]) -> bool:
        """Send ``msg`` to the process. False if it is gone (its reader replaces it). Raises what
        pickling ``msg`` raised (a handler or a value that cannot go to another process)."""
        with self.lock:
            try:
                self.conn.send(msg)
                return True
            except (OSError, ValueError):
                return False


class Processes:
    """A fixed set of handler processes, one task each at a time (see the module docstring).

    It returns from its start only once every process has said it is ready, and raises if one
    exits first or is not ready within ``start_s``: a spawned process imports the main module
    again, and a script that starts its worker outside ``if __name__ == "__main__":`` makes each
    one fail there (or run the script's work). Replaced at once and failing again, such processes
    left every request waiting for a process that never came, and spawned without end."""

    def __init__(self, n: int, mailbox: Mailbox, clock: Clock, codec: Codec | None, start_s: float = 60.0) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self._mailbox = mailbox
        self._clock = clock
        self._codec = codec
        self._lock = threading.Lock()
        self._closed = False
        self._starting = True  # a process that dies before it is ready now fails the start
        self._waiting: list[tuple[Service, Execute]] = []  # more tasks than processes (never, normally)
        self.replaced = 0
        self._unreplaced_log = RateLimitedLog(log, UNREPLACED_LOG_S, 1)  # replacements that failed
        self._slots: list[_Slot] = []
        # Replacements start on this thread, not on the reader thread that saw a process die: a
        # process's parent-death signal (_child_init) follows the thread that started it, and a
        # reader thread ends with its process (a replacement was SIGKILLed when it ended).
        self._dead: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()
        self._keeper = threading.Thread(target=self._keep, name="zmqdist-keeper", daemon=True)
        self._keeper.start()
        # At interpreter exit multiprocessing terminates its daemon processes, ours too: replaced
        # then, each new one would find its parent gone and print a traceback. Registered after
        # multiprocessing's, this runs before it.
        atexit.register(self._exiting)
        try:
            for _ in range(n):
                with self._lock:  # (a slot's reader may look for it in the list at once)
                    self._slots.append(_Slot(self._ctx, self))
        except Exception as exc:  # out of processes, memory or descriptors: those started end
            started = len(self._slots)
            self.shutdown()
            raise ZmqdistError(
                f"cannot start the handler processes ({exc}): {started} of {n} started. The process is out of "
                "processes, memory or file descriptors (ulimit -u, -v, -n; a container's limits): lower concurrency"
            ) from exc
        self._await_ready(start_s)
        with self._lock:
            self._starting = False

    def _await_ready(self, start_s: float) -> None:
        """Wait until every process is ready; raise :class:`ZmqdistError` (all stopped) if one
        exits first or is still not ready after ``start_s``. One killed by a signal (the OOM
        killer, an operator) is replaced and waited for instead: that is no fault of the main
        module, and the whole worker used to exit for it, with a message blaming the script."""
        end = time.monotonic() + start_s
        i = 0
        while i < len(self._slots):
            slot = self._slots[i]  # (a replacement takes the same place)
            if slot.ready.wait(0.05):
                i += 1
                continue
            code = slot.proc.exitcode
            if code is None and time.monotonic() < end:
                continue
            if code is not None and code < 0 and time.monotonic() < end:
                log.warning("a handler process was killed (signal %d) as the worker started: replaced", -code)
                self._dead.put(slot)  # the keeper replaces it (its reader left that to this start)
                while self._slots[i] is slot and time.monotonic() < end and not self._closed:
                    time.sleep(0.05)
                continue
            self.shutdown()
            what = f"exited (code {code})" if code is not None else f"was not ready after {start_s:g} s"
            raise ZmqdistError(
                f"isolation='process': a handler process {what} as the worker started. Each one is "
                "spawned and imports the main module again: a script must start its worker (and "
                'anything else it runs) under `if __name__ == "__main__":`; the process\'s own '
                "error, if it had one, is printed above it"
            )

    def submit(self, svc: Service, task: Execute) -> None:
        with self._lock:
            slot = next((s for s in self._slots if s.task is None and s.killed is None and not s.gone), None)
            if slot is None:
                self._waiting.append((svc, task))
                return
            slot.task = task
        self._run(slot, svc, task)

    def _run(self, slot: _Slot, svc: Service, task: Execute) -> None:
        slot.sending = (svc, task)  # until it is in the pipe: a process gone before runs it afresh
        try:
            if slot.send(("run", svc.fn, svc.retry, task, self._clock, self._codec)):
                slot.sending = None
            else:
                log.debug("handler process gone before its task was sent: its replacement runs it")
        except Exception as exc:  # pickling: e.g. a lambda as handler, or a codec of lambdas
            slot.sending = None
            why = RuntimeError(f"the handler of {task.service!r} cannot run in a child process: {exc}")
            self._mailbox.post(("done", task.ticket, task.session, False, _failure(why), None))
            self._next(slot)

    def _find(self, ticket: int, session: int) -> _Slot | None:
        for s in self._slots:
            t = s.task
            if t is not None and t.ticket == ticket and t.session == session:
                return s
        return None

    def send(self, ticket: int, session: int, msg: tuple[Any, ...]) -> None:
        slot = self._find(ticket, session)
        if slot is not None:
            slot.send(msg)

    def abort(self, ticket: int, session: int, services: dict[str, Service]) -> None:
        with self._lock:
            for i, (_, t) in enumerate(self._waiting):
                if t.ticket == ticket and t.session == session:
                    del self._waiting[i]
                    self._mailbox.post(("done", ticket, session, False, b"", None))
                    return
            # Found and killed under the lock: the slot's reader, its task done, could otherwise
            # give it the next task in between, and that task would be killed for this cancel.
            slot = self._find(ticket, session)
            task = slot.task if slot is not None else None
            if slot is None or task is None:
                return
            svc = services.get(task.service)
            if svc is not None and svc.terminate_on_cancel:
                slot.killed = task
                slot.proc.kill()  # its reader sees the pipe close, reports the task, replaces it
                return
        slot.send(("cancel", ticket))

    def read(self, slot: _Slot) -> None:
        """A slot's reader thread: pass on what its process sends; replace it if it dies."""
        post = self._mailbox.post
        while True:
            try:
                msg = slot.conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # cannot happen with our own messages; if it does, start afresh
                log.exception("a message from a handler process could not be read: the process is replaced")
                slot.proc.kill()
                continue
            if msg[0] == "ready":
                slot.ready.set()
                continue
            post(msg)
            if msg[0] == "done":
                self._next(slot)
        self._died(slot)

    def _next(self, slot: _Slot) -> None:
        with self._lock:
            slot.task = None
            if not self._waiting or slot.killed is not None:  # (its replacement takes the next one)
                return
            svc, task = self._waiting.pop(0)
            slot.task = task
        self._run(slot, svc, task)

    def _died(self, slot: _Slot) -> None:
        """A slot's reader thread, its process gone: have the keeper replace it."""
        slot.gone = True
        if not slot.ready.is_set() and slot.killed is None:
            with self._lock:
                if self._closed or self._starting or slot not in self._slots:
                    return  # the start fails or replaces it (see _await_ready)
            # A replacement that never came up would fail the same way again at once: not a loop.
            slot.proc.join(1.0)
            log.warning(
                "a handler process exited before it was ready (exit code %s): replaced in 1 s", slot.proc.exitcode
            )
            time.sleep(1.0)
        self._dead.put(slot)

    def _keep(self) -> None:
        """The keeper thread: replace each dead slot's process, until shutdown says None, or
        until the interpreter exits: Python 3.12+ refuses a new thread (a replacement's reader)
        from the moment it begins to exit, before sys.is_finalizing() says so, when the main
        thread has already ended; it printed a traceback at exit."""
        while (slot := self._dead.get()) is not None:
            try:
                self._replace(slot)
            except Exception as exc:
                if isinstance(exc, RuntimeError) and (sys.is_finalizing() or not threading.main_thread().is_alive()):
                    return
                # No process (or no thread) to be had now: out of file descriptors, processes or
                # memory. (This thread used to die of it, and the slot stayed dead for good,
                # holding its task.) Try again until it can; meanwhile the worker runs with fewer
                # processes, and the dead one's task is reported when its replacement starts.
                self._unreplaced_log.log(
                    logging.ERROR,
                    "unreplaced",
                    time.monotonic(),
                    "a handler process could not be replaced (%s: %s): tried again every %.0f s; the worker "
                    "runs with one process less meanwhile",
                    type(exc).__name__,
                    exc,
                    REPLACE_RETRY_S,
                )
                time.sleep(REPLACE_RETRY_S)  # (this thread's own wait: it replaces nothing else meanwhile)
                self._dead.put(slot)

    def _replace(self, slot: _Slot) -> None:
        """Start a process in place of ``slot``'s, report the task it held, and give the new one
        the next waiting task. That is decided under the lock, as the new slot enters the list: a
        submit after it finds the slot taken or free, and nothing clears what it gave the slot
        (clearing it afterwards lost the slot's task: a cancel of it found no process to tell).
        A task the dead process never got (given to it as it died idle, before its reader saw
        that: the send failed) is not its to fail: the new process runs it first."""
        with self._lock:
            if self._closed or slot not in self._slots:
                return
            task = slot.task
            unsent = slot.sending if slot.sending is not None and slot.sending[1] is task else None
            slot.proc.join(1.0)
            code = slot.proc.exitcode
            i = self._slots.index(slot)
            fresh = _Slot(self._ctx, self)  # (may raise: nothing has changed then, see _keep)
            self.replaced += 1
            self._slots[i] = fresh
            if unsent is not None and slot.killed is not task and slot.ready.is_set():
                nxt: tuple[Service, Execute] | None = unsent
                task = None  # the process died idle: nothing of it to report (one that never
                # came up fails its task as before: run again, it could wait for ever)
            else:
                nxt = self._waiting.pop(0) if self._waiting else None
            if nxt is not None:
                fresh.task = nxt[1]
        with slot.lock:
            slot.conn.close()
        if task is not None:
            if slot.killed is task:
                self._mailbox.post(("done", task.ticket, task.session, False, b"", None))
            else:
                log.warning(
                    "the process running the handler of %s died (exit code %s): replaced",
                    task.service,
                    code,
                    extra={"trace": task.trace, "service": task.service},
                )
                why = RuntimeError(
                    f"the process running the handler of {task.service!r} died (exit code {code}); "
                    "the worker replaced it"
                )
                self._mailbox.post(("done", task.ticket, task.session, False, _failure(why), None))
        elif slot.ready.is_set() and slot.killed is None:  # idle (the OOM killer, an operator?): nothing lost
            log.warning("a handler process died while idle (exit code %s): replaced", code)
        if nxt is not None:
            self._run(fresh, *nxt)

    def _exiting(self) -> None:
        with self._lock:
            self._closed = True  # nothing is replaced from here on

    def shutdown(self) -> None:
        atexit.unregister(self._exiting)
        with self._lock:
            self._closed = True
            slots = list(self._slots)
        self._dead.put(None)  # the keeper ends (it replaces nothing once closed)
        for slot in slots:
            slot.send(("stop",))
        for slot in slots:
            slot.proc.join(0.5)
            if slot.proc.is_alive():
                slot.proc.kill()  # a handler stuck in a loop must not outlive its worker
                slot.proc.join(2.0)
            with slot.lock:
                slot.conn.close()
