"""Where capabilities meet: peers of a backup pair that is also a proxy tier, with failover lists
that go on to the master. Each test here reproduces a defect a chaos soak found (issue 16).

Topology: a master ``m``; a proxy pair ``pa`` (primary) / ``pb`` (backup) below it; a worker
``w`` and a client ``c`` of the region that list ``[pa, pb, m]``.
"""

from collections import Counter

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.testing import Simulation, assert_each_ended_once

REGION = ("pa", "pb", "m")


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
        sim.run_for(40)
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
