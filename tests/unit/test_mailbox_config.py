"""Leaves and small transport pieces: mailbox, settings, endpoint checks."""

import os

import pytest

from zmqdist import Broker, Client, Codec, Retry, Worker
from zmqdist.config import IPC_PATH_MAX, BrokerSettings, HeartbeatSettings, check_endpoints, load_toml
from zmqdist.errors import ClosedError, ConfigError
from zmqdist.transport import Mailbox, poll_timeout_ms


def test_mailbox_delivers_in_order_and_ignores_posts_after_close():
    m = Mailbox()
    for i in range(3):
        m.post(i)
    assert m.drain() == [0, 1, 2]
    assert m.drain() == []
    m.close()
    m.post("late")  # must not write to a closed (possibly reused) descriptor
    m.close()


def test_pending_says_whether_items_wait_and_reads_nothing():
    """A driving caller glances with pending() before it drains (a drain reads the pipe)."""
    m = Mailbox()
    assert not m.pending()
    m.post("a")
    assert m.pending()
    assert m.pending()  # a glance takes nothing
    assert m.drain() == ["a"]
    assert not m.pending()
    m.close()


def test_post_all_queues_in_order_and_writes_one_wake_up(monkeypatch):
    m = Mailbox()
    writes: list[int] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(fd) or real_write(fd, data))
    m.post("a")
    m.post_all(["b", "c"])
    assert writes == [m._w]  # armed by the first post: the rest write nothing
    assert m.drain() == ["a", "b", "c"]
    m.post_all(["d", "e"])
    assert writes == [m._w, m._w] and m.drain() == ["d", "e"]
    m.close()
    m.post_all(["late"])  # ignored once closed, as post is
    assert len(writes) == 2


def test_a_wake_up_write_and_close_exclude_each_other(monkeypatch):
    """A post that saw the mailbox open writes its byte under the lock that close() takes, so
    close cannot give the descriptors back (to be reused by another file) in between."""
    m = Mailbox()
    during_write = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        got = m._lock.acquire(blocking=False)  # what close() would do now
        if got:
            m._lock.release()
        during_write.append(got)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    m.post("a")
    assert during_write == [False]  # close() would have waited for the write
    m.drain()
    m.close()
    m.post("late")
    assert during_write == [False]  # nothing written once closed


def test_settings_refuse_nonsense_with_clear_errors():
    with pytest.raises(ConfigError, match="heartbeat"):
        HeartbeatSettings(heartbeat_s=0)
    with pytest.raises(ConfigError, match="liveness"):
        HeartbeatSettings(liveness=0)
    with pytest.raises(ConfigError, match="max_queue"):
        BrokerSettings(max_queue=0)
    assert HeartbeatSettings(0.5, 3).ttl_s == 1.5


def test_endpoints_are_checked(tmp_path):
    assert check_endpoints("tcp://a:1", "x") == ("tcp://a:1",)
    for bad in ([], ["nope"], ["udp://a:1"]):
        with pytest.raises(ConfigError):
            check_endpoints(bad, "x")
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_an_ipc_path_too_long_for_a_socket_address_is_refused_where_it_is_given():
    # libzmq refuses it only at bind or connect: a client or worker took it, then its socket thread
    # died at the first connect ("File name too long"), the client's every call with it, even where
    # the failover list went on to a good endpoint.
    at_limit = "ipc:///" + "d" * (IPC_PATH_MAX - 1)
    assert check_endpoints([at_limit], "client") == (at_limit,)
    for ep in (at_limit + "x", "ipc:///tmp/" + "é" * 60):  # bytes count, not characters
        with pytest.raises(ConfigError, match=f"longer than the {IPC_PATH_MAX} a socket address holds"):
            check_endpoints(["tcp://127.0.0.1:5555", ep], "client")
        for make in (lambda: Client([ep]), lambda: Worker([ep]), lambda: Broker(bind=[ep])):
            with pytest.raises(ConfigError, match="ipc path"):
                make()
    assert check_endpoints(["ipc://*", "inproc://" + "d" * 300], "x")  # a wildcard; inproc has no limit


def test_a_bind_address_or_a_malformed_host_in_a_connect_list_is_refused_where_it_is_given():
    # libzmq refuses these at connect (EINVAL): a client or worker took one (the broker's bind
    # copied into the client's list, say), then its socket thread died at the first connect, every
    # call with it, good endpoints after it in the list or not.
    good = "tcp://127.0.0.1:5555"
    for ep, why in (
        ("tcp://*:5555", "is a bind address"),
        ("tcp://127.0.0.1:*", "is a bind address"),
        ("ipc://*", "cannot be connected to"),
        ("tcp://no such host:5555", "is not a host name or address"),
        ("tcp://-x:5555", "is not a host name or address"),
    ):
        with pytest.raises(ConfigError, match=why):
            check_endpoints([ep, good], "client", connect=True)
        for make in (lambda: Client([ep, good]), lambda: Worker([ep, good]), lambda: Broker(upstream=[ep])):
            with pytest.raises(ConfigError, match=why):
                make()
        if "*" in ep:
            assert check_endpoints([ep], "broker bind") == (ep,)  # where a bind takes it
    ok = ["tcp://localhost:1", "tcp://[::1]:5555", "tcp://host-1.example.com:9", "tcp://10.0.0.1:5555;10.0.0.2:5555"]
    assert check_endpoints(ok, "client", connect=True) == tuple(ok)


def test_poll_timeout_rounds_up_and_caps():
    assert poll_timeout_ms(None, 0.0) == 1000
    assert poll_timeout_ms(1.0001, 1.0) == 1
    assert poll_timeout_ms(0.5, 1.0) == 0
    assert poll_timeout_ms(100.0, 0.0) == 1000


def test_json_log_formatter_keeps_extra_fields_and_exceptions():
    import json
    import logging

    from zmqdist.logs import JsonFormatter

    rec = logging.LogRecord("zmqdist.broker", logging.WARNING, "f.py", 1, "refused %s", ("alice",), None)
    rec.trace = "t-123"  # as logging's extra= would set it
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == "refused alice" and out["level"] == "WARNING" and out["trace"] == "t-123"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exception"]


def test_a_client_refuses_a_name_its_broker_would_refuse_and_a_map_window_that_is_not_a_count():
    from zmqdist import Client

    with pytest.raises(ConfigError, match="client name must be a string of at most 255"):
        Client(["tcp://127.0.0.1:1"], name="x" * 256)  # its HELLO would be refused: it would run unregistered
    with Client(["tcp://127.0.0.1:1"], name="x" * 255) as c:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ConfigError, match="window must be a whole number of at least 1"):
                c.map("svc", [1], window=bad)  # at the call, as the built-in map (it was at the first next)
        with pytest.raises(ConfigError, match="service must be a name"):
            c.map("", [1])
        with pytest.raises(ConfigError, match="values must be an iterable"):
            c.map("svc", 5)  # type: ignore[arg-type]
    with pytest.raises(ClosedError):
        c.map("svc", [1])  # a closed client says so at the call


def test_a_worker_refuses_a_service_its_broker_would_refuse_a_name_added_twice_and_a_handler_taking_no_value():
    """'mmi.' was taken locally, then the broker refused the whole registration: the worker served
    nothing and only logged. A second add of a name replaced the first handler silently. A handler
    that cannot take the request's value failed every call."""
    w = Worker(["tcp://127.0.0.1:1"])
    for reserved in ("mmi.service", "zmqdist.mine"):
        with pytest.raises(ConfigError, match=r"'zmqdist\.' or 'mmi\.' are reserved"):
            w.add_service(reserved, abs)
    w.add_service("x", abs)
    with pytest.raises(ConfigError, match="service 'x' is already added to this worker"):
        w.add_service("x", round)
    with pytest.raises(ConfigError, match="already added"):
        w.service("x")(round)
    assert w.services == ("x",)
    for cannot in (lambda: 1, lambda a, b: 1, lambda *, a: 1):  # each call would fail with TypeError
        with pytest.raises(ConfigError, match="must take one positional argument, the request's value"):
            w.add_service("y", cannot)
    for can in (lambda v=None: v, lambda *a: a, lambda v, *, k=1: v, dict.get.__get__({}), print):
        w.add_service(f"ok{len(w.services)}", can)  # print: no signature to read, taken
    assert len(w.services) == 6


def _double(v):
    return v * 2


def _nested():
    def inner(v):
        return v

    return inner


def test_a_process_worker_refuses_at_start_a_handler_retry_or_codec_it_cannot_send_to_a_child():
    """A handler process gets its handler by pickling: a lambda or a nested function was taken, the
    worker registered, and then every call of that service failed with a RemoteError."""
    for fn in (lambda v: v, _nested()):
        w = Worker(["tcp://127.0.0.1:1"], isolation="process")
        w.add_service("ok", _double)
        w.add_service("bad", fn)
        with pytest.raises(ConfigError, match="the handler of 'bad' cannot be sent to a handler process"):
            w.start()
        assert w._runner is None  # refused before anything started: it can be fixed and started
        w.configure(isolation="thread")  # threads take it as it is
        w._check_startable()

    class LocalError(Exception):  # a class made inside a function: not importable by name
        pass

    w = Worker(["tcp://127.0.0.1:1"], isolation="process")
    w.add_service("r", _double, retry=Retry(on=(LocalError,), attempts=2))
    with pytest.raises(ConfigError, match="the retry policy of 'r' cannot be sent"):
        w.start()
    codec = Codec()
    codec.register(complex, 1, lambda c: repr(c).encode(), lambda b: complex(b.decode()))
    w = Worker(["tcp://127.0.0.1:1"], isolation="process", codec=codec)
    w.add_service("ok", _double)
    with pytest.raises(ConfigError, match="the codec cannot be sent"):
        w.start()
    w = Worker(["tcp://127.0.0.1:1"], isolation="process")
    w.add_service("ok", _double, retry=Retry(on=(ValueError,), attempts=2))
    w._check_startable()  # module-level functions and plain policies go
