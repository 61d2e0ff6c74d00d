"""Natural batching at the unit level: the BATCH framing, the broker's door and grouping, and a
peer's link (its sends replaced by a fake libzmq, as in test_dealer_link)."""

from __future__ import annotations

import errno
import logging

import msgpack
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.broker import BrokerCore
from zmqdist.errors import RemoteProtocolError
from zmqdist.transport.sockets import DealerLink

ENC = p.Encoder()


def frames_of(*msgs: p.Message) -> list[bytes]:
    return [f for m in msgs for f in ENC.encode(m)]


# --- the framing ------------------------------------------------------------------------------


def test_a_batch_carries_its_messages_in_order():
    msgs = [p.Request(i, "echo", 1000, (), b"v%d" % i) for i in range(5)]
    frames = p.unpack_batch(p.pack_batch(frames_of(*msgs)))
    assert [p.decode(frames[i], frames[i + 1]) for i in range(0, len(frames), 2)] == msgs


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        msgpack.packb({"a": 1}),  # not an array
        msgpack.packb([]),  # empty
        msgpack.packb([b"head"]),  # odd: a head without its payload
        msgpack.packb([b"head", "payload"]),  # a str, not bytes
        msgpack.packb([p.BATCH_HEAD, b""]),  # a batch inside a batch
        msgpack.packb([b"h", b"p"] * (p.MAX_BATCH + 1)),  # over the count limit
    ],
)
def test_a_bad_batch_is_refused_whole_with_a_reason(payload):
    with pytest.raises(RemoteProtocolError, match="BATCH") as e:
        p.unpack_batch(payload)
    assert e.value.code == p.E_FRAMES


def test_hello_and_welcome_say_whether_a_peer_reads_batches_and_old_ones_mean_no():
    h = p.Hello(p.ROLE_CLIENT, "c", (), 0, 250, 0, 64)
    assert p.decode(*ENC.encode(h)).batch == 64
    old = p.HEAD_PREFIX[p.Hello] + msgpack.packb([p.ROLE_CLIENT, "c", [], 0, 250])  # first revision
    assert p.decode(old, b"").batch == 0
    w = p.Welcome("b", "i", 250, 4, 0, "", 10, 100, p.MAX_BATCH)
    assert p.decode(*ENC.encode(w)).batch == p.MAX_BATCH


def test_a_writer_cuts_batches_at_the_count_limit_and_before_batch_bytes():
    small = frames_of(*[p.Reply(i, p.ST_OK, "", b"x") for i in range(5)])
    assert p.batch_spans(small, 2) == [(0, 2), (2, 4), (4, 5)]
    assert p.batch_spans(small) == [(0, 5)]
    big = frames_of(*[p.Reply(i, p.ST_OK, "", b"x" * (p.BATCH_BYTES // 3)) for i in range(5)])
    assert p.batch_spans(big) == [(0, 2), (2, 4), (4, 5)]  # a third would pass BATCH_BYTES
    huge = frames_of(*[p.Reply(i, p.ST_OK, "", b"x" * p.BATCH_BYTES) for i in range(2)])
    assert p.batch_spans(huge) == [(0, 1), (1, 2)]  # alone, each goes as itself
    assert p.batch_spans([]) == []


@given(
    sizes=st.lists(st.integers(0, 3000), max_size=60),
    limit=st.integers(1, 1024),
    max_bytes=st.integers(1, 20_000),
)
def test_every_batch_fits_the_readers_limit_and_closes_only_when_the_next_message_would_not(sizes, limit, max_bytes):
    """A BATCH over the reader's --max-message-size is refused whole: packed, each batch of two or
    more stays within ``max_bytes``; a batch ends early only because the next message would pass
    it (or at the count); every message goes once, in order."""
    frames = frames_of(*[p.Reply(i, p.ST_OK, "", b"x" * n) for i, n in enumerate(sizes)])
    spans = p.batch_spans(frames, limit, max_bytes)
    assert [i for a, b in spans for i in range(a, b)] == list(range(len(sizes)))
    for k, (a, b) in enumerate(spans):
        assert b - a <= limit
        if b - a > 1:
            assert len(p.pack_batch(frames[2 * a : 2 * b])) <= max_bytes
        if k + 1 < len(spans) and b - a < limit:  # closed early: the next one did not fit
            # (the writer counts the most msgpack's headers take: 5 bytes, 2 for a short bin)
            slack = 3 * 2 * (b - a + 1) + 4
            assert len(p.pack_batch(frames[2 * a : 2 * b + 2])) + slack > max_bytes


# --- the broker's door and grouping -----------------------------------------------------------


def make() -> BrokerCore:
    return BrokerCore(BrokerSettings(name="b"), "inc", now=0.0)


def script(n_workers: int, n_requests: int) -> list[tuple[bytes, p.Message]]:
    """Workers register, clients send requests, workers answer the tasks they get (tickets are
    deterministic: 1, 2, ... in order of acceptance)."""
    msgs: list[tuple[bytes, p.Message]] = [
        (b"W%d" % i, p.Hello(p.ROLE_WORKER, f"w{i}", ("echo",), 2, 250, 0, p.MAX_BATCH)) for i in range(n_workers)
    ]
    msgs += [(b"C", p.Request(r, "echo", 5000, (), b"x%d" % r)) for r in range(n_requests)]
    msgs += [(b"C", p.Request(0, "echo", 5000, (), b"dup"))]  # a duplicate rid
    msgs += [(b"C", p.Request(99, "nobody", 5000, (), b""))]
    return msgs


def feed_singly(core: BrokerCore, msgs: list[tuple[bytes, p.Message]]) -> list:
    out: list = []
    for peer, m in msgs:
        core.receive_frames(peer, *ENC.encode(m), 0.0, out)
    return out


@given(cuts=st.lists(st.integers(1, 6), min_size=1, max_size=40))
def test_a_batch_through_the_door_is_exactly_its_messages_one_by_one(cuts):
    """Same outputs, same state, same counters (but the batches' own) however the messages are grouped."""
    msgs = script(3, 12)
    a, b = make(), make()
    out_a = feed_singly(a, msgs)
    out_b: list = []
    i = 0
    k = 0
    sent = 0
    inside = 0
    while i < len(msgs):
        n = cuts[k % len(cuts)]
        k += 1
        chunk = msgs[i : i + n]
        peers = {peer for peer, _ in chunk}
        if len(peers) == 1:  # a batch is what one peer sent
            b.receive_frames(chunk[0][0], p.BATCH_HEAD, p.pack_batch(frames_of(*(m for _, m in chunk))), 0.0, out_b)
            sent += 1
            inside += len(chunk)
        else:
            out_b += feed_singly(b, chunk)
        i += n
    assert out_a == out_b
    ca, cb = a.counters.as_dict(), b.counters.as_dict()
    assert (ca.pop("batches_in"), cb.pop("batches_in")) == (0, sent)
    assert (ca.pop("batched_in"), cb.pop("batched_in")) == (0, inside)
    assert ca == cb
    assert sorted(a.d.reqs) == sorted(b.d.reqs)


def test_a_bad_batch_is_bad_input_and_nothing_of_it_is_handled():
    core = make()
    out: list = []
    good = frames_of(p.Request(1, "echo", 1000, (), b""))
    core.receive_frames(b"C", p.BATCH_HEAD, msgpack.packb([*good, b"odd"]), 0.0, out)
    assert core.counters.bad_input == 1 and core.counters.requests == 0
    assert [type(m) for _, m in out if _ == b"C"] == [p.Error]


def test_the_broker_groups_what_one_step_made_for_a_peer_that_reads_batches_only():
    core = make()
    out: list = []
    for peer, batch in ((b"C1", p.MAX_BATCH), (b"C2", 0)):
        core.receive_frames(peer, *ENC.encode(p.Hello(p.ROLE_CLIENT, "c", (), 0, 250, 0, batch)), 0.0, out)
    assert core.batching == {b"C1": p.MAX_BATCH}
    msgs = [(b"C1", p.Reply(i, p.ST_OK, "", b"")) for i in range(5)]
    msgs += [(b"C2", p.Reply(i, p.ST_OK, "", b"")) for i in range(3)]
    msgs.insert(2, (b"C1x", p.Reply(9, p.ST_OK, "", b"")))  # an unknown peer: single
    batches, rest = core.group(msgs)
    assert batches == [(b"C1", [m for peer, m in msgs if peer == b"C1"])]
    assert rest == [(peer, m) for peer, m in msgs if peer != b"C1"]  # in their order
    assert core.counters.batches_out == 1 and core.counters.batched_out == 5


def test_a_batch_is_bounded_by_the_peers_limit_and_one_message_alone_travels_as_today():
    core = make()
    core.note_batching(b"C", 4)
    msgs = [(b"C", p.Reply(i, p.ST_OK, "", b"")) for i in range(9)]
    batches, rest = core.group(msgs)
    assert [len(m) for _, m in batches] == [4, 4]
    assert rest == [msgs[8]]  # the ninth, alone: a plain message
    batches, rest = core.group(msgs[:1])
    assert batches == [] and rest == msgs[:1]


def test_a_peer_that_registers_again_without_batches_gets_single_messages():
    core = make()
    core.note_batching(b"C", p.MAX_BATCH)
    out: list = []
    core.receive_frames(b"C", *ENC.encode(p.Hello(p.ROLE_CLIENT, "c", (), 0, 250)), 0.0, out)
    assert b"C" not in core.batching


# --- a peer's link ------------------------------------------------------------------------------


class FakePort:
    """A DEALER's port (transport.wire): ``fail`` makes every send return EAGAIN, ``fail_calls``
    the sends whose frame so numbered fails (nothing of that message goes out)."""

    def __init__(self, fail: bool = False, fail_calls: frozenset[int] = frozenset()) -> None:
        self.fail = fail
        self.fail_calls = fail_calls
        self.calls = 0
        self.messages: list[list[bytes]] = []

    def send(self, *frames: bytes) -> int:
        for _ in frames:
            self.calls += 1
            if self.fail or self.calls in self.fail_calls:
                return errno.EAGAIN
        self.messages.append(list(frames))
        return 0

    def detach(self) -> None:
        pass


def link_with(fake: FakePort, batch: int) -> DealerLink:
    link = DealerLink(zmq.Context.instance(), b"link", logging.getLogger("test"))
    link._port = fake
    link.batch = batch
    return link


REQS = [p.Request(i, "echo", 1000, (), b"v") for i in range(5)]


def send_corked(link: DealerLink, msgs: list) -> None:
    link.cork()
    for m in msgs:
        link.send(m)
    link.uncork()


def test_what_a_corked_link_holds_goes_out_as_one_batch_to_a_broker_that_reads_them():
    fake = FakePort()
    link = link_with(fake, p.MAX_BATCH)
    link.cork()
    for r in REQS:
        link.send(r)
    assert fake.messages == []  # held
    link.uncork()
    assert len(fake.messages) == 1 and fake.messages[0][0] == p.BATCH_HEAD
    frames = p.unpack_batch(fake.messages[0][1])
    assert [p.decode(frames[i], frames[i + 1]) for i in range(0, len(frames), 2)] == REQS


def test_a_link_sends_singly_to_a_broker_that_does_not_read_batches_and_alone_as_today():
    fake = FakePort()
    link = link_with(fake, 0)
    send_corked(link, REQS)
    assert [p.decode(*m) for m in fake.messages] == REQS
    fast = FakePort()
    link = link_with(fast, p.MAX_BATCH)
    send_corked(link, REQS[:1])
    assert fast.messages == [list(ENC.encode(REQS[0]))]  # one request alone: two frames, no BATCH


def test_a_link_closes_a_batch_at_the_brokers_limit():
    fake = FakePort()
    link = link_with(fake, 2)
    send_corked(link, REQS)
    assert [m[0] == p.BATCH_HEAD for m in fake.messages] == [True, True, False]


def test_a_link_keeps_each_batch_within_the_message_limit_its_brokers_welcome_said():
    """A broker refuses a BATCH over its --max-message-size whole, though each message in it fits."""
    reqs = [p.Request(i, "echo", 1000, (), b"v" * 100) for i in range(20)]
    fake = FakePort()
    link = link_with(fake, p.MAX_BATCH)
    welcome = p.Welcome("b", "i", 250, 4, 0, "", 10, 600, p.MAX_BATCH)
    link._decode(*ENC.encode(welcome), [], 0.0)
    assert link.batch == p.MAX_BATCH and link.batch_bytes == 600
    send_corked(link, reqs)
    assert len(fake.messages) >= 4 and all(len(m[-1]) <= 600 for m in fake.messages)
    assert [p.decode(*f) for m in fake.messages for f in p.frames_of(*m)] == reqs
    link._decode(*ENC.encode(welcome._replace(max_message=0)), [], 0.0)  # a broker that says no limit
    assert link.batch_bytes == p.BATCH_BYTES


def test_a_batch_that_cannot_go_is_kept_message_by_message_heartbeats_dropped():
    fake = FakePort(fail=True)
    link = link_with(fake, p.MAX_BATCH)
    link.cork()
    link.send(REQS[0])
    link.send(p.Heartbeat(p.ROLE_CLIENT, "", 0, ()))
    link.send(REQS[1])
    link.uncork()
    fake.fail = False
    assert link.flush()
    assert [p.decode(*m) for m in fake.messages] == REQS[:2]


def test_after_a_batch_that_could_not_go_the_next_ones_wait_behind_it_in_order():
    fake = FakePort(fail_calls=frozenset({1}))  # the first batch cannot start (EAGAIN)
    link = link_with(fake, 2)  # batches of two: REQS go as [0, 1], [2, 3], 4
    send_corked(link, REQS)
    assert link.flush()
    assert [p.decode(*f) for m in fake.messages for f in p.frames_of(*m)] == REQS


def test_a_link_starts_a_new_connection_not_knowing_whether_its_broker_reads_batches():
    link = link_with(FakePort(), p.MAX_BATCH)
    link.connect("tcp://127.0.0.1:1")  # nothing listens: the connection waits, the socket exists
    try:
        assert link.batch == 0
    finally:
        link.close()
