"""The coroutines that wait for something, kept out of the compiled modules on purpose.

A coroutine compiled by mypyc passes an exception thrown into it (a task's cancel, a failed future)
on to what it awaits with ``throw(type, value, traceback)``, the form Python 3.12 deprecated
(mypyc/mypyc#1214). With warnings as errors (pytest's ``-W error``, common in applications' test
suites) that DeprecationWarning replaced the exception: an ``AsyncClient.call`` that failed raised
it instead of its RemoteError, and a cancel or an ``asyncio.timeout`` never reached an async handler.
These run interpreted (this module is not in ``_native.MODULES``), so the compiled callers hand the
waiting to them and never await themselves; they touch the objects they get by attribute only.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future
from types import CoroutineType
from typing import Any, Final

NOT_RUN: Final = object()  # Executors._begin_async: the task was cancelled before its handler ran


async def run_handler(ex: Any, svc: Any, task: Any, live: Any) -> None:
    """An async handler's task on the worker's event loop: ``ex._begin_async`` calls the handler,
    this waits for what it returned, ``ex._end_async`` posts the outcome (exactly once, whatever
    happened: a CancelledError is an outcome too, not re-raised)."""
    result: Any = None
    error: BaseException | None = None
    try:
        result = ex._begin_async(svc, task, live)
        if result is NOT_RUN:
            ex._ended(task, False, b"", None)
            return
        if type(result) is CoroutineType:  # what an async def handler returns: no inspect call
            result = await result
        elif inspect.isasyncgen(result):
            result = await drain(result, task.window, live.gate, ex._post_part(task))
        elif inspect.isawaitable(result):
            result = await result
    except BaseException as exc:
        error = exc
    ex._end_async(svc, task, live, result, error)


async def drain(agen: AsyncIterator[Any], window: int, gate: Any, post: Callable[[Any], None]) -> Any:
    """An async generator handler's values: all of them as a list (no stream), or each ``post``ed
    as the stream's consumer makes room for it (``gate.wait_for``)."""
    if not window:
        return [v async for v in agen]
    seq = 0
    it = agen.__aiter__()
    try:
        while True:
            while (room := gate.wait_for(seq)) is not None:
                await room
            try:
                value = await it.__anext__()
            except StopAsyncIteration:
                return None
            post(value)
            seq += 1
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def iterate(agen: Any, gate: Any = None) -> Iterator[Any]:
    """An async generator a handler process (or a sync handler) returned, as a generator: each
    value made on a private event loop, closed with it (``close()`` closes the async generator
    first). A handler process has no event loop of its own: it runs one task at a time. A cancel
    (``gate``) cancels the step that waits, as :func:`await_it` does."""
    loop = asyncio.new_event_loop()
    it = agen.__aiter__()
    try:
        while True:
            try:
                value = loop.run_until_complete(await_it(it.__anext__(), gate))
            except StopAsyncIteration:
                return
            yield value
    finally:
        try:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                loop.run_until_complete(aclose())
        finally:
            loop.close()


async def await_it(aw: Any, gate: Any = None) -> Any:
    """What a sync handler returned that is awaitable (an async handler, in a handler process),
    run to its end on this thread's loop (``asyncio.run``). A cancel (``gate``, set from another
    thread) cancels its task, as one on the worker's event loop is: with the flag alone, a
    coroutine waiting 50 s held its process for the 50 s."""
    if gate is None:
        return await aw
    task = asyncio.ensure_future(aw)
    loop = asyncio.get_running_loop()

    def cancel() -> None:
        try:
            loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:  # the loop has closed: the task is over
            pass

    if gate.cancelled:
        task.cancel()  # before its first step: the handler never runs
    else:
        gate.on_cancel(cancel)  # (calls it at once if a cancel came meanwhile)
    try:
        return await task
    finally:
        gate.on_cancel(None)


async def call(submit: Callable[[], Any], on_progress: Callable[[Any], None] | None) -> Any:
    """AsyncClient.call: the request goes out (``submit()``, a RequestFuture) when the coroutine
    first runs, as it always did."""
    fut = submit()
    if on_progress is not None:
        loop = asyncio.get_running_loop()
        fut.add_progress_callback(lambda v: loop.call_soon_threadsafe(on_progress, v))
    return await asyncio.wrap_future(fut)


async def gather(submit: Callable[[Any], Future[Any]], values: Iterable[Any]) -> list[Any]:
    """AsyncClient.gather: every value's request at once, the results in order."""
    futs = [asyncio.wrap_future(submit(v)) for v in values]
    return list(await asyncio.gather(*futs))


async def next_part(stream: Any) -> Any:
    """AsyncStream.__anext__: the next part (the task iterating cancelled: so is the request)."""
    if stream._ended:
        raise StopAsyncIteration
    aio = stream._sink.aio
    assert aio is not None
    try:
        return stream._take(await aio.get())
    except StopIteration:
        raise StopAsyncIteration from None
    except asyncio.CancelledError:
        stream.cancel()
        raise
