"""Workers used by the integration tests (imported by `zmqdist worker testworkers:NAME`)."""

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


_T18 = max(min(_regex_time(18) for _ in range(3)), 1e-5)  # each extra "a" doubles the time


def hold_gil(seconds):
    """C code that keeps the GIL for about ``seconds`` in one go: a catastrophic regex backtrack."""
    n = 18 + max(0, round(math.log2(seconds / _T18)))
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


crashy = Worker(["tcp://127.0.0.1:5555"], concurrency=2, isolation="process")


@crashy.service("crash")
def _crash(x):
    os._exit(1)  # the process dies in the middle of the request


@crashy.service("pid")
def _pid(x):
    time.sleep(x)
    return os.getpid()
