"""One round-trip and malformed-input tests per message type of the wire protocol."""

import msgpack
import pytest

from zmqdist import protocol as p
from zmqdist.errors import LocalProtocolError, RemoteProtocolError

SAMPLES = [
    p.Hello(p.ROLE_WORKER, "w1", ("echo", "sum"), 4, 250),
    p.Welcome("broker", "abc123", 250, 4),
    p.Welcome("broker-b", "abc123", 250, 4, 3, "broker-a"),
    p.Request(7, "echo", 5000, ("b1",), b"\x01payload"),
    p.Request(7, "echo", 5000, (), b"\x01payload", "trace-1a2b"),
    p.Task(9, "echo", 4999, 1, "C-1:7", 3, (), b"payload"),
    p.Task(9, "echo", 4999, 1, "C-1:7", 3, ("proxy-a", "master"), b"payload"),
    p.Task(9, "echo", 4999, 1, "C-1:7", 3, (), b"payload", "trace-1a2b"),
    p.Advert((("echo", 3), ("sum", 0))),
    p.Advert(()),
    p.Result(9, p.RS_FAILED, b"err"),
    p.Reply(7, p.ST_BUSY, "queue full", b""),
    p.Heartbeat(p.ROLE_WORKER, "abc123", 5, (1, 2)),
    p.Heartbeat(p.ROLE_BROKER, "abc123", 5, (), 7),
    p.PairState("broker-a", 1, p.PAIR_ACTIVE, 3, "inc", -1, 0),
    p.Replicate(3, 41, 0, p.pack_ops(1.5, [p.OpEnded(7)])),
    p.Handover(3),
    p.Credit(0),
    p.Reconnect("unknown worker"),
    p.Bye("leaving"),
    p.Error(p.E_HEADER, "bad header"),
    p.Request(7, "echo", 5000, (), b"v", "", "order-42", 16, (3, 100, 2000, ("OSError", "builtins.TimeoutError"))),
    p.Request(7, "echo", 5000, (), b"v", "", "order-42"),
    p.Task(9, "echo", 4999, 2, "order-42", 3, (), b"v", "t", 16, (3, 100, 2000, ("OSError",))),
    p.Result(9, p.RS_RETRY, b"err", 250),
    p.Result(9, p.RS_OK, b"", 0, 10_000),
    p.Result(9, p.RS_CANCELLED, b""),
    p.Reply(7, p.ST_OK, "", b"\xc0", 10_000),
    p.Reply(7, p.ST_CANCELLED, "cancelled", b""),
    p.Cancel(7),
    p.Part(7, 0, b"\x01"),
    p.Ack(7, 64),
    p.Progress(7, b"\xcb?\xe0\x00\x00\x00\x00\x00\x00"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    head, payload = p.Encoder().encode(msg)
    assert head[:2] == b"ZD" and head[2] == p.VERSION and head[3] == p.CMD_OF[type(msg)]
    assert p.decode(head, payload) == msg


def test_every_message_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(p.CMD_OF)


# For each type: a header that is well-formed msgpack but invalid for that command.
MALFORMED = {
    p.Hello: [(9, "w", (), 1, 250), (2, "w", ("",), 1, 250), (2, "w", ("a",), -1, 250), (2, "w", ("a",), 1, 0)],
    p.Welcome: [("b", 5, 250, 4), ("b", "i", 0, 4), ("b", "i", 250, 4, -1), ("b", "i", 250, 4, 1, 5)],
    p.Request: [
        (1, "", 10, ()),
        (1, "s", -5, ()),
        (-1, "s", 10, ()),
        (1, "s", 10, ("x",) * 40),
        ("1", "s", 10, ()),
        (1, "s", 10, (), 5),  # a trace that is not a string
        (1, "s", 10, (), "", 5),  # a key that is not a string
        (1, "s", 10, (), "", "k", -1),  # a negative window
        (1, "s", 10, (), "", "k", 70000),  # a window too large
        (1, "s", 10, (), "", "k", 0, (0, 1, 1, ("E",))),  # a retry policy of no attempts
        (1, "s", 10, (), "", "k", 0, (3, 1, 1, ())),  # ... retrying on nothing
        (1, "s", 10, (), "", "k", 0, (3, 1, 1, ("",))),  # ... on a nameless exception
        (1, "s", 10, (), "", "k", 0, (3, -1, 1, ("E",))),  # ... with a negative backoff
        (1, "s", 10, (), "", "k", 0, "retry"),  # ... that is not a policy
    ],
    p.Task: [
        (1, "s", 10, 0, "k", 1, ()),
        (1, "s", 10, 1, 5, 1, ()),
        (1, "s", 10, 1, "k", -1, ()),
        (1, "s", 10, 1, "k", 1, ("x",) * 40),
        (1, "s", 10, 1, "k", 1, ("",)),
        (1, "s", 10, 1, "k", 1, (), "", -3),
        (1, "s", 10, 1, "k", 1, (), "", 0, (1,)),
    ],
    p.Result: [(1, 9), (1, "ok"), (1, 4, -5), (1, 0, 0, -1)],
    p.Reply: [(1, 99, ""), (1, 0, 5), (1, 0, "", -1)],
    p.Cancel: [("7",), (-1,)],
    p.Part: [(7, -1), (7, "0"), ("7", 0)],
    p.Ack: [(7, -1), (7, 1.5)],
    p.Progress: [(-7,), (None,)],
    p.Heartbeat: [(7, "", 0, ()), (1, 2, 0, ()), (2, "", -1, ()), (2, "", 0, ("x",)), (0, "", 0, (), "e")],
    p.PairState: [
        ("a", 2, 1, 1, "i", 0, 0),
        ("a", 1, 3, 1, "i", 0, 0),
        ("a", 1, 1, -1, "i", 0, 0),
        ("a", 1, 1, 1, "i", -2, 0),
        (5, 1, 1, 1, "i", 0, 0),
    ],
    p.Replicate: [(-1, 0, 0), (0, 0, 2), (0, "1", 0)],
    p.Handover: [(-1,), ("1",)],
    p.Credit: [(-1,), (70000,)],
    p.Reconnect: [(5,)],
    p.Bye: [(None,)],
    p.Error: [("x", "y")],
    p.Advert: [((("s", -1),),), ((("", 1),),), ((("s",),),), ("s",), ((("s", 1),) * 5000,), ((("s", 70000),),)],
}


@pytest.mark.parametrize("cls", list(p.CMD_OF), ids=lambda c: c.__name__)
def test_malformed_headers_raise_remote_protocol_error(cls):
    prefix = p.HEAD_PREFIX[cls]
    for fields in MALFORMED[cls]:
        with pytest.raises(RemoteProtocolError) as ei:
            p.decode(prefix + msgpack.packb(fields), b"")
        assert ei.value.code == p.E_HEADER
    # too few fields, not an array, not msgpack at all
    for head in (prefix + msgpack.packb([]), prefix + msgpack.packb({"a": 1}), prefix + b"\xc1\xc1"):
        with pytest.raises(RemoteProtocolError):
            p.decode(head, b"")


def test_request_error_carries_rid_when_readable():
    head = p.HEAD_PREFIX[p.Request] + msgpack.packb((42, "", 10, ()))
    with pytest.raises(RemoteProtocolError) as ei:
        p.decode(head, b"x")
    assert ei.value.rid == 42


def test_wrong_version_and_tag_and_command():
    good, _ = p.encode(p.Credit(1))
    with pytest.raises(RemoteProtocolError, match="version 9") as ei:
        p.decode(b"ZD\x09" + good[3:], b"")
    assert ei.value.code == p.E_VERSION
    with pytest.raises(RemoteProtocolError, match="bad protocol tag"):
        p.decode(b"HTTP/1.1", b"")
    with pytest.raises(RemoteProtocolError) as ei:
        p.decode(b"ZD\x01\x63" + good[4:], b"")
    assert ei.value.code == p.E_COMMAND
    with pytest.raises(RemoteProtocolError):
        p.decode(b"", b"")
    with pytest.raises(RemoteProtocolError):
        p.decode(b"ZD\x01", b"")


def test_control_message_with_payload_is_refused():
    head, _ = p.encode(p.Credit(1))
    with pytest.raises(RemoteProtocolError, match="unexpected payload"):
        p.decode(head, b"junk")


def test_extra_trailing_fields_are_ignored_for_forward_compatibility():
    head = p.HEAD_PREFIX[p.Credit] + msgpack.packb((3, "future-field"))
    assert p.decode(head, b"") == p.Credit(3)


def test_optional_trailing_fields_default_when_absent():
    welcome = p.decode(p.HEAD_PREFIX[p.Welcome] + msgpack.packb(["b", "i", 250, 4]), b"")
    assert welcome == p.Welcome("b", "i", 250, 4, 0, "") and welcome.epoch == 0 and welcome.peer == ""
    welcome = p.decode(p.HEAD_PREFIX[p.Welcome] + msgpack.packb(["b", "i", 250, 4, 9]), b"")
    assert welcome.epoch == 9 and welcome.peer == ""
    hb = p.decode(p.HEAD_PREFIX[p.Heartbeat] + msgpack.packb([0, "i", 1, [], 4]), b"")
    assert hb.epoch == 4 and hb.rtt_us == 0  # a peer from before rtt_us
    hb = p.decode(p.HEAD_PREFIX[p.Heartbeat] + msgpack.packb([0, "i", 1, [], 4, 1500, "future"]), b"")
    assert hb.epoch == 4 and hb.rtt_us == 1500 and len(hb) == 6
    with pytest.raises(p.RemoteProtocolError, match="rtt_us"):
        p.decode(p.HEAD_PREFIX[p.Heartbeat] + msgpack.packb([0, "i", 1, [], 4, -1]), b"")


OPS = [
    p.OpAccepted(1, b"c", 2, "s", 3.5, ("proxy",), "t", "k", 1, b"x"),
    p.OpSent(1, b"W", 2),
    p.OpRequeued(1),
    p.OpEnded(1),
]


def test_replication_ops_round_trip_as_named_records():
    assert p.unpack_ops(p.pack_ops(1.25, OPS)) == (1.25, OPS)


def _wire(*ops):
    return msgpack.packb([1.0, *ops], use_bin_type=True)


@pytest.mark.parametrize(
    "bad",
    [
        b"\xc1",  # not msgpack
        msgpack.packb({"a": 1}),  # not a list
        msgpack.packb(5),
        msgpack.packb(["not a time"]),
        _wire(["a", 1, "not bytes", 2, "s", 3.0, [], "", "", 0, b"x"]),  # OpAccepted: client must be bytes
        _wire(["a", -1, b"c", 2, "s", 3.0, [], "", "", 0, b"x"]),  # a negative ticket
        _wire(["a", 1, b"c", 2, "s", 3.0, [5], "", "", 0, b"x"]),  # hops must be names
        _wire(["s", 1]),  # OpSent: too short
        _wire(["s", 1, "W", 2]),  # OpSent: member must be bytes
        _wire(["q", 1, 2]),  # OpRequeued: too long
        _wire(["e"]),  # OpEnded: no ticket
        _wire(["z", 1]),  # unknown kind
    ],
)
def test_replication_ops_refuse_garbage_naming_it(bad):
    with pytest.raises(RemoteProtocolError):
        p.unpack_ops(bad)


def test_encode_refuses_non_messages():
    with pytest.raises(LocalProtocolError):
        p.Encoder().encode(("not", "a", "message"))  # type: ignore[arg-type]


def test_values_round_trip_and_bytes_pass_through():
    for v in (None, 1, -2.5, "text", b"\x00\xffraw", [1, {"a": b"b"}], {1: 2}):
        assert p.unpack_value(p.pack_value(v)) == v
    with pytest.raises(TypeError, match="not msgpack-serialisable"):
        p.pack_value(object())
    with pytest.raises(ValueError):
        p.unpack_value(b"\xc1")


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 200_000])
def test_a_byte_string_packs_as_msgpack_does_at_every_length_boundary(n):
    # pack_value writes a bytes value's bin header itself (no Packer): byte for byte msgpack's
    value = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    assert p.pack_value(value) == msgpack.packb(value)
    assert p.unpack_value(p.pack_value(value)) == value
    assert p.unpack_value(p.pack_value(bytearray(value))) == value  # not bytes: through the Packer


def test_error_payload_tolerates_garbage():
    assert p.unpack_error(p.pack_error("ValueError", "bad", "tb")) == ("ValueError", "bad", "tb")
    assert p.unpack_error(b"\xc1")[0] == "UnknownError"


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_fields = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=300) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=5).map(tuple),
    max_leaves=8,
)


_near_valid = st.one_of(
    st.tuples(  # REQUEST-shaped, around every boundary
        st.integers(-1, 2**63) | st.booleans(),
        st.text(max_size=258),
        st.integers(-1, p.MAX_BUDGET_MS + 1),
        st.just(()) | st.lists(st.text(max_size=3), max_size=2).map(tuple),
    ),
    st.tuples(  # REQUEST-shaped with a trace
        st.integers(0, 2**63 - 1),
        st.text(min_size=1, max_size=5),
        st.integers(0, 1000),
        st.just(()),
        st.text(max_size=258) | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=3),
    ),
    st.tuples(st.integers(-1, 2**63), st.integers(-1, 3) | st.booleans()),  # RESULT-shaped
)


@given(
    cmd=st.sampled_from([p.Request, p.Result]),
    fields=st.lists(_fields, max_size=6).map(tuple) | _near_valid,
)
def test_fast_paths_accept_and_refuse_exactly_what_the_general_decoder_does(cmd, fields):
    head = p.HEAD_PREFIX[cmd] + msgpack.packb(fields)
    try:
        expected = p._decode_general(head, b"pl")
    except RemoteProtocolError as exc:
        with pytest.raises(RemoteProtocolError):
            p.decode(head, b"pl")
        assert exc.code == p.E_HEADER
    else:
        assert p.decode(head, b"pl") == expected


def same_as_general(cmd: type, fields: tuple) -> None:
    """``decode`` (fast path first) accepts and refuses exactly what the general decoder does."""
    head = p.HEAD_PREFIX[cmd] + msgpack.packb(fields)
    try:
        expected = p._decode_general(head, b"pl")
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            p.decode(head, b"pl")
    else:
        assert p.decode(head, b"pl") == expected


_reply_shaped = st.tuples(
    st.integers(-1, 2**63) | st.booleans(),
    st.integers(-1, 8) | st.booleans(),
    st.text(max_size=3) | st.binary(max_size=2) | st.none(),
)
_task_shaped = st.tuples(  # around every boundary, with and without a trace
    st.integers(-1, 2**63) | st.booleans(),
    st.text(max_size=258),
    st.integers(-1, p.MAX_BUDGET_MS + 1),
    st.integers(-1, 1001) | st.booleans(),
    st.text(max_size=3) | st.integers(0, 3),
    st.integers(-1, 2**63),
    st.just(()) | st.lists(st.text(min_size=1, max_size=3), max_size=2).map(tuple),
).flatmap(lambda t: st.just(t) | (st.text(max_size=258) | st.integers(-(2**63), 2**64 - 1)).map(lambda tr: (*t, tr)))


@given(data=st.data(), cmd=st.sampled_from([p.Reply, p.Task]))
def test_the_peers_fast_paths_accept_and_refuse_exactly_what_the_general_decoder_does(data, cmd):
    """REPLY (every reply a client reads) and TASK (every task a worker reads)."""
    shaped = _reply_shaped if cmd is p.Reply else _task_shaped
    fields = data.draw(shaped | st.lists(_fields, max_size=9).map(tuple))
    same_as_general(cmd, fields)


@pytest.mark.parametrize(
    ("cmd", "fields"),
    [
        (p.Reply, (1, 7, "")),  # the last status
        (p.Reply, (1, 8, "")),  # past it
        (p.Reply, (1, True, "")),  # a bool is not a status
        (p.Reply, (2**63, 0, "")),  # id past its range
        (p.Reply, (1, 0, b"")),  # message not a string
        (p.Reply, (1, 0, "", 3)),  # with parts: the general path
        (p.Task, (1, "s", 0, 1, "", 0, ())),
        (p.Task, (1, "s", 0, 0, "", 0, ())),  # attempt from 1
        (p.Task, (1, "s", 0, 1001, "", 0, ())),  # to 1000
        (p.Task, (1, "", 0, 1, "", 0, ())),  # a service has a name
        (p.Task, (1, "s", p.MAX_BUDGET_MS + 1, 1, "", 0, ())),
        (p.Task, (1, "s", 0, 1, "", -1, ())),
        (p.Task, (1, "s", 0, 1, "", 0, ("a",))),  # hops: the general path
        (p.Task, (1, "s", 0, 1, "", 0, (), "t" * 256)),  # trace too long
        (p.Task, (1, "s", 0, 1, "", 0, (), "tr")),
    ],
)
def test_the_peers_fast_paths_at_every_boundary(cmd, fields):
    same_as_general(cmd, fields)


_IDS = [0, 2**62 - 1, 2**62, 2**63 - 1, 2**63, -1, True, False]  # around a machine int's edge too


@pytest.mark.parametrize("rid", _IDS)
def test_every_fast_path_reads_ids_at_every_edge_as_the_general_decoder_does(rid):
    """Compiled, an id up to 2**62 - 1 is compared as a machine int and one above it as an
    object; a bool is never an id (compiled code narrowed by isinstance would take it for one)."""
    valid = type(rid) is int and 0 <= rid <= p.MAX_ID
    for cmd, fields in [
        (p.Request, (rid, "s", 0, ())),
        (p.Result, (rid, p.RS_OK)),
        (p.Reply, (rid, 0, "")),
        (p.Task, (rid, "s", 0, 1, "", 0, ())),
        (p.Task, (1, "s", 0, 1, "", rid, ())),  # the seq is an id too
    ]:
        same_as_general(cmd, fields)
        head = p.HEAD_PREFIX[cmd] + msgpack.packb(fields)
        fast = {
            p.Request: lambda: r if (r := p.plain_request(head))[1] else None,  # NOT_PLAIN_*: not taken
            p.Result: lambda: r if (r := p.plain_result(head))[1] >= 0 else None,
            p.Reply: lambda: p.plain_reply(head, b""),
            p.Task: lambda: p.plain_task(head, b""),
        }[cmd]()
        assert (fast is not None) == valid, (cmd, fields)
        if valid:
            assert fast[0] == fields[0] and type(fast[0]) is int


def test_the_rid_of_an_oversized_request_is_read_from_its_head_with_or_without_hops():
    """A broker answers a request over its limit by rid (a proxy's forwarded one has hops)."""
    enc = p.Encoder()
    plain, _ = enc.encode(p.Request(7, "echo", 5000, (), b"y"))
    hopped, _ = enc.encode(p.Request(8, "echo", 5000, ("P", "Q"), b"y", "t", "k"))
    result, _ = enc.encode(p.Result(9, p.RS_OK, b"y"))
    assert p.request_rid(plain) == 7 and p.request_rid(hopped) == 8
    assert p.request_rid(result) is None and p.request_rid(plain[:6]) is None and p.request_rid(b"") is None


@given(
    kind=st.text(max_size=40),
    message=st.text(max_size=3000),
    tb=st.text(max_size=3000),
    limit=st.integers(0, 4000),
)
def test_a_failure_cut_to_the_limit_keeps_its_type_the_messages_start_and_the_tracebacks_end(kind, message, tb, limit):
    """A handler's failure over the broker's limit goes cut rather than refused whole: within the
    limit, the same type, a prefix of the message and a suffix of the traceback (marked if cut)."""
    data = p.pack_error(kind, message, tb)
    out = p.fit_error(data, limit)
    mark = " [cut to the broker's message limit]"
    if len(data) <= limit:
        assert out == data  # what fits is not cut
        return
    if out is None:
        assert len(kind.encode()) + 2 * len(mark) + 16 > limit  # only when the type leaves no room
        return
    assert len(out) <= limit
    k, m, t = p.unpack_error(out)
    assert k == kind
    assert message.startswith(m.removesuffix(mark)) and (m == message or m.endswith(mark))
    assert tb.endswith(t.removeprefix(mark)) and (t == tb or t.startswith(mark))


@pytest.mark.parametrize(
    "service",
    ["zmqdist.status", "mmi.service", "zmqdist.", "mmi.", "zmqdist", "mmi", "echo", "", "Zmqdist.x", "xmmi.x"],
)
def test_internal_is_what_the_internal_prefixes_say(service):
    assert p.internal(service) is service.startswith(p.INTERNAL_PREFIXES)
