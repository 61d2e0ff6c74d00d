"""The worker's per-request path: a request context made only when a handler asks for it, plain
results told apart without inspect, the values' codec (a Packer per call, not packb; a bin 8 fast
path), a task's gate made on demand; and what Client.call waits on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.helpers import drained
from zmqdist import current_request
from zmqdist import protocol as p
from zmqdist._handlers import ChildTask, Executors, Gate, Service, run_task
from zmqdist.clock import MonotonicClock
from zmqdist.context import _current
from zmqdist.core.worker import Abort, Execute, Window
from zmqdist.transport import Mailbox


def task(value: object = 1, window: int = 0) -> Execute:
    return Execute(7, 3, "svc", p.pack_value(value), "key-7", 2, time.monotonic() + 30, "trace-7", window)


def run(fn: Any, value: object = 1, window: int = 0) -> list[tuple[Any, ...]]:
    posted: list[tuple[Any, ...]] = []
    run_task(Service(fn), task(value, window), MonotonicClock(), None, posted.append, Gate(window))
    return posted


def test_the_context_is_made_at_the_first_ask_and_is_the_same_for_the_rest_of_the_call():
    seen: list[Any] = []

    def handler(x):
        seen.append(type(_current.get()))  # before asking: not made yet
        a = current_request()
        b = current_request()
        seen.extend([a is b, a.key, a.service, a.attempt, a.trace, 29 < a.remaining() <= 30])
        a.progress("half")
        return x

    posted = run(handler)
    assert seen == [tuple, True, "key-7", "svc", 2, "trace-7", True]
    assert posted == [("progress", 7, 3, p.pack_value("half")), ("done", 7, 3, True, p.pack_value(1), None)]
    with pytest.raises(LookupError):
        current_request()  # the call is over: outside a handler again


def test_a_handler_that_never_asks_leaves_no_context_behind():
    assert run(lambda x: x + 1) == [("done", 7, 3, True, p.pack_value(2), None)]
    assert _current.get() is None


class Listish(list):  # a result type outside the plain set still goes through inspect's checks
    pass


def gen(x: int) -> Iterator[int]:
    yield x
    yield x + 1


async def coro(x: int) -> int:
    return x * 10


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (lambda x: True, True),
        (lambda x: None, None),
        (lambda x: {"a": [x]}, {"a": [1]}),
        (lambda x: Listish([x]), [1]),
        (gen, [1, 2]),  # a generator for a caller that did not ask for a stream: one list
        (coro, 10),  # an awaitable from a sync handler: awaited
    ],
)
def test_every_kind_of_result_is_sent_as_before(fn, expected):
    (done,) = run(fn)
    assert done[:4] == ("done", 7, 3, True) and p.unpack_value(done[4]) == expected


def test_a_plain_result_to_a_stream_caller_is_a_stream_of_one():
    posted = run(lambda x: "v", window=4)
    assert posted == [("part", 7, 3, p.pack_value("v")), ("done", 7, 3, True, p.pack_value(None), None)]


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5)


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300),
    _containers,
    max_leaves=20,
)


@given(values)
def test_pack_value_is_msgpack_with_bin_types(v):
    assert p.pack_value(v) == msgpack.packb(v, use_bin_type=True)
    assert p.unpack_value(p.pack_value(v)) == msgpack.unpackb(msgpack.packb(v, use_bin_type=True), raw=False)


@given(st.binary(max_size=300) | st.binary(max_size=40).map(lambda b: b"\xc4" + bytes([len(b) + 1]) + b))
def test_unpack_value_reads_any_bytes_as_msgpack_does(data):
    """The bin 8 fast path included: a declared length that is not the frame's goes to msgpack."""
    try:
        want: Any = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        with pytest.raises(ValueError):
            p.unpack_value(data)
    else:
        assert p.unpack_value(data) == want


def test_pack_value_after_an_error_and_from_many_threads():
    with pytest.raises(TypeError, match="not msgpack-serialisable"):
        p.pack_value([1, object()])
    assert p.pack_value([1, 2]) == msgpack.packb([1, 2])  # nothing of the failed value left behind
    wrong: list[Any] = []

    def packer(k: int) -> None:
        for i in range(2000):
            v = {"thread": k, "i": i, "blob": bytes([k]) * (i % 50)}
            if msgpack.unpackb(p.pack_value(v), raw=False) != v:
                wrong.append((k, i))

    threads = [threading.Thread(target=packer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not wrong


@pytest.fixture
def async_executors():
    started: list[int] = []
    release = asyncio.Event()

    async def aecho(x):
        started.append(x)
        return x

    async def await_forever(x):
        started.append(x)
        await release.wait()  # never set: only a cancel ends it
        return x

    mailbox = Mailbox()
    services = {"aecho": Service(aecho), "forever": Service(await_forever)}
    ex = Executors(services, 2, "thread", mailbox, MonotonicClock())
    yield ex, mailbox, started
    ex.shutdown(wait=True)
    mailbox.close()


@contextlib.contextmanager
def async_only(**handlers: Any) -> Iterator[tuple[Executors, Mailbox]]:
    """Executors of one handler thread for these async handlers, and its mailbox; shut at the end."""
    mailbox = Mailbox()
    ex = Executors({n: Service(f) for n, f in handlers.items()}, 1, "thread", mailbox, MonotonicClock())
    try:
        yield ex, mailbox
    finally:
        ex.shutdown(wait=True)
        mailbox.close()


def atask(ticket: int, service: str, value: object) -> Execute:
    return Execute(ticket, 1, service, p.pack_value(value), f"k{ticket}", 1, time.monotonic() + 30, "", 0)


def test_async_tasks_of_one_turn_start_together_and_none_before_start(async_executors):
    ex, mailbox, started = async_executors
    for i in range(100):
        ex.submit(atask(i, "aecho", i))
    assert drained(mailbox, 1, wait=0.2) == [] and started == []  # held until the turn ends
    ex.start()
    done = drained(mailbox, 100)
    assert sorted((d[1], d[3], p.unpack_value(d[4])) for d in done) == [(i, True, i) for i in range(100)]


def test_the_outcomes_of_a_batch_of_async_tasks_wake_the_socket_thread_once_all_there(async_executors, monkeypatch):
    """The loop posts a turn's outcomes together: the socket thread is woken once, with all of
    them waiting. Posted one by one, the first woke it while the loop still ran the rest of the
    batch, and the two threads fought for the GIL over it (an async worker's CPU per request)."""
    ex, mailbox, _ = async_executors
    queued_at_wake: list[int] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        if fd == mailbox._w:
            queued_at_wake.append(len(mailbox._q))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    for i in range(50):
        ex.submit(atask(i, "aecho", i))
    ex.start()
    done = drained(mailbox, 50)
    assert sorted(d[1] for d in done) == list(range(50)) and all(d[3] for d in done)
    assert queued_at_wake == [50]


def test_an_async_task_aborted_before_it_started_never_runs_and_ends_once(async_executors):
    ex, mailbox, started = async_executors
    ex.submit(atask(1, "aecho", 1))
    ex.submit(atask(2, "aecho", 2))
    ex.abort(Abort(1, 1, "cancelled"))  # in the same turn: before the loop saw it
    ex.start()
    done = drained(mailbox, 2)
    assert sorted(d[:4] for d in done) == [("done", 1, 1, False), ("done", 2, 1, True)]
    assert started == [2]
    assert drained(mailbox, 1, wait=0.2) == []  # no second outcome for the aborted one


def test_a_running_async_task_is_cancelled_on_its_loop_and_ends_once(async_executors):
    ex, mailbox, started = async_executors
    ex.submit(atask(5, "forever", 5))
    ex.start()
    assert drained(mailbox, 1, wait=0.3) == []  # running, waiting
    ex.abort(Abort(5, 1, "cancelled"))
    (done,) = drained(mailbox, 1)
    assert done[:5] == ("done", 5, 1, False, b"") and started == [5]
    assert drained(mailbox, 1, wait=0.2) == []  # the cancelled run posted exactly one outcome


def test_a_cancel_and_a_timeout_reach_the_async_handler_itself_with_no_warning():
    """A cancelled handler sees CancelledError where it waits (its cleanup runs), and
    asyncio.timeout inside a handler turns its own cancel into TimeoutError. Compiled coroutines
    pass a thrown exception on with throw(type, value, traceback), deprecated since Python 3.12
    (mypyc/mypyc#1214): with warnings as errors (this suite's setting, and many a user's) the
    warning replaced the CancelledError before it reached the handler."""
    cleaned: list[str] = []
    waiting = threading.Event()

    async def waits(x):
        try:
            waiting.set()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cleaned.append("cancelled")
            raise
        return x

    async def bounded(x):
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(60)
        except TimeoutError:
            return "timed out"
        return x

    with async_only(waits=waits, bounded=bounded) as (ex, mailbox):
        ex.submit(atask(1, "waits", 1))
        ex.submit(atask(2, "bounded", 2))
        ex.start()
        assert waiting.wait(10)
        (timed,) = drained(mailbox, 1)
        assert timed[:4] == ("done", 2, 1, True) and p.unpack_value(timed[4]) == "timed out"
        ex.abort(Abort(1, 1, "cancelled"))
        (done,) = drained(mailbox, 1)
        assert done[:5] == ("done", 1, 1, False, b"") and cleaned == ["cancelled"]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+: a task's first step runs as it is made (eager)")
def test_an_async_task_cancelled_between_being_made_and_its_first_step_never_runs(async_executors):
    """The race an abort from the socket thread can hit: the task is made, then cancelled before
    the loop ran its first step. Its first step sees the gate, posts one outcome and never calls
    the handler (asyncio would otherwise drop the coroutine unrun: there is no done callback)."""
    ex, mailbox, started = async_executors
    ex.submit(atask(3, "forever", 3))
    live = ex._live[(3, 1)]
    batch, ex._starting = ex._starting, []

    def make_then_cancel() -> None:
        ex._start_batch(batch)  # the task is made; its first step is scheduled after this callback
        live.gate.cancelled = True  # what abort() does on the socket thread, right then
        ex._cancel_live(live)

    ex._loop.call_soon_threadsafe(make_then_cancel)
    (done,) = drained(mailbox, 1)
    assert done[:5] == ("done", 3, 1, False, b"")
    assert started == []  # the handler never ran
    assert drained(mailbox, 1, wait=0.2) == []
    assert not ex._live


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are Python 3.12+")
def test_an_async_handler_that_does_not_wait_ends_as_its_task_is_made_as_its_own_current_task():
    """Python 3.12+: the batch's callback makes each task eagerly. A handler that never waits has
    posted its outcome when the callback returns (no step scheduled, no second turn of the loop);
    it ran as its own current task, so asyncio.timeout works in it. One that waits ends later."""
    seen: list[bool] = []

    async def quick(x):
        async with asyncio.timeout(5):  # raises without a current task
            seen.append(asyncio.current_task() is not None)
        return x

    async def waits(x):
        await asyncio.sleep(0)
        return x

    with async_only(quick=quick, waits=waits) as (ex, mailbox):
        ex.submit(atask(1, "quick", 1))
        ex.submit(atask(2, "waits", 2))
        batch, ex._starting = ex._starting, []
        at_return: list[tuple[Any, ...]] = []
        looked = threading.Event()

        def start_then_look() -> None:
            ex._start_batch(batch)
            at_return.extend(mailbox.drain())  # (the test's thread reads only after this)
            looked.set()

        ex._loop.call_soon_threadsafe(start_then_look)
        assert looked.wait(10)
        later = drained(mailbox, 1)
        assert [(d[1], d[3], p.unpack_value(d[4])) for d in at_return] == [(1, True, 1)]
        assert [(d[1], d[3], p.unpack_value(d[4])) for d in later] == [(2, True, 2)]
        assert seen == [True] and not ex._live


def test_an_async_stream_waits_for_its_window_and_an_async_handler_reads_its_own_context():
    """Async handlers get their context made only when they ask (each task its own), and an async
    generator runs at most ``window`` parts ahead of the consumer (its gate's event made at the
    first wait)."""

    async def ctx(x):
        c = current_request()
        c.progress(x)
        await asyncio.sleep(0)
        return [current_request().key, c.attempt, c.deadline - time.monotonic()]

    async def parts(n):
        for i in range(n):
            yield i

    mailbox = Mailbox()
    ex = Executors({"ctx": Service(ctx), "parts": Service(parts)}, 2, "thread", mailbox, MonotonicClock())
    try:
        for t in (1, 2):
            ex.submit(atask(t, "ctx", t))
        ex.submit(Execute(3, 1, "parts", p.pack_value(5), "k3", 1, time.monotonic() + 30, "", 2))
        ex.start()
        got = drained(mailbox, 2 + 2 + 2)  # two progress reports, two outcomes, two parts
        progress = sorted((g[1], p.unpack_value(g[3])) for g in got if g[0] == "progress")
        done = sorted((g[1], p.unpack_value(g[4])) for g in got if g[0] == "done")
        assert progress == [(1, 1), (2, 2)]
        assert [[*d[:2], 0 < d[2] <= 30] for _, d in done] == [["k1", 1, True], ["k2", 1, True]]  # its own
        assert [p.unpack_value(g[3]) for g in got if g[0] == "part"] == [0, 1]
        assert drained(mailbox, 1, wait=0.2) == []  # the stream waits for its consumer
        ex.window(Window(3, 1, 2))  # the consumer took two: two more may go
        more = drained(mailbox, 2)
        assert [p.unpack_value(g[3]) for g in more] == [2, 3]
        ex.window(Window(3, 1, 4))
        last = drained(mailbox, 2)
        assert [g[0] for g in last] == ["part", "done"] and p.unpack_value(last[0][3]) == 4
    finally:
        ex.shutdown(wait=True)
        mailbox.close()


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str() for this one")


def unprintable(x):
    if x:
        raise Unprintable()
    return "fine"


async def aunprintable(x):
    return unprintable(x)


@pytest.mark.parametrize("mode", ["thread", "inline", "async"])
def test_an_exception_whose_str_raises_is_a_failure_and_the_handler_runs_on(mode):
    """Before: on a handler thread the thread died (the task never ended: its slot stayed taken
    and the worker lost a thread for good); inline, the socket thread's loop died with it."""
    mailbox = Mailbox()
    fn = aunprintable if mode == "async" else unprintable
    ex = Executors({"s": Service(fn, inline=mode == "inline")}, 1, "thread", mailbox, MonotonicClock())
    try:
        for ticket, value in ((1, True), (2, False)):  # one thread: the second needs it alive
            ex.submit(atask(ticket, "s", value))
            ex.start()
            (done,) = ex.take_ready() if mode == "inline" else drained(mailbox, 1)
            assert done[:4] == ("done", ticket, 1, value is False)
            if value:
                kind, message, tb = p.unpack_error(done[4])
                assert kind == "Unprintable" and "str()" in message and "Unprintable" in tb
            else:
                assert p.unpack_value(done[4]) == "fine"
    finally:
        ex.shutdown(wait=True)
        mailbox.close()


def test_a_gate_makes_its_condition_only_for_a_waiter_and_wakes_it_from_another_thread():
    """Most tasks never wait on their gate: no Condition is made for them. A stream's handler that
    waits for its window is woken by the socket thread's open() and by cancel()."""
    plain = run(lambda x: x)
    assert plain == [("done", 7, 3, True, p.pack_value(1), None)]
    idle = Gate(0)
    idle.open(5)
    idle.cancel()
    assert idle._cond is None and idle.acked == 5 and idle.is_set()

    for wake in ("open", "cancel"):
        gate = Gate(1)
        results: list[bool] = []
        started = threading.Event()

        def waiter(gate: Gate = gate, results: list[bool] = results, started: threading.Event = started) -> None:
            started.set()
            results.append(gate.wait(1, 30.0))  # part 1 may go once part 0 is acknowledged

        t = threading.Thread(target=waiter)
        t.start()
        assert started.wait(10)
        deadline = time.monotonic() + 10
        while not (gate._cond is not None and gate._cond._waiters) and time.monotonic() < deadline:
            pass  # until the waiter waits on its condition (a bounded spin, no sleep)
        assert gate._cond is not None and gate._cond._waiters
        gate.open(1) if wake == "open" else gate.cancel()
        t.join(10)
        assert not t.is_alive() and results == [wake == "open"]


def test_a_call_slot_returns_the_value_or_raises_the_error_once_and_ignores_a_second_outcome():
    """Client.call waits on a _Slot (a held lock), not a Future: the value comes back, an error is
    raised as it is, and a second outcome for the same request changes nothing."""
    from zmqdist.client import _Slot
    from zmqdist.errors import RequestTimeout

    ok = _Slot()
    ok.put((1, True, "value"))
    ok.put((1, False, RequestTimeout("late")))
    assert ok.wait() == "value"
    err = _Slot()
    boom = RequestTimeout("deadline passed")
    t = threading.Thread(target=err.put, args=((2, False, boom),))  # as from the socket thread
    t.start()
    with pytest.raises(RequestTimeout) as raised:
        err.wait()
    t.join(10)
    assert raised.value is boom


def test_a_handler_process_keeps_a_cancel_that_arrives_before_its_task_starts():
    # The worker sends a run and its cancel back to back; the child's reader thread can see the
    # cancel before the main thread starts the run. It was dropped, and the handler ran to its end.
    task = ChildTask()
    task.cancel(7)  # before the run of ticket 7 has started
    first = Gate(8)
    task.start(7, first)
    assert first.cancelled
    task.end()
    task.cancel(7)  # a cancel that crossed the task's end: kept, but not for the next ticket
    second = Gate(8)
    task.start(8, second)
    assert not second.cancelled
    task.window(8, 5)
    task.window(9, 50)  # another ticket's window is not this task's
    assert second.acked == 5
    task.cancel(8)  # the running task, at once
    assert second.cancelled


def _switches(thread: threading.Thread) -> int:
    """The voluntary context switches of ``thread`` so far (Linux), read from /proc."""
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def _all_idle(ex: Executors, wait: float = 5.0) -> None:
    """Wait (bounded) until every handler thread of ``ex`` sleeps for want of a task (a bounded
    spin, no sleep: the thread that posted the last outcome goes idle a moment later)."""
    end = time.monotonic() + wait
    while len(ex._idle) < len(ex._threads):
        assert time.monotonic() < end, "a handler thread never went idle"


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")
def test_a_task_wakes_one_handler_thread_and_the_others_sleep_on():
    """Tasks one at a time: each is handed to the handler thread that went idle last, and no other
    thread wakes (a shared queue woke a second one per task, only for it to find nothing)."""
    ran: list[str] = []
    mailbox = Mailbox()
    ex = Executors(
        {"s": Service(lambda x: ran.append(threading.current_thread().name) or x)},
        8,
        "thread",
        mailbox,
        MonotonicClock(),
    )
    try:
        ex.submit(atask(1, "s", 1))
        assert drained(mailbox, 1, wait=0.1) == []  # not before the turn ends
        ex.start()
        assert len(drained(mailbox, 1)) == 1
        hot = ran[0]
        _all_idle(ex)  # every thread is asleep now (one ran a task, seven never had one): count from here
        before = {t.name: _switches(t) for t in ex._threads}
        for i in range(2, 42):
            _all_idle(ex)  # (the thread that posted the last outcome is idle again a moment later)
            ex.submit(atask(i, "s", i))
            ex.start()
            done = drained(mailbox, 1)
            assert [(d[1], p.unpack_value(d[4])) for d in done] == [(i, i)]
        after = {t.name: _switches(t) for t in ex._threads}
        assert set(ran) == {hot}
        woken = {name for name in after if after[name] != before[name]}
        assert woken == {hot}, woken
    finally:
        ex.shutdown(wait=True)
        mailbox.close()


def test_tasks_past_the_free_threads_wait_in_order_and_all_run_once():
    """More tasks than threads: two run at once, the rest start in their order as threads free up,
    and shutdown(wait=True) ends every thread."""
    release = threading.Event()
    started = threading.Semaphore(0)
    running: list[int] = []
    order: list[int] = []
    lock = threading.Lock()

    def slow(x):
        with lock:
            running.append(x)
            order.append(x)
        started.release()
        release.wait(5)
        with lock:
            running.remove(x)
        return x

    mailbox = Mailbox()
    ex = Executors({"s": Service(slow)}, 2, "thread", mailbox, MonotonicClock())
    for i in range(10):
        ex.submit(atask(i, "s", i))
    ex.start()
    assert started.acquire(timeout=5) and started.acquire(timeout=5)
    assert not started.acquire(timeout=0.1)  # two threads: no third starts
    assert sorted(order) == [0, 1] and len(running) == 2
    release.set()
    done = drained(mailbox, 10)
    assert sorted(d[1] for d in done) == list(range(10)) and all(d[3] for d in done)
    assert order[2:] == list(range(2, 10))  # the waiting ones started in order
    assert drained(mailbox, 1, wait=0.1) == []  # each ended once
    ex.shutdown(wait=True)
    assert not any(t.is_alive() for t in ex._threads)
    mailbox.close()


def test_tasks_waiting_together_wake_as_many_threads_as_they_need_and_stop_ends_every_thread():
    """One wake per turn, then each woken thread wakes the next while tasks wait: handlers that
    block all run at once (each waits at a barrier for the other three), and shutdown stops all."""
    barrier = threading.Barrier(4, timeout=5)
    mailbox = Mailbox()
    ex = Executors({"s": Service(lambda x: barrier.wait() * 0 + x)}, 6, "thread", mailbox, MonotonicClock())
    for i in range(4):
        ex.submit(atask(i, "s", i))
    ex.start()  # one turn: one thread woken by it, three more by the threads
    done = drained(mailbox, 4)
    assert sorted((d[1], d[3]) for d in done) == [(i, True) for i in range(4)]  # no barrier broke
    ex.shutdown(wait=True)
    assert not any(t.is_alive() for t in ex._threads)
    mailbox.close()


@pytest.mark.parametrize("threads", [1, 4])
def test_no_task_waits_while_a_thread_sleeps_under_constant_thread_switches(threads):
    """The hand-off takes no lock (single C calls, atomic under the GIL; its ordering argument is
    in Executors._thread_main): turns of 1-12 tasks, each waited for, with the interpreter
    switching threads as often as it can, so the next turn is queued while the threads go idle.
    A lost wake-up would leave a task queued with every thread asleep: its wait would run out."""
    rng = random.Random(7)
    mailbox = Mailbox()
    ex = Executors({"s": Service(lambda x: x)}, threads, "thread", mailbox, MonotonicClock())
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        ticket = 0
        for _ in range(1000):
            n = rng.randint(1, 12)
            for _ in range(n):
                ticket += 1
                ex.submit(atask(ticket, "s", ticket))
            ex.start()
            done = drained(mailbox, n)
            assert len(done) == n and all(d[3] for d in done), (ticket, len(done))
    finally:
        sys.setswitchinterval(old)
        ex.shutdown(wait=True)
        mailbox.close()
    assert not any(t.is_alive() for t in ex._threads)


@pytest.mark.parametrize("when", ["running", "before"])
@pytest.mark.parametrize("kind", ["coroutine", "async generator"])
def test_a_cancel_cancels_an_async_handler_run_by_run_task_as_a_handler_process_does(kind, when):
    """In a handler process an async handler runs through run_task on a loop of its own; a cancel
    came as the gate's flag alone, so a coroutine (or an async generator's step) that waited went
    on waiting: its process stayed busy. Now the cancel cancels the task that waits, whether it
    came while the task ran or before it started (ChildTask applies an early cancel at the start)."""
    waiting = threading.Event()

    async def coro(_x: Any) -> str:
        waiting.set()
        await asyncio.Event().wait()  # for ever, unless cancelled
        return "never"

    async def agen(_x: Any) -> Any:
        yield "first"
        waiting.set()
        await asyncio.Event().wait()
        yield "never"

    gate = Gate(0)
    if when == "before":
        gate.cancel()
    posted: list[tuple[Any, ...]] = []
    fn = coro if kind == "coroutine" else agen
    args = (Service(fn), task(), MonotonicClock(), None, posted.append, gate)
    t = threading.Thread(target=run_task, args=args, daemon=True)  # (daemon: a failure must not hang the run)
    t.start()
    if when == "running":
        assert waiting.wait(10)
        gate.cancel()
    t.join(10)
    assert not t.is_alive(), "the handler was not cancelled"
    (done,) = posted
    assert done[:4] == ("done", 7, 3, False) and b"CancelledError" in done[4]
    assert gate._on_cancel is None  # the hook went with the loop
    assert waiting.is_set() == (when == "running")  # cancelled before it started: it never ran


@pytest.mark.parametrize("with_async", [False, True])
def test_handler_threads_that_cannot_all_start_end_those_that_did_and_say_why(monkeypatch, with_async):
    """Out of threads or memory (ulimit -u, a container's pids limit) the worker's start raised
    "can't start new thread", and the handler threads started before stayed idle for good (52 of
    them in the probe, a process under ulimit -v asking for 1000)."""
    import zmqdist._handlers as handlers
    from zmqdist.errors import ZmqdistError

    starts = []

    class Scarce(threading.Thread):
        def start(self) -> None:
            if len(starts) == 4:
                raise RuntimeError("can't start new thread")
            starts.append(self)
            super().start()

    monkeypatch.setattr(handlers.threading, "Thread", Scarce)

    async def coro(x):
        return x

    services = {"s": Service(lambda x: x)} | ({"a": Service(coro)} if with_async else {})
    n = 4 if with_async else 8  # with async: the 5th thread to start is the event loop's
    total = n + 1 if with_async else n
    why = rf"cannot start the handler threads \(can't start new thread\): 4 of {total} started"
    with pytest.raises(ZmqdistError, match=why):
        Executors(services, n, "thread", Mailbox(), MonotonicClock())
    assert len(starts) == 4 and not any(t.is_alive() for t in starts)
