"""Every keyword option of the public API, given a value of the wrong type, is refused at the call
with a ConfigError naming it, in a compiled install as in pure Python (tests/test_pure.py runs this
file again on the pure sources).

A compiled module checks a parameter's declared type before its code runs, with a bare TypeError
("float or None object expected; got str") that names no parameter and is not a ZmqdistError; a
wrong clock or context was taken as it was and stopped the socket thread at its first use. The
public calls now take their options as ``**options`` (typed for a type checker by a TypedDict) and
check each one themselves.
"""

import threading

import pytest
import zmq
import zmq.auth

from zmqdist import AsyncClient, Broker, Client, Codec, ConfigError, Retry, Worker

EP = "tcp://127.0.0.1:1"
WRONG = object()  # of no type any option takes


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


CLIENT_OPTIONS = {
    "timeout": "timeout",
    "name": "name",
    "heartbeat_s": "heartbeat",
    "liveness": "liveness",
    "server_key": "server_key",
    "backlog": "backlog",
    "codec": "codec",
    "clock": "clock",
    "context": "context",
}


@pytest.mark.parametrize("option", sorted(CLIENT_OPTIONS))
@pytest.mark.parametrize("make", [Client, AsyncClient])
def test_a_client_refuses_each_option_of_a_wrong_type_naming_it_and_starts_no_thread(make, option):
    before = _threads()
    extra = {"key": "k.key_secret"} if option == "server_key" else {}
    for bad in (WRONG, [1], True) if option in ("name", "server_key") else (WRONG, "5", [1], True):
        with pytest.raises(ConfigError, match=CLIENT_OPTIONS[option]):
            make(EP, **{option: bad}, **extra)
    assert _threads() <= before


WORKER_OPTIONS = {
    "concurrency": "concurrency",
    "name": "name",
    "heartbeat_s": "heartbeat",
    "liveness": "liveness",
    "isolation": "isolation",
    "server_key": "server_key",
    "clock": "clock",
    "context": "context",
    "codec": "codec",
}


@pytest.mark.parametrize("option", sorted(WORKER_OPTIONS))
def test_a_worker_refuses_each_option_of_a_wrong_type_naming_it(option):
    extra = {"key": "k.key_secret"} if option == "server_key" else {}
    for bad in (WRONG, [2], True, 0, "x" if option in ("heartbeat_s", "concurrency", "liveness") else 2.5):
        with pytest.raises(ConfigError, match=WORKER_OPTIONS[option]):
            Worker(EP, **{option: bad}, **extra)
    if option not in ("clock", "context", "codec"):  # what configure changes
        with pytest.raises(ConfigError, match=WORKER_OPTIONS[option]):
            Worker(EP).configure(**{option: WRONG}, **extra)


def test_a_misspelt_option_is_refused_with_the_name_meant():
    with pytest.raises(ConfigError, match="Client takes no option 'timout'; did you mean 'timeout'"):
        Client(EP, timout=1)
    with pytest.raises(ConfigError, match="Worker takes no option 'concurency'; did you mean 'concurrency'"):
        Worker(EP, concurency=2)
    with pytest.raises(ConfigError, match="add_service takes no option 'inlined'; did you mean 'inline'"):
        Worker(EP).add_service("s", abs, inlined=True)
    with pytest.raises(ConfigError, match="configure takes no option 'isolaton'"):
        Worker(EP).configure(isolaton="thread")
    with Client(EP) as c:
        for call in (c.submit, c.call, c.stream):
            with pytest.raises(ConfigError, match="takes no option 'tiemout'; did you mean 'timeout'"):
                call("s", 1, tiemout=1)
        with pytest.raises(ConfigError, match="map takes no option 'windw'; did you mean 'window'"):
            c.map("s", [1], windw=3)
        assert not c._futures  # nothing was sent
        with pytest.raises(ConfigError, match="a progress callback must be a function"):
            c.submit("s", 1).add_progress_callback(5)


@pytest.mark.parametrize("method", ["submit", "call", "stream", "map"])
def test_a_request_refuses_each_option_of_a_wrong_type_naming_it_and_sends_nothing(method):
    options = {"timeout": "timeout", "trace": "trace", "key": "key", "retry": "retry", "window": "window"}
    if method in ("submit", "call"):
        del options["window"]
    if method == "map":
        options = {"timeout": "timeout", "window": "window"}
    with Client(EP, timeout=1) as c:
        for option, says in options.items():
            for bad in (WRONG, ["x"]):
                with pytest.raises(ConfigError, match=says):
                    getattr(c, method)("s", [1] if method == "map" else 1, **{option: bad})
        assert not c._futures


def test_async_calls_refuse_options_of_a_wrong_type():
    ac = AsyncClient(EP, timeout=1)
    try:
        with pytest.raises(ConfigError, match="on_progress must be a function"):
            ac.call("s", 1, on_progress=5)
        with pytest.raises(ConfigError, match="gather takes no option 'window'"):
            ac.gather("s", [1], window=2)
        for option, bad in (("timeout", "1"), ("trace", 5), ("key", ""), ("retry", 3)):
            with pytest.raises(ConfigError, match=option):  # at the call, as the sync calls do
                ac.call("s", 1, **{option: bad})
        with pytest.raises(ConfigError, match="timeout must be a number"):
            ac.gather("s", [1], timeout=[1])
        with pytest.raises(ConfigError, match="service must be a name"):
            ac.gather("", [1])
        assert not ac._client._futures
    finally:
        ac._client.close()


def test_service_options_of_a_wrong_type_are_refused_at_the_decorator():
    w = Worker(EP)
    for option, bad in (("inline", "no"), ("terminate_on_cancel", 1), ("retry", 3)):
        with pytest.raises(ConfigError, match=option):
            w.add_service("s", abs, **{option: bad})
        with pytest.raises(ConfigError, match=option):
            w.service("s", **{option: bad})
    with pytest.raises(ConfigError, match="service name must be"):
        w.service("")  # at the decorator, before any function
    w.add_service("s", abs, inline=True, retry=Retry(attempts=2))
    assert w.services == ("s",)


def test_endpoints_waits_and_codecs_of_a_wrong_type_are_config_errors():
    for make in (Client, Worker):
        for bad in (5, None, {"tcp://127.0.0.1:1": 1}, b"tcp://127.0.0.1:1"):
            with pytest.raises(ConfigError, match="endpoints must be a string or a list"):
                make(bad)
    with pytest.raises(ConfigError, match="bind must be"):
        Broker(5)
    for option in ("clock", "context"):
        with pytest.raises(ConfigError, match=f"broker: {option} must"):
            Broker(EP.replace(":1", ":*"), **{option: "x"})
    b = Broker(EP.replace(":1", ":*"))
    for call in (b.start, b.stop, b.status):
        with pytest.raises(ConfigError, match="timeout must be a number of seconds"):
            call("1")
    c = Client(EP)
    with pytest.raises(ConfigError, match="close's timeout must be a number of seconds"):
        c.close("soon")
    c.close()
    w = Worker(EP)
    with pytest.raises(ConfigError, match="stop's timeout"):
        w.stop(timeout="x")
    for bad in ("no", 0, None, WRONG):  # not taken for true or false, compiled or not
        with pytest.raises(ConfigError, match="stop's drain must be True or False"):
            w.stop(bad)
    with pytest.raises(ConfigError, match="wait's timeout"):
        w.wait("x")
    assert w.wait(0) is False
    for kw in ({"default": 5}, {"ext_hook": "x"}, {"tuples": "yes"}):
        with pytest.raises(ConfigError, match="Codec's"):
            Codec(**kw)
    with pytest.raises(ConfigError, match="register takes a class and two functions"):
        Codec().register(int, 3, "enc", bytes)


def test_the_options_still_take_what_they_took(tmp_path):
    """The values a user passes stay accepted: ints for seconds, key files as ``Path``s (a compiled
    install refused a ``Path`` with a TypeError: its signature said ``str``), a context of its own."""
    import pathlib

    from zmqdist.transport.security import generate

    broker_pub, _ = generate("broker", tmp_path)
    _, own_secret = generate("own", tmp_path)
    for make in (Client, Worker):
        peer = make(EP, server_key=broker_pub, key=own_secret)  # Paths
        assert peer._curve is not None and peer._curve.server_public == zmq.auth.load_certificate(broker_pub)[0]
        if make is Client:
            peer.close()
    ctx = zmq.Context()
    try:
        with Client([EP], timeout=2, heartbeat_s=1, liveness=2, backlog=10, context=ctx, name="n") as c:
            assert (c.timeout, c.backlog, c.name, c._hb.ttl_s) == (2.0, 10, "n", 2)
        w = Worker((EP,), concurrency=3, heartbeat_s=0.5, liveness=3, isolation="process", context=ctx)
        assert (w.concurrency, w.isolation, w._hb.ttl_s) == (3, "process", 1.5)
        w.configure(concurrency=5, isolation=None)
        assert (w.concurrency, w.isolation) == (5, "process")
        with pytest.raises(ConfigError, match="cannot read certificate"):  # a Path is a path, read as one
            Worker(EP, server_key=pathlib.Path("/nonexistent.key"), key=pathlib.Path("/nonexistent.key_secret"))
    finally:
        ctx.term()


def _typeddict_keys(module):
    """Each TypedDict of ``module``'s source with its keys, its bases' included. (Read from the
    source: a compiled module's TypedDicts keep neither their bases' keys nor their optional
    ones at run time, where only a type checker reads them.)"""
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[2] / "zmqdist" / f"{module.__name__.rsplit('.', 1)[1]}.py"
    keys: dict[str, set[str]] = {}
    for node in ast.parse(source.read_text()).body:
        bases = [ast.unparse(b) for b in node.bases] if isinstance(node, ast.ClassDef) else []
        if any(b in keys or b == "TypedDict" for b in bases):
            own = {st.target.id for st in node.body if isinstance(st, ast.AnnAssign)}
            keys[node.name] = own.union(*(keys.get(b, set()) for b in bases))
    return keys


def test_each_calls_defaults_name_exactly_the_options_its_typeddict_types():
    """The names a call accepts at run time are its defaults' keys; a type checker reads them
    from the TypedDict. Written twice, they must not drift: an option typed but not accepted
    would be refused as misspelt, one accepted but not typed refused by the type checker."""
    from zmqdist import client, worker

    typed = {**_typeddict_keys(client), **_typeddict_keys(worker)}
    pairs = {
        "ClientOptions": client._CLIENT_DEFAULTS,
        "RequestOptions": client._REQUEST_DEFAULTS,
        "StreamOptions": client._STREAM_DEFAULTS,
        "MapOptions": client._MAP_DEFAULTS,
        "TimeoutOption": client._TIMEOUT_DEFAULTS,
        "AsyncCallOptions": client._ASYNC_CALL_DEFAULTS,
        "WorkerOptions": worker._WORKER_DEFAULTS,
        "WorkerSettings": worker._SETTINGS_DEFAULTS,
        "ServiceOptions": worker._SERVICE_DEFAULTS,
    }
    assert set(typed) == set(pairs)
    for name, defaults in pairs.items():
        assert typed[name] == set(defaults), name
