"""The mistakes of a user's first hour end in errors that say what happened (issue 17)."""

import logging
import os
import signal
import socket
import time

import pytest

from tests.integration.helpers import free_port, wait_for
from zmqdist import Broker, Client, ConfigError, NoBroker, RequestTimeout, TransportError, Worker, ZmqdistError
from zmqdist.config import BrokerSettings

pytestmark = pytest.mark.integration


@pytest.mark.timeout(30)
def test_no_broker_at_the_address_is_told_apart_from_a_slow_worker(tmp_path):
    ep = f"tcp://127.0.0.1:{free_port()}"
    with Client([ep, f"ipc://{tmp_path}/nobody.sock"], timeout=0.6) as c, pytest.raises(NoBroker) as ei:
        c.call("echo", 1)
    assert "no broker answered on any endpoint" in str(ei.value) and ep in str(ei.value)
    assert ei.value.endpoints == (ep, f"ipc://{tmp_path}/nobody.sock") and isinstance(ei.value, RequestTimeout)
    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"]).start()
    w = Worker(b.endpoints, concurrency=1)
    w.add_service("slow", lambda s: __import__("time").sleep(s))
    w.start()
    try:
        with Client(b.endpoints, timeout=0.6) as c:
            wait_for(lambda: c.call("zmqdist.status")["workers"], 10, "worker")
            with pytest.raises(RequestTimeout) as ei:
                c.call("slow", 2.0)
            assert not isinstance(ei.value, NoBroker)  # a broker answered: the worker was slow
    finally:
        w.stop(drain=False)
        b.stop()


@pytest.mark.timeout(30)
def test_endpoints_are_checked_whole_at_construction():
    cases = [
        ("tcp://127.0.0.1", "no port"),
        ("tcp://:5555", "no port"),
        ("udp://x:1", "unsupported"),
        ("tcp://h:99999", "port"),
        ("ipc://", "no ipc path"),
        ("localhost:5555", "not an endpoint"),
    ]
    for bad, why in cases:
        with pytest.raises(ConfigError, match=why):
            Client([bad])
        with pytest.raises(ConfigError, match=why):
            Worker([bad])
    with pytest.raises(ConfigError, match="no port"):
        Broker(bind=["tcp://127.0.0.1"])


@pytest.mark.timeout(30)
def test_timeout_none_means_no_deadline_and_cancel_says_what_happened(tmp_path):
    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"]).start()
    w = Worker(b.endpoints, concurrency=1)
    w.add_service("echo", lambda x: x)
    w.start()
    try:
        with Client(b.endpoints, timeout=None) as c:
            assert c.timeout == 7 * 24 * 3600
            fut = c.submit("echo", "x")
            assert fut.result(10) == "x"
            assert fut.cancel() is False  # answered: nothing to cancel, and cancel() says so
            with pytest.raises(ConfigError, match="timeout"):
                c.submit("echo", 1, timeout=-1)
    finally:
        w.stop(drain=False)
        b.stop()


@pytest.mark.timeout(30)
def test_the_broker_binds_loopback_by_default_and_says_what_is_open_beyond_it(tmp_path, caplog):
    assert BrokerSettings().bind == ("tcp://127.0.0.1:5555",)
    with caplog.at_level(logging.WARNING, logger="zmqdist.broker"):
        b = Broker(bind=[f"tcp://*:{free_port()}"], name="open").start()
        b.stop()
    assert any("beyond loopback with no authentication" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zmqdist.broker"):
        b = Broker(bind=[f"tcp://127.0.0.1:{free_port()}", f"ipc://{tmp_path}/x.sock"], name="closed").start()
        b.stop()
    assert not any("beyond loopback" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_a_worker_says_when_it_registered_and_with_which_broker(tmp_path, caplog):
    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"], name="the-broker").start()
    w = Worker(b.endpoints, concurrency=1, name="w-reg")
    w.add_service("echo", lambda x: x)
    try:
        with caplog.at_level(logging.INFO, logger="zmqdist.worker"):
            w.start()
            wait_for(lambda: any("registered with broker the-broker" in r.getMessage() for r in caplog.records), 10,
                     "the registration log")  # fmt: skip
    finally:
        w.stop(drain=False)
        b.stop()


@pytest.mark.timeout(30)
def test_a_payload_over_the_brokers_limit_fails_at_once_and_the_broker_says_so(tmp_path, caplog):
    import time

    import zmq

    from zmqdist import InvalidRequest
    from zmqdist import protocol as p

    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"], max_message_size=10_000).start()
    try:
        with Client(b.endpoints, timeout=10) as c:
            c.call("zmqdist.status")  # welcomed: the client knows the limit
            t = time.monotonic()
            with pytest.raises(InvalidRequest, match="larger than the broker's limit of 10000"):
                c.call("echo", b"x" * 20_000)
            assert time.monotonic() - t < 5.0  # at once, not at the deadline (10 s)
        raw = zmq.Context.instance().socket(zmq.DEALER)  # a peer that does not know the limit
        raw.linger = 0
        raw.connect(b.endpoints[0])
        with caplog.at_level(logging.WARNING, logger="zmqdist.broker"):
            raw.send_multipart(p.encode(p.Request(7, "echo", 5000, (), b"y" * 15_000)))
            assert raw.poll(5000)
            reply = p.decode(*raw.recv_multipart())
            # as a proxy forwards it (with its hops): answered too, or the proxy waits out the deadline
            raw.send_multipart(p.encode(p.Request(8, "echo", 5000, ("P",), b"y" * 15_000)))
            assert raw.poll(5000)
            forwarded = p.decode(*raw.recv_multipart())
        raw.close()
        assert reply.rid == 7 and reply.status == p.ST_INVALID and "over this broker's limit" in reply.message
        assert type(forwarded) is p.Reply and (forwarded.rid, forwarded.status) == (8, p.ST_INVALID)
        assert any("over this broker's limit" in r.getMessage() for r in caplog.records)
        assert b.status()["counters"]["bad_input"] == 2
    finally:
        b.stop()


@pytest.mark.timeout(60)
def test_a_result_over_the_brokers_limit_fails_at_once_saying_so_and_frees_the_slot(tmp_path):
    """A handler that returns more than the broker's --max-message-size: the broker would refuse
    the RESULT and the caller would wait out its deadline (RequestTimeout after 8 s, measured):
    the caller gets a RemoteError that says why at once, and the worker's one slot is free again.
    A stream's part over the limit ends the stream so too (it was StreamInterrupted, "part 2
    arrived when part 1 was due"); a handler's failure over it keeps its type, cut to fit."""
    import time

    from zmqdist import RemoteError

    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"], max_message_size=20_000).start()
    w = Worker(b.endpoints, concurrency=1)
    w.add_service("grow", lambda n: "x" * n)

    def parts(n):
        yield "a"
        yield "x" * n
        yield "b"

    w.add_service("parts", parts)

    def boom(n):
        raise ValueError("v" * n)

    w.add_service("boom", boom)
    w.start()
    try:
        with Client(b.endpoints, timeout=20) as c:
            assert c.call("grow", 100) == "x" * 100
            t = time.monotonic()
            with pytest.raises(RemoteError, match=r"over broker .*'s limit of 20000 bytes") as err:
                c.call("grow", 50_000)
            assert err.value.remote_type == "ResultTooLarge"
            assert time.monotonic() - t < 5.0  # at once, not at the deadline (20 s)
            assert c.call("grow", 19_000) == "x" * 19_000  # the slot is free, a result that fits goes
            got = []  # a stream's part over the limit: the parts before it, then the reason
            with pytest.raises(RemoteError, match=r"part 2 of the stream \(50003 bytes\) is over"):
                got.extend(c.stream("parts", 50_000))
            assert got == ["a"] and time.monotonic() - t < 10.0
            # a handler's own failure over the limit keeps its type; its message is cut to fit
            with pytest.raises(RemoteError, match=r"raised ValueError: vvv.*\[cut to the broker's message limit\]"):
                c.call("boom", 50_000)
            assert time.monotonic() - t < 15.0
    finally:
        w.stop()
        b.stop()


@pytest.mark.timeout(60)
def test_a_worker_says_no_broker_accepted_it_only_when_none_ever_did(tmp_path, caplog):
    """Once, after 5 s, for a worker that never registered (the address or the keys are wrong);
    never for one that was accepted and then lost its broker (it said which, and fails over)."""
    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"]).start()
    lost = Worker(b.endpoints, concurrency=1, name="lost-its-broker")
    never = Worker([f"ipc://{tmp_path}/nobody.sock"], concurrency=1, name="never-accepted")
    for w in (lost, never):
        w.add_service("echo", lambda x: x)

    def said(text, name, after=0.0):
        return [r for r in caplog.records if text in r.getMessage() and name in r.getMessage() and r.created > after]

    with caplog.at_level(logging.INFO, logger="zmqdist.worker"):
        never.start()
        lost.start()  # started last: its 5 s are up after the other's
        try:
            wait_for(lambda: said("registered with broker", "lost-its-broker"), 10, "registered")
            b.stop()
            warned = wait_for(lambda: said("no broker has accepted it", "never-accepted"), 20, "the warning")
            # The lost worker has ticked past its own 5 s once it tries its broker again a second later.
            wait_for(lambda: said("connecting to", "lost-its-broker", warned[0].created + 1.0), 10, "a later try")
            assert not said("no broker has accepted it", "lost-its-broker")
            assert "no broker runs there, the address is wrong" in warned[0].getMessage()
        finally:
            never.stop(drain=False)
            lost.stop(drain=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("open_at_fork", [False, True])
def test_a_client_used_in_a_forked_child_says_so_at_once_and_the_parents_goes_on(tmp_path, open_at_fork):
    """multiprocessing's fork start method (Linux's default) copies a Client without its socket
    thread: a call in the child hung for good, past its timeout. It raises at once now, and the
    child's close leaves the parent's client alone."""
    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"]).start()
    w = Worker(b.endpoints, concurrency=2)
    w.add_service("echo", lambda x: x)
    w.add_service("slow", time.sleep)
    w.start()
    try:
        with Client(b.endpoints, timeout=20) as c:
            assert c.call("echo", 1) == 1
            busy = c.submit("slow", 0.5) if open_at_fork else None  # the socket thread busy at the fork
            r, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report through the pipe, never return into pytest
                try:
                    try:
                        c.call("echo", 2, timeout=2)
                        said = "no error"
                    except ZmqdistError as exc:
                        said = str(exc)
                    except BaseException as exc:
                        said = repr(exc)
                    c.close()
                    os.write(wfd, said.encode()[:1000])
                finally:
                    os._exit(0)
            os.close(wfd)
            status = None
            try:
                end = time.monotonic() + 15  # bounded: a child that hangs is killed, not left behind
                while status is None and time.monotonic() < end:
                    done, st = os.waitpid(pid, os.WNOHANG)
                    status = st if done else None
                    time.sleep(0.02)
            finally:
                if status is None:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            said = os.read(r, 1000).decode() if status is not None else "the child hung (killed)"
            os.close(r)
            assert status == 0 and "made before the process forked" in said, said
            assert c.call("echo", 3) == 3  # the parent's client is untouched
            assert busy is None or busy.result(10) is None
    finally:
        w.stop(drain=False)
        b.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["thread", "async", "inline"])
def test_a_handler_that_stops_its_own_worker_gets_its_reply_out_and_the_worker_stops(tmp_path, kind):
    """A "shutdown" service: worker.stop() (drain) from the worker's own handler. On a handler
    thread it waited for the drain, which waited for that very handler: the caller timed out and
    the worker hung on for the 30 s drain timeout. It returns at once now; the drain ends after
    the handler."""
    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"]).start()
    w = Worker(b.endpoints, concurrency=2)

    def shutdown(_x):
        t0 = time.monotonic()
        w.stop()
        return time.monotonic() - t0

    async def ashutdown(x):
        return shutdown(x)

    w.add_service("shutdown", ashutdown if kind == "async" else shutdown, inline=kind == "inline")
    w.start()
    try:
        with Client(b.endpoints, timeout=20) as c:
            wait_for(lambda: len(b.status()["workers"]) == 1, 20, "the worker registered")
            t0 = time.monotonic()
            took_in_handler = c.call("shutdown", None)
            assert took_in_handler < 1.0 and time.monotonic() - t0 < 10
            assert w.wait(10)  # and the worker did stop
    finally:
        w.stop(drain=False)
        b.stop()


@pytest.mark.timeout(30)
def test_a_client_whose_socket_thread_failed_says_why_instead_of_closed(tmp_path):
    """One Client per request or per thread soon runs a process out of ZeroMQ sockets (1023 in a
    context by default): the Client's socket thread fails. Its calls said only "client is closed",
    though nobody closed it; they say why now, and what to do."""
    import zmq

    from zmqdist import ClosedError

    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"]).start()
    ctx = zmq.Context()
    ctx.max_sockets = 1  # room for one Client's socket
    try:
        with Client(b.endpoints, timeout=5, context=ctx) as first:
            assert "workers" in first.call("zmqdist.status")
            with Client(b.endpoints, timeout=5, context=ctx) as second:
                for _ in range(2):  # the request in flight as it failed, then one after
                    with pytest.raises(ClosedError, match=r"socket thread failed .*Too many open files.*share one"):
                        second.call("zmqdist.status")
    finally:
        b.stop()
        ctx.term()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("slow", ["worker", "client"])
def test_a_peer_made_with_slower_heartbeats_than_its_brokers_is_not_taken_for_dead(tmp_path, slow):
    """heartbeat_s=10 on a Worker or a Client, the broker at its default 0.25 s x 4: the peer
    adopts the broker's interval at WELCOME, and its first heartbeat no longer waits 10 s. It
    did: the broker took it for dead after 1 s, so a request of 2.5 s sent at once ran twice
    (the worker's tasks requeued, or the client's requests stopped and sent again)."""
    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"]).start()
    runs = []

    def hold(s):
        runs.append(s)
        time.sleep(s)
        return s

    w = Worker(b.endpoints, concurrency=1, **({"heartbeat_s": 10.0} if slow == "worker" else {}))
    w.add_service("hold", hold)
    w.start()
    try:
        with Client(b.endpoints, timeout=30, **({"heartbeat_s": 10.0} if slow == "client" else {})) as c:
            assert c.call("hold", 2.5) == 2.5  # at once: the first 10 s after connecting were the ones at risk
            assert runs == [2.5]
            counters = c.call("zmqdist.status")["counters"]
            assert counters["workers_expired"] == 0 and counters["cancelled"] == 0 and counters["requeues"] == 0
    finally:
        w.stop(drain=False)
        b.stop()


@pytest.mark.timeout(60)
def test_a_second_broker_on_a_running_brokers_ipc_path_is_refused_and_a_stale_path_is_taken(tmp_path):
    """libzmq's ipc bind removes the file and takes the path, silently: a second broker started on
    the same path cut the first off from every new peer. It is refused as a port in use is; a
    socket file that nobody listens on (its process died) is taken as before."""
    ep = f"ipc://{tmp_path}/b.sock"
    b = Broker(bind=[ep]).start()
    try:
        with pytest.raises(TransportError, match="Address already in use"):
            Broker(bind=[ep]).start()
        w = Worker([ep])
        w.add_service("echo", lambda x: x)
        w.start()
        try:
            with Client([ep], timeout=10) as c:  # new peers still reach the first broker
                assert c.call("echo", 1) == 1
                assert c.call("zmqdist.status")["broker"] == b.status()["broker"]
        finally:
            w.stop(drain=False)
    finally:
        b.stop()
    Broker(bind=[ep]).start().stop()  # a stopped broker's path is free at once
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays; nobody listens
    assert stale.exists()
    Broker(bind=[f"ipc://{stale}"]).start().stop()


@pytest.mark.timeout(30)
def test_starting_a_stopped_worker_or_broker_says_it_runs_once(tmp_path):
    """Both said "already started", as if they still ran."""
    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"]).start()
    w = Worker(b.endpoints)
    w.add_service("echo", lambda x: x)
    w.start()
    with pytest.raises(ZmqdistError, match="already started"):
        w.start()
    w.stop(drain=False)
    with pytest.raises(ZmqdistError, match="worker has stopped: a Worker runs once"):
        w.start()
    b.stop()
    with pytest.raises(ZmqdistError, match="broker has stopped: a Broker runs once"):
        b.start()


@pytest.mark.timeout(30)
def test_a_worker_or_broker_stopped_before_it_started_refuses_to_start(tmp_path):
    """stop() before start() (a cleanup path that ran first): start() returned as if it served,
    and the object had stopped at once on the stop waiting in its mailbox."""
    b = Broker(bind=[f"ipc://{tmp_path}/b.sock"])
    b.stop()
    with pytest.raises(ZmqdistError, match="broker was stopped before it started"):
        b.start()
    with pytest.raises(ZmqdistError, match="broker was stopped before it started"):
        b.run()
    w = Worker([f"ipc://{tmp_path}/b.sock"])
    w.add_service("echo", lambda x: x)
    w.stop()
    with pytest.raises(ZmqdistError, match="worker was stopped before it started"):
        w.start()
    with pytest.raises(ZmqdistError, match="worker was stopped before it started"):
        w.run()


@pytest.mark.timeout(30)
def test_a_worker_is_a_context_manager_that_drains_on_exit(tmp_path):
    """``with Worker(...) as w:`` starts it and, on leaving, drains: a request it holds is answered."""
    import threading

    with Broker(bind=[f"ipc://{tmp_path}/b.sock"]) as b:
        running, release = threading.Event(), threading.Event()
        w = Worker(b.endpoints)
        w.add_service("slow", lambda x: running.set() or (release.wait(10) and x))
        with Client(b.endpoints, timeout=10) as c:
            with w as started:
                assert started is w
                fut = c.submit("slow", 7)
                assert running.wait(10)
                threading.Timer(0.3, release.set).start()
            assert w.wait(0)  # __exit__ returned once the drain ended
            assert fut.result(5) == 7


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.timeout(30)
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_an_ipv6_address_in_brackets_binds_and_connects_beside_ipv4():
    """libzmq takes tcp://[::1]:... only on a socket with IPV6 on. The endpoint checks accepted it,
    then the broker failed to bind ("No such device") and a worker or client could not connect."""
    b = Broker(bind=["tcp://[::1]:*", "tcp://127.0.0.1:*"]).start()
    v6, v4 = b.endpoints
    assert v6.startswith("tcp://[::1]:") and v4.startswith("tcp://127.0.0.1:")
    w = Worker([v6], concurrency=1)
    w.add_service("echo", lambda x: x)
    w.start()
    try:
        with Client([v6], timeout=10) as c6, Client([v4], timeout=10) as c4:
            wait_for(lambda: c6.call("zmqdist.status")["workers"], 10, "worker")
            assert c6.call("echo", "six") == "six"
            assert c4.call("echo", "four") == "four"
    finally:
        w.stop()
        b.stop()


@pytest.mark.timeout(30)
def test_a_broker_whose_ipc_file_was_removed_binds_it_again_and_keeps_its_peers(tmp_path, caplog):
    """A cleaner of /tmp (or an rm) removes a running broker's ipc file: it went on listening on
    the unlinked file, connected peers served, and every new peer got NoBroker for good. Now the
    broker binds the path again within about a second (a second listener: an unbind would have
    dropped its connected peers), and says so."""
    caplog.set_level(logging.WARNING, logger="zmqdist")
    path = tmp_path / "b.sock"
    with Broker(bind=[f"ipc://{path}"]) as b:
        w = Worker(b.endpoints, name="before")
        w.add_service("echo", lambda x: x)
        with w, Client(b.endpoints, timeout=10) as old:
            assert old.call("echo", 1) == 1
            path.unlink()
            wait_for(path.exists, 10, "the ipc file bound again")
            with Client(b.endpoints, timeout=10) as new:
                assert new.call("echo", 2) == 2
            assert old.call("echo", 3) == 3
            assert [x["name"] for x in b.status()["workers"]] == ["before"]
            assert b.status()["counters"]["workers_registered"] == 1  # kept its connection: no new HELLO
    assert any("was removed (a cleaner of /tmp?): bound it again" in r.getMessage() for r in caplog.records)
