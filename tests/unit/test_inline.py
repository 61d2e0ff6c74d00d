"""Inline handlers: run on the socket thread (no hand-off), moved to the threads once slow."""

from __future__ import annotations

import threading
import time

import pytest

from tests.unit.helpers import drained
from zmqdist import Worker
from zmqdist import protocol as p
from zmqdist._handlers import INLINE_BUDGET_S, INLINE_LIMIT_S, INLINE_STRIKES, Executors, Service
from zmqdist.clock import MonotonicClock
from zmqdist.core.worker import Execute
from zmqdist.errors import ConfigError
from zmqdist.transport import Mailbox


def task(ticket: int, service: str, value: object = 1, window: int = 0) -> Execute:
    return Execute(ticket, 1, service, p.pack_value(value), f"k{ticket}", 1, time.monotonic() + 30, "", window)


class FakeTimer:
    """The guard's timer: a handler "takes" time by moving it on."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def executors():
    threads: list[str] = []
    timer = FakeTimer()

    def where(x):
        threads.append(threading.current_thread().name)
        return x

    def slow(x):
        timer.now += INLINE_BUDGET_S * 2
        threads.append(threading.current_thread().name)
        return x

    def stuck(x):
        timer.now += INLINE_LIMIT_S * 1.5
        threads.append(threading.current_thread().name)
        return x

    services = {
        "fast": Service(where, inline=True),
        "slow": Service(slow, inline=True),
        "stuck": Service(stuck, inline=True),
        "pooled": Service(where),
    }
    mailbox = Mailbox()
    ex = Executors(services, 2, "thread", mailbox, MonotonicClock(), timer=timer)
    yield ex, mailbox, threads
    ex.shutdown(wait=True)
    mailbox.close()


def test_an_inline_handler_runs_on_the_calling_thread_and_its_result_is_ready_at_once(executors):
    ex, mailbox, threads = executors
    ex.submit(task(1, "fast", 42))
    assert threads == [threading.current_thread().name]
    (done,) = ex.take_ready()
    assert done[:4] == ("done", 1, 1, True) and p.unpack_value(done[4]) == 42
    assert mailbox.drain() == []  # nothing went through the mailbox
    ex.submit(task(2, "pooled"))
    ex.start()  # (a thread task is handed to its thread at the turn's end)
    assert ex.take_ready() == []
    assert [i[:4] for i in drained(mailbox, 1)] == [("done", 2, 1, True)]
    assert threads[-1] != threading.current_thread().name  # a handler thread


def test_a_slow_inline_handler_moves_to_the_threads_for_good(executors, caplog):
    ex, mailbox, threads = executors
    here = threading.current_thread().name
    for i in range(INLINE_STRIKES):  # slow calls in a row: here until the last strike
        assert "runs on the handler threads from now on" not in caplog.text
        ex.submit(task(i, "slow"))
        assert len(ex.take_ready()) == 1 and threads[-1] == here
    assert "runs on the handler threads from now on" in caplog.text
    ex.submit(task(10, "slow"))
    ex.start()  # (a thread task is handed to its thread at the turn's end)
    assert ex.take_ready() == []
    assert [i[:2] for i in drained(mailbox, 1)] == [("done", 10)]
    assert threads[-1] != here
    ex.submit(task(11, "fast"))  # another inline service is not affected
    assert len(ex.take_ready()) == 1


def test_one_very_slow_inline_call_moves_it_at_once_and_a_fast_call_clears_the_strikes(executors):
    ex, mailbox, threads = executors
    here = threading.current_thread().name
    ex.submit(task(1, "stuck"))
    ex.take_ready()
    ex.submit(task(2, "stuck"))
    ex.start()  # (a thread task is handed to its thread at the turn's end)
    drained(mailbox, 1)
    assert threads == [here, threads[1]] and threads[1] != here
    for i in range(2 * INLINE_STRIKES):  # slow, fast, slow, fast...: never three in a row
        ex.submit(task(10 + i, "slow" if i % 2 == 0 else "fast"))
        assert len(ex.take_ready()) == 1 and threads[-1] == here


def test_a_stream_of_an_inline_service_runs_on_a_thread(executors):
    """A stream waits for its consumer's acknowledgements: never on the socket thread."""
    ex, mailbox, threads = executors
    ex.submit(task(1, "fast", window=4))
    ex.start()  # (a thread task is handed to its thread at the turn's end)
    assert ex.take_ready() == []
    items = drained(mailbox, 2)
    assert [i[0] for i in items] == ["part", "done"]
    assert threads and threads[0] != threading.current_thread().name


def test_inline_is_refused_for_async_handlers_and_process_isolation():
    w = Worker(["tcp://127.0.0.1:5555"])

    async def coro(x):  # never run: an async handler is refused before
        return x

    with pytest.raises(ConfigError, match="inline is for sync handlers"):
        w.add_service("a", coro, inline=True)
    wp = Worker(["tcp://127.0.0.1:5555"], isolation="process")
    wp.add_service("x", abs, inline=True)
    with pytest.raises(ConfigError, match="not with isolation='process'"):
        wp.start()
