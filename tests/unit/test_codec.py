"""Payload codecs: application types as msgpack extension types, tuples kept, clear errors; and the
retry policy's decisions (pure functions of the exception, the attempt and a random source)."""

import dataclasses
import datetime
import pickle

import pytest

from zmqdist import Codec, ConfigError, Retry
from zmqdist import protocol as p
from zmqdist.errors import Busy


@dataclasses.dataclass
class Point:
    x: float
    y: float


def _dt_enc(d):
    return d.isoformat().encode()


def _dt_dec(b):
    return datetime.datetime.fromisoformat(b.decode())


def rich():
    codec = Codec(tuples=True)
    codec.register(datetime.datetime, 1, _dt_enc, _dt_dec)
    codec.register(Point, 2, lambda pt: codec.pack(dataclasses.astuple(pt)), lambda b: Point(*codec.unpack(b)))
    return codec


def test_registered_types_round_trip_nested_and_tuples_stay_tuples():
    codec = rich()
    when = datetime.datetime(2026, 12, 3, 20, 15, tzinfo=datetime.UTC)
    value = {
        "at": when,
        "naive": datetime.datetime(2026, 1, 2, 3, 4),
        "path": (Point(1.0, 2.5), Point(-1, 0)),
        "n": [1, 2],
    }
    back = codec.unpack(codec.pack(value))
    assert back["at"] == when and back["naive"] == value["naive"] and back["path"] == (Point(1.0, 2.5), Point(-1, 0))
    assert back["n"] == (1, 2)  # tuples=True: every array comes back a tuple
    assert Codec().unpack(Codec().pack((1, 2))) == [1, 2]  # the default: lists, as msgpack


def test_numpy_arrays_as_the_docs_show(tmp_path):
    numpy = pytest.importorskip("numpy")
    codec = Codec()

    def decode(b):
        dtype, shape, data = codec.unpack(b)
        return numpy.frombuffer(data, dtype).reshape(shape)

    codec.register(numpy.ndarray, 3, lambda a: codec.pack((a.dtype.str, a.shape, a.tobytes())), decode)
    a = numpy.arange(12, dtype="float32").reshape(3, 4)
    assert (codec.unpack(codec.pack(a)) == a).all()


def test_default_and_ext_hook_are_msgpacks_own_and_unknown_types_fail_clearly():
    codec = Codec(default=lambda o: {"set": sorted(o)} if isinstance(o, set) else str(o), ext_hook=lambda c, b: (c, b))
    assert codec.unpack(codec.pack({3, 1})) == {"set": [1, 3]}
    import msgpack

    assert codec.unpack(msgpack.packb(msgpack.ExtType(9, b"z"))) == (9, b"z")
    with pytest.raises(TypeError, match="register it with a Codec"):
        Codec().pack(object())
    with pytest.raises(TypeError, match="not serialisable"):
        p.pack_value(Point(1, 2), Codec())
    with pytest.raises(ConfigError):
        Codec().register(Point, 128, bytes, bytes)
    c = Codec().register(Point, 5, bytes, bytes)
    with pytest.raises(ConfigError, match="registered already"):
        c.register(datetime.date, 5, bytes, bytes)
    with pytest.raises(ValueError, match="not valid msgpack"):
        Codec().unpack(b"\xc1")


def test_a_codec_of_module_functions_pickles_for_process_isolation():
    codec = Codec(tuples=True).register(datetime.datetime, 1, _dt_enc, _dt_dec)
    again = pickle.loads(pickle.dumps(codec))
    when = datetime.datetime(2026, 12, 3)
    assert again.unpack(codec.pack((when,))) == (when,)


def test_retry_decides_by_exception_class_or_name_with_doubling_jittered_backoff():
    r = Retry(on=(OSError, "mymod.Glitch"), attempts=4, backoff=0.1, max_backoff=0.3)
    assert r.decide(ConnectionResetError("x"), 1, lambda: 1.0) == 100  # a subclass of OSError
    assert r.decide(ConnectionResetError("x"), 2, lambda: 1.0) == 200
    assert r.decide(ConnectionResetError("x"), 3, lambda: 1.0) == 300  # capped
    assert r.decide(ConnectionResetError("x"), 3, lambda: 0.0) == 150  # jitter: half at least
    assert r.decide(ConnectionResetError("x"), 4, lambda: 1.0) is None  # the last attempt
    assert r.decide(ValueError("x"), 1, lambda: 1.0) is None
    glitch = type("Glitch", (Exception,), {"__module__": "mymod"})
    assert r.decide(glitch(), 1, lambda: 1.0) == 100
    assert Retry(on="OSError").matches(FileNotFoundError())  # a bare name matches its subclasses too
    wire = Retry.from_spec(r.spec())
    assert wire.attempts == 4 and wire.decide(ConnectionResetError(), 1, lambda: 1.0) == 100
    assert not r.retries_busy and Retry(on=(Busy, OSError)).retries_busy
    assert Retry(on=Busy).spec() == ()  # Busy is the client's to retry: nothing goes to the worker


@pytest.mark.parametrize(
    "kw",
    [{"on": ()}, {"on": (int,)}, {"attempts": 0}, {"attempts": 2.5}, {"backoff": -1}, {"backoff": 2, "max_backoff": 1}],
)
def test_bad_retry_policies_are_refused_with_the_reason(kw):
    with pytest.raises(ConfigError, match="Retry"):
        Retry(**kw)
