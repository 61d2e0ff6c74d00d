"""The contract of transport.wire's Port and Poller, held alike by the C module and the pyzmq fallback (real
sockets over tcp loopback)."""

import errno
import functools
import operator
import os
import signal
import threading
import time

import pytest
import zmq

from zmqdist import _native
from zmqdist.clock import MonotonicClock
from zmqdist.transport import wire
from zmqdist.transport.loop import Loop
from zmqdist.transport.mailbox import Mailbox

pytestmark = pytest.mark.timeout(30)


def _c_expected():
    """Whether this install must have the C Port: compiled, and not turned off for an A/B run."""
    return _native.STATE == "compiled" and os.environ.get(wire.WIRE_ENV, "") != "0"


def _implementation(param, native, pure, what):
    """The C class ``native`` or the pyzmq one ``pure``; a compiled install must have the C one."""
    if param == "c":
        if native is None:
            if _c_expected():
                pytest.fail(f"a compiled install without the C {what}: {wire.WHY_NOT}")
            pytest.skip(f"no C {what} here: {wire.WHY_NOT}")
        return native
    return pure


@pytest.fixture(params=["py", "c"])
def make(request):
    """A function that makes a Port of the implementation under test for a socket."""
    return _implementation(request.param, wire.NativePort, wire.PyPort, "Port")


@pytest.fixture
def pair():
    """(router, dealer): a DEALER connected to a ROUTER over tcp (whose ZMTP handshake gives each
    message the peer's metadata), its routing id b"D"."""
    ctx = zmq.Context.instance()
    r = ctx.socket(zmq.ROUTER)
    r.linger = 0
    r.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    d = ctx.socket(zmq.DEALER)
    d.linger = 0
    d.setsockopt(zmq.ROUTING_ID, b"D")
    d.connect(f"tcp://127.0.0.1:{port}")
    yield r, d
    r.close(0)
    d.close(0)


def _wait(sock):
    assert sock.poll(5000), "no message within 5 s"


def test_a_message_is_read_whole_and_none_when_nothing_waits(make, pair):
    r, d = pair
    port = make(r)
    assert port.recv(8) is None
    d.send_multipart([b"head", b"x" * 100])
    _wait(r)
    assert port.recv(8) == [b"D", b"head", b"x" * 100]
    assert port.recv(8) is None
    big = bytes(range(256)) * 4096  # 1 MiB, zero-copy in libzmq
    d.send_multipart([b"", big])
    _wait(r)
    assert port.recv(8) == [b"D", b"", big]


def test_the_c_port_reads_a_peers_routing_id_as_the_same_object_each_time_and_never_mixes_peers(pair):
    """The broker's tables are keyed by peer: a routing id that is the object already in a table
    is found by identity, not compared byte by byte. The C port of a ROUTER keeps recent ids and
    hands the same object back (a DEALER's, whose first frame is a head, does not); 300 peers
    (more than its 64 slots, so ids collide and are replaced) still each read as their own bytes."""
    native = _implementation("c", wire.NativePort, wire.PyPort, "Port")
    r, _ = pair
    ctx = zmq.Context.instance()
    ep = r.getsockopt(zmq.LAST_ENDPOINT).decode()
    d = ctx.socket(zmq.DEALER)
    d.linger = 0
    d.setsockopt(zmq.ROUTING_ID, b"a-peer")  # (not the pair's b"D": CPython shares 1-byte bytes)
    d.connect(ep)
    dealers = []
    try:
        for port, keeps in ((wire.port(r), True), (native(r, False), False)):  # kept: a ROUTER's (wire.port)
            got = []
            for _ in range(2):
                d.send_multipart([b"h", b"p"])
                _wait(r)
                got.append(port.recv(8))
            assert got[0] == got[1] == [b"a-peer", b"h", b"p"] and (got[0][0] is got[1][0]) == keeps
        port = wire.port(r)
        for k in range(300):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.setsockopt(zmq.ROUTING_ID, b"peer-%d" % k)
            s.connect(ep)
            dealers.append(s)
        seen = {}
        for rnd in range(2):
            for k, s in enumerate(dealers):
                s.send_multipart([b"%d" % k, b"%d" % rnd])
            for _ in dealers:
                _wait(r)
                ident, head, body = port.recv(8)
                assert ident == b"peer-" + head  # each message comes with its own sender's id
                seen.setdefault(ident, []).append(body)
        assert len(seen) == 300 and all(v == [b"0", b"1"] for v in seen.values())
    finally:
        d.close(0)
        for s in dealers:
            s.close(0)


def test_a_longer_message_than_the_cap_is_marked_and_the_next_one_starts_clean(make, pair):
    r, d = pair
    port = make(r)
    d.send_multipart([b"1", b"2", b"3", b"4", b"5"])
    d.send_multipart([b"next", b"one"])
    _wait(r)
    # the routing id and two frames kept, then the mark: the other frames are read and dropped
    assert port.recv(3) == [b"D", b"1", b"2", b""]
    _wait(r)
    assert port.recv(3) == [b"D", b"next", b"one"]  # exactly cap frames: no mark
    with pytest.raises(ValueError, match="cap"):
        port.recv(0)


def test_a_message_is_sent_whole_and_failures_come_back_as_errno(make, pair):
    r, d = pair
    port = make(r)
    d.send(b"hello")  # the ROUTER knows the peer once it has read from it
    _wait(r)
    assert port.recv(4) == [b"D", b"hello"]
    assert port.send(b"D", b"a", b"b" * 1000) == 0
    _wait(d)
    assert d.recv_multipart() == [b"a", b"b" * 1000]
    # a peer the ROUTER does not know: EHOSTUNREACH, nothing raised and nothing sent
    assert port.send(b"nobody", b"a", b"b") == errno.EHOSTUNREACH
    lone = zmq.Context.instance().socket(zmq.DEALER)  # no peer: the send would block, so EAGAIN
    lone.linger = 0
    try:
        assert make(lone).send(b"a", b"b") == errno.EAGAIN
    finally:
        lone.close(0)
    with pytest.raises(TypeError, match="frame 1 is str"):
        port.send(b"D", "text")
    with pytest.raises(TypeError):
        port.send()
    assert not d.poll(100)  # nothing of the refused sends arrived


def test_metadata_properties_come_with_the_frames_and_a_missing_one_is_empty(make, pair):
    """A missing property is "" (it was an error that lost the message: a CURVE connection that
    no ZAP handler checked carries none, and its first message killed the broker's loop)."""
    r, d = pair
    port = make(r)
    d.send_multipart([b"h", b"p"])
    d.send_multipart([b"h2", b"p2", b"extra"])
    d.send_multipart([b"h3", b"p3"])
    _wait(r)
    assert port.recv(8, ("Socket-Type",)) == ([b"D", b"h", b"p"], ("DEALER",))
    _wait(r)  # (each message over tcp may come on its own)
    assert port.recv(8, ("X-Not-There", "Socket-Type")) == ([b"D", b"h2", b"p2", b"extra"], ("", "DEALER"))
    _wait(r)
    assert port.recv(8) == [b"D", b"h3", b"p3"]
    d.send_multipart([b"h4", b"p4"])
    _wait(r)
    f = r.recv_multipart(copy=False)[-1]
    assert (wire.prop(f, "Socket-Type"), wire.prop(f, "X-Not-There")) == ("DEALER", "")


def test_a_detached_port_raises_instead_of_touching_its_socket(make, pair):
    r, _ = pair
    port = make(r)
    port.detach()
    with pytest.raises(ValueError, match="detached"):
        port.recv(3)
    with pytest.raises(ValueError, match="detached"):
        port.send(b"D", b"x")


def test_a_closed_socket_raises_never_crashes(make, pair):
    """Closed by its owner, or by its context's destroy() (which any thread may call): the Port
    raises as pyzmq does (ENOTSOCK), where a raw handle would be used after libzmq freed it."""
    _, d = pair
    port = make(d)
    d.close(0)
    with pytest.raises(zmq.ZMQError) as err:
        port.recv(3)
    assert err.value.errno == zmq.ENOTSOCK
    with pytest.raises(zmq.ZMQError) as err:
        port.send(b"x")
    assert err.value.errno == zmq.ENOTSOCK
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    other = make(s)
    ctx.destroy(linger=0)
    with pytest.raises(zmq.ZMQError):
        other.recv(3)


def test_the_c_port_refuses_what_is_not_a_socket_and_a_failed_load_changes_nothing(pair):
    if wire.NativePort is None:
        pytest.skip(f"no C Port here: {wire.WHY_NOT}")
    from zmqdist.transport import _wire

    with pytest.raises(AttributeError):
        wire.NativePort("not a socket")
    with pytest.raises(OSError, match="is not loaded"):
        _wire.load("/nonexistent/libzmq.so", zmq.ZMQError)
    with pytest.raises(OSError, match="no zmq_msg_init found"):
        _wire.load(_wire.__file__, zmq.ZMQError)  # loaded, but no libzmq behind it
    with pytest.raises(TypeError, match="exception class"):
        _wire.load(_wire.__file__, "not an exception")
    r, d = pair  # the module still reads and writes through the libzmq it loaded first
    port = wire.NativePort(r)
    d.send_multipart([b"h", b"p"])
    _wait(r)
    assert port.recv(3) == [b"D", b"h", b"p"]
    assert port.send(b"D", b"x") == 0


def test_a_compiled_install_uses_the_c_port():
    """The runtimes' loops read through the C module wherever the install compiled."""
    assert wire.NATIVE == _c_expected(), wire.WHY_NOT


@pytest.fixture(params=["py", "c"])
def make_poller(request):
    """A function that makes a Poller of the implementation under test for a list of items."""
    return _implementation(request.param, wire.NativePoller, wire.PyPoller, "Poller")


def test_a_poller_returns_the_indices_of_ready_sockets_and_descriptors(make_poller, pair):
    r, d = pair
    rfd, wfd = os.pipe()
    try:
        poller = make_poller([r, d, rfd])
        assert poller.poll(0) == []
        d.send_multipart([b"h", b"p"])
        _wait(r)
        assert poller.poll(1000) == [0]
        os.write(wfd, b"x")
        assert poller.poll(1000) == [0, 2]
        r.recv_multipart()
        assert poller.poll(0) == [2]
        os.read(rfd, 1)
        t0 = time.monotonic()
        assert poller.poll(50) == []
        assert time.monotonic() - t0 >= 0.04  # waited for its timeout
        with pytest.raises(ValueError, match="timeout"):
            poller.poll(-2)
    finally:
        os.close(rfd)
        os.close(wfd)


def test_a_poller_lets_other_threads_run_while_it_waits(make_poller, pair):
    """The GIL is released during the wait: a thread counting meanwhile makes progress, and one
    that sends wakes the wait (no limit, -1) well before anything else would."""
    r, d = pair
    poller = make_poller([r])
    counted = []

    def count_then_send():
        n = 0
        t_end = time.monotonic() + 0.2
        while time.monotonic() < t_end:
            n += 1
        counted.append(n)
        d.send(b"wake")

    t = threading.Thread(target=count_then_send)
    t0 = time.monotonic()
    t.start()
    assert poller.poll(-1) == [0]
    t.join(5)
    assert counted and counted[0] > 1000
    assert time.monotonic() - t0 < 5


def test_a_signal_handler_that_raises_interrupts_a_poll(make_poller, pair):
    r, _ = pair
    poller = make_poller([r])

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()
    timer = threading.Timer(0.05, lambda: signal.pthread_kill(main, signal.SIGUSR1))
    try:
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            poller.poll(10_000)
        assert time.monotonic() - t0 < 5
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, old)


def test_a_poller_raises_on_a_closed_socket_and_refuses_what_it_cannot_poll(make_poller, pair):
    _, d = pair
    poller = make_poller([d])
    d.close(0)
    with pytest.raises(zmq.ZMQError) as err:
        poller.poll(0)
    assert err.value.errno == zmq.ENOTSOCK
    with pytest.raises(TypeError, match="item 1 is str, not a socket"):
        make_poller([0, "not a socket"])
    with pytest.raises(ValueError, match="item 0 is not a file descriptor"):
        make_poller([-1])


def test_a_signal_caught_by_another_thread_runs_its_handler_when_a_loop_wakes():
    """The broker's SIGTERM handler must run even when a libzmq or helper thread, not the loop's,
    catches the signal: nothing interrupts the loop's wait then, and a compiled loop whose timers
    and readers are not Python functions runs no bytecode that would run the handler later. (The
    C Poller once ran handlers only on EINTR: a broker sent SIGTERM kept running.)"""
    clock = MonotonicClock()
    mailbox = Mailbox()
    loop = Loop(clock, mailbox)

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    def kill_myself():
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # caught by this thread

    def give_up():
        loop.stop()  # seen at the loop's next wake-up (every 100 ms)

    old = signal.signal(signal.SIGUSR1, handler)
    killer = threading.Timer(0.05, kill_myself)
    backstop = threading.Timer(10.0, give_up)
    try:
        killer.start()
        backstop.start()
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            # timers and mail are C callables: the loop runs no bytecode of its own when compiled
            loop.run(functools.partial(operator.add, 0.1), print)
        # raised by the loop within a few wake-ups, not once the backstop ended it
        assert time.monotonic() - t0 < 5.0
    finally:
        killer.cancel()
        backstop.cancel()
        signal.signal(signal.SIGUSR1, old)
        mailbox.close()
