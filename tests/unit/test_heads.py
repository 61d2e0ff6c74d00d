"""zmqdist._heads packs a head byte for byte as msgpack does, and leaves what it does not pack to
msgpack (the Encoder then packs it, or raises msgpack's own error)."""

import importlib.util
import os

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

from zmqdist._heads import pack

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
            p.Encoder()._head(PREFIX, fields)
    else:
        assert p.Encoder()._head(PREFIX, fields) == expected


def test_bad_arguments_raise_type_error():
    with pytest.raises(TypeError):
        pack("not bytes", ())
    with pytest.raises(TypeError):
        pack(PREFIX, [1, 2])
    with pytest.raises(TypeError):
        pack(PREFIX)


def test_every_message_encodes_the_same_with_and_without_it():
    """The Encoder of a compiled install uses it; one made after use_head_packer(None) uses msgpack
    alone: every sample message comes out the same."""
    saved = p._head_packer
    try:
        p.use_head_packer(pack)
        fast = p.Encoder()
        p.use_head_packer(None)
        plain = p.Encoder()
    finally:
        p.use_head_packer(saved)
    for msg in SAMPLES:
        assert fast.encode(msg) == plain.encode(msg), msg


def test_a_compiled_install_packs_heads_in_c():
    assert (p._head_packer is pack) == (_native.STATE == "compiled")
