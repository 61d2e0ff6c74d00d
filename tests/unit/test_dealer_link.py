"""DealerLink's sends (no connection: its send function is replaced by a fake libzmq)."""

import logging

import zmq

from zmqdist import protocol as p
from zmqdist.transport.sockets import NB, DealerLink

REQ = p.Request(7, "echo", 1000, (), b"payload")


class FakeSend:
    """Stands in for a DEALER's send: ``fail_at`` lists the frame numbers that raise EAGAIN, as
    libzmq does when it rolls back a message whose pipe closed after its first frame."""

    def __init__(self, fail_at: set[int]) -> None:
        self.fail_at = fail_at
        self.n = 0
        self.frames: list[bytes] = []  # what went out, whole messages only
        self._part: list[bytes] = []

    def __call__(self, data: bytes, flags: int) -> None:
        self.n += 1
        if self.n in self.fail_at:
            self._part.clear()  # rolled back: nothing of the message goes out
            raise zmq.Again()
        self._part.append(data)
        if flags == NB:  # the last frame
            self.frames += self._part
            self._part.clear()


def _link(fake: FakeSend, keep: bool = True) -> DealerLink:
    link = DealerLink(zmq.Context.instance(), b"link", logging.getLogger("test"), keep=keep)
    link._fsend = fake
    return link


def test_a_message_rolled_back_at_its_second_frame_is_kept_and_sent_later():
    fake = FakeSend(fail_at={2})
    link = _link(fake)
    link.send(REQ)  # must not raise: the peer died between the two frames
    assert fake.frames == []
    assert link.flush()  # the retry (a new pipe, or the reconnected peer) takes it whole
    assert p.decode(*fake.frames) == REQ


def test_later_messages_wait_behind_a_rolled_back_one_in_order():
    fake = FakeSend(fail_at={2})
    link = _link(fake)
    link.send(REQ)
    second = REQ._replace(rid=8)
    link.send(second)  # the backlog is flushed first: REQ, then this one
    assert [p.decode(*fake.frames[i : i + 2]) for i in (0, 2)] == [REQ, second]


def test_a_link_that_keeps_nothing_drops_a_rolled_back_message_without_raising():
    fake = FakeSend(fail_at={2})
    link = _link(fake, keep=False)
    link.send(REQ)
    assert link.flush()  # nothing kept
    assert fake.frames == []
