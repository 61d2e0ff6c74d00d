"""Workers used by the integration tests (imported by `zmqdist worker testworkers:NAME`)."""

import asyncio
import math
import os
import re
import time

from zmqdist import Worker, current_request

echo = Worker(["tcp://127.0.0.1:5555"], concurrency=2)


@echo.service("echo")
def _echo(x):
    time.sleep(0.001)
    return [x, os.getpid()]


@echo.service("slow")
def _slow(x):
    time.sleep(x)
    return os.getpid()


@echo.service("ctx")
def _ctx(_x):
    c = current_request()
    return {"key": c.key, "attempt": c.attempt, "remaining": c.remaining()}


def spin(seconds):
    """Pure-Python CPU work: the interpreter switches threads every 5 ms, heartbeats go on."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def _regex_time(n):
    t0 = time.perf_counter()
    re.match(r"(a+)+b", "a" * n)
    return time.perf_counter() - t0


def hold_gil(seconds):
    """C code that keeps the GIL for at least about ``seconds`` in one go: a catastrophic regex
    backtrack, each extra "a" doubling its time. Timed here, at the call, at the best of 5 (a
    timing taken while another process had the core reads long, and the hold came out short: the
    once-at-import timing, rounded to the nearest power, held it about 1 s on a loaded hour), and
    rounded up: the hold is from ``seconds`` to twice that."""
    t18 = max(min(_regex_time(18) for _ in range(5)), 1e-5)
    n = 18 + max(0, math.ceil(math.log2(seconds / t18)))
    t0 = time.monotonic()
    re.match(r"(a+)+b", "a" * n)
    return time.monotonic() - t0


def echo_fn(x):
    return x


gil = Worker(["tcp://127.0.0.1:5555"], concurrency=1)
gil.add_service("spin", spin)
gil.add_service("hold_gil", hold_gil)


regional = Worker(["tcp://127.0.0.1:5555"], concurrency=2)


@regional.service("regional")
def _regional(x):
    time.sleep(0.001)
    return [x, os.getpid()]


@regional.service("grow")
def _grow(n):
    return "x" * n


crashy = Worker(["tcp://127.0.0.1:5555"], concurrency=2, isolation="process")


@crashy.service("crash")
def _crash(x):
    os._exit(1)  # the process dies in the middle of the request


@crashy.service("pid")
def _pid(x):
    time.sleep(x)
    return os.getpid()


@crashy.service("apid")
async def _apid(x):
    await asyncio.sleep(x)
    return os.getpid()


@crashy.service("acount")
async def _acount(x):
    """An async generator, in a handler process: ``n`` parts, ``s`` seconds apart."""
    for k in range(x["n"]):
        await asyncio.sleep(x["s"])
        yield [k, os.getpid()]


# --- the request lifecycle (test_lifecycle.py) -------------------------------------------------------

lifecycle = Worker(["tcp://127.0.0.1:5555"], concurrency=1)


def _mark(path, what):
    with open(path, "a") as f:
        f.write(what + "\n")


@lifecycle.service("loop")
def _loop(marker):
    """Runs until cancelled (checking ``cancelled`` as a cooperative handler does), at most 60 s."""
    _mark(marker, "started")
    ctx = current_request()
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if ctx.cancelled:
            _mark(marker, "stopped")
            return "stopped"
        ctx.progress(time.monotonic())
        time.sleep(0.005)
    return "finished"


@lifecycle.service("aloop")
async def _aloop(marker):
    import asyncio

    _mark(marker, "started")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _mark(marker, "cancelled")
        raise
    return "finished"


@lifecycle.service("gen")
def _gen(spec):
    """``spec["n"]`` parts of ``spec["size"]`` bytes, each made fresh (memory grows if they pile up)."""
    size = spec.get("size", 8)
    delay = spec.get("delay", 0.0)
    for i in range(spec["n"]):
        if delay:
            time.sleep(delay)
        yield [i, b"x" * size]


@lifecycle.service("pid")
def _lpid(_x):
    return os.getpid()


killable = Worker(["tcp://127.0.0.1:5555"], concurrency=1, isolation="process")


def _stuck(_x):
    while True:  # ignores cancelled: only killing its process stops it
        pass


def _coop(marker):
    ctx = current_request()
    marker, seconds = marker if isinstance(marker, list) else (marker, 60)  # [path, seconds] or a path
    _mark(marker, f"started {os.getpid()}")
    end = time.monotonic() + seconds
    while time.monotonic() < end and not ctx.cancelled:
        time.sleep(0.005)
    _mark(marker, "stopped" if ctx.cancelled else "finished")
    return "done"


killable.add_service("stuck", _stuck, terminate_on_cancel=True)
killable.add_service("coop", _coop)
killable.add_service("pid", _lpid)


_flaky_runs = {}


@echo.service("flaky")
def _flaky(fails):
    """Raises ValueError on the first ``fails`` runs of one request (by its key), then answers."""
    ctx = current_request()
    n = _flaky_runs[ctx.key] = _flaky_runs.get(ctx.key, 0) + 1
    if n <= fails:
        raise ValueError(f"run {n} of {ctx.key}")
    return n


geo = Worker(["tcp://127.0.0.1:5555"], concurrency=2)


@geo.service("work")
def _work(x):
    time.sleep(0.01)  # 10 ms of service
    return [x, os.getpid()]


@echo.service("after")
def _after(body):
    """For Majordomo callers (a body frame arrives as bytes): ``b"NAME SECONDS"`` is answered
    with NAME after SECONDS."""
    name, seconds = body.split()
    time.sleep(float(seconds))
    return name


class Unprintable(Exception):
    """An exception whose ``str()`` raises: the worker must still answer, and live on."""

    def __str__(self):
        raise RuntimeError("no str() for this one")


oddities = Worker(["tcp://127.0.0.1:5555"], concurrency=1)


@oddities.service("unprintable")
def _unprintable(_x):
    raise Unprintable()


@oddities.service("unprintable-inline", inline=True)
def _unprintable_inline(_x):
    raise Unprintable()


@oddities.service("aunprintable")
async def _aunprintable(_x):
    raise Unprintable()


@oddities.service("pid")
def _opid(_x):
    return os.getpid()
