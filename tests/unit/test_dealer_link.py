"""DealerLink's sends (no connection: its port is replaced by a fake libzmq)."""

import errno
import logging

import zmq

from zmqdist import protocol as p
from zmqdist.transport.sockets import DealerLink

REQ = p.Request(7, "echo", 1000, (), b"payload")


class FakePort:
    """Stands in for a DEALER's port (transport.wire): ``fail_at`` lists the frame numbers that
    fail with EAGAIN, as libzmq does when it rolls back a message whose pipe closed after its
    first frame: nothing of the message goes out."""

    def __init__(self, fail_at: set[int]) -> None:
        self.fail_at = fail_at
        self.n = 0
        self.frames: list[bytes] = []  # what went out, whole messages only

    def send(self, *frames: bytes) -> int:
        for _ in frames:
            self.n += 1
            if self.n in self.fail_at:
                return errno.EAGAIN
        self.frames += frames
        return 0

    def detach(self) -> None:
        pass


def _link(fake: FakePort, keep: bool = True) -> DealerLink:
    link = DealerLink(zmq.Context.instance(), b"link", logging.getLogger("test"), keep=keep)
    link._port = fake
    return link


def test_a_message_rolled_back_at_its_second_frame_is_kept_and_sent_later():
    fake = FakePort(fail_at={2})
    link = _link(fake)
    link.send(REQ)  # must not raise: the peer died between the two frames
    assert fake.frames == []
    assert link.flush()  # the retry (a new pipe, or the reconnected peer) takes it whole
    assert p.decode(*fake.frames) == REQ


def test_later_messages_wait_behind_a_rolled_back_one_in_order():
    fake = FakePort(fail_at={2})
    link = _link(fake)
    link.send(REQ)
    second = REQ._replace(rid=8)
    link.send(second)  # the backlog is flushed first: REQ, then this one
    assert [p.decode(*fake.frames[i : i + 2]) for i in (0, 2)] == [REQ, second]


def test_a_link_that_keeps_nothing_drops_a_rolled_back_message_without_raising():
    fake = FakePort(fail_at={2})
    link = _link(fake, keep=False)
    link.send(REQ)
    assert link.flush()  # nothing kept
    assert fake.frames == []


class FullableContext:
    """A context that can be out of sockets on demand (libzmq says EMFILE then, as it does when the
    process is out of file descriptors or the context at its MAX_SOCKETS)."""

    def __init__(self) -> None:
        self.real = zmq.Context.instance()
        self.full = False

    def socket(self, kind: int) -> zmq.Socket:
        if self.full:
            raise zmq.ZMQError(errno.EMFILE)
        return self.real.socket(kind)


def test_a_link_without_a_socket_to_make_fails_its_first_connect_and_waits_out_later_ones(caplog):
    ctx = FullableContext()
    link = DealerLink(ctx, b"link", logging.getLogger("test"))  # type: ignore[arg-type]
    ctx.full = True
    try:
        link.connect("tcp://127.0.0.1:1")
        raise AssertionError("the first connect made a socket in a full context")
    except zmq.ZMQError as exc:  # a start that cannot work says so at once
        assert exc.errno == errno.EMFILE
    ctx.full = False
    try:
        assert link.connect("tcp://127.0.0.1:1") is not None
        ctx.full = True  # then a failover finds no socket to make
        with caplog.at_level(logging.WARNING):
            assert link.connect("tcp://127.0.0.1:2") is None
        assert "cannot open a socket to tcp://127.0.0.1:2" in caplog.text
        assert link.sock is None and link.endpoint == "tcp://127.0.0.1:2"
        link.send(REQ)  # held, not raised
        assert link.stuck() and link.recv_batch(0.0) == []
        ctx.full = False  # the next failover makes one (what was held went with the old connection)
        assert link.connect("tcp://127.0.0.1:2") is not None and not link.stuck()
    finally:
        link.close()


def test_a_probe_link_waits_out_even_its_first_connect():
    ctx = FullableContext()
    ctx.full = True
    link = DealerLink(ctx, b"probe", logging.getLogger("test"), first_raises=False)  # type: ignore[arg-type]
    assert link.connect("tcp://127.0.0.1:1") is None and link.sock is None


def test_a_connect_that_fails_closes_the_socket_it_made():
    """A bad endpoint raised with the new socket left open (the caller's start failed, and the
    socket stayed in the context until it ended)."""
    from zmqdist.errors import TransportError

    made = []

    class Recording(FullableContext):
        def socket(self, kind: int) -> zmq.Socket:
            s = super().socket(kind)
            made.append(s)
            return s

    link = DealerLink(Recording(), b"link", logging.getLogger("test"))  # type: ignore[arg-type]
    try:
        link.connect("tcp://[not an address")
        raise AssertionError("connected to a malformed endpoint")
    except TransportError as exc:
        assert "cannot connect to tcp://[not an address" in str(exc)
    assert len(made) == 1 and made[0].closed and link.sock is None
