"""Running handlers off the socket thread: threads, an asyncio loop, or child processes.

Every executor reports a finished task by posting ``("done", ticket, session, ok, payload)`` to
the worker's mailbox. Handlers never run on the socket thread, so heartbeats keep flowing while
they work; see docs/worker.md for what C code that holds the GIL does, and ``isolation="process"``.

Child processes (``isolation="process"``) die with their worker, even a SIGKILLed one (Linux's
parent-death signal), so a worker never leaves processes behind. A child that dies (a crash,
``os._exit``, a signal) breaks its pool: the pool is replaced at once and the worker goes on. Every
task that was in the broken pool runs once more in the new one (it may not be the one whose
process died); a task that is in a pool when it breaks a second time ends in a clear error.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import queue
import signal
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from zmqdist import protocol as p
from zmqdist.clock import Clock
from zmqdist.context import RequestContext, reset_current, set_current
from zmqdist.core.worker import Execute
from zmqdist.transport import Mailbox

log = logging.getLogger(__name__)
Handler = Callable[[Any], Any]
MAX_TRIES = 2  # runs of a task whose process pool broke under it: the second break fails it


def _failure(exc: BaseException) -> bytes:
    return p.pack_error(type(exc).__qualname__, str(exc), "".join(traceback.format_exception(exc)))


def _context(task: Execute, clock: Clock) -> RequestContext:
    return RequestContext(task.key, task.service, task.attempt, task.deadline, task.trace, clock)


def _raised(task: Execute, exc: BaseException) -> bytes:
    """Log a handler's exception (with its traceback; trace and service as log fields) and
    return the failure payload for the client."""
    log.warning(
        "handler of %s raised %s: %s (trace %s)",
        task.service,
        type(exc).__name__,
        exc,
        task.trace,
        exc_info=exc,
        extra={"trace": task.trace, "service": task.service},
    )
    return _failure(exc)


def run_sync(fn: Handler, task: Execute, clock: Clock) -> tuple[bool, bytes]:
    """Decode, call ``fn``, encode; return (ok, payload). Never raises."""
    token = set_current(_context(task, clock))
    try:
        result = fn(p.unpack_value(task.payload))
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return True, p.pack_value(result)
    except BaseException as exc:  # a handler may raise anything; the worker must survive it
        return False, _raised(task, exc)
    finally:
        reset_current(token)


async def _await(aw: Any) -> Any:
    return await aw


def _process_entry(fn: Handler, task: Execute, clock: Clock) -> tuple[bool, bytes]:
    return run_sync(fn, task, clock)


def _child_init(parent: int) -> None:
    """In each handler process: die with the worker, even if it is SIGKILLed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # another system: an orphan exits when its pipe closes
        pass
    if os.getppid() != parent:  # the worker died before that took effect
        os._exit(1)


class Executors:
    """Owns the threads / loop / process pool that run handlers for one worker."""

    def __init__(
        self, handlers: dict[str, Handler], concurrency: int, isolation: str, mailbox: Mailbox, clock: Clock
    ) -> None:
        self._handlers = handlers
        self._clock = clock  # the worker's: a task's deadline was made with it
        self._mailbox = mailbox
        self._isolation = isolation
        self._queue: queue.SimpleQueue[Execute | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._concurrency = concurrency
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()  # the socket thread submits, pool callback threads replace
        self._tries: dict[int, int] = {}  # ticket -> runs begun in a process pool
        self.pools_replaced = 0
        if isolation == "process":
            self._pool = self._new_pool()
        else:
            for i in range(concurrency):
                t = threading.Thread(target=self._thread_main, name=f"zmqdist-handler-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        if any(inspect.iscoroutinefunction(h) for h in handlers.values()) and isolation != "process":
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._loop.run_forever, name="zmqdist-asyncio", daemon=True)
            self._loop_thread.start()

    def submit(self, task: Execute) -> None:
        """Start ``task``; its completion arrives through the mailbox."""
        fn = self._handlers.get(task.service)
        if fn is None:
            err = LookupError(f"this worker has no handler for service {task.service!r}")
            self._mailbox.post(("done", task.ticket, task.session, False, _failure(err)))
        elif self._pool is not None:
            self._to_pool(fn, task)
        elif self._loop is not None and inspect.iscoroutinefunction(fn):
            asyncio.run_coroutine_threadsafe(self._run_async(fn, task), self._loop)
        else:
            self._queue.put(task)

    def _thread_main(self) -> None:
        get = self._queue.get
        post = self._mailbox.post
        handlers = self._handlers
        while True:
            task = get()
            if task is None:
                return
            ok, payload = run_sync(handlers[task.service], task, self._clock)
            post(("done", task.ticket, task.session, ok, payload))

    async def _run_async(self, fn: Handler, task: Execute) -> None:
        set_current(_context(task, self._clock))
        try:
            result = await fn(p.unpack_value(task.payload))
            ok, payload = True, p.pack_value(result)
        except BaseException as exc:
            ok, payload = False, _raised(task, exc)
        self._mailbox.post(("done", task.ticket, task.session, ok, payload))

    # --- child processes ------------------------------------------------------------------------

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(
            self._concurrency,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=(os.getpid(),),
        )

    def _to_pool(self, fn: Handler, task: Execute) -> None:
        """Run ``task`` in a child process (from the socket thread or a pool's callback)."""
        with self._pool_lock:
            if self._pool is None:
                return  # shut down
            try:
                fut = self._pool.submit(_process_entry, fn, task, self._clock)
            except BrokenProcessPool:
                self._replace(self._pool)
                fut = self._pool.submit(_process_entry, fn, task, self._clock)
            pool = self._pool
        self._tries[task.ticket] = self._tries.get(task.ticket, 0) + 1
        fut.add_done_callback(functools.partial(self._process_done, fn, task, pool))

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """(Lock held.) A process of ``broken`` died: a new pool takes its place."""
        if self._pool is broken:
            self.pools_replaced += 1
            log.warning("a handler process died: its pool of %d processes is replaced", self._concurrency)
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()

    def _process_done(
        self, fn: Handler, task: Execute, pool: ProcessPoolExecutor, fut: Future[tuple[bool, bytes]]
    ) -> None:
        try:
            ok, payload = fut.result()
        except BrokenProcessPool as exc:  # a process of its pool died while the task was in it
            with self._pool_lock:
                if self._pool is not None:
                    self._replace(pool)
            tries = self._tries.get(task.ticket, 0)
            if tries < MAX_TRIES and self._pool is not None:
                self._to_pool(fn, task)
                return
            why = RuntimeError(
                f"the process running the handler of {task.service!r} died ({exc}): the worker replaced it; "
                f"this request was in the pool each time it broke ({tries} runs)"
            )
            ok, payload = False, _failure(why)
        except BaseException as exc:  # the value or the result could not be pickled
            ok, payload = False, _failure(exc)
        self._tries.pop(task.ticket, None)
        self._mailbox.post(("done", task.ticket, task.session, ok, payload))

    def shutdown(self, wait: bool) -> None:
        """Stop the threads (after running tasks when ``wait``) and every child process."""
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join(5.0)
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5.0)
            if not self._loop.is_running():
                self._loop.close()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            children = getattr(pool, "_processes", None) or {}  # the pool's own table: no public one
            for proc in list(children.values()):
                proc.terminate()  # a handler stuck in a loop must not outlive its worker
            pool.shutdown(wait=True, cancel_futures=True)
