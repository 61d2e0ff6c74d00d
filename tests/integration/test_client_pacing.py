"""A client never trips its own broker-side quota: it keeps the excess and paces itself."""

import threading

import pytest

from tests.integration.helpers import wait_for
from zmqdist import Broker, Busy, Client, Worker

pytestmark = pytest.mark.integration


@pytest.fixture
def echo_broker(tmp_path):
    ep = f"ipc://{tmp_path}/b.sock"
    b = Broker(bind=[ep]).start()  # the default per-client quota: 2,500 open requests
    w = Worker([ep], concurrency=16)
    w.add_service("echo", lambda x: x)
    w.start()
    wait_for(lambda: len(b.status()["workers"]) == 1, 20, "worker registered")
    yield b, ep
    w.stop(drain=False)
    b.stop()


@pytest.mark.timeout(120)
def test_20000_submits_and_a_20000_item_map_on_a_default_broker_are_all_answered_none_busy(echo_broker):
    b, ep = echo_broker
    with Client([ep], timeout=60) as c:
        futs = [c.submit("echo", i) for i in range(20_000)]
        assert [f.result(90) for f in futs] == list(range(20_000))
        assert list(c.map("echo", range(20_000))) == list(range(20_000))
    counters = b.status()["counters"]
    assert counters["busy"] == 0 and counters["over_quota"] == 0 and counters["replies_ok"] == 40_000


@pytest.mark.timeout(60)
def test_submit_blocks_while_the_client_backlog_is_full_and_says_busy_if_nothing_frees_room(echo_broker):
    _, ep = echo_broker
    gate = threading.Event()
    with Client([ep], timeout=5, backlog=3) as c:
        first = [c.submit("slow", i, timeout=1.0) for i in range(3)]  # nobody serves "slow": 1 s each
        with pytest.raises(Busy, match="backlog"):
            c.submit("echo", 99, timeout=0.2)  # nothing ends within 0.2 s
        done = threading.Thread(target=lambda: gate.set() if c.call("echo", 7, timeout=5) == 7 else None)
        done.start()  # blocks until the first three time out (1 s), then goes through
        done.join(10)
        assert gate.is_set()
        assert all(f.exception(5) is not None for f in first)


@pytest.mark.timeout(60)
def test_map_refills_its_window_in_batches_within_a_small_backlog_and_refuses_an_unpackable_value(echo_broker):
    """map hands the socket thread each refill of its window as one item: answers stay in order
    with a backlog smaller than the window (it waits for room then), a value that cannot be
    packed raises at once, and no request is left open behind it."""
    b, ep = echo_broker
    with Client([ep], timeout=30, backlog=40) as c:
        assert list(c.map("echo", range(3_000), window=500)) == list(range(3_000))
        it = c.map("echo", [1, 2, object(), 4], window=10)
        with pytest.raises(TypeError, match="not msgpack-serialisable"):
            next(it)
        assert c.call("echo", "after") == "after"
        assert not c._futures  # nothing of the refused refill is held
    assert b.status()["counters"]["replies_ok"] == 3_001
