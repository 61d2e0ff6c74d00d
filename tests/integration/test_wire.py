"""The contract of transport.wire's Port, held alike by the C module and the pyzmq fallback (real
sockets over tcp loopback)."""

import errno
import os

import pytest
import zmq

from zmqdist import _native
from zmqdist.transport import wire

pytestmark = pytest.mark.timeout(30)


def _c_expected():
    """Whether this install must have the C Port: compiled, and not turned off for an A/B run."""
    return _native.STATE == "compiled" and os.environ.get(wire.WIRE_ENV, "") != "0"


@pytest.fixture(params=["py", "c"])
def make(request):
    """A function that makes a Port of the implementation under test for a socket."""
    if request.param == "c":
        if wire.NativePort is None:
            if _c_expected():
                pytest.fail(f"a compiled install without the C Port: {wire.WHY_NOT}")
            pytest.skip(f"no C Port here: {wire.WHY_NOT}")
        return wire.NativePort
    return wire.PyPort


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


def test_metadata_properties_come_with_the_frames_and_a_missing_one_raises(make, pair):
    r, d = pair
    port = make(r)
    d.send_multipart([b"h", b"p"])
    d.send_multipart([b"h2", b"p2", b"extra"])
    d.send_multipart([b"h3", b"p3"])
    _wait(r)
    assert port.recv(8, ("Socket-Type",)) == ([b"D", b"h", b"p"], ("DEALER",))
    _wait(r)  # (each message over tcp may come on its own)
    with pytest.raises(zmq.ZMQError):
        port.recv(8, ("X-Not-There",))
    _wait(r)
    assert port.recv(8) == [b"D", b"h3", b"p3"]  # the failed message was read to its end


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
