"""Proxy tiers in simulation: local first, capacity-aware funnelling, loops, failure isolation.

Topologies are built from broker names; ``broker`` is the master (the default broker). Every test
runs on the fake clock: seconds of heartbeats and failures take milliseconds, with no sleeps.
"""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.client import NO_BROKER
from zmqdist.core.records import HOP_MARGIN_MS
from zmqdist.policy import Retry
from zmqdist.testing import Simulation, assert_each_ended_once, tree_members


def statuses(client):
    return Counter(v[0].status for v in client.completed.values())


def two_regions(**kw):
    """master <- A, master <- B; workers 'wa' under A and 'wb' under B (2 slots each)."""
    sim = Simulation(**kw)
    sim.add_broker("A", upstream=("broker",))
    sim.add_broker("B", upstream=("broker",))
    sim.add_worker("wa", concurrency=2, service_time=0.01, via=("A", "B"))
    sim.add_worker("wb", concurrency=2, service_time=0.01, via=("B", "A"))
    return sim


def test_local_first_while_local_capacity_is_free():
    sim = two_regions()
    ca = sim.add_client("ca", via=("A",))
    sim.run_for(0.1)
    for i in range(40):  # one at a time: the local worker is always free
        ca.submit("echo", i, timeout=5)
        sim.run_for(0.02)
    assert_each_ended_once(ca, 40)
    assert statuses(ca) == {p.ST_OK: 40}
    assert len(sim.workers["wa"].executed) == 40 and not sim.workers["wb"].executed
    assert sim.brokers["A"].core.counters.forwarded_up == 0


def test_overflow_funnels_into_the_other_region_in_proportion_to_capacity():
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    sim.add_broker("B", upstream=("broker",))
    sim.add_worker("wa", concurrency=2, service_time=0.01, via=("A",))
    sim.add_worker("wb", concurrency=6, service_time=0.01, via=("B",))
    ca = sim.add_client("ca", via=("A",))
    sim.run_for(0.1)
    for i in range(800):
        ca.submit("echo", i, timeout=30)
    sim.run_for(10)
    assert_each_ended_once(ca, 800)
    assert statuses(ca) == {p.ST_OK: 800}
    for rid, (done,) in ca.completed.items():
        assert p.unpack_value(done.payload) == rid - 1  # replies travel back along the same path
    a, b = len(sim.workers["wa"].executed), len(sim.workers["wb"].executed)
    assert a + b == 800
    assert b / a == pytest.approx(3, rel=0.2)  # slots 2 : 6, same speed
    # Work flowed down into region B through the master, never back into A.
    assert sim.brokers["B"].core.counters.tasks_from_up == b
    assert sim.brokers["A"].core.counters.tasks_from_up == 0


def test_no_local_worker_goes_upstream_and_queues_there():
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    sim.add_worker("wm", services=("rare",), concurrency=1, service_time=0.05)
    ca = sim.add_client("ca", via=("A",))
    sim.run_for(0.1)
    for i in range(20):
        ca.submit("rare", i, timeout=30)
    sim.run_for(0.01)
    # Nothing below A serves 'rare': all of it went up at once and waits in the master's queue.
    assert sim.brokers["A"].core.counters.forwarded_up == 20
    sim.run_for(5)
    assert statuses(ca) == {p.ST_OK: 20}


def test_three_tiers_site_to_region_to_master_and_back_down():
    sim = Simulation()
    for region in ("R1", "R2"):
        sim.add_broker(region, upstream=("broker",))
    sim.add_broker("S1", upstream=("R1",))
    sim.add_broker("S2", upstream=("R2",))
    w = sim.add_worker("w2", concurrency=2, service_time=0.01, via=("S2",))
    c = sim.add_client("c1", via=("S1",))
    sim.run_for(0.2)
    sim.sent = []  # every message a broker sends from now on
    for i in range(50):
        c.submit("echo", i, timeout=10)
    sim.run_for(3)
    assert statuses(c) == {p.ST_OK: 50}
    assert len(w.executed) == 50
    # S1 -> R1 -> master -> R2 -> S2 -> worker: five hops, each spends at least HOP_MARGIN_MS.
    budgets = [m.budget_ms for _, name, to, m in sim.sent if name == "S2" and to == w.ident and type(m) is p.Task]
    assert len(budgets) == 50
    assert max(budgets) <= 10_000 - 5 * HOP_MARGIN_MS
    # The path is recorded: the task S2 got names every broker the request passed.
    assert sim.brokers["S2"].core.counters.tasks_from_up == 50


def test_a_request_is_never_sent_back_to_a_broker_it_passed():
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    sim.add_worker("wa", concurrency=1, service_time=0.2, via=("A",))
    sim.add_worker("wm", concurrency=1, service_time=0.2)
    ca = sim.add_client("ca", via=("A",))
    sim.run_for(0.1)
    for i in range(10):
        ca.submit("echo", i, timeout=30)
    sim.run_for(10)
    assert statuses(ca) == {p.ST_OK: 10}
    # A forwarded overflow up; the master served it with its own worker and never handed it
    # back down to A, even when A's worker was free again.
    assert sim.brokers["A"].core.counters.forwarded_up > 0
    assert sim.brokers["A"].core.counters.tasks_from_up == 0


def test_a_looping_request_is_refused_with_a_clear_error():
    sim = Simulation()
    sim.run_for(0.01)
    core = sim.broker
    out = core.receive(b"peer", p.Request(1, "echo", 1000, ("x", "broker"), b""), sim.clock.now())
    assert out[0][1].status == p.ST_INVALID and "looped" in out[0][1].message
    assert core.counters.loops == 1


def test_killed_proxy_costs_only_its_own_clients_who_fail_over():
    sim = two_regions()
    ca = sim.add_client("ca", via=("A", "B"))  # failover list
    cb = sim.add_client("cb", via=("B",))
    sim.run_for(0.1)
    for i in range(300):
        ca.submit("echo", i, timeout=30)
        cb.submit("echo", i, timeout=30)
    sim.run_for(0.3)
    sim.kill("A")
    sim.run_for(20)
    # B's clients saw nothing; A's completed everything through B, same ids, no duplicates.
    assert_each_ended_once(cb, 300)
    assert statuses(cb) == {p.ST_OK: 300}
    assert_each_ended_once(ca, 300)
    assert statuses(ca) == {p.ST_OK: 300}
    assert ca.core.counters["failovers"] >= 1 and ca.core.counters["duplicates"] == 0
    # A's worker moved on to B; the master dropped A and kept serving.
    assert sim.workers["wa"].core.link.endpoint == Simulation.endpoint("B")
    assert sim.broker.counters.workers_expired == 1  # A, detected by heartbeats


def test_master_outage_proxies_keep_serving_local_and_upstream_work_waits():
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    sim.add_worker("wa", services=("local",), concurrency=2, service_time=0.01, via=("A",))
    sim.add_worker("wm", services=("central",), concurrency=2, service_time=0.01)
    ca = sim.add_client("ca", via=("A",))
    sim.run_for(0.1)
    sim.kill_broker()
    sim.run_for(0.2)
    for i in range(20):
        ca.submit("local", i, timeout=30)
        ca.submit("central", i, timeout=30)
    sim.run_for(3)
    done = {rid: v[0].status for rid, v in ca.completed.items()}
    assert sorted(done.values()) == [p.ST_OK] * 20  # the local service went on during the outage
    a = sim.brokers["A"].core
    assert a.counters.upstream_losses >= 1 and not a.upstream.registered
    sim.restart_broker()  # the master comes back; A registers again by itself
    sim.run_for(10)
    assert_each_ended_once(ca, 40)
    assert statuses(ca) == {p.ST_OK: 40}
    assert a.upstream.registered


def test_silent_downstream_broker_is_dropped_and_its_work_requeued():
    sim = Simulation(BrokerSettings(max_attempts=3))
    sim.add_broker("A", upstream=("broker",))
    sim.add_broker("B", upstream=("broker",))
    sim.add_worker("wa", concurrency=4, service_time=0.5, via=("A",))
    sim.add_worker("wb", concurrency=4, service_time=0.01, via=("B",))
    c = sim.add_client("cm")  # a client of the master: its work flows down into A and B
    sim.run_for(0.1)
    for i in range(40):
        c.submit("echo", i, timeout=30)
    sim.run_for(0.05)
    held_by_a = sim.brokers["A"].core.counters.tasks_from_up
    assert held_by_a > 0
    sim.partition("A")
    sim.run_for(10)
    assert_each_ended_once(c, 40)
    assert statuses(c) == {p.ST_OK: 40}
    m = sim.broker.counters
    assert m.workers_expired >= 1 and m.requeues >= held_by_a - 4  # a few may have finished


def test_re_registration_after_a_master_restart_is_jittered():
    sim = Simulation(BrokerSettings(backoff_s=0.5, backoff_max_s=4.0), seed=7)
    names = [f"P{i}" for i in range(20)]
    for n in names:
        sim.add_broker(n, upstream=("broker",))
    sim.run_for(0.5)
    assert sim.broker.counters.brokers_registered == 20
    sim.kill_broker()
    sim.run_for(0.1)
    sim.restart_broker()
    times = []
    for _ in range(300):
        before = sim.broker.counters.brokers_registered
        sim.run_for(0.01)
        times += [sim.clock.now()] * (sim.broker.counters.brokers_registered - before)
    assert len(times) == 20
    spread = max(times) - min(times)
    assert spread > 0.25, f"all proxies came back within {spread:.3f}s: not jittered"
    assert len({round(t, 2) for t in times}) >= 10, "registrations bunched together"


@given(
    data=st.data(),
    n_requests=st.integers(1, 120),
    drop_rate=st.sampled_from([0.0, 0.0, 0.01]),
)
def test_property_tiers_every_request_ends_exactly_once(data, n_requests, drop_rate):
    """Three tiers with failover lists; random kills, partitions and restarts of proxies, the master
    and workers. Every request of every client ends exactly once with a correct value or a clear
    error; the simulation checks on every send that no task goes to a member declared dead and no
    worker is over capacity."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    sim = Simulation(seed=seed)
    sim.add_broker("R1", upstream=("broker",))
    sim.add_broker("R2", upstream=("broker",))
    sim.add_broker("S1", upstream=("R1", "R2"))
    proxies = ["R1", "R2", "S1"]
    places = [("S1", "R1"), ("R1", "R2"), ("R2", "R1"), ("broker",)]
    for i in range(data.draw(st.integers(1, 4))):
        sim.add_worker(
            f"w{i}",
            concurrency=data.draw(st.integers(1, 3)),
            service_time=data.draw(st.sampled_from([0.001, 0.01, 0.1])),
            via=data.draw(st.sampled_from(places)),
        )
    clients = [sim.add_client(f"c{i}", via=places[i]) for i in range(3)]
    sim.run_for(0.2)
    sim.drop_rate = drop_rate
    sent = Counter()
    for i in range(n_requests):
        c = clients[i % 3]
        c.submit("echo", i, timeout=data.draw(st.sampled_from([0.5, 5.0, 30.0])))
        sent[c.ident] += 1
    for _ in range(data.draw(st.integers(0, 4))):
        sim.run_for(data.draw(st.floats(0.0, 1.0)))
        action = data.draw(st.sampled_from(["kill", "partition", "heal", "restart", "kill_worker"]))
        target = data.draw(st.sampled_from([*proxies, "broker"]))
        if action == "kill":
            sim.kill(target)
        elif action == "partition":
            sim.partition(target)
        elif action == "heal":
            sim.heal(target)
        elif action == "restart":
            sim.kill_broker(target)
            sim.run_for(data.draw(st.floats(0.0, 2.0)))
            sim.restart_broker(target)
        else:
            sim.kill(f"w{data.draw(st.integers(0, len(sim.workers) - 1))}")
    # A healthy run needs some ten thousand steps; a message storm between brokers would not end.
    sim.run_until(sim.clock.now() + 40, max_steps=300_000)
    for idx, c in enumerate(clients):
        assert all(len(v) == 1 for v in c.completed.values()), "a request ended twice"
        assert len(c.completed) == sent[c.ident], "a request never ended"
        for rid, (done,) in c.completed.items():
            if done.status == p.ST_OK:
                assert p.unpack_value(done.payload) % 3 == idx  # its own value came back
            else:
                assert done.status in (p.ST_TIMEOUT, p.ST_LOST, NO_BROKER), done
    if drop_rate == 0.0:
        for b in sim.brokers.values():
            if b.alive:
                assert b.core.open_requests == 0, f"{b.name} kept a request no one will answer"
    for w in sim.workers.values():
        assert w.max_running <= w.core.concurrency


def test_silence_on_an_inter_broker_link_is_detected_within_the_ttl_on_both_sides():
    sim = Simulation()
    ttl = sim.settings.heartbeat.ttl_s
    sim.add_broker("A", upstream=("broker",))
    sim.add_worker("wa", concurrency=2, service_time=0.01, via=("A",))
    sim.run_for(0.5)
    a = sim.brokers["A"].core
    assert sim.broker.status(sim.clock.now())["brokers"][0]["spare"] == {"echo": 2}
    cut = sim.clock.now()
    sim.partition("A")
    step = 0.01
    master_saw = a_saw = None
    for _ in range(300):
        sim.run_for(step)
        if master_saw is None and not sim.broker.status(sim.clock.now())["brokers"]:
            master_saw = sim.clock.now() - cut  # A's capacity is gone from the master's pool
        if a_saw is None and a.counters.upstream_losses:
            a_saw = sim.clock.now() - cut
    # Heartbeats every ttl/liveness: the last one before the cut is at most one interval old.
    hb = sim.settings.heartbeat.heartbeat_s
    assert master_saw is not None and ttl - hb <= master_saw <= ttl + 2 * step
    assert a_saw is not None and ttl - hb <= a_saw <= ttl + 2 * step
    assert a.upstream.credit("echo") == 0


def test_a_site_fails_over_to_its_second_region_and_its_forwarded_work_completes():
    sim = Simulation()
    sim.add_broker("R1", upstream=("broker",))
    sim.add_broker("R2", upstream=("broker",))
    sim.add_broker("S", upstream=("R1", "R2"))
    sim.add_worker("wm", concurrency=2, service_time=0.05)  # only the master serves 'echo'
    c = sim.add_client("c", via=("S",))
    sim.run_for(0.3)
    for i in range(60):
        c.submit("echo", i, timeout=30)
    sim.run_for(0.2)
    assert sim.brokers["S"].core.counters.forwarded_up == 60
    sim.kill("R1")
    sim.run_for(10)
    assert_each_ended_once(c, 60)
    assert statuses(c) == {p.ST_OK: 60}
    s = sim.brokers["S"].core
    assert s.upstream.registered and s.upstream.link.endpoint == Simulation.endpoint("R2")
    assert s.counters.requeues > 0  # what R1 held came back and went up again through R2


def test_a_region_passes_a_sites_overflow_up_to_the_master_rather_than_back():
    sim = Simulation()
    sim.add_broker("R", upstream=("broker",))
    sim.add_broker("S", upstream=("R",))
    ws = sim.add_worker("ws", concurrency=1, service_time=0.1, via=("S",))
    wm = sim.add_worker("wm", concurrency=4, service_time=0.01)  # at the master, two tiers up
    c = sim.add_client("c", via=("S",))
    sim.run_for(0.3)
    for i in range(100):
        c.submit("echo", i, timeout=30)
    sim.run_for(10)
    assert statuses(c) == {p.ST_OK: 100}
    # 4 fast slots at the master against 1 slow slot at the site: the master serves the bulk.
    assert len(wm.executed) > 8 * len(ws.executed), (len(wm.executed), len(ws.executed))
    assert sim.brokers["R"].core.counters.forwarded_up == len(wm.executed)


def test_funnelled_work_keeps_the_remote_slots_busy():
    """Credit between brokers works like a worker's capacity: every answer frees a slot at once,
    without waiting for an advert. 16 remote slots at 0.5 ms serve 3000 requests in about 0.1 s
    plus hops; refilled one advert at a time (5 ms) it took 0.95 s, and fed only on heartbeat
    refreshes, 47 s (both were bugs)."""
    sim = Simulation(BrokerSettings(max_client_inflight=10_000))
    sim.add_broker("A", upstream=("broker",))
    sim.add_broker("B", upstream=("broker",))
    sim.add_worker("wb", services=("far",), concurrency=16, service_time=0.0005, via=("B",))
    c = sim.add_client("c", via=("A",))
    sim.run_for(0.5)
    t0 = sim.clock.now()
    for i in range(3000):
        c.submit("far", i, timeout=60)
    while len(c.completed) < 3000 and sim.clock.now() - t0 < 60:
        sim.run_for(0.01)
    assert statuses(c) == {p.ST_OK: 3000}
    assert sim.clock.now() - t0 <= 0.4, f"took {sim.clock.now() - t0:.2f} fake seconds"


def test_tree_status_gathers_every_broker_and_worker_below_and_names_the_silent():
    sim = Simulation()
    sim.add_broker("R1", upstream=("broker",))
    sim.add_broker("R2", upstream=("broker",))
    sim.add_broker("S1", upstream=("R1",))
    for name, via in (("wm", ("broker",)), ("w1", ("R1",)), ("w2", ("R2",)), ("ws", ("S1", "R1"))):
        sim.add_worker(name, via=via)
    c = sim.add_client("c")
    sim.run_for(0.5)

    def tree():
        rid = c.submit("zmqdist.tree", None)
        sim.run_for(2.5)
        (done,) = c.completed[rid]
        assert done.status == p.ST_OK
        return p.unpack_value(done.payload)

    t = tree()
    assert tree_members(t) == ({"broker", "R1", "R2", "S1"}, {"wm", "w1", "w2", "ws"})
    assert t["unreachable"] == [] and sorted(s["broker"] for s in t["below"]) == ["R1", "R2"]
    r1 = next(s for s in t["below"] if s["broker"] == "R1")
    assert [s["broker"] for s in r1["below"]] == ["S1"]
    sim.partition("S1")  # silent, not yet declared dead: R1 answers without it, naming it
    t = tree()
    r1 = next(s for s in t["below"] if s["broker"] == "R1")
    assert r1["unreachable"] == ["S1"] and r1["below"] == []
    sim.kill("w2")
    sim.run_for(3)  # past every ttl: S1 is dropped by R1, ws fails over to R1, w2 expires
    assert tree_members(tree()) == ({"broker", "R1", "R2"}, {"wm", "w1", "ws"})


def test_a_proxys_request_that_ran_at_the_master_keeps_its_run_count_there():
    """A request the master ran waits there for a slot rather than going back to the proxy it came
    from: its runs are counted at the master, and sent up again it would start that count afresh.
    (Old code gave it back when its retry came due with every master slot taken: the proxy sent it
    up again and it ran four times under a policy of three.)"""
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    wa = sim.add_worker("wa", concurrency=1, service_time=0.5, via=("A",))  # the proxy's own: slow
    wm = sim.add_worker("wm", concurrency=4, service_time=0.05)
    policy = Retry(on=(OSError,), attempts=3, backoff=0.05, jitter=False)
    wa.retry = wm.retry = policy
    c = sim.add_client("c", via=("A",))
    sim.run_for(1.0)
    rids = [c.submit("echo", {"flaky": 99}, timeout=20, retry=policy) for _ in range(6)]
    sim.run_for(10)
    assert {rid: [x.status for x in c.completed[rid]] for rid in rids} == {rid: [p.ST_FAILED] for rid in rids}
    runs = Counter(wa.executed + wm.executed)
    assert sorted(runs.values()) == [3] * 6, runs  # every request ran as often as its policy says
    assert sim.brokers["broker"].core.counters.returned == 0


def test_a_request_whose_master_workers_all_died_goes_back_to_the_proxy_that_serves_it():
    """The exception: once no worker at the master serves it, a request that ran there goes back
    to the proxy it came from (which serves its service), not to wait at the master for nobody."""
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    wa = sim.add_worker("wa", concurrency=1, service_time=1.0, via=("A",))
    wm = sim.add_worker("wm", concurrency=1, service_time=1.0)
    c = sim.add_client("c", via=("A",))
    sim.run_for(0.5)
    for i in range(3):  # the proxy learns how long its worker takes
        r = c.submit("echo", i, timeout=30)
        sim.run_for(1.1)
        assert [x.status for x in c.completed[r]] == [p.ST_OK]
    rids = [c.submit("echo", i, timeout=30) for i in range(3)]  # the third waits longest here: up
    sim.run_for(0.3)
    assert len(wm.executed) == 1
    sim.kill("wm")
    sim.run_for(6)
    assert [[x.status for x in c.completed[r]] for r in rids] == [[p.ST_OK]] * 3 and len(wa.executed) == 6
    assert sim.brokers["broker"].core.counters.returned == 1


def test_a_request_its_retry_policy_runs_again_at_a_proxy_is_not_sent_up_while_workers_there_serve_it():
    """The same count at a proxy: a request whose run failed with what its policy retries stays
    with the proxy's workers. (Old code: its retry came due with the proxy's worker busy and the
    master worth the trip, went up, and the master ran it three more times: four runs.)"""
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    wa = sim.add_worker("wa", concurrency=1, service_time=0.5, via=("A",))
    wm = sim.add_worker("wm", concurrency=8, service_time=0.05)
    policy = Retry(on=(OSError,), attempts=3, backoff=0.05, jitter=False)
    wa.retry = wm.retry = policy
    c = sim.add_client("c", via=("A",))
    sim.run_for(1.0)
    for i in range(3):  # the proxy learns how long its worker takes
        c.submit("echo", i, timeout=30)
        sim.run_for(0.6)
    for i in range(4):  # some go up: the time away is measured (the master's workers are faster)
        c.submit("echo", i, timeout=30)
    sim.run_for(2.5)
    assert sim.brokers["A"].core.counters.forwarded_up > 0
    flaky = c.submit("echo", {"flaky": 99}, timeout=20, retry=policy)
    sim.run_for(0.52)  # its first run failed at the proxy's worker; its retry is due in 50 ms
    plain = c.submit("echo", "p", timeout=20)  # takes the proxy's free worker meanwhile
    sim.run_for(10)
    assert [x.status for x in c.completed[flaky]] == [p.ST_FAILED]
    assert [x.status for x in c.completed[plain]] == [p.ST_OK]
    key = f"{c.ident.hex()}:{flaky}"  # the same at every broker and worker (it ran here first)
    assert (wa.executed + wm.executed).count(key) == 3


def test_a_proxy_paused_with_its_master_does_not_take_the_pause_for_its_upstreams_silence():
    """A stalled host stops a proxy and the master on it at once, past the ttl. The proxy judged
    its upstream's silence across its own pause: on resuming it gave the master up, voided what it
    had handed down and sent its requests up again (they ran twice). Silence counts from its
    resume, as its members' does."""
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    sim.add_worker("wm", concurrency=4, service_time=0.5, via=("broker",))
    ca = sim.add_client("ca", via=("A",))
    sim.run_for(0.5)
    for i in range(8):
        ca.submit("echo", i, timeout=30)
    sim.run_for(0.2)  # sent up, running at the master's worker
    for name in ("A", "broker", "wm"):
        sim.freeze(name, 3.0)
    sim.run_for(6)
    assert_each_ended_once(ca, 8)
    assert statuses(ca) == {p.ST_OK: 8}
    assert sim.brokers["A"].core.counters.upstream_losses == 0
    assert len(sim.workers["wm"].executed) == 8
