"""The soak's workers, one per way a handler can run: ``zmqdist worker soakworker:worker`` (handler
threads), ``soakworker:aworker`` (the same services as async handlers, on the worker's event loop),
``soakworker:iworker`` (on the socket thread: "work", "flaky" and "mdpwork" are inline; a
stream's handler runs on the threads there, as it does on any worker) and ``soakworker:pworker``
(``isolation="process"``: each handler runs in one of the worker's child processes, which import
this module again and find the handlers by name). tests/chaos is on PYTHONPATH.

Every execution is written (the request's number, one line, flushed before the work) to
``$SOAK_LOG_DIR/exec-MODE-PID.log``, so the soak counts how often each request ran, kills
included, and how many each mode ran.
"""

import asyncio
import os
import time

from zmqdist import Worker, current_request

INLINE_MAX_MS = 1  # an inline handler sleeps at most this: a slower one would be moved to the threads
ENDPOINT = "tcp://127.0.0.1:1"  # the soak gives --connect


def answer(i: int) -> int:
    """The value a correct worker returns for request ``i`` (the soak checks it)."""
    return (i * 7919) % 1_000_003


class _Executions:
    """This process's execution log, opened by the first execution (a mode's module-level Worker
    that never runs here writes nothing)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._log = None

    def write(self, i: int) -> None:
        if self._log is None:
            path = os.path.join(os.environ.get("SOAK_LOG_DIR", "."), f"exec-{self.mode}-{os.getpid()}.log")
            self._log = open(path, "a", buffering=1)  # kept open for the process's life
        self._log.write(f"{i}\n")


def _flaky(x, runs: _Executions):
    """Fails (ValueError) on the first ``fail`` runs of a request (its run number is its attempt:
    every run counts, those cut by a fault too); the caller's retry policy runs it again."""
    i, run = x["i"], current_request().attempt
    if run <= x["fail"]:
        raise ValueError(f"run {run} of {i} fails on purpose")
    runs.write(i)
    return {"i": i, "v": answer(i)}


def _mdpwork(x, runs: _Executions) -> bytes:
    """For Majordomo clients: the body (one frame, the request's number) arrives as bytes, and a
    bytes value goes back as one frame: the number and its answer."""
    i = int(x)
    runs.write(i)
    return b"%d %d" % (i, answer(i))


def _work(x, runs: _Executions, most: float | None = None):
    """ "work": the answer to request ``x["i"]``, after ``x["ms"]`` (at most ``most``) of sleep."""
    i = x["i"]
    runs.write(i)
    if x.get("ms"):
        time.sleep((x["ms"] if most is None else min(x["ms"], most)) / 1000)
    return {"i": i, "v": answer(i)}


def _parts(x, runs: _Executions):
    """ "parts": a stream of ``n`` parts, each naming its request and place (the soak checks their
    order)."""
    i = x["i"]
    runs.write(i)
    for k in range(x["n"]):
        if x.get("ms"):
            time.sleep(x["ms"] / 1000)
        yield {"i": i, "k": k, "v": answer(i) + k}
    return {"i": i, "v": answer(i)}


def threaded(mode: str, inline: bool) -> Worker:
    """Handlers that run on threads or, ``inline``, on the socket thread (sleeping at most
    INLINE_MAX_MS there)."""
    w = Worker([ENDPOINT], concurrency=8)
    runs = _Executions(mode)
    most = INLINE_MAX_MS if inline else None

    @w.service("parts")
    def parts(x):
        return (yield from _parts(x, runs))

    w.add_service("work", lambda x: _work(x, runs, most), inline=inline)
    w.add_service("mdpwork", lambda x: _mdpwork(x, runs), inline=inline)
    w.add_service("flaky", lambda x: _flaky(x, runs), inline=inline)
    return w


def coroutines() -> Worker:
    """The same services as async handlers (a stream is an async generator)."""
    w = Worker([ENDPOINT], concurrency=8)
    runs = _Executions("async")

    @w.service("work")
    async def work(x):
        i = x["i"]
        runs.write(i)
        if x.get("ms"):
            await asyncio.sleep(x["ms"] / 1000)
        return {"i": i, "v": answer(i)}

    @w.service("parts")
    async def parts(x):
        i = x["i"]
        runs.write(i)
        for k in range(x["n"]):
            if x.get("ms"):
                await asyncio.sleep(x["ms"] / 1000)
            yield {"i": i, "k": k, "v": answer(i) + k}

    @w.service("mdpwork")
    async def mdpwork(x):
        return _mdpwork(x, runs)

    @w.service("flaky")
    async def flaky(x):
        return _flaky(x, runs)

    return w


_in_child = _Executions("process")  # a handler process's own log (each child imports this module)


def p_work(x):
    """ "work" in a handler process, found by name there (the services below likewise)."""
    return _work(x, _in_child)


def p_parts(x):
    return (yield from _parts(x, _in_child))


def p_mdpwork(x):
    return _mdpwork(x, _in_child)


def p_flaky(x):
    return _flaky(x, _in_child)


def processes() -> Worker:
    """The same services, each run in one of 4 handler processes (the soak SIGKILLs them too), and
    "killwork": "work" whose cancel kills the handler's process (terminate_on_cancel)."""
    w = Worker([ENDPOINT], concurrency=4, isolation="process")
    for name, fn in (("work", p_work), ("parts", p_parts), ("mdpwork", p_mdpwork), ("flaky", p_flaky)):
        w.add_service(name, fn)
    w.add_service("killwork", p_work, terminate_on_cancel=True)
    return w


worker = threaded("threads", inline=False)
iworker = threaded("inline", inline=True)
aworker = coroutines()
pworker = processes()
