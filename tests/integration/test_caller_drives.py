"""Client.call drives the sockets on the calling thread while the client has nothing else open
(client.py's module docstring): no thread hand-off for a lone synchronous call, and everything
the socket thread does goes on meanwhile (heartbeats, other threads' requests, failover, close)."""

import logging
import os
import signal
import threading
import time

import pytest

from tests.integration.helpers import status, wait_for
from zmqdist import Client, ClosedError, ZmqdistError

pytestmark = pytest.mark.integration


def _thread_cpu_s(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _socket_thread(c: Client) -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == f"zmqdist-client-{c.name}")


@pytest.fixture
def broker(procs, ipc_ep):
    procs.spawn("broker", "--bind", ipc_ep, "--name", "drv")
    procs.spawn("worker", "testworkers:echo", "--connect", ipc_ep, "--name", "w0")
    with Client([ipc_ep], timeout=20) as c:
        wait_for(lambda: len(status(c)["workers"]) == 1, 20, "worker registered")
    return ipc_ep


@pytest.mark.timeout(90)
def test_lone_calls_are_sent_and_read_on_the_calling_thread(broker):
    """2,000 calls one after another: the socket thread stays asleep (it used about as much CPU per
    call as the caller when every call went through it: 40-70 us)."""
    with Client([broker], timeout=20) as c:
        assert c.call("echo", 0)[0] == 0
        sock_thread = _socket_thread(c)
        assert sock_thread.native_id is not None
        before = _thread_cpu_s(sock_thread.native_id)
        for i in range(2_000):
            assert c.call("echo", i)[0] == i
        used = _thread_cpu_s(sock_thread.native_id) - before
        assert used <= 0.03, f"the socket thread used {used * 1e3:.0f} ms of CPU for 2,000 lone calls"


@pytest.mark.timeout(120)
def test_calls_from_many_threads_mixed_with_futures_and_a_map_each_get_their_own_answer(broker):
    """Whoever drives the sockets (a caller or the socket thread) reads the others' replies."""
    with Client([broker], timeout=30) as c:
        errors: list[BaseException] = []

        def caller(k: int) -> None:
            try:
                for i in range(150):
                    v = k * 1_000 + i
                    assert c.call("echo", v)[0] == v
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        futs = [c.submit("echo", -i) for i in range(1, 301)]
        mapped = list(c.map("echo", range(500), window=50))
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert not any(t.is_alive() for t in threads)
        assert [f.result(30)[0] for f in futs] == [-i for i in range(1, 301)]
        assert [r[0] for r in mapped] == list(range(500))
        assert c.call("echo", "quiet again")[0] == "quiet again"  # the lone call drives again
        assert status(c)["counters"]["replies_ok"] >= 8 * 150 + 300 + 500


@pytest.mark.timeout(60)
def test_a_call_that_outlasts_the_brokers_ttl_keeps_its_client_alive(broker):
    """The calling thread runs the client's timers while it drives: heartbeats go on through a
    call three times longer than the broker's ttl for a silent client (1 s here)."""
    with Client([broker], timeout=20) as c:
        assert c.call("slow", 3.0) > 0
        assert status(c)["counters"]["abandoned"] == 0


@pytest.mark.timeout(60)
def test_close_from_another_thread_ends_a_driving_call_at_once(broker):
    c = Client([broker], timeout=30)
    assert c.call("echo", 1)[0] == 1
    outcome: list[BaseException] = []

    def lonely() -> None:
        try:
            c.call("nobody serves this", 1)
        except BaseException as exc:  # asserted below
            outcome.append(exc)

    t = threading.Thread(target=lonely)
    t.start()
    wait_for(lambda: c._driver != 0, 10, "the call drives the sockets")
    began = time.monotonic()
    c.close()
    t.join(10)
    assert time.monotonic() - began < 5
    assert not t.is_alive() and len(outcome) == 1 and isinstance(outcome[0], ClosedError)


@pytest.mark.timeout(60)
def test_a_callback_on_the_driving_thread_may_close_the_client_but_not_call_through_it(broker):
    """A future's callbacks run on whichever thread reads its reply, here a driving caller: a
    close there does not wait for that thread (it must return first), and a call there raises
    at once instead of waiting for itself for good."""
    c = Client([broker], timeout=30)
    assert c.call("echo", 1)[0] == 1
    seen: list[BaseException] = []

    def nested(_f: object) -> None:
        try:
            c.call("echo", 2)
        except BaseException as exc:  # asserted below
            seen.append(exc)
        c.close()

    def later() -> None:
        wait_for(lambda: c._driver != 0, 10, "the slow call drives the sockets")
        c.submit("slow", 0.3).add_done_callback(nested)  # registered well before its reply

    helper = threading.Thread(target=later)
    helper.start()
    began = time.monotonic()
    with pytest.raises(ClosedError):
        c.call("slow", 4.5)  # its thread reads the other reply, runs the callback, which closes
    assert time.monotonic() - began < 4.0  # not the slow reply (4.5 s), nor a 5 s wait on itself in close
    helper.join(10)
    assert len(seen) == 1 and isinstance(seen[0], ZmqdistError) and "wait for itself" in str(seen[0])


@pytest.mark.timeout(60)
def test_an_idle_client_follows_its_brokers_death_without_a_call(procs, tmp_path, caplog):
    """With nothing open its socket thread wakes only for its timers, and those notice the silence
    and move to the next endpoint; the next call then goes straight there."""
    a_ep, b_ep = f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock"
    a = procs.spawn("broker", "--bind", a_ep, "--name", "a")
    procs.spawn("broker", "--bind", b_ep, "--name", "b")
    procs.spawn("worker", "testworkers:echo", "--connect", b_ep, "--name", "w0")
    caplog.set_level(logging.INFO, logger="zmqdist.client")
    # Bound before the client starts (a loaded machine can take over a second to start a broker:
    # the client would take it for silent at once and go to b).
    wait_for((tmp_path / "a.sock").exists, 20, "broker a bound")
    with Client([a_ep, b_ep], timeout=20) as c:
        assert c.call("zmqdist.status")["broker"] == "a"
        a.send_signal(signal.SIGKILL)
        wait_for(lambda: f"connecting to {b_ep}" in caplog.text, 10, "the idle client moved to b")
        assert c.call("echo", 7)[0] == 7
        assert c.call("zmqdist.status")["broker"] == "b"


@pytest.mark.timeout(120)
def test_a_driving_call_follows_the_takeover_of_a_pair_whose_active_broker_is_sigkilled(procs, tmp_path):
    """The caller's own thread notices the silence, moves to the backup that takes over, and gets
    its answer there; the lone calls after it drive again (pairs with the caller-driven path)."""
    from tests.integration.test_ha import Pairs

    t = Pairs(procs, tmp_path)
    t.pair("A", "B")
    t.worker("w0", "A", "B")
    t.wait_pair("A", "B")
    with t.client("A", "B", timeout=60) as c:
        wait_for(lambda: len(status(c)["workers"]) == 1, 20, "the worker at A")
        assert [c.call("echo", i)[0] for i in range(20)] == list(range(20))
        drivers: list[int] = []

        def kill() -> None:
            drivers.append(c._driver)  # the calling thread drives at this moment
            t.brokers["A"].send_signal(signal.SIGKILL)

        killer = threading.Timer(0.3, kill)
        killer.start()
        began = time.monotonic()
        assert c.call("slow", 1.0) > 0  # in flight at A when A dies: sent again to B
        killer.join()
        assert drivers == [threading.get_ident()]
        assert time.monotonic() - began < 20
        assert [c.call("echo", i)[0] for i in range(50)] == list(range(50))
        assert status(c)["broker"] == "B" and c._core.counters["failovers"] >= 1


@pytest.mark.timeout(90)
def test_a_call_never_overtakes_what_the_same_thread_submitted_before_it(procs, ipc_ep):
    """submit(a) then call(b) on one thread: a goes out first. A caller that found the sockets
    free sent its own request before what was still in the mailbox (its own earlier submit, a
    cancel), so b overtook a: the old code did so in 17 rounds of 20 here, and a test that
    cancels right after submitting saw the later call served first."""
    from zmqdist import Worker

    procs.spawn("broker", "--bind", ipc_ep, "--name", "ord")
    ran: list[int] = []
    w = Worker([ipc_ep], concurrency=1)  # one slot: requests run in the order the broker got them
    w.add_service("rec", lambda i: ran.append(i) or i)
    with w, Client([ipc_ep], timeout=20) as c:
        wait_for(lambda: len(status(c)["workers"]) == 1, 20, "worker registered")
        for i in range(1, 21):
            f = c.submit("rec", i)
            assert c.call("rec", -i) == -i
            assert f.result(10) == i
        pairs = [ran[k : k + 2] for k in range(0, len(ran), 2)]
        assert pairs == [[i, -i] for i in range(1, 21)], f"calls that overtook their submit: {pairs}"
