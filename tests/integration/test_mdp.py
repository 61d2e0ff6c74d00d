"""Majordomo compatibility with real processes, against majortomo (an MDP 0.2 implementation from
PyPI that zmqdist did not write): its client to native workers, native clients to its worker, its
worker dying mid-request, MMI, and MDP through a proxy tier."""

import signal
import subprocess
import sys
import time

import pytest
from majortomo import Client as MdpClient

from tests.integration.helpers import ROOT, status, wait_for
from zmqdist import Client, RemoteError

pytestmark = pytest.mark.integration

FAST_HB = ("--mdp-heartbeat", "0.2", "--mdp-liveness", "3")


def mdp_worker(procs, ep, service, delay=0.0, hb=0.2):
    cmd = [sys.executable, str(ROOT / "tests" / "integration" / "mdpworker.py"), ep, service, str(delay), str(hb)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.procs.append(p)
    return p


def services(c):
    return status(c)["services"]


@pytest.mark.timeout(60)
def test_majortomo_client_calls_a_native_worker(procs, tmp_path):
    ep = f"ipc://{tmp_path}/b.sock"
    procs.spawn("broker", "--bind", ep)
    procs.spawn("worker", "testworkers:echo_fn", "--service", "echo", "--connect", ep)
    with Client([ep], timeout=10) as c:
        wait_for(lambda: "echo" in services(c), 20, "native worker registered")
    with MdpClient(ep) as mc:
        for i in range(20):
            mc.send(b"echo", f"hello {i}".encode())
            # RFC 18: FINAL, service name, body (majortomo's client returns the frames after FINAL)
            assert mc.recv_all_as_list(timeout=10) == [b"echo", f"hello {i}".encode()]


@pytest.mark.timeout(60)
def test_native_client_calls_a_majortomo_worker_and_errors_reach_mdp_clients(procs, tmp_path):
    ep = f"ipc://{tmp_path}/b.sock"
    procs.spawn("broker", "--bind", ep, "--mdp-timeout", "1", *FAST_HB)
    w = mdp_worker(procs, ep, "upper")
    procs.spawn("worker", "testworkers:gil", "--connect", ep)  # serves spin(), raises on bad input
    with Client([ep], timeout=10) as c:
        wait_for(lambda: "upper" in services(c) and "spin" in services(c), 20, "workers registered")
        # one body frame arrives as bytes; the reply frames come back as a list of bytes
        assert c.call("upper", b"abc") == [b"ABC", str(w.pid).encode()]
        assert c.call("upper", [b"a", b"b"]) == [b"A", b"B", str(w.pid).encode()]
    with MdpClient(ep) as mc:
        mc.send(b"upper", b"x", b"y")  # MDP to MDP through zmqdist: frames survive
        assert mc.recv_all_as_list(timeout=10) == [b"upper", b"X", b"Y", str(w.pid).encode()]
        mc.send(b"spin", b"not a number")  # the native handler raises
        reply = mc.recv_all_as_list(timeout=10)
        assert reply[:3] == [b"spin", b"zmqdist.error", b"FAILED"] and b"TypeError" in reply[3]
        mc.send(b"nosuch", b"x")  # nobody serves it: deadline (1 s here)
        reply = mc.recv_all_as_list(timeout=10)
        assert reply[:3] == [b"nosuch", b"zmqdist.error", b"TIMEOUT"] and b"no worker" in reply[3]


@pytest.mark.timeout(60)
def test_majortomo_worker_dying_mid_request_is_requeued_to_another(procs, tmp_path):
    ep = f"ipc://{tmp_path}/b.sock"
    procs.spawn("broker", "--bind", ep, *FAST_HB)
    w1 = mdp_worker(procs, ep, "slow", delay=1.5)
    with Client([ep], timeout=30) as c:
        wait_for(lambda: services(c).get("slow", {}).get("workers") == 1, 20, "first MDP worker")
        fut = c.submit("slow", b"job")
        wait_for(lambda: services(c)["slow"]["inflight"] == 1, 10, "the request at the first worker")
        w2 = mdp_worker(procs, ep, "slow", delay=0.0)
        wait_for(lambda: services(c)["slow"]["workers"] == 2, 20, "second MDP worker")
        w1.send_signal(signal.SIGKILL)  # dies holding the request
        assert fut.result(20) == [b"JOB", str(w2.pid).encode()]
        st = status(c)
        assert st["counters"]["requeues"] >= 1 and st["counters"]["workers_expired"] >= 1


@pytest.mark.timeout(60)
def test_mmi_service_discovery(procs, tmp_path):
    ep = f"ipc://{tmp_path}/b.sock"
    procs.spawn("broker", "--bind", ep, *FAST_HB)
    mdp_worker(procs, ep, "upper")
    with Client([ep], timeout=10) as c:
        wait_for(lambda: "upper" in services(c), 20, "MDP worker registered")
        assert c.call("mmi.service", b"upper") == b"200"  # native clients may ask too
    with MdpClient(ep) as mc:
        mc.send(b"mmi.service", b"upper")
        assert mc.recv_all_as_list(timeout=10) == [b"mmi.service", b"200"]
        mc.send(b"mmi.service", b"nosuch")
        assert mc.recv_all_as_list(timeout=10) == [b"mmi.service", b"404"]
        mc.send(b"mmi.other", b"")
        assert mc.recv_all_as_list(timeout=10) == [b"mmi.other", b"501"]


@pytest.mark.timeout(60)
def test_mdp_traffic_crosses_a_proxy_tier_like_native_traffic(procs, tmp_path):
    master, proxy = f"ipc://{tmp_path}/m.sock", f"ipc://{tmp_path}/p.sock"
    procs.spawn("broker", "--bind", master, "--name", "master", *FAST_HB)
    procs.spawn("broker", "--bind", proxy, "--name", "proxy", "--upstream", master, *FAST_HB)
    w = mdp_worker(procs, master, "upper")  # a Majordomo worker at the master
    with Client([proxy], timeout=10) as c:
        wait_for(lambda: status(c)["upstream"]["registered"], 20, "proxy registered")
        with Client([master], timeout=10) as cm:
            wait_for(lambda: "upper" in services(cm), 20, "MDP worker at the master")
        with MdpClient(proxy) as mc:  # a Majordomo client at the proxy
            for i in range(10):
                mc.send(b"upper", f"m{i}".encode())
                assert mc.recv_all_as_list(timeout=10) == [b"upper", f"M{i}".encode(), str(w.pid).encode()]
        assert status(c)["counters"]["forwarded_up"] >= 10


def recv(sock, timeout_s=10):
    assert sock.poll(int(timeout_s * 1000)), "no message in time"
    return sock.recv_multipart()


@pytest.mark.timeout(60)
def test_rfc_strict_peers_on_raw_sockets(procs, tmp_path):
    """The RFCs to the letter: an MDP/0.1 client on a REQ socket, an MDP/0.2 worker and client on
    DEALER sockets with no delimiter frame and the RFC 18 client codes (REQUEST 0x01, FINAL 0x03)."""
    import zmq

    ep = f"ipc://{tmp_path}/b.sock"
    procs.spawn("broker", "--bind", ep, *FAST_HB)
    ctx = zmq.Context.instance()
    socks = [ctx.socket(t) for t in (zmq.DEALER, zmq.REQ, zmq.DEALER)]
    worker, req_client, dealer_client = socks
    try:
        for s in socks:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
        worker.send_multipart([b"MDPW02", b"\x01", b"raw"])
        with Client([ep], timeout=10) as c:
            wait_for(lambda: "raw" in services(c), 20, "raw worker registered")
        for client, request, expect_head in (
            (req_client, [b"MDPC01", b"raw", b"ping"], [b"MDPC01", b"raw"]),
            (dealer_client, [b"MDPC02", b"\x01", b"raw", b"ping"], [b"MDPC02", b"\x03", b"raw"]),
        ):
            client.send_multipart(request)
            task = recv(worker)
            assert task[:2] == [b"MDPW02", b"\x02"] and len(task[2]) == 8 and task[3] == b""
            assert task[4:] == [b"ping"]
            worker.send_multipart([b"MDPW02", b"\x04", task[2], b"", b"pong"])
            assert recv(client) == [*expect_head, b"pong"]
    finally:
        for s in socks:
            s.close(0)


def recv_task(sock):
    """The next message to a raw MDP 0.2 worker that is not the broker's heartbeat."""
    while (msg := recv(sock))[:2] == [b"MDPW02", b"\x05"]:
        pass
    return msg


@pytest.mark.timeout(60)
def test_mdp_bodies_over_the_brokers_limit_are_refused_or_failed_saying_so(procs, tmp_path):
    """--max-message-size holds for Majordomo peers as for native ones, on the body's total: libzmq
    checks each frame, so several frames under the limit could carry any amount. A request over it
    is refused (INVALID) and never reaches a worker; a reply over it, in one frame, in several, or
    in PARTIALs collected for one reply, fails its request (ResultTooLarge) and the worker, not at
    fault for the broker's limit, keeps serving."""
    import zmq

    ep = f"ipc://{tmp_path}/b.sock"
    limit = 20_000
    procs.spawn("broker", "--bind", ep, "--max-message-size", str(limit))
    ctx = zmq.Context.instance()
    worker, client = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for s in (worker, client):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
        worker.send_multipart([b"MDPW02", b"\x01", b"raw"])
        with Client([ep], timeout=10) as c:
            wait_for(lambda: "raw" in services(c), 20, "raw worker registered")
            big, half = b"r" * (limit * 3 // 2), b"h" * (limit * 3 // 4)
            for body in ([big], [half, half, half]):  # one frame over, three frames each under
                client.send_multipart([b"MDPC02", b"\x01", b"raw", *body])
                reply = recv(client)
                assert reply[:4] == [b"MDPC02", b"\x03", b"raw", b"zmqdist.error"], reply[:4]
                assert reply[4] == b"INVALID" and f"limit of {limit} bytes".encode() in reply[5], reply[4:]
            cases = (  # the client's request, the worker's answer: the client gets FAILED
                ([b"MDPC02", b"\x01"], [[b"\x04", big]]),
                ([b"MDPC02", b"\x01"], [[b"\x04", half, half, half]]),
                ([b"MDPC01"], [[b"\x03", half], [b"\x03", half], [b"\x04", half]]),  # PARTIALs make one reply
                ([b"MDPC02", b"\x01"], [[b"\x03", half], [b"\x03", big], [b"\x04", half]]),  # a stream's part
            )
            for request, answer in cases:
                worker.send_multipart([b"MDPW02", b"\x05"])  # a heartbeat: the test outlasts none
                client.send_multipart([*request, b"raw", b"ping"])
                task = recv_task(worker)  # not one of the requests refused above
                assert task[:2] == [b"MDPW02", b"\x02"] and task[4:] == [b"ping"], task[:2]
                for cmd, *body in answer:
                    worker.send_multipart([b"MDPW02", cmd, task[2], b"", *body])
                head = [b"MDPC01", b"raw"] if request == [b"MDPC01"] else [b"MDPC02", b"\x03", b"raw"]
                if answer[1:2] == [[b"\x03", big]]:  # the stream's first part reaches the client first
                    assert recv(client) == [b"MDPC02", b"\x02", b"raw", half]  # RFC 18's PARTIAL
                reply = recv(client)
                assert reply[: len(head) + 2] == [*head, b"zmqdist.error", b"FAILED"], reply[:5]
                assert reply[-1].startswith(b"ResultTooLarge") and f"limit of {limit}".encode() in reply[-1], reply[-1]
            # the worker was not dropped: it serves the next request, a native client's too
            worker.send_multipart([b"MDPW02", b"\x05"])
            fut = c.submit("raw", b"native")
            task = recv_task(worker)
            worker.send_multipart([b"MDPW02", b"\x04", task[2], b"", b"ok"])
            assert fut.result(10) == b"ok"
            fut = c.submit("raw", b"native")
            task = recv_task(worker)
            worker.send_multipart([b"MDPW02", b"\x04", task[2], b"", big])
            with pytest.raises(RemoteError, match="ResultTooLarge"):
                fut.result(10)
            st = status(c)
            assert st["counters"]["invalid"] == 2 and st["mdp"]["mdp_too_large"] == 5, st
    finally:
        for s in (worker, client):
            s.close(0)


@pytest.mark.timeout(60)
def test_an_mdp_client_sent_away_by_a_broker_of_a_pair_is_told_at_once(procs, tmp_path):
    """MDP has no redirect. An MDP client at the passive broker of a pair got no answer until its
    own timeout, and one whose broker stopped (SIGTERM hands over to the backup) the same: each
    request it has open there now ends at once with BUSY, naming the active broker."""
    from tests.integration.test_ha import Pairs

    t = Pairs(procs, tmp_path)
    t.pair("A", "B")
    t.worker("w0", "A", "B", target="testworkers:lifecycle")
    t.wait_pair("A", "B")
    with MdpClient(t.ep("B")) as mc:
        started = time.monotonic()
        mc.send(b"pid", b"")
        reply = mc.recv_all_as_list(timeout=10)
        assert reply[:3] == [b"pid", b"zmqdist.error", b"BUSY"], reply
        assert b"B is the passive broker of its pair; A is active" in reply[3] and time.monotonic() - started < 5
    with MdpClient(t.ep("A")) as mc, Client([t.ep("A")], timeout=10) as c:
        wait_for(lambda: "pid" in services(c), 20, "the worker at A")
        mc.send(b"pid", b"")
        got = mc.recv_all_as_list(timeout=10)
        assert got[0] == b"pid" and got[1] != b"zmqdist.error", got  # A serves
        mc.send(b"loop", str(tmp_path / "marker").encode())  # runs till cancelled: open when A stops
        wait_for(lambda: services(c)["loop"]["inflight"] == 1, 10, "the request running at A")
        started = time.monotonic()
        t.brokers["A"].send_signal(signal.SIGTERM)
        reply = mc.recv_all_as_list(timeout=10)
        assert reply[:3] == [b"loop", b"zmqdist.error", b"BUSY"] and b"A sent this client away" in reply[3], reply
        assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_an_mdp_clients_requests_across_the_takeover_of_a_pair_are_each_answered(procs, tmp_path):
    """The active broker A of a pair is SIGKILLed; an MDP client at B asks again and again. While B
    still hears A as active, each request is answered BUSY naming A (a BYE was sent once per
    heartbeat, so a request sent again within one got no answer); the request that is B's vote
    for a takeover is answered BUSY "send it again" (the RECONNECT was dropped, the request never
    answered); then B serves. None waits out the client's own timeout."""
    from tests.integration.test_ha import Pairs

    t = Pairs(procs, tmp_path)
    t.pair("A", "B")  # no worker: the broker answers mmi.service itself, and no other peer votes
    t.wait_pair("A", "B")
    t.brokers["A"].send_signal(signal.SIGKILL)
    answers = []
    with MdpClient(t.ep("B")) as mc:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            mc.send(b"mmi.service", b"mmi.service")
            answers.append(mc.recv_all_as_list(timeout=5))  # majortomo raises Timeout after 5 s
            if answers[-1][1] != b"zmqdist.error":
                break
            time.sleep(0.05)
    kinds = [a[1:3] if a[1] == b"zmqdist.error" else a[1:] for a in answers]
    assert kinds[-1] == [b"404"], answers[-3:]  # answered by B, active now (no service of that name)
    again = [a for a in answers if a[1:3] == [b"zmqdist.error", b"BUSY"] and a[3].startswith(b"send it again")]
    assert len(again) == 1, answers[-3:]
    busy = [a for a in answers if a[1:3] == [b"zmqdist.error", b"BUSY"]]
    assert len(busy) == len(answers) - 1 and all(b"A is active" in a[3] for a in busy if a not in again)
