"""Running handlers off the socket thread: threads, an asyncio loop, or child processes.

Every executor reports a finished task by posting ``("done", ticket, session, ok, payload)`` to
the worker's mailbox. Handlers never run on the socket thread, so heartbeats keep flowing while
they work; see docs/worker.md for what C code that holds the GIL does, and ``isolation="process"``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from zmqdist import protocol as p
from zmqdist.clock import Clock
from zmqdist.context import RequestContext, reset_current, set_current
from zmqdist.core.worker import Execute
from zmqdist.transport import Mailbox

log = logging.getLogger(__name__)
Handler = Callable[[Any], Any]


def _failure(exc: BaseException) -> bytes:
    return p.pack_error(type(exc).__qualname__, str(exc), "".join(traceback.format_exception(exc)))


def _context(task: Execute, clock: Clock) -> RequestContext:
    return RequestContext(task.key, task.service, task.attempt, task.deadline, task.trace, clock)


def run_sync(fn: Handler, task: Execute, clock: Clock) -> tuple[bool, bytes]:
    """Decode, call ``fn``, encode; return (ok, payload). Never raises."""
    token = set_current(_context(task, clock))
    try:
        result = fn(p.unpack_value(task.payload))
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return True, p.pack_value(result)
    except BaseException as exc:  # a handler may raise anything; the worker must survive it
        log.info("handler of %s raised %s: %s (trace %s)", task.service, type(exc).__name__, exc, task.trace)
        return False, _failure(exc)
    finally:
        reset_current(token)


async def _await(aw: Any) -> Any:
    return await aw


def _process_entry(fn: Handler, task: Execute, clock: Clock) -> tuple[bool, bytes]:
    return run_sync(fn, task, clock)


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
        self._pool: ProcessPoolExecutor | None = None
        self._concurrency = concurrency
        if isolation == "process":
            import multiprocessing

            self._pool = ProcessPoolExecutor(concurrency, mp_context=multiprocessing.get_context("spawn"))
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
            fut = self._pool.submit(_process_entry, fn, task, self._clock)
            fut.add_done_callback(functools.partial(self._process_done, task))
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
            log.info("handler of %s raised %s: %s (trace %s)", task.service, type(exc).__name__, exc, task.trace)
            ok, payload = False, _failure(exc)
        self._mailbox.post(("done", task.ticket, task.session, ok, payload))

    def _process_done(self, task: Execute, fut: Future[tuple[bool, bytes]]) -> None:
        try:
            ok, payload = fut.result()
        except BaseException as exc:  # the child died (BrokenProcessPool) or could not pickle
            ok, payload = False, _failure(exc)
        self._mailbox.post(("done", task.ticket, task.session, ok, payload))

    def shutdown(self, wait: bool) -> None:
        """Stop the threads (after running tasks when ``wait``)."""
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
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
