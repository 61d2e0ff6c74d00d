"""CURVE on every link, allow-lists per role, role enforcement, revocation by SIGHUP, quotas.

Real sockets throughout; brokers run in this process where a test needs to look inside, and as
`zmqdist broker` processes where a signal or a second host-like process is needed.
"""

import logging
import shutil
import signal
import socket
import time

import pytest

from tests.integration.helpers import status, wait_for
from zmqdist import Broker, Client, InvalidRequest, RequestTimeout, Worker
from zmqdist.transport.security import generate, load_public

pytestmark = pytest.mark.integration


@pytest.fixture
def pki(tmp_path):
    """Keys for a broker, a proxy, clients and workers, and the broker's allow-lists."""
    keys = tmp_path / "keys"
    for name, services in (
        ("broker", None),
        ("proxy", None),
        ("alice", None),
        ("bob", ["echo"]),  # a client limited to 'echo'
        ("w1", None),
        ("w_echo", ["echo"]),  # a worker limited to 'echo'
        ("mallory", None),  # in no allow-list
    ):
        generate(name, keys, services)
    allow = {role: tmp_path / "allow" / role for role in ("clients", "workers", "brokers")}
    for d in allow.values():
        d.mkdir(parents=True)
    for name in ("alice", "bob"):
        shutil.copy(keys / f"{name}.key", allow["clients"])
    for name in ("w1", "w_echo"):
        shutil.copy(keys / f"{name}.key", allow["workers"])
    shutil.copy(keys / "proxy.key", allow["brokers"])

    class P:
        pass

    p = P()
    p.keys, p.allow, p.tmp = keys, allow, tmp_path
    p.pub = lambda n: str(keys / f"{n}.key")
    p.sec = lambda n: str(keys / f"{n}.key_secret")
    return p


def secure_broker(pki, ep, **kw):
    return Broker(
        bind=[ep],
        name="secure",
        key=pki.sec("broker"),
        allow_clients=str(pki.allow["clients"]),
        allow_workers=str(pki.allow["workers"]),
        allow_brokers=str(pki.allow["brokers"]),
        **kw,
    ).start()


@pytest.mark.timeout(90)
def test_only_allowed_keys_get_in_and_roles_are_enforced(pki, tmp_path, caplog):
    ep = f"ipc://{tmp_path}/s.sock"
    b = secure_broker(pki, ep)
    workers = []
    try:
        w = Worker([ep], concurrency=2, server_key=pki.pub("broker"), key=pki.sec("w1"), name="w1")
        w.add_service("echo", lambda x: x)
        w.add_service("sum", sum)
        workers.append(w.start())
        wait_for(lambda: len(b.status()["workers"]) == 1, 20, "w1 registered over CURVE")
        with Client([ep], timeout=5, server_key=pki.pub("broker"), key=pki.sec("alice")) as alice:
            assert alice.call("echo", {"x": 1}) == {"x": 1}
            assert alice.call("sum", [1, 2]) == 3

            caplog.set_level(logging.WARNING, logger="zmqdist")
            # a peer that connects and closes mid-handshake (a client moving on at a failover, a
            # port scan) is no misconfiguration: neither counted nor logged (it was both, saying
            # "plaintext, or a wrong server key"); the plaintext client after it is the first
            with socket.socket(socket.AF_UNIX) as raw:
                raw.settimeout(5)
                raw.connect(f"{tmp_path}/s.sock")
                raw.recv(10)  # the broker's greeting: its handshake has begun
            # plaintext: the CURVE handshake never completes
            with Client([ep], timeout=1) as plain, pytest.raises(RequestTimeout):
                plain.call("echo", 1)
            wait_for(lambda: b.status()["counters"].get("handshakes_failed", 0) >= 1, 10, "plaintext seen")
            failed = [r.getMessage() for r in caplog.records if "failed the CURVE handshake" in r.getMessage()]
            assert failed and all(m.endswith("a plaintext peer (no CURVE keys)") for m in failed), failed
            # a wrong server key (another's public key) is told apart from plaintext
            before = b.status()["counters"]["handshakes_failed"]
            with Client([ep], timeout=1, server_key=pki.pub("alice"), key=pki.sec("bob")) as wrong:
                with pytest.raises(RequestTimeout):
                    wrong.call("echo", 1)
            wait_for(lambda: b.status()["counters"]["handshakes_failed"] > before, 10, "wrong server key seen")
            assert any(
                r.getMessage().endswith("a wrong server key (the peer lacks this broker's public key)")
                for r in caplog.records
            )
            # a key in no allow-list: refused by ZAP, and the refusal names the key
            with Client([ep], timeout=1, server_key=pki.pub("broker"), key=pki.sec("mallory")) as m:
                with pytest.raises(RequestTimeout):
                    m.call("echo", 1)
            mallory = load_public(pki.pub("mallory")).decode()
            assert any(mallory in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
            # a client key may not register as a worker; a limited worker may not serve more
            imposter = Worker([ep], server_key=pki.pub("broker"), key=pki.sec("alice"), name="imposter")
            imposter.add_service("echo", lambda x: "forged")
            limited = Worker([ep], server_key=pki.pub("broker"), key=pki.sec("w_echo"), name="limited")
            limited.add_service("echo", lambda x: x)
            limited.add_service("sum", sum)
            workers += [imposter.start(), limited.start()]
            wait_for(lambda: b.status()["counters"].get("refused_by_role", 0) >= 2, 20, "both refused")
            assert [x["name"] for x in b.status()["workers"]] == ["w1"]
            # a client limited to 'echo' cannot call 'sum'
            with Client([ep], timeout=5, server_key=pki.pub("broker"), key=pki.sec("bob")) as bob:
                assert bob.call("echo", 7) == 7
                with pytest.raises(InvalidRequest, match="not allowed service"):
                    bob.call("sum", [1])
            # and through all of it the broker kept serving the others
            assert [alice.call("echo", i) for i in range(50)] == list(range(50))
    finally:
        for x in workers:
            x.stop(drain=False)
        b.stop()


@pytest.mark.timeout(90)
def test_sighup_revokes_a_key_from_its_next_connection_only(procs, pki, tmp_path):
    ep = f"ipc://{tmp_path}/s.sock"
    broker = procs.spawn(
        "broker", "--bind", ep, "--key", pki.sec("broker"),
        "--allow-clients", str(pki.allow["clients"]), "--allow-workers", str(pki.allow["workers"]),
    )  # fmt: skip
    procs.spawn("worker", "testworkers:echo_fn", "--service", "echo", "--connect", ep,
                "--server-key", pki.pub("broker"), "--key", pki.sec("w1"))  # fmt: skip
    keys = {"server_key": pki.pub("broker"), "key": pki.sec("alice")}
    with Client([ep], timeout=5, **keys) as connected:
        wait_for(lambda: "echo" in status(connected)["services"], 20, "worker registered")
        assert connected.call("echo", 1) == 1
        (pki.allow["clients"] / "alice.key").unlink()  # revoke alice
        broker.send_signal(signal.SIGHUP)
        # the reload is asynchronous: a new connection with the revoked key is refused once it is done
        wait_for(lambda: not _can_call(ep, keys), 20, "the revoked key refused on a new connection")
        assert connected.call("echo", 2) == 2, "a connected peer must not be dropped by a reload"
        shutil.copy(pki.keys / "alice.key", pki.allow["clients"])  # and re-admitted after a reload
        broker.send_signal(signal.SIGHUP)
        wait_for(lambda: _can_call(ep, keys), 10, "alice admitted again")


def _can_call(ep, keys):
    with Client([ep], timeout=1, **keys) as c:
        try:
            return c.call("echo", 0) == 0
        except RequestTimeout:
            return False


@pytest.mark.timeout(90)
def test_proxy_to_master_link_is_encrypted_and_needs_a_broker_key(procs, pki, tmp_path):
    master, proxy = f"ipc://{tmp_path}/m.sock", f"ipc://{tmp_path}/p.sock"
    common = ["--key", pki.sec("broker"), "--allow-clients", str(pki.allow["clients"]),
              "--allow-workers", str(pki.allow["workers"]), "--allow-brokers", str(pki.allow["brokers"])]  # fmt: skip
    procs.spawn("broker", "--bind", master, "--name", "master", *common)
    procs.spawn("worker", "testworkers:echo_fn", "--service", "central", "--connect", master,
                "--server-key", pki.pub("broker"), "--key", pki.sec("w1"))  # fmt: skip
    # the proxy's own key is in the master's brokers allow-list; it serves its clients with it too
    procs.spawn("broker", "--bind", proxy, "--name", "proxy", "--upstream", master,
                "--upstream-server-key", pki.pub("broker"), *common[2:], "--key", pki.sec("proxy"))  # fmt: skip
    with Client([proxy], timeout=5, server_key=pki.pub("proxy"), key=pki.sec("alice")) as c:
        wait_for(lambda: status(c)["upstream"]["registered"], 20, "proxy registered over CURVE")
        assert [c.call("central", i) for i in range(20)] == list(range(20))
    # a proxy whose key is only a client's cannot register upstream
    rogue = f"ipc://{tmp_path}/r.sock"
    procs.spawn("broker", "--bind", rogue, "--name", "rogue", "--upstream", master,
                "--upstream-server-key", pki.pub("broker"), "--key", pki.sec("alice"))  # fmt: skip
    with Client([master], timeout=5, server_key=pki.pub("broker"), key=pki.sec("alice")) as cm:
        wait_for(lambda: status(cm)["counters"].get("refused_by_role", 0) >= 1, 20, "rogue proxy refused")
        assert [x["name"] for x in status(cm)["brokers"]] == ["proxy"]


@pytest.mark.timeout(90)
def test_a_curve_proxy_pair_whose_active_dies_with_no_peer_coming_by_takes_over_on_its_upstreams_word(
    procs, pki, tmp_path
):
    """The passive proxy of a pair asks its upstream whether its silent peer is still there (its
    witness), connecting as a client. Under CURVE the upstream refused that HELLO from a broker key
    ("a key in the brokers allow-list cannot act as clients": a warning and refused_by_role at every
    takeover, seen in the CURVE chaos soak; the question itself still got through). Now a broker
    key may come as a client. With no client or worker coming by to vote, the witness's word is
    what the takeover waits for. Watched at the master: a status client at the passive proxy would
    itself be a vote."""
    ep = {n: f"ipc://{tmp_path}/{n}.sock" for n in ("M", "PA", "PB")}
    allow = ["--allow-clients", str(pki.allow["clients"]), "--allow-workers", str(pki.allow["workers"])]
    allow += ["--allow-brokers", str(pki.allow["brokers"]), "--heartbeat", "0.2"]
    procs.spawn("broker", "--bind", ep["M"], "--name", "M", "--key", pki.sec("broker"), *allow)
    proxies = {}
    for name, role, other in (("PA", "primary", "PB"), ("PB", "backup", "PA")):
        proxies[name] = procs.spawn(
            "broker", "--bind", ep[name], "--name", name, "--key", pki.sec("proxy"), *allow,
            "--ha", role, "--ha-bind", f"ipc://{tmp_path}/{name}.ha", "--peer", f"ipc://{tmp_path}/{other}.ha",
            "--peer-server-key", pki.pub("proxy"), "--upstream", ep["M"], "--upstream-server-key", pki.pub("broker"),
        )  # fmt: skip
    keys = {"server_key": pki.pub("broker"), "key": pki.sec("alice")}
    with Client([ep["M"]], timeout=5, **keys) as m:
        wait_for(lambda: [b["name"] for b in status(m)["brokers"]] == ["PA"], 20, "PA registered at M")
        with Client([ep["PA"]], timeout=5, server_key=pki.pub("proxy"), key=pki.sec("alice")) as pa:
            wait_for(lambda: status(pa)["ha"]["peer"]["synced"] >= 0, 20, "PB holds PA's table")
        proxies["PA"].send_signal(signal.SIGKILL)
        proxies["PA"].wait(10)
        wait_for(lambda: [b["name"] for b in status(m)["brokers"]] == ["PB"], 30, "PB active on M's word")
        assert status(m)["counters"].get("refused_by_role", 0) == 0


@pytest.mark.timeout(60)
def test_a_client_bursting_past_its_quota_paces_itself_and_the_others_are_served(tmp_path):
    """A zmqdist Client keeps what its broker would refuse (WELCOME says the quota) and sends it as
    replies free room: a burst of 2,000 against a quota of 50 is all served, none Busy, while another
    client is served meanwhile. (A raw client that ignores the quota gets Busy: the test below.)"""
    ep = f"ipc://{tmp_path}/q.sock"
    b = Broker(bind=[ep], max_client_inflight=50).start()
    w = Worker([ep], concurrency=4)
    w.add_service("echo", lambda x: x)
    w.start()
    try:
        with Client([ep], timeout=30) as flood, Client([ep], timeout=10) as other:
            wait_for(lambda: len(b.status()["workers"]) == 1, 20, "worker")
            futs = [flood.submit("echo", i) for i in range(2000)]
            assert [other.call("echo", i) for i in range(20)] == list(range(20))
            assert [f.result(30) for f in futs] == list(range(2000))
            assert b.status()["counters"]["over_quota"] == 0
    finally:
        w.stop(drain=False)
        b.stop()


FLOOD_ROUNDS = 3  # windows the flood test may take (its docstring says why more than one)


def p50(client, n=300):
    lat = []
    for i in range(n):
        t = time.perf_counter()
        assert client.call("echo", i) == i
        lat.append(time.perf_counter() - t)
    return sorted(lat)[n // 2]


@pytest.mark.alone
@pytest.mark.timeout(150)
def test_a_flood_far_past_the_quota_gets_busy_and_leaves_others_latency_within_2x(procs, tmp_path):
    """10,000 requests/s from one client whose quota is 4 open requests: it gets Busy at once, and
    another client's p50 stays within 2x of its p50 under the same flood sent to another broker.
    On a slow machine the flood is 4 requests per quiet call's p50 (10,000/s is that at 400 us):
    a fixed rate nearly saturated the broker on an hour when the machine ran 4-5 times slower
    (its p50 went 2.6x, even with no other test beside it).

    The control matters on a shared 2-core machine: the flooder and the broker answering it use CPU
    whichever broker they hit, and that alone slows every process (docs/security.md has the figures
    for an unthrottled flooder, which takes a core for itself). What the broker controls is whether
    the flood it receives delays the others it serves, and that is what the ratio isolates.

    One window's ratio is still noise on a loaded machine: with a busy loop on each core beside it,
    3 of 12 single rounds went over 2x (2.1-3.4x) on the code of 2026-12-06 and the commit before
    it alike, and the others were 0.6-1.3x. A flood that delays the others does it in every window,
    so the test passes on the first of up to FLOOD_ROUNDS rounds within 2x."""
    import json
    import subprocess
    import sys

    from tests.integration.helpers import ROOT

    eps = [f"ipc://{tmp_path}/fl{i}.sock" for i in range(2)]
    for ep in eps:  # the broker under test, and a twin that takes the control flood
        procs.spawn("broker", "--bind", ep, "--max-client-inflight", "4")
        procs.spawn("worker", "testworkers:echo_fn", "--service", "echo", "--connect", ep, "--concurrency", "8")

    def flood_while_measuring(ep: str, watch: Client, other: Client, rate: int) -> tuple[float, dict[str, int]]:
        """The other client's p50 while the flood hits ``ep`` (``watch`` is a client of that broker)."""
        before = status(watch)["counters"]["over_quota"]
        flood = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "integration" / "flooder.py"), ep, "4", str(rate)],
            stdout=subprocess.PIPE,
            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        )
        procs.procs.append(flood)
        wait_for(lambda: status(watch)["counters"]["over_quota"] > before + 2000, 20, "the flood under way")
        lat = p50(other, 500)
        out, _ = flood.communicate(timeout=30)
        return lat, json.loads(out)

    with Client([eps[0]], timeout=10) as other, Client([eps[1]], timeout=10) as twin:
        for c in (other, twin):
            wait_for(lambda c=c: "echo" in status(c)["services"], 20, "worker registered")
        p50(other, 100)  # warm up
        quiet = p50(other, 500)
        rate = int(min(10_000, 4 / quiet))
        rounds = []
        for _ in range(FLOOD_ROUNDS):
            control, _ = flood_while_measuring(eps[1], twin, other, rate)
            loud, counts = flood_while_measuring(eps[0], other, other, rate)
            print(
                f"other client p50: {quiet * 1e6:.0f} us quiet, {control * 1e6:.0f} us while another broker is "
                f"flooded, {loud * 1e6:.0f} us while its own broker is; flooder at {rate}/s {counts}"
            )
            busy = counts.get(str(2), 0)
            assert counts["sent"] > 2 * rate and busy > counts["sent"] // 2, counts  # Busy, not silence (4 s sent)
            # Both baselines are without the flood on this broker; the higher is the fairer one to compare
            # with (a 300-call p50 moves by tens of percent from one window to the next under load).
            base = max(quiet, control)
            rounds.append(f"p50 {loud * 1e6:.0f} us under flood, {control * 1e6:.0f} us control")
            if loud <= 2 * base:
                break
        else:
            pytest.fail(
                f"in every round the flood at its own broker more than doubled the p50 ({quiet * 1e6:.0f} "
                f"us quiet): {'; '.join(rounds)}"
            )


@pytest.mark.timeout(60)
def test_a_secured_broker_on_its_own_context_lets_the_context_terminate(pki, tmp_path):
    import threading

    import zmq

    ctx = zmq.Context()
    b = secure_broker(pki, f"ipc://{tmp_path}/own.sock", context=ctx)
    assert any(t.name == "zmqdist-zap" for t in threading.enumerate())
    b.stop()
    # the ZAP handler stopped with its last broker (it does not die later of ETERM in term())
    wait_for(lambda: not any(t.name == "zmqdist-zap" for t in threading.enumerate()), 10, "ZAP thread gone")
    t = threading.Thread(target=ctx.term, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "ctx.term() hangs: a socket of the broker or its ZAP handler is still open"


@pytest.mark.timeout(60)
def test_a_plaintext_client_at_a_curve_broker_is_told_no_broker_answered(pki, tmp_path):
    from zmqdist import NoBroker

    b = secure_broker(pki, f"ipc://{tmp_path}/s.sock")
    try:
        with Client(b.endpoints, timeout=0.6) as c, pytest.raises(NoBroker, match="keys do not match"):
            c.call("echo", 1)
    finally:
        b.stop()


@pytest.mark.timeout(60)
def test_zmqdist_worker_keeps_the_worker_objects_curve_keys(pki, tmp_path):
    """The object's server_key and key are used as they are: it registers at a CURVE broker."""
    import subprocess
    import sys

    from tests.integration.helpers import Procs

    b = secure_broker(pki, f"ipc://{tmp_path}/s.sock")
    (tmp_path / "securemod.py").write_text(
        "from zmqdist import Worker\n"
        f"w = Worker(['{b.endpoints[0]}'], server_key={pki.pub('broker')!r}, key={pki.sec('w1')!r}, name='kw')\n"
        "w.add_service('echo', lambda v: v)\n"
    )
    procs = Procs()
    try:
        cmd = [sys.executable, "-m", "zmqdist", "-q", "worker", "securemod:w"]
        procs.procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        wait_for(lambda: [w["name"] for w in b.status()["workers"]] == ["kw"], 20, "the worker registered over CURVE")
    finally:
        procs.cleanup()
        b.stop()


@pytest.mark.timeout(60)
def test_majordomo_peers_over_curve_get_the_rights_of_their_keys(pki, tmp_path):
    """MDP peers on a CURVE endpoint are held to their keys as native ones: a worker key limited to
    'echo' may not offer 'sum' (DISCONNECT), a client key may not act as a worker, a client limited
    to 'echo' is refused 'sum' with the INVALID error body; what is allowed is served."""
    import zmq

    from zmqdist.transport.security import load_secret

    ep = f"ipc://{tmp_path}/s.sock"
    b = secure_broker(pki, ep)
    ctx = zmq.Context.instance()
    socks = []

    def dealer(name):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.curve_publickey, s.curve_secretkey = load_secret(pki.sec(name))
        s.curve_serverkey = load_public(pki.pub("broker"))
        s.connect(ep)
        socks.append(s)
        return s

    def recv(s):
        assert s.poll(10_000), "no answer"
        return s.recv_multipart()

    try:
        worker = dealer("w_echo")
        worker.send_multipart([b"MDPW02", b"\x01", b"echo"])
        wait_for(lambda: "echo" in b.status()["services"], 20, "the MDP worker over CURVE")
        for name, service in (("w_echo", b"sum"), ("alice", b"echo")):  # beyond its services; a client key
            bad = dealer(name)
            bad.send_multipart([b"MDPW02", b"\x01", service])
            assert recv(bad) == [b"MDPW02", b"\x06"]  # DISCONNECT
        assert b.status()["services"]["echo"]["workers"] == 1 and "sum" not in b.status()["services"]
        bob = dealer("bob")
        bob.send_multipart([b"MDPC02", b"\x01", b"sum", b"x"])
        reply = recv(bob)
        assert reply[3:5] == [b"zmqdist.error", b"INVALID"] and b"not allowed service" in reply[5], reply
        bob.send_multipart([b"MDPC02", b"\x01", b"echo", b"hi"])
        while (task := recv(worker))[1] != b"\x02":  # past the broker's heartbeats
            pass
        worker.send_multipart([b"MDPW02", b"\x04", task[2], b"", b"HI"])
        assert recv(bob) == [b"MDPC02", b"\x03", b"echo", b"HI"]
        assert b.status()["counters"]["refused_by_role"] >= 3
    finally:
        for s in socks:
            s.close(0)
        b.stop()


@pytest.mark.timeout(60)
def test_a_broker_whose_zap_handler_stopped_sends_unchecked_peers_away_and_restarts_it(
    pki, tmp_path, caplog, monkeypatch
):
    """Without its ZAP handler libzmq admits every CURVE peer that knows the server key, with no
    rights on its connection. The first message of such a peer killed the broker's loop (reading
    the missing rights raised); a key in no allow-list was then "in". Now such a connection is told
    BYE (once a second): the peer connects again, and is checked once the broker has restarted the
    handler (it tries every second). An honest peer loses nothing; the others are served."""
    from zmqdist.core.rights import UNCHECKED
    from zmqdist.transport import security

    b = secure_broker(pki, f"ipc://{tmp_path}/s.sock")
    w = Worker(b.endpoints, server_key=pki.pub("broker"), key=pki.sec("w1"), name="w1")
    w.add_service("echo", lambda x: x)
    w.start()
    keys = {"server_key": pki.pub("broker")}
    real = security.ZapHandler

    class Unstartable:
        def __init__(self, ctx):
            raise RuntimeError("can't start new thread")

    try:
        with Client(b.endpoints, timeout=5, key=pki.sec("alice"), **keys) as alice:
            assert alice.call("echo", 1) == 1
            zap = security._handlers[id(b._ctx)]
            caplog.set_level(logging.WARNING, logger="zmqdist")
            monkeypatch.setattr(security, "ZapHandler", Unstartable)  # the restart fails, for now
            zap.stop()  # its thread ends, as if it had died
            with Client(b.endpoints, timeout=2, key=pki.sec("mallory"), **keys) as mallory:
                with pytest.raises(RequestTimeout):  # sent away, again and again: never served
                    mallory.call("echo", 2)
            assert any(UNCHECKED in r.getMessage() for r in caplog.records)
            assert any("ZAP handler cannot restart" in r.getMessage() for r in caplog.records)
            with Client(b.endpoints, timeout=15, key=pki.sec("alice"), **keys) as honest:
                pending = honest.submit("echo", 3)  # connected while no handler runs
                assert alice.call("echo", 4) == 4  # the broker lives, its checked peers are served
                assert not pending.done()
                monkeypatch.setattr(security, "ZapHandler", real)
                restarted = wait_for(
                    lambda: (h := security._handlers.get(id(b._ctx))) is not zap and h.alive and h,
                    10,
                    "the ZAP handler restarted",
                )
                assert pending.result(10) == 3  # it connected again, was checked, and said it again
            with Client(b.endpoints, timeout=1, key=pki.sec("mallory"), **keys) as mallory:
                with pytest.raises(RequestTimeout):  # refused at the handshake again
                    mallory.call("echo", 5)
            assert restarted.refused >= 1 and restarted.accepted >= 1
    finally:
        w.stop(drain=False)
        b.stop()


@pytest.mark.timeout(30)
def test_a_zap_request_whose_check_fails_is_refused_and_the_handler_answers_the_next(pki, caplog):
    """An error while answering one ZAP request refuses that peer (500) and keeps the handler: its
    thread ending would let libzmq admit every peer that knows the server key."""
    import zmq

    from zmqdist.transport.security import KeyRing, ZapHandler

    ctx = zmq.Context()
    h = ZapHandler(ctx)
    ring = KeyRing({"clients": str(pki.allow["clients"])})
    alice = zmq.utils.z85.decode(load_public(pki.pub("alice")))

    class Broken:
        def get(self, key):
            raise RuntimeError("a bug")

    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect("inproc://zeromq.zap.01")
    try:
        h.add("d", ring)
        good = ring.keys
        caplog.set_level(logging.ERROR, logger="zmqdist")
        ring.keys = Broken()  # type: ignore[assignment]
        req.send_multipart([b"1.0", b"1", b"d", b"127.0.0.1", b"", b"CURVE", alice])
        assert req.poll(5000)
        assert req.recv_multipart()[2] == b"500"
        assert any("ZAP request failed" in r.getMessage() for r in caplog.records)
        assert h.alive
        ring.keys = good
        req.send_multipart([b"1.0", b"2", b"d", b"127.0.0.1", b"", b"CURVE", alice])
        assert req.poll(5000)
        assert req.recv_multipart()[2:4] == [b"200", b"OK"]
    finally:
        req.close(0)
        h.stop()
        ctx.term()
