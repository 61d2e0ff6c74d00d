"""Where capabilities meet: peers of a backup pair that is also a proxy tier, with failover lists
that go on to the master. Each test here reproduces a defect a chaos soak found (issue 16).

Topology: a master ``m``; a proxy pair ``pa`` (primary) / ``pb`` (backup) below it; a worker
``w`` and a client ``c`` of the region that list ``[pa, pb, m]``.
"""

import dataclasses
import functools
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.client import NO_BROKER
from zmqdist.policy import Retry
from zmqdist.testing import Simulation, assert_each_ended_once

REGION = ("pa", "pb", "m")


def _open_of(d, client):
    """``client``'s quota count at dispatcher ``d`` (0 when it has nothing open there)."""
    rec = d.callers.get(client)
    return 0 if rec is None else rec.open


def region(seed=0):
    sim = Simulation(seed=seed)
    sim.add_broker("m")
    sim.add_pair("pa", "pb", upstream=("m",))
    w = sim.add_worker("w", concurrency=2, service_time=0.01, via=REGION)
    c = sim.add_client("c", via=REGION)
    sim.run_for(2)
    assert sim.active("pa", "pb") == ["pa"] and w.endpoint == Simulation.endpoint("pa")
    return sim, w, c


def served_in_region(sim, c, n=20):
    """Submit ``n`` requests; every one must end OK, served by the region's worker."""
    before = len(sim.workers["w"].executed)
    first = c.core.counters["sent"] + 1
    for i in range(n):
        c.submit("echo", i, timeout=10)
    sim.run_for(2)
    done = {rid: v for rid, v in c.completed.items() if rid >= first}
    assert len(done) == n and all(v[0].status == p.ST_OK for v in done.values())
    assert len(sim.workers["w"].executed) - before >= n  # the region's worker ran them


def test_a_worker_stopped_for_a_while_comes_back_to_its_active_proxy_not_the_master():
    """SIGSTOP 2.5 s: on resume the worker cannot tell its broker's silence from its own pause.
    It must stay in its region (at the active proxy), not drift to the master for good."""
    sim, w, c = region()
    sim.run_for(0.1)  # between heartbeats: nothing is on its way to the worker when it stops
    sim.freeze("w", 2.5)
    sim.run_for(5)
    assert w.endpoint == Simulation.endpoint("pa"), w.endpoint
    served_in_region(sim, c)


def test_a_worker_follows_its_pair_through_restarts_of_both_proxies():
    """Kill and restart the active proxy, then the other: the worker ends at the active one of
    the pair (it tries the pair's other broker first, and a BYE that names the active one sends
    it there), never at the master."""
    sim, w, c = region()
    sim.kill_broker("pa")
    sim.run_for(3)
    assert sim.active("pa", "pb") == ["pb"] and w.endpoint == Simulation.endpoint("pb")
    sim.restart_broker("pa")
    sim.run_for(3)
    sim.kill_broker("pb")
    sim.run_for(3)
    assert sim.active("pa", "pb") == ["pa"], sim.active("pa", "pb")
    sim.restart_broker("pb")
    sim.run_for(3)
    assert w.endpoint == Simulation.endpoint("pa"), w.endpoint
    served_in_region(sim, c)


def test_a_passive_proxy_takes_over_when_its_active_peer_dies_for_good():
    """pa came back passive after a restart, pb is active with every peer. pb dies and stays down:
    its peers try pa (the other broker of the pair) before the master, so pa takes over."""
    sim, w, c = region()
    sim.kill_broker("pa")
    sim.run_for(3)
    sim.restart_broker("pa")
    sim.run_for(3)
    assert sim.active("pa", "pb") == ["pb"]
    sim.kill_broker("pb")
    sim.run_for(3)
    assert sim.active("pa", "pb") == ["pa"]
    assert w.endpoint == Simulation.endpoint("pa") and c.endpoint == Simulation.endpoint("pa")
    served_in_region(sim, c)
    assert_each_ended_once(c, c.core.counters["sent"])


def test_a_restarted_broker_hears_the_live_active_one_and_never_deposes_it():
    """Kill the active a, let b take over, restart a while a peer that lists a first talks to it.
    b's own connection to a comes back only after libzmq's reconnect backoff (1.5 s here, longer
    than a's grace), so a must hear b on the connection a made (b answers a new broker's state at
    once), stay passive, and b, which holds the requests, must never step down."""
    sim = Simulation()
    sim.add_pair("a", "b")
    sim.add_worker("w", concurrency=4, service_time=0.2, via=("a", "b"))
    c = sim.add_client("c", via=("a", "b"))
    sim.run_for(1.5)
    sim.kill_broker("a")
    sim.run_for(3)
    assert sim.active("a", "b") == ["b"]
    for i in range(40):
        c.submit("echo", i, timeout=20)
    sim.run_for(0.1)
    assert sim.brokers["b"].core.open_requests > 0
    sim.pair_reconnect_s = 1.5
    sim.restart_broker("a")
    sim.add_client("new", via=("a", "b")).submit("echo", "vote", timeout=20)  # it comes to a first
    sim.run_for(5)
    assert sim.active("a", "b") == ["b"]
    assert sim.brokers["b"].core.pair.counters["step_downs"] == 0
    assert sim.brokers["a"].core.pair.counters["takeovers"] == 0
    assert_each_ended_once(c, 40, p.ST_OK)


def test_a_passive_proxy_with_no_peer_coming_by_takes_over_on_its_upstreams_word():
    """No peer lists the passive pb (the region's work comes down from the master), so no vote
    comes: pb asks the master, which sees both brokers of the pair; the master no longer hears pa,
    and pb takes over. With the pair link cut but pa still registered at the master, it does not."""
    sim = Simulation()
    sim.add_broker("m")
    sim.add_pair("pa", "pb", upstream=("m",))
    sim.add_worker("w", concurrency=2, service_time=0.01, via=("pa",))  # a worker that knows pa only
    c = sim.add_client("c", via=("m",))
    sim.run_for(3)
    sim.cut_pair("pa")  # a cut link: pa is alive and registered at the master
    sim.run_for(3)
    assert sim.active("pa", "pb") == ["pa"], "the witness must not vote while the master hears pa"
    sim.heal_pair("pa")
    sim.run_for(2)
    sim.kill_broker("pa")
    sim.run_for(4)
    pb = sim.brokers["pb"].core
    assert sim.active("pa", "pb") == ["pb"] and pb.upstream.registered  # it took over, and serves the tier
    sim.add_worker("w2", concurrency=2, service_time=0.01, via=("pb",))
    sim.run_for(1)
    for i in range(10):
        c.submit("echo", i, timeout=10)
    sim.run_for(3)
    assert_each_ended_once(c, 10, p.ST_OK)  # the master's requests flow down to the new active proxy


def test_peers_that_drifted_to_the_master_go_back_home_when_their_proxy_is_back():
    """Both proxies of the region die: the worker and the client end at the master (their last
    choice). pa comes back: their looks home find it (their probes are also the votes that let it
    take over), and they return, the client without losing or repeating a request."""
    sim, w, c = region(seed=3)
    sim.kill_broker("pa")
    sim.kill_broker("pb")
    sim.run_for(6)
    assert w.endpoint == c.endpoint == Simulation.endpoint("m")
    sim.restart_broker("pa")
    n = 0
    for _ in range(300):  # a steady load through the move: 10 requests every 0.1 s for 30 s
        for _ in range(10):
            c.submit("echo", n, timeout=10)
            n += 1
        sim.run_for(0.1)
    sim.run_for(5)
    assert sim.active("pa", "pb") == ["pa"]
    assert w.endpoint == c.endpoint == Simulation.endpoint("pa")
    assert w.core.counters["homecomings"] == 1 and c.core.counters["homecomings"] == 1
    assert_each_ended_once(c, n, p.ST_OK)
    assert all(v == 1 for v in Counter(w.executed).values()), "a request ran twice"
    served_in_region(sim, c)


def test_a_client_holds_what_its_broker_would_refuse_and_sends_it_as_replies_free_room():
    """20,000 submits at once from one client, against the default per-client quota of 2,500:
    the client keeps the excess and none gets Busy; the deadline counts from submit."""
    sim = Simulation()
    sim.add_worker("w", concurrency=50, service_time=0.001)
    c = sim.add_client()
    sim.run_for(0.1)
    for i in range(20_000):
        c.submit("echo", i, timeout=60)
    assert c.core.sent == 2_500 and len(c.core.waiting) == 17_500
    sim.run_for(30)
    assert_each_ended_once(c, 20_000, p.ST_OK)
    assert sim.broker.counters.over_quota == 0 and sim.broker.counters.busy == 0
    slow = Simulation(BrokerSettings(max_client_inflight=100))
    slow.add_worker("w", concurrency=2, service_time=0.05)  # 40 requests a second
    c2 = slow.add_client()
    slow.run_for(0.1)
    assert c2.core.quota == 100  # learned from WELCOME
    for i in range(300):
        c2.submit("echo", i, timeout=1.0)  # 100 go, 200 wait here; most cannot be served in time
    slow.run_for(3)
    assert_each_ended_once(c2, 300)
    ok = [v for v in c2.completed.values() if v[0].status == p.ST_OK]
    waited = [v for v in c2.completed.values() if "waiting here" in v[0].message]
    assert 20 <= len(ok) <= 60 and len(waited) >= 150  # their deadlines counted from submit
    assert slow.broker.counters.busy == 0


def test_a_client_over_its_quota_fails_over_with_its_pair_and_every_request_ends_once():
    """A burst of 3,000 against a quota of 100, and the active broker dies mid-burst (early, with
    its first hundred out, and later): the client resends what the dead one held, learns the other
    broker's quota from its WELCOME, and sends the rest as room frees. Nothing gets Busy, nothing
    is over the quota, every request ends once and right."""
    for seed, kill_after in ((0, 0.05), (1, 0.3), (2, 0.7)):
        sim = Simulation(seed=seed)
        sim.add_pair("a", "b", settings=BrokerSettings(max_client_inflight=100))
        sim.add_worker("w", concurrency=20, service_time=0.005, via=("a", "b"))
        c = sim.add_client("c", via=("a", "b"))
        sim.run_for(2)
        assert c.core.quota == 100
        for i in range(3000):
            c.submit("echo", i, timeout=60)
        assert c.core.sent == 100  # the rest waits in the client
        sim.run_for(kill_after)
        a = sim.brokers["a"].core
        assert 0 < a.counters.replies_ok < 3000
        sim.kill_broker("a")
        counts = []  # b's count of the client's open requests: its copies count once sent again
        for _ in range(100):
            sim.run_for(0.05)
            counts.append(_open_of(sim.brokers["b"].core.inner.d, c.ident))
        assert max(counts) == 100 and counts[-1] == 0
        sim.run_for(35)
        assert_each_ended_once(c, 3000, p.ST_OK)
        b = sim.brokers["b"].core
        assert b.counters.over_quota == 0 and b.counters.busy == 0 and a.counters.over_quota == 0
        assert c.core.counters["failovers"] >= 1 and c.endpoint == Simulation.endpoint("b")


def test_a_client_failing_over_to_a_broker_with_a_smaller_quota_sends_again_within_it():
    """500 requests open at a broker taking 1,000 per client; it dies and the client fails over to
    one taking 100. Sent again all at once with the HELLO, 380 of the 500 ended Busy ("this
    client has 100 requests open, its limit is 100"): the client now sends them again once the
    WELCOME has said the quota, and the rest as room frees. Every one ends once and right."""
    sim = Simulation(settings=BrokerSettings(max_client_inflight=1000))
    sim.add_broker("B", settings=BrokerSettings(max_client_inflight=100))
    sim.add_worker("w", concurrency=4, service_time=0.05, via=("broker", "B"))
    c = sim.add_client("c", via=("broker", "B"))
    sim.run_for(0.5)
    for i in range(500):
        c.submit("echo", i, timeout=120)
    sim.run_for(0.3)
    assert c.core.sent > 400  # open at the broker that dies
    sim.kill_broker("broker")
    sim.run_for(60)
    assert_each_ended_once(c, 500, p.ST_OK)
    b = sim.brokers["B"].core
    assert b.counters.over_quota == 0 and b.counters.busy == 0 and c.core.quota == 100


def test_copies_a_new_active_broker_restored_count_in_no_quota_until_their_client_sends_them_again():
    """The pair link is cut while a answers a client's 8 requests (its quota): b's copies of them
    never learn they ended. a dies; b takes over holding 8 requests the client no longer has.
    Counted in its quota, every new request of the client got Busy ("this client has 8 requests
    open, its limit is 8") until those copies ran again; a property test of the lifecycle across a
    proxy pair found it. A copy counts once its client sends it again: a client's requests open at
    a when it died still count at b, once each (the quota tests above)."""
    sim = Simulation()
    sim.add_pair("a", "b", settings=BrokerSettings(max_client_inflight=8))
    w = sim.add_worker("w", concurrency=8, service_time=0.5, via=("a", "b"))
    c = sim.add_client("c", via=("a", "b"))
    sim.run_for(2)
    first = [c.submit("echo", i, timeout=60) for i in range(8)]
    sim.run_for(0.1)
    assert len(sim.brokers["b"].core.pair.table) == 8  # b holds a copy of each
    sim.cut_pair("a")
    sim.run_for(1)
    assert all([x.status for x in c.completed[r]] == [p.ST_OK] for r in first)  # a answered them
    sim.kill_broker("a")
    later = [c.submit("echo", i, timeout=60) for i in range(8, 16)]  # they go once b says its quota
    sim.run_for(4)
    assert sim.active("a", "b") == ["b"] and c.endpoint == Simulation.endpoint("b")
    assert [c.completed[r][0].status for r in later] == [p.ST_OK] * 8
    b = sim.brokers["b"].core
    assert b.counters.busy == 0 and b.counters.over_quota == 0
    d = b.inner.d
    assert len(w.executed) == 24 and b.open_requests == 0 and d.callers == {} and d.unclaimed == set()


def test_a_caller_that_joined_a_proxys_request_at_the_master_waits_for_its_run_when_its_worker_dies():
    """Proxy x forwards a keyed request up (its own worker is busy); client d, at the master,
    joins it. The master's worker dies and nothing there is free: the master gave the request back
    to x (which serves it itself) with BUSY, and the BUSY went to d too ("m has no spare capacity
    for it now"), a client that had asked nothing of x. A request with joiners now waits at the
    master: one run, on the next worker, answers both."""
    sim = Simulation(settings=BrokerSettings(join_same_key=True))
    sim.add_broker("m")
    sim.add_broker("x", upstream=("m",))
    wx = sim.add_worker("wx", service_time=1.0, via=("x",))
    sim.add_worker("wm", service_time=1.0, via=("m",))
    c = sim.add_client("c", via=("x",))
    d = sim.add_client("d", via=("m",))
    sim.run_for(2)
    c.submit("echo", "filler", 30)  # x's one slot is taken
    sim.run_for(0.1)
    a = c.submit("echo", {"id": 1}, 30, key="k")  # so it goes up and runs at the master's wm
    sim.run_for(0.1)
    j = d.submit("echo", {"id": 1}, 30, key="k")
    sim.run_for(0.1)
    m = sim.brokers["m"].core
    assert m.counters.joined == 1 and m.counters.forwarded_up == 0
    sim.kill("wm")
    sim.run_for(6)  # declared dead, requeued; nothing at m is free
    assert m.counters.requeues == 1 and j not in d.completed and a not in c.completed
    w2 = sim.add_worker("wm2", service_time=0.1, via=("m",))
    sim.run_for(5)
    assert [x.status for x in d.completed[j]] == [p.ST_OK] == [x.status for x in c.completed[a]]
    assert p.unpack_value(d.completed[j][0].payload) == {"id": 1} == p.unpack_value(c.completed[a][0].payload)
    assert len(w2.executed) == 1 and len(wx.executed) == 1  # one run for both; x ran only the filler
    assert m.counters.busy == 0 and m.counters.returned == 0 and m.open_requests == 0


@pytest.mark.parametrize("window", [1, 4])
def test_a_stream_whose_first_parts_died_with_the_active_broker_runs_afresh_at_the_other(window):
    """The active broker stops (SIGSTOP) as a stream starts, its worker's first parts wait in its
    socket, and it dies: they are lost. The client, holding none, sends the stream again to the
    broker that took over, which had adopted the run: that run waited for acknowledgements of the
    lost parts, and the stream hung to its deadline (TIMEOUT after 30 s, 0 parts; seen in the
    chaos soak through a proxy whose master pair failed over). A stream sent again now runs
    afresh, and the old run is stopped."""
    sim = Simulation(seed=1)
    sim.add_pair("a", "b")
    w = sim.add_worker("w", concurrency=2, service_time=0.01, via=("a", "b"))
    c = sim.add_client("c", via=("a", "b"))
    sim.run_for(2)
    rid = c.submit("echo", {"stream": 20}, 30, window=window)
    sim.run_for(3 * sim.latency)  # the task is at w
    sim.freeze("a", 10)
    sim.run_for(0.2)  # w sends its window of parts to a, and waits
    assert w.parts_made == window and c.parts == {}
    sim.kill_broker("a")
    sim.run_for(5)
    assert sim.active("a", "b") == ["b"] and [x.status for x in c.completed[rid]] == [p.ST_OK]
    assert c.parts[rid] == list(range(20)) and c.completed_at[rid] < 5
    b = sim.brokers["b"].core
    assert b.counters.restarted == 1 and b.open_requests == 0 and w.runs == {} and w.core.inflight == {}


def test_a_restored_request_that_ended_before_its_worker_came_back_is_stopped_there():
    """b takes over a request its worker runs; the worker is stopped (SIGSTOP) and its client
    cancels the request before it comes back. The copy is forgotten; the worker's heartbeats to b
    list the run, and b tells it to stop (it ran on for nobody)."""
    sim = Simulation(seed=2)
    sim.add_pair("a", "b")
    w = sim.add_worker("w", concurrency=2, service_time=10.0, via=("a", "b"))
    c = sim.add_client("c", via=("a", "b"))
    sim.run_for(2)
    rid = c.submit("echo", {"id": 1}, 60)
    sim.run_for(0.1)
    assert len(w.runs) == 1
    sim.freeze("w", 2.5)
    sim.kill_broker("a")
    sim.run_for(2.0)  # b took over on the client's vote; the client sent its request again there
    assert sim.active("a", "b") == ["b"] and c.endpoint == Simulation.endpoint("b")
    c.cancel(rid)
    sim.run_for(4.0)  # w comes back, registers with b, lists the run and is told to stop it
    assert w.aborted == w.executed and w.runs == {} and rid not in c.completed
    assert sim.brokers["b"].core.open_requests == 0


# --- the request lifecycle across a proxy pair and its master, under faults ----------------------

FLAKY = Retry(on=(OSError,), attempts=3, backoff=0.1, max_backoff=0.5, jitter=False)


@pytest.mark.timeout(900)  # the thorough profile's 1,000 examples take about 5 minutes
@given(data=st.data())
def test_property_the_lifecycle_across_a_proxy_pair_and_its_master_under_faults(data):
    """Cancels, retries, joined keys, streams and progress reports through a proxy pair that
    funnels to a master (a pair too, or not; another region's proxy beside it, or not), each
    broker with its own message limit, while brokers die, restart, stop, are cut off or lose their
    pair link, clients stop or lose a link, and workers stop or die; peers read BATCH frames or do
    not. Every request ends once (a cancelled one at most once, and never after its cancel), with
    its own value or a status its kind allows; a stream's parts come in order with no gap and no
    repeat; a progress report reaches only its own request's callers (any caller of a joined key),
    before its end; once everything is healed nothing is left open anywhere."""
    sim = Simulation(seed=data.draw(st.integers(0, 2**32 - 1)))
    settings = BrokerSettings(
        join_same_key=data.draw(st.booleans()),
        max_client_inflight=data.draw(st.sampled_from([8, 1000])),
    )
    failback = data.draw(st.sampled_from(["manual", "auto"]))

    def limited() -> BrokerSettings:  # each broker its own --max-message-size: large, or small
        return dataclasses.replace(settings, max_message_size=data.draw(st.sampled_from([1 << 20, 3000, 2000])))

    masters: tuple[str, ...] = ("m",)
    if data.draw(st.booleans()):  # the master is a pair too
        masters = ("m", "mb")
        sim.add_pair("m", "mb", settings=limited(), failback=failback, backup_settings=limited())
    else:
        sim.add_broker("m", settings=limited())
    sim.add_pair("pa", "pb", upstream=masters, settings=limited(), failback=failback, backup_settings=limited())
    vias = [("pa", "pb"), ("pb", "pa"), ("pa", "pb", *masters), masters]
    if data.draw(st.booleans()):  # another region, behind a proxy alone: work overflows between them
        sim.add_broker("r", upstream=masters, settings=limited())
        vias.insert(3, ("r",))

    def add_worker(name: str) -> None:
        sim.add_worker(
            name,
            concurrency=data.draw(st.integers(1, 3)),
            service_time=data.draw(st.sampled_from([0.005, 0.05, 0.3])),
            via=data.draw(st.sampled_from(vias)),
            batch=data.draw(st.booleans()),  # a peer of the first protocol revision reads no BATCH
        ).retry = FLAKY

    for i in range(data.draw(st.integers(1, 3))):
        add_worker(f"w{i}")
    clients = [
        sim.add_client(n, via=data.draw(st.sampled_from(vias[:-1])), batch=data.draw(st.booleans())) for n in ("c", "d")
    ]
    sim.run_for(2)
    kinds: dict[tuple[str, int], tuple[str, Any]] = {}  # (client, rid) -> (kind, value)
    cancelled: dict[tuple[str, int], int] = {}  # -> completions it had when cancelled
    reported: dict[tuple[str, int], int] = {}  # -> progress reports it had when cancelled
    frozen_until = 0.0
    for step in range(data.draw(st.integers(1, 5))):
        for _ in range(data.draw(st.integers(1, 12))):
            kind = data.draw(st.sampled_from(["echo", "fail", "flaky", "stream", "joined", "progress", "big"]))
            timeout = data.draw(st.sampled_from([1.0, 10.0, 60.0]))
            c = data.draw(st.sampled_from(clients))
            n = len(kinds)
            if kind == "joined":  # both clients, one key, one value
                value: Any = {"id": n, "progress": data.draw(st.integers(0, 3))}  # reports reach both
                for who in clients:
                    rid = who.submit("echo", value, timeout, key=f"key-{step}-{n}")
                    kinds[(who.core.name, rid)] = (kind, value)
                continue
            value = {
                "echo": {"id": n},
                "fail": f"fail-{n}",
                "flaky": {"flaky": data.draw(st.integers(1, 2)), "id": n},
                "stream": {"stream": data.draw(st.integers(1, 30)), "pad": data.draw(st.sampled_from([0, 1500, 2500]))},
                "big": {"id": n, "pad": "x" * data.draw(st.sampled_from([1500, 2500, 4000]))},
                "progress": {"id": n, "progress": data.draw(st.integers(1, 8))},
            }[kind]
            rid = c.submit("echo", value, timeout, window=4 if kind == "stream" else 0)
            kinds[(c.core.name, rid)] = (kind, value)
        sim.run_for(data.draw(st.floats(0.0, 1.0)))
        if kinds and data.draw(st.booleans()):
            name, rid = data.draw(st.sampled_from(sorted(kinds)))
            c = sim.clients[name]
            cancelled.setdefault((name, rid), len(c.completed.get(rid, [])))
            reported.setdefault((name, rid), len(c.progress.get(rid, [])))
            c.cancel(rid)
        actions = ["kill", "restart", "isolate", "cut_pair", "freeze", "kill_worker", "cut_client", "none"]
        action = data.draw(st.sampled_from(actions))
        target = data.draw(st.sampled_from(sorted(sim.brokers.keys() - {"broker"})))
        if action == "kill":
            sim.kill_broker(target)
        elif action == "restart" and not sim.brokers[target].alive:
            sim.restart_broker(target)
        elif action == "isolate":
            sim.partition(target)
            sim.at(sim.clock.now() + data.draw(st.floats(0.5, 5.0)), functools.partial(sim.heal, target))
        elif action == "cut_pair" and sim.brokers[target].pair_peer is not None:
            sim.cut_pair(target)
            sim.at(sim.clock.now() + data.draw(st.floats(0.5, 5.0)), functools.partial(sim.heal_pair, target))
        elif action == "freeze" and sim.clock.now() >= frozen_until:  # SIGSTOP a worker, client or broker
            seconds = data.draw(st.floats(0.5, 4.0))
            alive = sorted(n for n, w in sim.workers.items() if w.alive)
            brokers = sorted(n for n, b in sim.brokers.items() if b.alive and n != "broker")
            sim.freeze(data.draw(st.sampled_from([*alive, "c", "d", *brokers])), seconds)
            frozen_until = sim.clock.now() + seconds
        elif action == "kill_worker":  # SIGKILL, and one like it starts in its place
            sim.kill(data.draw(st.sampled_from(sorted(n for n, w in sim.workers.items() if w.alive))))
            add_worker(f"w{len(sim.workers)}")
        elif action == "cut_client":  # one client's connection to one broker only
            name = data.draw(st.sampled_from(["c", "d"]))
            sim.cut_link(name, target)
            later = sim.clock.now() + data.draw(st.floats(0.5, 5.0))
            sim.at(later, functools.partial(sim.heal_link, name, target))
        sim.run_for(data.draw(st.floats(0.0, 1.5)))
    for name in sim.brokers.keys() - {"broker"}:  # heal everything and bring the dead back
        sim.heal(name)
        sim.heal_pair(name)
        for c in clients:
            sim.heal_link(c.core.name, name)
        if not sim.brokers[name].alive:
            sim.restart_broker(name)
    sim.run_for(90)
    for (name, rid), (kind, value) in kinds.items():
        c = sim.clients[name]
        ends = c.completed.get(rid, [])
        reports = c.progress.get(rid, [])  # its own only, within its count, none after a cancel
        ident, most = (value.get("id"), value.get("progress", 0)) if isinstance(value, dict) else (None, 0)
        assert all(r[0] == ident and 1 <= r[1] <= most for r in reports), (name, rid, kind, value, reports)
        assert reported.get((name, rid), len(reports)) == len(reports), (name, rid, kind, reports)
        if (name, rid) in cancelled:
            assert len(ends) == cancelled[(name, rid)] <= 1, (name, rid, kind, ends)
            continue
        assert len(ends) == 1, (name, rid, kind, value, ends)
        (end,) = ends
        if end.status == p.ST_OK:
            assert kind != "fail", (name, rid, end)
            got = p.unpack_value(end.payload)
            assert got == (None if kind == "stream" else value), (name, rid, kind, value, got)
        elif end.status == p.ST_FAILED:  # the handler's error: flaky, retries ran out or would pass the deadline
            error_type, error = p.unpack_value(end.payload)[:2]
            if error_type == p.RESULT_TOO_LARGE:  # over the limit of a broker on the way back
                assert kind in ("big", "stream"), (name, rid, kind, end)
            else:
                assert error == value or (kind == "flaky" and error.startswith("flaky run")), (name, rid, kind, end)
        elif end.status == p.ST_INVALID:  # over the limit of a broker on the way there
            assert kind == "big" and "limit of" in end.message, (name, rid, kind, end)
        elif end.status == p.ST_INTERRUPTED:
            assert kind == "stream", (name, rid, kind, value, end)
        else:
            assert end.status in (p.ST_TIMEOUT, p.ST_LOST, NO_BROKER), (name, rid, kind, value, end)
        if kind == "stream":
            parts = [x[0] for x in c.parts.get(rid, [])]  # [i, pad bytes]
            assert parts == list(range(len(parts))), (name, rid, parts)
            assert end.status != p.ST_OK or len(parts) == value["stream"], (name, rid, parts, end)
    for b in sim.brokers.values():
        assert b.core.open_requests == 0, (b.name, b.core.status(sim.clock.now())["counters"])
        d = getattr(b.core, "inner", b.core).d
        assert d.callers == {} and d.unclaimed == set(), (b.name, d.callers, d.unclaimed)
    for w in sim.workers.values():
        assert not w.alive or (w.runs == {} and w.core.inflight == {}), (w.core.name, w.runs, w.core.inflight)
