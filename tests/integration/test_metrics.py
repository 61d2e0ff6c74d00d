"""The Prometheus endpoint, scraped over HTTP: counters match a known load exactly."""

import logging
import re
import time

import pytest
import zmq

from tests.integration.helpers import scrape, value, wait_for
from zmqdist import Broker, Client, RemoteError, Worker
from zmqdist import protocol as p

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_metrics_match_1000_calls_with_10_handler_errors(tmp_path):
    b = Broker(bind=[f"ipc://{tmp_path}/m.sock"], metrics_port=0).start()
    w = Worker(b.endpoints, concurrency=4, name="mw")

    @w.service("calc")
    def calc(x):
        if x % 100 == 0:
            raise ValueError(f"bad {x}")
        return x * 2

    w.start()
    try:
        wait_for(lambda: b.status()["workers"], 10, "worker")
        errors = 0
        with Client(b.endpoints, timeout=10) as c:
            futs = [c.submit("calc", i) for i in range(1000)]
            for i, f in enumerate(futs):
                if i % 100 == 0:
                    with pytest.raises(RemoteError):
                        f.result(10)
                    errors += 1
                else:
                    assert f.result(10) == i * 2
        text = scrape(b.metrics_port)
        counters = b.status()["counters"]
        assert errors == 10
        # 1,000 submits at once: the client batched them, the broker batched tasks and replies
        b_in = value(text, "zmqdist_batches_total", direction="in")
        b_out = value(text, "zmqdist_batches_total", direction="out")
        assert b_in >= 1 and b_out >= 1
        assert value(text, "zmqdist_batched_messages_total", direction="out") >= 2 * b_out
        assert value(text, "zmqdist_batched_messages_total", direction="in") >= 2 * b_in
        # the same as status says (read just after: a heartbeat's batch may fall between)
        assert abs(b_in - counters["batches_in"]) <= 2 and abs(b_out - counters["batches_out"]) <= 2
        assert counters["batched_in"] >= value(text, "zmqdist_batched_messages_total", direction="in")
        assert value(text, "zmqdist_requests_total") == 1000
        assert value(text, "zmqdist_replies_total", status="ok") == 990
        assert value(text, "zmqdist_replies_total", status="failed") == 10
        assert value(text, "zmqdist_replies_total", status="timeout") == 0
        assert value(text, "zmqdist_requeues_total") == 0
        assert value(text, "zmqdist_workers") == 1 and "zmqdist_workers_total" not in text
        # what the broker keeps of its peers: the worker's batch limit at least, no Majordomo peer
        assert value(text, "zmqdist_remembered_peers", table="batch_limits") >= 1
        assert value(text, "zmqdist_remembered_peers", table="mdp_peers") == 0
        assert value(text, "zmqdist_remembered_peers", table="clients") <= 1
        # the process's own metrics: its file descriptors against its limit (a broker out of them
        # accepts no more peers), its CPU and memory
        assert 0 < value(text, "process_open_fds") < value(text, "process_max_fds")
        assert value(text, "process_cpu_seconds_total") > 0 and value(text, "process_resident_memory_bytes") > 0
        assert value(text, "zmqdist_service_capacity", service="calc") == 4
        assert value(text, "zmqdist_queue_depth") == 0
        # the failing handler is visible per worker
        assert value(text, "zmqdist_worker_served_total", worker="mw") == 1000
        assert value(text, "zmqdist_worker_failed_total", worker="mw") == 10
        assert value(text, "zmqdist_worker_service_seconds_mean", worker="mw") > 0
        for kind in ("queue_wait", "service", "end_to_end"):
            assert value(text, "zmqdist_latency_seconds_count", kind=kind) == 1000
            assert value(text, "zmqdist_latency_seconds_bucket", kind=kind, le="+Inf") == 1000
        # end to end is never shorter than the service time it contains
        assert value(text, "zmqdist_latency_seconds_sum", kind="end_to_end") >= value(
            text, "zmqdist_latency_seconds_sum", kind="service"
        )
    finally:
        w.stop(drain=False)
        b.stop()


def test_a_taken_metrics_port_is_a_clear_startup_error(tmp_path):
    import socket

    from zmqdist import ConfigError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            Broker(bind=[f"ipc://{tmp_path}/x.sock"], metrics_port=port).start()


@pytest.mark.parametrize("old", ["0.17.0", "0.19.0"])
def test_a_prometheus_client_older_than_setup_cfg_accepts_is_a_clear_startup_error(tmp_path, monkeypatch, old):
    """Installed anyway (--no-deps, a pinned environment): the broker names the version it needs
    and starts no server. (Before 0.20 start_http_server, which the endpoint used then, returned
    nothing, and the broker said TypeError at start.)"""
    from zmqdist import ConfigError, metrics

    started = []
    monkeypatch.setattr(metrics, "version", lambda name: old if name == "prometheus_client" else "?")
    monkeypatch.setattr(metrics, "make_wsgi_app", lambda *a, **k: started.append(a))
    with pytest.raises(ConfigError, match=rf"prometheus_client 0\.20 or later \(installed: {re.escape(old)}\)"):
        Broker(bind=[f"ipc://{tmp_path}/x.sock"], metrics_port=0).start()
    assert started == []


def test_a_prometheus_client_without_its_metadata_is_not_refused(tmp_path, monkeypatch):
    """A copy importable without its dist-info (vendored) cannot say its version: metrics start."""
    from importlib.metadata import PackageNotFoundError

    from zmqdist import metrics

    def no_metadata(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(metrics, "version", no_metadata)
    with Broker(bind=[f"ipc://{tmp_path}/x.sock"], metrics_port=0) as b:
        assert "zmqdist_requests_total" in scrape(b.metrics_port)


@pytest.mark.timeout(60)
def test_the_lifecycle_counters_are_scraped_cancels_retries_parts_joins(tmp_path):
    import threading

    from zmqdist import Retry, current_request

    b = Broker(bind=[f"ipc://{tmp_path}/l.sock"], metrics_port=0, join_same_key=True).start()
    w = Worker(b.endpoints, concurrency=4, name="lw")
    runs = {}
    release = threading.Event()

    @w.service("flaky", retry=Retry(on=ValueError, attempts=3, backoff=0.01))
    def flaky(_x):
        k = current_request().key
        runs[k] = runs.get(k, 0) + 1
        if runs[k] < 3:
            raise ValueError("again")
        return runs[k]

    @w.service("gen")
    def gen(n):
        yield from range(n)

    @w.service("wait")
    def wait(_x):
        release.wait(10)
        return 1

    w.start()
    try:
        wait_for(lambda: b.status()["workers"], 10, "worker")
        with Client(b.endpoints, timeout=10) as c:
            assert c.call("flaky", 0) == 3  # two retries
            assert list(c.stream("gen", 25)) == list(range(25))
            f = c.submit("wait", 0)
            wait_for(lambda: b.status()["requests_open"] == 1, 10, "wait running")
            assert f.cancel()
            joined = [c.submit("wait", 0, key="same") for _ in range(3)]
            wait_for(lambda: b.status()["counters"]["joined"] == 2, 10, "two joined the first")
            release.set()
            assert [x.result(10) for x in joined] == [1, 1, 1]
        text = scrape(b.metrics_port)
        assert value(text, "zmqdist_retries_total") == 2
        assert value(text, "zmqdist_stream_parts_total") == 25
        assert value(text, "zmqdist_replies_total", status="cancelled") == 1
        assert value(text, "zmqdist_replies_total", status="interrupted") == 0
        assert value(text, "zmqdist_joined_total") == 2
    finally:
        w.stop(drain=False)
        b.stop()


@pytest.mark.timeout(60)
def test_majordomo_traffic_is_scraped_by_kind(tmp_path):
    import zmq

    b = Broker(bind=[f"ipc://{tmp_path}/m.sock"], metrics_port=0, max_message_size=10_000).start()
    ctx = zmq.Context.instance()
    worker, client = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for s in (worker, client):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(b.endpoints[0])
        worker.send_multipart([b"MDPW02", b"\x01", b"raw"])
        wait_for(lambda: "raw" in b.status()["services"], 10, "the MDP worker registered")
        for answer in ([b"\x03", b"part"], [b"\x04", b"x" * 20_000]):  # a PARTIAL, then a FINAL over the limit
            client.send_multipart([b"MDPC01", b"raw", b"go"])  # an MDP 0.1 client: PARTIALs make one reply
            assert worker.poll(10_000)
            while (task := worker.recv_multipart())[1] != b"\x02":  # skip the broker's heartbeats
                assert worker.poll(10_000)
            worker.send_multipart([b"MDPW02", answer[0], task[2], b"", *answer[1:]])
            if answer[0] == b"\x03":
                worker.send_multipart([b"MDPW02", b"\x04", task[2], b"", b"end"])
            assert client.poll(10_000)
            client.recv_multipart()
        text = scrape(b.metrics_port)
        kinds = ("request", "reply", "worker_ready", "partial", "too_large")
        got = {k: value(text, "zmqdist_mdp_messages_total", kind=k) for k in kinds}
        assert got == {"request": 2, "reply": 2, "worker_ready": 1, "partial": 1, "too_large": 1}, got
    finally:
        for s in (worker, client):
            s.close(0)
        b.stop()


@pytest.mark.timeout(60)
def test_a_reply_to_a_client_that_left_is_counted_and_logged_at_info_not_as_a_warning(tmp_path, caplog):
    """A peer gone when its message is sent is routine at every failover: the drop is counted
    (zmqdist_drops_total{cause="send_failed"}) and logged at INFO; WARNING stays for a peer whose
    queue is full."""
    ep = f"ipc://{tmp_path}/b.sock"
    b = Broker(bind=[ep]).start()
    w = Worker([ep], concurrency=2)
    w.add_service("nap", lambda s: time.sleep(s) or s)
    w.start()
    caplog.set_level(logging.INFO, logger="zmqdist.broker")
    try:
        wait_for(lambda: len(b.status()["workers"]) == 1, 20, "worker registered")
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.linger = 0
        s.connect(ep)
        head, body = p.Encoder().encode(p.Request(1, "nap", 30_000, (), p.pack_value(0.3, None)))
        s.send_multipart([head, body])
        wait_for(lambda: b.status()["requests_open"] == 1, 10, "the request taken")
        s.close()  # the client leaves before its reply
        wait_for(lambda: b.status()["counters"]["send_drops"] >= 1, 10, "the reply dropped")
        gone = [r for r in caplog.records if "cannot send Reply" in r.getMessage()]
        assert gone and all(r.levelno == logging.INFO for r in gone), [(r.levelname, r.getMessage()) for r in gone]
        assert "Host unreachable" in gone[0].getMessage()
    finally:
        w.stop(drain=False)
        b.stop()


@pytest.mark.timeout(60)
def test_idle_connections_to_the_metrics_port_are_bounded_and_closed(tmp_path, monkeypatch, caplog):
    """prometheus_client's server gave every connection a thread and kept it open for good: idle
    connections (a port scan, a client that hung) piled up threads and file descriptors until the
    broker had none left to accept its peers. Now at most SCRAPE_CONNECTIONS are served at once
    (more are closed at once, and logged), each closed after SCRAPE_TIMEOUT_S of silence, and a
    scrape is served once they are gone."""
    import socket
    import threading

    from zmqdist import metrics

    monkeypatch.setattr(metrics._Handler, "timeout", 1.0)  # (SCRAPE_TIMEOUT_S: 10 s)
    caplog.set_level(logging.WARNING, logger="zmqdist")
    n = metrics.SCRAPE_CONNECTIONS + 24
    with Broker(bind=[f"ipc://{tmp_path}/b.sock"], metrics_port=0) as b:
        port = b.metrics_port
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
        try:
            server = b._metrics_server
            wait_for(lambda: server.turned_away == n - metrics.SCRAPE_CONNECTIONS, 10, "the extra connections closed")

            def served():
                return [t for t in threading.enumerate() if "process_request_thread" in t.name]

            assert len(served()) <= metrics.SCRAPE_CONNECTIONS
            assert any("connections are open already" in r.getMessage() for r in caplog.records)
            for s in idle:  # every one is closed by the server: at once, or after its timeout
                assert s.recv(1) == b""
            wait_for(lambda: not served(), 10, "no connection's thread left")
            assert value(scrape(port), "zmqdist_workers") == 0
        finally:
            for s in idle:
                s.close()
