"""Backup pairs with real processes: SIGKILL of the active master and of the active proxy under
load, restart of the killed primary, manual failback through the CLI."""

import logging
import os
import signal
import threading
import time

import pytest

from tests.integration.helpers import status, wait_for
from zmqdist import Client, InvalidRequest, RequestTimeout

pytestmark = pytest.mark.integration


class Pairs:
    def __init__(self, procs, tmp_path):
        self.procs = procs
        self.tmp = tmp_path
        self.brokers = {}

    def ep(self, name):
        return f"ipc://{self.tmp}/{name}.sock"

    def ha_ep(self, name):
        return f"ipc://{self.tmp}/{name}.ha"

    def broker(self, name, role, peer, *extra):
        self.brokers[name] = self.procs.spawn(
            "broker",
            *("--bind", self.ep(name), "--name", name, "--ha", role),
            *("--ha-bind", self.ha_ep(name), "--peer", self.ha_ep(peer)),
            *extra,
        )
        return self.brokers[name]

    def pair(self, a, b, *extra):
        """Start ``a`` as the primary, and once it has bound, ``b`` as its backup: a peer spawned
        next that lists ``a`` first must find it there. (A peer that came to the backup while the
        primary was still starting, slow on a loaded machine, made the backup active, as a backup
        alone with a peer is, and a later wait for ``a`` active timed out.)"""
        self.broker(a, "primary", b, *extra)
        wait_for(lambda: os.path.exists(f"{self.tmp}/{a}.sock"), 20, f"{a} bound")
        self.broker(b, "backup", a, *extra)

    def worker(self, name, *at, concurrency=4, target="testworkers:echo"):
        eps = [x for n in at for x in ("--connect", self.ep(n))]
        return self.procs.spawn("worker", target, *eps, "--name", name, "--concurrency", str(concurrency))

    def client(self, *at, timeout=30):
        return Client([self.ep(n) for n in at], timeout=timeout)

    def ha(self, name):
        with self.client(name, timeout=5) as c:
            return status(c)["ha"]

    def wait_pair(self, active, passive, epoch=None):
        """``active`` serves, ``passive`` holds a copy of its table and ``active`` has heard so (a
        handover is refused until it has: the passive's report follows its copy by a heartbeat)."""

        def ok():
            a, p = self.ha(active), self.ha(passive)
            good = a["state"] == "active" and p["state"] == "passive" and p["seq"] >= 0
            good = good and a["peer"]["synced"] >= 0
            return good and (epoch is None or a["epoch"] == epoch)

        wait_for(ok, 20, f"{active} active and {passive} passive")


def pipelined(client, n, kill_at, kill, window=200):
    """Submit ``n`` echo calls keeping ``window`` in flight; call ``kill`` after ``kill_at``
    submissions. Return (results, takeover time: from the kill to the first reply to a request
    sent after it, which only the backup can give)."""
    futs, times = [], {}
    killed = None
    for i in range(n):
        f = client.submit("echo", i)
        f.add_done_callback(lambda _f, i=i: times.setdefault(i, time.monotonic()))
        futs.append(f)
        if i == kill_at:
            killed = time.monotonic()
            kill()
        if i >= window:
            futs[i - window].result(60)
    results = [f.result(60)[0] for f in futs]
    return results, min(t for i, t in times.items() if i > kill_at) - killed


@pytest.mark.timeout(150)
def test_sigkill_of_the_active_master_under_pipelined_load(procs, tmp_path):
    t = Pairs(procs, tmp_path)
    t.pair("A", "B")
    for i in range(3):
        t.worker(f"w{i}", "A", "B")
    t.wait_pair("A", "B")
    epoch1 = t.ha("A")["epoch"]
    with t.client("A") as c:
        wait_for(lambda: len(status(c)["workers"]) == 3, 20, "3 workers at A")
    n = 4000
    with t.client("A", "B") as c:
        results, takeover = pipelined(c, n, 1500, lambda: t.brokers["A"].send_signal(signal.SIGKILL))
        assert results == list(range(n)), "a request was lost or answered wrongly"
        print(f"\ntakeover: {takeover:.3f}s from SIGKILL to the first reply to a request sent after it")
        print(f"client: {c._core.counters}")
        assert takeover < 2.0
        st = status(c)
    assert st["broker"] == "B" and st["ha"]["state"] == "active" and st["ha"]["epoch"] > epoch1
    print(f"B: adopted {st['counters']['adopted']}, requeues {st['counters']['requeues']}")


@pytest.mark.timeout(120)
def test_a_map_at_its_quota_across_the_kill_of_the_active_broker_gets_every_result_none_busy(procs, tmp_path):
    """Client.map of 3,000 calls against a pair that takes 8 open requests per client; SIGKILL of
    the active one after 1,000 results. The client holds the rest, sends what A had again once B's
    WELCOME says its quota, and B's count of the client's requests is what the client sent it:
    copies B restored count once sent again, and a BUSY over the quota for a request the client
    sent within it (a request sent again crossing its reply) sends that request again. Every
    result comes, in order; the caller never sees Busy."""
    t = Pairs(procs, tmp_path)
    t.pair("A", "B", "--max-client-inflight", "8")
    for i in range(2):
        t.worker(f"w{i}", "A", "B", concurrency=4)
    t.wait_pair("A", "B")
    with t.client("A") as c:
        wait_for(lambda: len(status(c)["workers"]) == 2, 20, "2 workers at A")
    with t.client("A", "B", timeout=60) as c:
        got = []
        for r in c.map("echo", range(3000), window=100):
            got.append(r[0])
            if len(got) == 1000:
                t.brokers["A"].send_signal(signal.SIGKILL)
        assert got == list(range(3000))
        st = status(c)
        assert st["broker"] == "B" and c._core.counters["failovers"] >= 1
        print(f"\nclient: {c._core.counters}; B: {st['counters']['over_quota']} over its quota")


@pytest.mark.timeout(150)
def test_the_killed_primary_restarted_stays_passive(procs, tmp_path):
    t = Pairs(procs, tmp_path)
    t.pair("A", "B")
    t.worker("w0", "A", "B")
    t.wait_pair("A", "B")
    epoch1 = t.ha("A")["epoch"]
    t.brokers["A"].send_signal(signal.SIGKILL)
    t.brokers["A"].wait(10)
    with t.client("A", "B") as c:
        assert [c.call("echo", i)[0] for i in range(20)] == list(range(20))  # served by B
    t.broker("A", "primary", "B")  # back at the same endpoints
    t.wait_pair("B", "A")
    with t.client("A", "B") as c:
        assert [c.call("echo", i)[0] for i in range(50)] == list(range(50))
        assert status(c)["broker"] == "B"
    assert t.ha("A")["state"] == "passive" and t.ha("A")["epoch"] == t.ha("B")["epoch"] > epoch1
    # Manual failback through the CLI: A takes the work back with a new epoch.
    b_epoch = t.ha("B")["epoch"]
    out = procs.spawn("handover", "--connect", t.ep("B"), quiet=True)
    assert out.wait(20) == 0, out.stderr.read().decode()
    assert f"handed over to A (it takes over above epoch {b_epoch})".encode() in out.stdout.read()
    t.wait_pair("A", "B")
    assert t.ha("A")["epoch"] > b_epoch
    with t.client("A", "B") as c:
        assert [c.call("echo", i)[0] for i in range(20)] == list(range(20))
        assert status(c)["broker"] == "A"


@pytest.mark.timeout(150)
def test_sigkill_of_the_active_proxy_of_a_pair_under_load(procs, tmp_path):
    t = Pairs(procs, tmp_path)
    t.procs.spawn("broker", "--bind", t.ep("M"), "--name", "M")
    t.pair("PA", "PB", "--upstream", t.ep("M"))
    for i in range(2):
        t.worker(f"w{i}", "M")
    t.wait_pair("PA", "PB")
    with t.client("PA") as c:
        wait_for(lambda: status(c)["upstream"]["registered"], 20, "PA registered at M")
    n = 2000
    with t.client("PA", "PB") as c:
        results, takeover = pipelined(c, n, 700, lambda: t.brokers["PA"].send_signal(signal.SIGKILL))
        assert results == list(range(n))
        print(f"\nproxy takeover: {takeover:.3f}s from SIGKILL to the first reply to a request sent after it")
        assert takeover < 2.0
        st = status(c)
    assert st["broker"] == "PB" and st["ha"]["state"] == "active" and st["upstream"]["registered"]


@pytest.mark.timeout(120)
def test_sigterm_of_the_active_broker_hands_over_at_once(procs, tmp_path):
    t = Pairs(procs, tmp_path)
    t.pair("A", "B", "--heartbeat", "1.0")  # a ttl of 4 s: a takeover after silence would show
    t.worker("w0", "A", "B")
    t.wait_pair("A", "B")
    with t.client("A", "B") as c:
        assert [c.call("echo", i)[0] for i in range(10)] == list(range(10))
        futs = [c.submit("echo", i) for i in range(300)]
        stopped = time.monotonic()
        t.brokers["A"].send_signal(signal.SIGTERM)  # graceful: HANDOVER to B, BYE to every peer
        assert t.brokers["A"].wait(10) == 0
        assert [f.result(30)[0] for f in futs] == list(range(300))
        first = c.call("echo", "after")[0]
        handover = time.monotonic() - stopped
        st = status(c)
    print(f"\nSIGTERM to the first call served after it: {handover:.3f}s")
    assert first == "after" and st["broker"] == "B" and st["ha"]["handovers"] == 0
    assert st["ha"]["takeovers"] == 1 and handover < 3.0  # no ttl of silence (4 s) to wait for


@pytest.mark.timeout(150)
def test_a_restarted_broker_never_deposes_the_live_active_one(procs, tmp_path):
    """Kill the active A, let B take over, and restart A while a client that lists A first comes
    to it. B's own pair connection to A reconnects only after libzmq's backoff (up to 1 s), longer
    than A's grace here (heartbeat 0.1 s x 3): A must hear B on the connection A made, stay
    passive, and B, which holds open requests, must never step down. Five restarts."""
    fast = ("--heartbeat", "0.1", "--liveness", "3")
    t = Pairs(procs, tmp_path)
    t.pair("A", "B", *fast)
    procs.spawn(
        "worker",
        "testworkers:echo",
        "--connect",
        t.ep("A"),
        "--connect",
        t.ep("B"),
        "--heartbeat",
        "0.1",
        "--liveness",
        "3",
        "--concurrency",
        "4",
    )
    t.wait_pair("A", "B")
    t.brokers["A"].send_signal(signal.SIGKILL)
    t.brokers["A"].wait(10)
    with t.client("B") as c:
        wait_for(lambda: status(c)["ha"]["state"] == "active", 20, "B active")
    with t.client("A", "B", timeout=60) as load:
        for round_ in range(5):
            time.sleep(2.5)  # B's attempts at the dead A back off (to 1 s; a new socket each second)
            slow = [load.submit("slow", 1.0) for _ in range(8)]  # B holds open requests
            t.broker("A", "primary", "B", *fast)
            with t.client("A", "B") as voter:  # a peer that lists A first comes to A at once
                voter.submit("echo", round_)
                time.sleep(2.0)
            b, a = t.ha("B"), t.ha("A")
            assert b["state"] == "active" and b["step_downs"] == 0, (round_, b)
            assert a["state"] == "passive" and a["takeovers"] == 0, (round_, a)
            assert [f.result(30) for f in slow]
            t.brokers["A"].send_signal(signal.SIGKILL)
            t.brokers["A"].wait(10)


@pytest.mark.timeout(120)
def test_a_stream_through_a_proxy_pair_survives_nothing_silently(procs, tmp_path):
    """A stream from a worker at the master, through the active proxy of a pair, to a slow
    consumer; SIGKILL of that proxy mid-stream: the parts that arrived are in order with no gap and
    no repeat, then StreamInterrupted; the master stops the run; a new stream goes through the
    other proxy whole."""
    from zmqdist import StreamInterrupted

    t = Pairs(procs, tmp_path)
    t.procs.spawn("broker", "--bind", t.ep("M"), "--name", "M")
    t.pair("PA", "PB", "--upstream", t.ep("M"))
    t.worker("w", "M", concurrency=1, target="testworkers:lifecycle")
    t.wait_pair("PA", "PB")
    with t.client("PA") as c:
        wait_for(lambda: status(c)["upstream"]["registered"], 20, "PA registered at M")
    with t.client("PA", "PB", timeout=60) as c:
        got = []
        with pytest.raises(StreamInterrupted):
            for part in c.stream("gen", {"n": 5000, "size": 8}, window=8):
                got.append(part[0])
                if len(got) == 200:
                    t.brokers["PA"].send_signal(signal.SIGKILL)
                time.sleep(0.002)
        assert got == list(range(len(got))) and len(got) >= 200
        with t.client("M") as m:  # the master stopped the run: its one slot is free again
            wait_for(lambda: status(m)["requests_open"] == 0, 15, "the master to stop the cut stream")
        again = [part[0] for part in c.stream("gen", {"n": 300, "size": 8}, window=8)]
        assert again == list(range(300))
        assert status(c)["broker"] == "PB"


@pytest.mark.timeout(90)
def test_a_worker_stopped_past_its_ttl_mid_stream_serves_it_again_whole_and_gets_its_slot_back(procs, tmp_path):
    """SIGSTOP the one worker of a pair while its stream's handler waits before its first part,
    past the ttl: the broker requeues the stream (no part went out) and, once the worker is back
    (SIGCONT, RECONNECT, its runs carried), sends it to that worker again. The run of the earlier
    session must stop: left running, it ended the stream with its own end before the new run had
    finished (StreamInterrupted), and kept its slot while it ran."""
    from zmqdist import StreamInterrupted

    t = Pairs(procs, tmp_path)
    t.pair("A", "B", "--heartbeat", "0.2")
    w = t.worker("w", "A", "B", concurrency=2, target="testworkers:lifecycle")
    t.wait_pair("A", "B")
    with t.client("A", "B", timeout=60) as c:
        wait_for(lambda: [x["capacity"] for x in status(c)["workers"]] == [2], 20, "the worker registered")
        stream = c.stream("gen", {"n": 4, "size": 8, "delay": 1.0}, window=8)
        wait_for(lambda: status(c)["workers"][0]["inflight"] == 1, 10, "the stream at the worker")
        w.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: status(c)["counters"]["workers_expired"] == 1, 10, "the worker given up")
        finally:
            w.send_signal(signal.SIGCONT)
        try:
            got = [part[0] for part in stream]
        except StreamInterrupted as e:
            pytest.fail(f"the earlier run ended the stream sent again: {e}")
        assert got == [0, 1, 2, 3]
        st = status(c)
        assert st["counters"]["requeues"] >= 1 and st["requests_open"] == 0
        wait_for(lambda: status(c)["workers"][0]["capacity"] == 2, 5, "the worker's two slots back")


@pytest.mark.timeout(150)
def test_a_stopped_active_broker_resumes_passive_and_the_pair_does_not_flap(procs, tmp_path):
    """SIGSTOP the active A under pipelined load (a stalled host, a long pause) past the ttl: B
    takes over. On SIGCONT A reads what waited on both pair connections, steps down once and
    stays passive; B, which holds the requests, never steps down. (A took over again on a state
    B had sent before its takeover, and deposed B, 4 runs of 4 before the fix.)"""
    t = Pairs(procs, tmp_path)
    t.pair("A", "B")
    for i in range(2):
        t.worker(f"w{i}", "A", "B")
    t.wait_pair("A", "B")
    with t.client("A") as c:
        wait_for(lambda: len(status(c)["workers"]) == 2, 20, "2 workers at A")
    a = t.brokers["A"]
    n = 3000
    with t.client("A", "B") as c:
        futs = []
        for i in range(n):
            futs.append(c.submit("echo", i))
            if i == 1000:
                a.send_signal(signal.SIGSTOP)
                resume = threading.Timer(3.0, a.send_signal, (signal.SIGCONT,))
                resume.start()
            if i >= 200:
                futs[i - 200].result(60)
        assert [f.result(60)[0] for f in futs] == list(range(n))
        resume.join()
        t.wait_pair("B", "A")
        assert [c.call("echo", i)[0] for i in range(20)] == list(range(20))
        assert status(c)["broker"] == "B"
    a_ha, b_ha = t.ha("A"), t.ha("B")
    print(f"\nA: {a_ha}\nB: {b_ha}")
    assert b_ha["takeovers"] == 1 and b_ha["step_downs"] == 0 and b_ha["state"] == "active"
    assert a_ha["takeovers"] == 1 and a_ha["step_downs"] == 1 and a_ha["state"] == "passive"


@pytest.mark.timeout(90)
def test_a_client_at_the_pair_link_by_mistake_is_told_so_and_takes_nothing_from_the_pair(procs, tmp_path, caplog):
    """A client given a broker's --ha-bind instead of its --bind: the broker answers its messages
    with an ERROR that says where it is, instead of sending it the pair's own states (it took the
    stray connection for the peer's and sent its answers there); the pair goes on."""
    t = Pairs(procs, tmp_path)
    t.pair("A", "B")
    t.wait_pair("A", "B")
    with caplog.at_level(logging.WARNING, logger="zmqdist.client"):
        with Client([t.ha_ep("A")], timeout=1.5) as stray, pytest.raises(RequestTimeout):
            stray.call("echo", 1)
    said = [r.getMessage() for r in caplog.records]
    told = [m for m in said if "this is the pair link of broker A (its --ha-bind)" in m]
    assert 1 <= len(told) <= 5, said  # one ERROR per message it sent (a HELLO a heartbeat): logged 5 a key
    assert not any("PairState" in m for m in said), said
    t.wait_pair("A", "B")
    with t.client("A") as c:
        assert status(c)["counters"]["bad_input"] >= 1


def limits_pair(procs, tmp_path, limit_a, limit_b):
    """A pair A (active) and B whose --max-message-size are given, and a worker of one slot."""
    t = Pairs(procs, tmp_path)
    t.broker("A", "primary", "B", "--max-message-size", str(limit_a), "--heartbeat", "0.2")
    t.broker("B", "backup", "A", "--max-message-size", str(limit_b), "--heartbeat", "0.2")
    t.worker("w", "A", "B", concurrency=1)
    t.wait_pair("A", "B")
    return t


def blocked(c, seconds=3.0):
    """Take the worker's one slot for ``seconds``: what follows stays queued at A."""
    blocker = c.submit("slow", seconds)
    wait_for(lambda: status(c)["counters"]["requests"] >= 1, 10, "the blocker accepted")
    return blocker


@pytest.mark.timeout(90)
@pytest.mark.parametrize("limit_a", [100_000, 400_000])
def test_a_queue_larger_than_the_message_limit_is_replicated_in_parts_and_survives_a_kill(procs, tmp_path, limit_a):
    """B's --max-message-size 100 kB (A's the same, or 400 kB: a rolling change) and 30 queued
    requests of 60 kB (1.8 MB): the passive broker's pair link refuses a REPLICATE over its limit
    whole, so the table goes in parts within it; the passive holds every request, and after a
    SIGKILL of the active one each is answered, once, right."""
    t = limits_pair(procs, tmp_path, limit_a, 100_000)
    with t.client("A", "B", timeout=60) as c:
        blocker = blocked(c)
        big = [c.submit("echo", f"{i:05d}" + "x" * 60_000) for i in range(30)]
        wait_for(lambda: t.ha("B")["replicated"] >= 30, 10, "B holding the 30 queued requests")
        t.brokers["A"].send_signal(signal.SIGKILL)
        assert [f.result(40)[0][:5] for f in big] == [f"{i:05d}" for i in range(30)]
        blocker.result(40)
        b = t.ha("B")
    assert b["state"] == "active" and b["takeovers"] == 1, b


@pytest.mark.timeout(90)
def test_a_request_too_large_for_the_backups_limit_neither_stalls_replication_nor_hangs_its_caller(procs, tmp_path):
    """A rolling change of --max-message-size: A takes 100 kB, its backup B 20 kB, and A holds a
    queued request of 60 kB (over twice B's limit). Its REPLICATE was dropped by B's pair link
    with the connection, and every one after it: B's copy stopped there for good, silently. After
    a SIGKILL of A the client sent it to B blind, libzmq dropped it with the connection, and it
    timed out at its deadline. Now it is left out of the replication (counted), the rest
    replicates, and the client ends it at once when B's WELCOME says its limit; the others are
    answered."""
    t = limits_pair(procs, tmp_path, 100_000, 20_000)
    with t.client("A", "B", timeout=60) as c:
        blocker = blocked(c, 8.0)  # the 60 kB request must still be queued at A when it dies
        small = [c.submit("echo", f"{i:05d}") for i in range(5)]
        huge = c.submit("echo", "H" * 60_000)
        small += [c.submit("echo", f"{i:05d}") for i in range(5, 10)]
        wait_for(lambda: t.ha("B")["replicated"] >= 11, 10, "B holding the blocker and the 10 small requests")
        assert t.ha("A")["not_replicated"] >= 1
        t.brokers["A"].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(InvalidRequest, match=r"larger than broker B's limit of 20000 bytes"):
            huge.result(30)
        assert time.monotonic() - killed < 10  # the failover, then at once (its deadline is 60 s)
        assert [f.result(30)[0] for f in small] == [f"{i:05d}" for i in range(10)]
        blocker.result(30)


@pytest.mark.timeout(60)
def test_an_mdp_client_with_one_identity_at_both_brokers_gets_its_own_answer_after_a_takeover(procs, tmp_path):
    """A Majordomo client reaches both brokers of a pair under one routing id. Its request open at
    the active broker when that one is SIGKILLed is not taken over by the other (MDP cannot send a
    request again by its number); the client's next request there gets its own answer and nothing
    else. Before: the copy was taken over, the bridge numbered the new request as the copy, the
    broker took it for the copy sent again, and the client got the copy's answer."""
    import zmq

    t = Pairs(procs, tmp_path)
    t.pair("A", "B")
    t.worker("w0", "A", "B")
    t.wait_pair("A", "B")
    ctx = zmq.Context.instance()
    socks = {}
    for name in ("A", "B"):
        s = socks[name] = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.routing_id = b"mdp-client-1"
        s.connect(t.ep(name))
    try:
        socks["A"].send_multipart([b"", b"MDPC01", b"after", b"old 2.5"])  # MDP/0.1, as a REQ socket sends
        wait_for(lambda: t.ha("B")["replicated"] == 1, 10, "the request in B's copy of the table")
        t.brokers["A"].send_signal(signal.SIGKILL)
        t.brokers["A"].wait(10)
        wait_for(lambda: t.ha("B")["state"] == "active", 15, "B active")
        socks["B"].send_multipart([b"", b"MDPC01", b"after", b"new 0"])
        assert socks["B"].poll(10_000), "no answer from B"
        assert socks["B"].recv_multipart() == [b"", b"MDPC01", b"after", b"new"]
        with t.client("B", timeout=5) as c:
            st = status(c)
        assert st["requests_open"] == 0 and st["counters"]["mdp_not_taken_over"] == 1
        # the first request's run, carried to B by its worker, ends there for nobody
        assert not socks["B"].poll(3000), socks["B"].recv_multipart()
    finally:
        for s in socks.values():
            s.close()


@pytest.mark.timeout(90)
def test_a_pair_whose_brokers_beat_at_different_intervals_keeps_its_live_active_broker(procs, tmp_path):
    """A runs --heartbeat 2, B the default 0.25 x 4: B took A for silent a second after each of
    its beats, and the first peer that came to B made it take over from live A (which stepped
    down). Each PAIR_STATE now says its sender's interval, and B judges A's silence by it."""
    t = Pairs(procs, tmp_path)
    t.broker("A", "primary", "B", "--heartbeat", "2")
    t.broker("B", "backup", "A")
    t.worker("w0", "A", "B")
    t.wait_pair("A", "B")
    end = time.monotonic() + 6  # three of A's beats, with peers coming to B all along
    while time.monotonic() < end:
        with t.client("B", "A", timeout=20) as c:
            assert c.call("echo", 1)[0] == 1
        b = t.ha("B")
        assert b["state"] == "passive" and b["takeovers"] == 0 and b["peer"]["state"] != "silent", b
    a = t.ha("A")
    assert a["state"] == "active" and a["step_downs"] == 0, a


@pytest.mark.timeout(90)
def test_a_pair_forgets_the_clients_and_workers_that_came_and_went(procs, tmp_path):
    """Short-lived clients of a backup pair, native workers that leave and Majordomo workers that
    vanish without DISCONNECT: the active broker forgets them within 10 ttls (its status says
    what it remembers). Before, its batch limits kept every client ever heard (the pair's door
    noted them in a table nobody swept) and every worker gone, and the Majordomo bridge every
    vanished worker, each until its table filled."""
    import zmq

    t = Pairs(procs, tmp_path)
    t.pair("A", "B", "--heartbeat", "0.05", "--mdp-heartbeat", "0.2")
    t.worker("w0", "A", "B")
    t.wait_pair("A", "B")
    for i in range(60):
        with t.client("A", "B", timeout=20) as c:
            assert c.call("echo", i)[0] == i
    gone = [t.worker(f"w{i}", "A", "B") for i in (1, 2, 3)]
    ctx = zmq.Context.instance()
    mdp = [ctx.socket(zmq.DEALER) for _ in range(20)]
    with t.client("A", timeout=5) as c:
        # The Majordomo workers never heartbeat: registered, they expire within a second (their
        # ttl), so they register only once the native ones have (a process starts slowly on a
        # loaded machine: the test missed the moment when all 24 were there, 1 run in 5).
        wait_for(lambda: len(status(c)["workers"]) >= 4, 20, "the leaving native workers registered")
        for s in mdp:
            s.linger = 0
            s.connect(t.ep("A"))
            s.send_multipart([b"", b"MDPW01", b"\x01", b"mdp-echo"])
        wait_for(lambda: len(status(c)["workers"]) >= 24, 20, "the leaving workers registered")
        for s in mdp:
            s.close()  # vanished, no DISCONNECT
        for w in gone:
            w.send_signal(signal.SIGKILL)
        # what stays: one client (this one) and two batch limits (w0's and this client's)
        wait_for(
            lambda: (r := status(c)["remembered"])["clients"] <= 1 and r["batch_limits"] <= 2 and r["mdp_peers"] == 0,
            20,
            "the gone peers forgotten",
        )
        assert status(c)["ha"]["state"] == "active" and c.call("echo", "still")[0] == "still"


@pytest.mark.timeout(120)
def test_a_stalled_host_pausing_the_whole_pair_and_its_workers_changes_no_active_broker(procs, tmp_path):
    """A host that stalls (a VM paused by its hypervisor) stops the brokers of a pair and the
    workers on it at once, for longer than the ttl; a client elsewhere finds the pair silent and
    goes to the passive broker B. When the host resumes, B (resumed a moment before A) must not
    count the pause as A's silence and take over with that client's vote, nor a worker as its
    broker's silence and fail over. Before the fix: B deposed the live A in 2 of 4 such pauses of
    5 s (requests ran twice), and this test failed 3 runs of 3 (2 of 2 with its ttl of 2 s); a
    worker failed over when the stop found it in its timers instead of its wait."""
    t = Pairs(procs, tmp_path)
    t.pair("A", "B", "--heartbeat", "0.5")  # ttl 2 s: a loaded machine's slow turn is no silence
    workers = [t.worker(f"w{i}", "A", "B") for i in range(2)]
    t.wait_pair("A", "B")
    with t.client("A") as c:
        wait_for(lambda: len(status(c)["workers"]) == 2, 20, "2 workers at A")
        # (counted before the stalls: on a loaded machine a start can count a worker twice, 1 in 12
        # of a probe beside the kill tests; most likely a HELLO while the pair was still deciding)
        registered = status(c)["counters"]["workers_registered"]
    stop = threading.Event()
    results: list[tuple[int, object]] = []

    def load() -> None:
        with t.client("A", "B", timeout=60) as c:
            i = 0
            while not stop.is_set():
                futs = [(j, c.submit("echo", j)) for j in range(i, i + 50)]
                results.extend((j, f.result(60)[0]) for j, f in futs)
                i += 50

    driver = threading.Thread(target=load)
    driver.start()
    try:
        host = [t.brokers["A"], t.brokers["B"], *workers]
        orders = ([*workers, t.brokers["B"], t.brokers["A"]], [t.brokers["B"], t.brokers["A"], *workers])
        for order in orders:
            wait_for(lambda n=len(results): len(results) > n + 500, 30, "load served")
            for proc in host:
                proc.send_signal(signal.SIGSTOP)
            time.sleep(4.0)  # past the ttl (2 s)
            for proc in order:
                proc.send_signal(signal.SIGCONT)
                time.sleep(0.03)
        wait_for(lambda n=len(results): len(results) > n + 500, 30, "load served after the pauses")
    finally:
        stop.set()
        driver.join(90)
    assert all(j == v for j, v in results) and len(results) > 1500
    a_ha, b_ha = t.ha("A"), t.ha("B")
    assert (a_ha["state"], a_ha["takeovers"], a_ha["step_downs"]) == ("active", 1, 0), a_ha
    assert (b_ha["state"], b_ha["takeovers"]) == ("passive", 0), b_ha
    with t.client("A") as c:  # no worker failed over, nor was taken for gone: none registered again
        st = status(c)
        assert len(st["workers"]) == 2 and st["counters"]["workers_registered"] == registered, st["counters"]
