"""Natural batching with real processes: a peer of the first protocol revision (its HELLO says
nothing of batches) beside one that reads them; clients and workers batching end to end through a
proxy while a worker is SIGKILLed."""

from __future__ import annotations

import signal

import pytest
import zmq

from tests.integration.helpers import status, wait_for
from zmqdist import Client
from zmqdist import protocol as p

pytestmark = pytest.mark.integration

ENC = p.Encoder()


def raw_client(ep: str, batch: int) -> zmq.Socket[bytes]:
    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 10_000
    s.connect(ep)
    hello = p.Hello(p.ROLE_CLIENT, "raw", (), 0, 250, 0, batch)
    if batch:
        s.send_multipart(ENC.encode(hello))
    else:  # exactly what a peer of the first revision sends: five fields, no batch
        fields = [p.ROLE_CLIENT, "raw", [], 0, 250]
        import msgpack

        s.send_multipart([p.HEAD_PREFIX[p.Hello] + msgpack.packb(fields), b""])
    welcome = p.decode(*s.recv_multipart())
    assert type(welcome) is p.Welcome and welcome.batch == p.MAX_BATCH  # the broker reads batches
    return s


def read_replies(s: zmq.Socket[bytes], n: int) -> tuple[dict[int, bytes], int]:
    """Read until ``n`` replies came; return them by rid, and how many BATCH frames carried them."""
    got: dict[int, bytes] = {}
    batches = 0
    while len(got) < n:
        head, payload = s.recv_multipart()
        batches += head[:4] == p.BATCH_HEAD
        for m in (p.decode(*f) for f in p.frames_of(head, payload)):
            if type(m) is p.Reply:
                assert m.rid not in got, f"reply {m.rid} twice"
                assert m.status == p.ST_OK, m
                got[m.rid] = m.payload
    return got, batches


@pytest.mark.timeout(60)
def test_a_peer_of_the_first_revision_never_gets_a_batch_and_one_that_reads_them_does(procs, ipc_ep):
    procs.spawn("broker", "--bind", ipc_ep, "--name", "b")
    procs.spawn("worker", "testworkers:echo", "--connect", ipc_ep, "--concurrency", "16")
    with Client([ipc_ep], timeout=20) as c:
        wait_for(lambda: status(c)["workers"], 20, "the worker")
    n = 300
    values = {i: p.pack_value(i) for i in range(n)}
    old = raw_client(ipc_ep, 0)
    new = raw_client(ipc_ep, p.MAX_BATCH)
    try:
        for i in range(n):  # the old one: single messages
            old.send_multipart(ENC.encode(p.Request(i, "echo", 20_000, (), values[i])))
        frames = [f for i in range(n) for f in ENC.encode(p.Request(i, "echo", 20_000, (), values[i]))]
        new.send_multipart([p.BATCH_HEAD, p.pack_batch(frames)])  # the new one: all in one message
        got_old, batches_old = read_replies(old, n)
        got_new, batches_new = read_replies(new, n)
    finally:
        old.close()
        new.close()
    assert batches_old == 0
    assert batches_new > 0
    for got in (got_old, got_new):
        assert sorted(got) == list(range(n))
        assert all(p.unpack_value(v)[0] == i for i, v in got.items())  # each its own answer


@pytest.mark.timeout(120)
def test_clients_and_workers_batch_through_a_proxy_and_a_killed_worker_loses_nothing(procs, tmp_path):
    m_ep, a_ep = f"ipc://{tmp_path}/m.sock", f"ipc://{tmp_path}/a.sock"
    procs.spawn("broker", "--bind", m_ep, "--name", "M")
    procs.spawn("broker", "--bind", a_ep, "--name", "A", "--upstream", m_ep)
    w1 = procs.spawn("worker", "testworkers:echo", "--connect", m_ep, "--concurrency", "8", "--name", "w1")
    procs.spawn("worker", "testworkers:echo", "--connect", m_ep, "--concurrency", "8", "--name", "w2")
    with Client([m_ep], timeout=20) as cm, Client([a_ep], timeout=60) as ca:
        wait_for(lambda: len(status(cm)["workers"]) == 2 and status(cm)["brokers"], 20, "workers and proxy")
        n = 6000
        it = ca.map("echo", range(n), window=500)
        out = []
        for k, v in enumerate(it):
            out.append(v)
            if k == 1500:
                w1.send_signal(signal.SIGKILL)  # what it held is requeued at the master
        assert [v[0] for v in out] == list(range(n))
        sm, sa = status(cm)["counters"], status(ca)["counters"]
    assert sa["batches_in"] > 0 and sa["batches_out"] > 0  # requests from the client, replies to it
    assert sm["batches_in"] > 0 and sm["batches_out"] > 0  # from the proxy and the workers; tasks down
    assert sm["batched_out"] > 2 * sm["batches_out"]  # batches of more than two on average


@pytest.mark.timeout(120)
def test_batches_stay_under_a_small_max_message_size_through_a_proxy(procs, tmp_path):
    """A broker's --max-message-size below the size natural batching reaches (256 KiB here) bounds
    every BATCH sent to it: a client's requests, a worker's results, a proxy's requests up. Each
    message fits; a batch of them must too, or the broker refuses it whole (over twice the limit
    libzmq drops it with the connection), and its requests are never answered."""
    m_ep, a_ep = f"ipc://{tmp_path}/m.sock", f"ipc://{tmp_path}/a.sock"
    small = ("--max-message-size", "20000")
    procs.spawn("broker", "--bind", m_ep, "--name", "M", *small)
    procs.spawn("broker", "--bind", a_ep, "--name", "A", "--upstream", m_ep, *small)
    procs.spawn("worker", "testworkers:echo", "--connect", m_ep, "--concurrency", "64", "--name", "w1")
    payload = b"x" * 900  # about 20 messages fill the limit; a window of 2,000 makes batches of hundreds
    with Client([m_ep], timeout=20) as cm, Client([a_ep], timeout=30) as ca:
        wait_for(lambda: status(cm)["workers"] and status(cm)["brokers"], 20, "worker and proxy")
        n = 4000
        out = list(ca.map("echo", ((i, payload) for i in range(n)), window=2000))
        assert [v[0][0] for v in out] == list(range(n))
        sm, sa = status(cm)["counters"], status(ca)["counters"]
    assert sa["batches_in"] > 0 and sm["batches_in"] > 0  # batches came, small ones
    assert sm["bad_input"] == 0 and sa["bad_input"] == 0, (sm, sa)


@pytest.mark.timeout(60)
def test_a_map_call_gets_what_one_read_of_its_client_made_in_one_hand_over():
    """The client's socket thread hands a map call's queue all the outcomes one read made, as one
    item when the read ends: handed one by one, the first woke the map's caller while the socket
    thread was still reading, and the two fought for the GIL over the rest (a broker of its own
    here, so that the eight replies surely come in one BATCH)."""
    import queue

    r: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    r.linger = 0
    r.rcvtimeo = 10_000
    port = r.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Client([f"tcp://127.0.0.1:{port}"], timeout=30) as c:
            ident, head, payload = r.recv_multipart()
            hello = p.decode(head, payload)
            assert type(hello) is p.Hello and hello.batch > 0
            welcome = p.Welcome("fake", "inc", 250, 4, quota=100, batch=p.MAX_BATCH, hello=hello.seq)
            r.send_multipart([ident, *ENC.encode(welcome)])
            sink: queue.SimpleQueue[list[tuple[int, bool, object]]] = queue.SimpleQueue()
            rids = c._submit_many("echo", [f"v{i}" for i in range(8)], None, sink)  # what map sends
            requests: list[p.Request] = []
            while len(requests) < 8:
                _, head, payload = r.recv_multipart()
                requests += [m for m in (p.decode(*f) for f in p.frames_of(head, payload)) if type(m) is p.Request]
            replies = [f for m in requests for f in ENC.encode(p.Reply(m.rid, p.ST_OK, "", m.payload))]
            r.send_multipart([ident, p.BATCH_HEAD, p.pack_batch(replies)])
            got = sink.get(timeout=10)
            assert sorted(got) == sorted((rid, True, f"v{i}") for i, rid in enumerate(rids))
            assert sink.empty()
    finally:
        r.close(0)
