"""zmqdist._heads packs a head byte for byte as msgpack does and reads one as msgpack does, and
leaves what it does not pack or read to msgpack (which then packs or reads it, or raises its own
error): the protocol's encodings and decodings, errors included, are the same with it and without."""

import contextlib
import importlib.util
import os
import sys

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmqdist import _native
from zmqdist import protocol as p

from .test_protocol import SAMPLES

if importlib.util.find_spec("zmqdist._heads") is None:
    if _native.STATE == "compiled" and os.name != "nt":
        pytest.fail("a compiled install without zmqdist._heads", pytrace=False)
    pytest.skip("zmqdist._heads is not built here", allow_module_level=True)

from zmqdist._heads import fields, key, message, pack

PREFIX = b"ZD\x01\x05"
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text()
    | st.binary()
)
# every length boundary of msgpack's compact forms, for str, bytes and arrays
LENGTHS = [0, 15, 16, 31, 32, 255, 256, 65535, 65536]
INT_EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
INT_EDGES += [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]


@given(st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner), max_leaves=30))
def test_it_packs_what_msgpack_packs_byte_for_byte(value):
    fields = (value,)
    got = pack(PREFIX, fields)
    # nested deeper than the C packer goes (8): msgpack's then
    assert got == PREFIX + msgpack.packb(fields) or (got is None and _depth(fields) > 8)


def _depth(v):
    return 1 + max((_depth(x) for x in v), default=0) if isinstance(v, (list, tuple)) else 0


@pytest.mark.parametrize("n", LENGTHS)
def test_every_length_and_integer_boundary(n):
    fields = ("x" * n, b"y" * n, tuple(range(n)), *INT_EDGES)
    assert pack(PREFIX, fields) == PREFIX + msgpack.packb(fields)


@pytest.mark.parametrize(
    "fields",
    [(2**64,), (-(2**63) - 1,), ({"a": 1},), ("\ud800",), (bytearray(b"x"),), ((((((((((1,),),),),),),),),),)],
    ids=["past-uint64", "past-int64", "dict", "surrogate", "bytearray", "deep"],
)
def test_what_it_does_not_pack_is_left_to_msgpack(fields):
    assert pack(PREFIX, fields) is None
    try:
        expected = PREFIX + msgpack.packb(fields)
    except Exception as exc:  # msgpack raises for some: the Encoder raises the same
        with pytest.raises(type(exc)):
            p.Encoder()._head(PREFIX, fields, len(fields))
    else:
        assert p.Encoder()._head(PREFIX, fields, len(fields)) == expected


@given(st.lists(LEAVES, max_size=20), st.data())
def test_the_first_n_fields_pack_as_msgpack_packs_them(items, data):
    """``pack(prefix, fields, n)``: the first n items of a tuple (a message's leading fields), the
    same bytes as msgpack packs of the tuple cut there; -1 is the whole; with or without C."""
    t = tuple(items)
    n = data.draw(st.integers(min_value=0, max_value=len(t)))
    assert pack(PREFIX, t, n) == PREFIX + msgpack.packb(t[:n])
    assert pack(PREFIX, t, -1) == pack(PREFIX, t) == PREFIX + msgpack.packb(t)
    with _codec(None, None):
        assert p.Encoder()._head(PREFIX, t, n) == PREFIX + msgpack.packb(t[:n])


def test_a_count_past_the_fields_or_for_a_list_is_refused():
    with pytest.raises(ValueError):
        pack(PREFIX, (1, 2), 3)
    with pytest.raises(ValueError):
        pack(PREFIX, (1, 2), -2)
    with pytest.raises(ValueError):
        pack(PREFIX, [b"a", b"b"], 1)  # a list is a BATCH's frames: packed whole
    with pytest.raises(TypeError):
        pack(PREFIX, (1, 2), "1")
    with pytest.raises(TypeError):
        pack(PREFIX, (1, 2), 1, 2)
    with pytest.raises(OverflowError):
        pack(PREFIX, (1, 2), 2**70)


def test_bad_arguments_raise_type_error():
    with pytest.raises(TypeError):
        pack("not bytes", ())
    with pytest.raises(TypeError):
        pack(PREFIX, {1, 2})
    with pytest.raises(TypeError):
        pack(PREFIX, "ab")
    with pytest.raises(TypeError):
        pack(PREFIX)


@given(st.lists(st.binary(max_size=300), max_size=40), st.sampled_from([0, 65536, 70000]))
def test_a_batch_packs_as_msgpack_packs_it(frames, big):
    """A BATCH's frames (a list) as msgpack.packb writes them, through the buffer's growth too."""
    if big:
        frames = [*frames, b"h" * big]
    assert pack(b"", frames) == msgpack.packb(frames)
    with _codec(pack, fields, message):
        fast = p.pack_batch(frames)
    with _codec(None, None):
        slow = p.pack_batch(frames)
    assert fast == slow == msgpack.packb(frames)


@given(st.lists(st.binary(max_size=20) | LEAVES, max_size=20), st.integers(min_value=0, max_value=20))
def test_a_list_with_any_item_not_bytes_packs_as_msgpack_packs_it(items, at):
    """A list is sized and written in one pass when every item is bytes (a BATCH's frames);
    anything else in it (here put at any place) packs through the general path, the same."""
    items = [*items[:at], "not bytes", *items[at:]]
    assert pack(b"", items) == msgpack.packb(items)
    assert pack(b"", [b"x"] * 16) == msgpack.packb([b"x"] * 16)  # past a fixarray: array16


@given(st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner), max_leaves=30))
def test_it_reads_what_msgpack_reads(value):
    data = PREFIX + msgpack.packb((value,))
    got = fields(data, 4)
    expected = msgpack.unpackb(data[4:], use_list=False)
    # floats are left to msgpack, and so is nesting deeper than 8
    assert got == expected or (got is None and (_has_float(value) or _depth((value,)) > 8))


def _has_float(v):
    return isinstance(v, float) or (isinstance(v, (list, tuple)) and any(_has_float(x) for x in v))


@given(
    st.binary(max_size=40)
    | st.lists(
        st.sampled_from(b"\x00\x01\x7f\x90\x93\x9f\xa3\xc0\xc3\xcc\xcf\xd3\xd9\xdb\xdc\xdd\xe0\xff"), max_size=40
    ).map(bytes)
)
def test_on_any_bytes_it_reads_what_msgpack_reads_or_leaves_them_to_it(data):
    got = fields(data, 0)
    if got is not None:
        assert got == msgpack.unpackb(data, use_list=False)


@pytest.mark.parametrize("n", LENGTHS)
def test_it_reads_every_length_and_integer_boundary(n):
    data = msgpack.packb(("x" * n, b"y" * n, tuple(range(min(n, 256))), *INT_EDGES))
    assert fields(data, 0) == msgpack.unpackb(data, use_list=False)
    longer = msgpack.packb((tuple(range(n)),))
    # arrays of up to 256 items (a head has about 10): longer ones are msgpack's
    assert fields(longer, 0) == (msgpack.unpackb(longer, use_list=False) if n <= 256 else None)


@pytest.mark.parametrize(
    "data",
    [
        b"\x91\xd0\x80",
        b"\x91\xd1\x7f\xff",
        b"\x91\xd2\x80\x00\x00\x00",
        b"\x91\xd3" + b"\xff" * 8,
        b"\x91\xd3\x80" + b"\x00" * 7,
        b"\x91\xd3\x7f" + b"\xff" * 7,
    ],
)
def test_signed_ints_of_every_width_read_as_msgpack_reads_them(data):
    """Every signed form, at its sign boundaries (msgpack reads forms wider than a value needs)."""
    assert fields(data, 0) == msgpack.unpackb(data, use_list=False)


def test_it_leaves_malformed_and_other_heads_to_msgpack():
    good = msgpack.packb((1, "svc"))
    for bad in [b"", good[:-1], good + b"\x00", b"\x92\x01\xa3sv", msgpack.packb({"a": 1}), msgpack.packb((1.5,))]:
        assert fields(bad, 0) is None, bad
    assert fields(b"\x92\x01\xa2\xff\xfe", 0) is None  # not UTF-8
    assert fields(b"\x9f", 0) is None and fields(b"\xdd\xff\xff\xff\xff", 0) is None  # items missing
    with pytest.raises(ValueError):
        fields(good, len(good) + 1)
    with pytest.raises(TypeError):
        fields("not bytes", 0)


@contextlib.contextmanager
def _codec(pack_with, read_with, make_with=None):
    """protocol's head codec set to these functions (None: msgpack, and tuple.__new__ to make
    messages) for the block, then restored."""
    saved = (p._codec.pack, p._codec.read, p._codec.make, p._codec.key)
    p.use_head_codec(pack_with, read_with, make_with, saved[3])
    try:
        yield
    finally:
        p.use_head_codec(*saved)


def _decoded(head, payload, read, make=None):
    with _codec(None, read, make):
        try:
            msg = p.decode(head, payload)
        except p.RemoteProtocolError as exc:
            return ("error", str(exc), exc.code, getattr(exc, "rid", None))
        return (type(msg), msg)  # (== on tuples alone would not tell a Reply from a Result)


def test_every_message_encodes_and_decodes_the_same_with_and_without_it():
    with _codec(pack, fields, message):
        fast = p.Encoder()  # an Encoder takes the packer when it is made
    with _codec(None, None):
        plain = p.Encoder()
    for msg in SAMPLES:
        assert fast.encode(msg) == plain.encode(msg), msg
        head, payload = plain.encode(msg)
        assert _decoded(head, payload, fields, message) == _decoded(head, payload, None) == (type(msg), msg)


def test_message_makes_what_tuple_new_makes():
    for msg in SAMPLES:
        cls, items = type(msg), tuple(msg)
        made = message(cls, items)
        assert type(made) is cls and made == tuple.__new__(cls, items) == cls(*items)
        assert all(a is b for a, b in zip(made, items, strict=True))  # the same objects, not copies
    assert message(tuple, (1, 2)) == (1, 2) and type(message(tuple, ())) is tuple
    # every message the core makes goes through protocol.message: the same with either maker
    with _codec(None, None, None):
        slow = p.message(p.Reply, (7, p.ST_OK, "", b"x", 0))
    with _codec(None, None, message):
        assert p._codec.make is message
        fast = p.message(p.Reply, (7, p.ST_OK, "", b"x", 0))
    assert type(fast) is type(slow) is p.Reply and fast == slow


def test_message_keeps_its_fields_alive_and_lets_them_go():
    payload = bytes(1000)
    before = sys.getrefcount(payload)
    made = [message(p.Reply, (1, 0, "", payload, 0)) for _ in range(100)]
    assert sys.getrefcount(payload) == before + 100
    del made
    assert sys.getrefcount(payload) == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((int, (1,)), "not a subclass of tuple"),
        ((1, (1,)), "not a subclass of tuple"),
        ((p.Reply, [1, 0, "", b"", 0]), "fields: tuple"),
        ((p.Reply,), "fields: tuple"),
        ((p.Reply, (1,), 2), "fields: tuple"),
    ],
)
def test_message_refuses_what_is_not_a_tuple_class_and_a_tuple(args, says):
    with pytest.raises(TypeError, match=says):
        message(*args)


@given(st.sampled_from(SAMPLES), st.integers(min_value=0, max_value=60), st.binary(max_size=6))
def test_a_damaged_head_decodes_or_fails_the_same_with_and_without_it(msg, cut, junk):
    head, payload = p.Encoder().encode(msg)
    damaged = head[: 4 + cut] + junk
    assert _decoded(damaged, payload, fields) == _decoded(damaged, payload, None)


def test_a_compiled_install_packs_and_reads_heads_and_makes_messages_in_c():
    compiled = _native.STATE == "compiled"
    assert (p._codec.pack is pack) == (p._codec.read is fields) == (p._codec.make is message) == compiled
    assert (p._codec.key is key) == compiled


def test_a_short_ascii_string_read_again_is_the_same_object_and_no_string_reads_as_another():
    """A service name read again is the str read before (a dict finds it by identity, its hash
    computed once); a longer or non-ASCII one is new each time; 1,000 names over the cache's 64
    slots (each replacing another) all read as themselves, twice over."""
    head = msgpack.packb(("echo", "x" * 33, "éé"))
    first, second = fields(head, 0), fields(head, 0)
    assert first == second == ("echo", "x" * 33, "éé")
    assert first[0] is second[0] and first[1] is not second[1] and first[2] is not second[2]
    names = [f"svc-{k}" for k in range(1000)]
    for _ in range(2):
        for name in names:
            assert fields(msgpack.packb((name, name.upper())), 0) == (name, name.upper())


KEY_RIDS = [0, 1, 9, 10, 99, 100, 2**31, 2**62 - 1, 2**62, 2**63 - 1, 2**63, 2**64 + 5, -1, -(2**70)]


@pytest.mark.parametrize("ident", [b"", b"\x00", b"\xff\x00\x10", bytes(range(256)), b"\x00k\x8b\x45\x67"])
@pytest.mark.parametrize("rid", KEY_RIDS)
def test_a_default_key_is_the_identity_in_hex_and_the_rid_in_decimal_at_every_edge(ident, rid):
    """What Python's hex and decimal make (a negative rid or one past 64 bits is never an id, but
    still formats as Python would), and protocol.default_key makes the same with it or without."""
    expected = ident.hex() + ":" + str(rid)
    assert key(ident, rid) == expected
    assert key(ident, rid).isascii()
    with _codec(None, None):
        p.use_head_codec(None, None, None, None)
        assert p.default_key(ident, rid) == expected


def test_a_default_key_refuses_what_is_not_bytes_and_an_int():
    for args in [("ab", 1), (b"ab", "1"), (b"ab", 1.0), (b"ab",), (b"ab", 1, 2), (bytearray(b"ab"), 1)]:
        with pytest.raises(TypeError, match="key"):
            key(*args)
