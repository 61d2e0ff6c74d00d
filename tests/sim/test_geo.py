"""Latency-aware overflow in simulation: a region 20 ms (one way) from its master.

A proxy sends a request upstream only when the request's expected wait for a local slot exceeds
the link's round trip plus the service time there; the master sends down to a proxy by the same
rule. Each test runs the same load under ``overflow="credit"`` (credit alone decides) beside it,
so that it shows the difference the rule makes, and fails if the rule does nothing.
"""

import statistics

import pytest

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.testing import Simulation, assert_each_ended_once

FAR = 0.020  # one way, region <-> master


def region(overflow: str, far: float = FAR):
    """master 'broker' (8 slots of 'echo' at 5 ms) <- proxy 'A' (2 slots at 5 ms), ``far`` away."""
    sim = Simulation(BrokerSettings(overflow=overflow))
    sim.far["A"] = far
    sim.add_broker("A", upstream=("broker",))
    sim.add_worker("wm", concurrency=8, service_time=0.005)
    sim.add_worker("wa", concurrency=2, service_time=0.005, via=("A",))
    client = sim.add_client("ca", via=("A",))
    sim.run_for(2.5)  # registered, and a heartbeat or two measured the link
    for i in range(20):  # the region's recent service time
        client.submit("echo", i, timeout=30)
        sim.run_for(0.01)
    return sim, client


def burst(sim, client, n, spread=0.0):
    """Submit ``n`` requests (``spread`` seconds apart); return their latencies in ms, in order."""
    sent = {}
    for i in range(n):
        rid = client.submit("echo", i, timeout=30)
        sent[rid] = sim.clock.now()
        if spread:
            sim.run_for(spread)
    sim.run_for(5)
    assert_each_ended_once(client, len(client.completed))
    assert all(client.completed[r][0].status == p.ST_OK for r in sent)
    return [1000 * (client.completed_at[r] - t) for r, t in sent.items()]


def test_the_proxy_measures_its_links_round_trip_and_tells_the_master():
    sim, _ = region("latency")
    up = sim.brokers["A"].core.tiers.up
    assert up.rtt == pytest.approx(2 * FAR, rel=0.05)
    (member,) = [m for m in sim.brokers["broker"].core.d.members.values() if m.name == "A"]
    assert member.rtt == pytest.approx(2 * FAR, rel=0.05)
    assert sim.brokers["A"].core.d.pools["echo"].svc == pytest.approx(0.005, rel=0.2)


def test_a_burst_the_region_absorbs_within_the_delay_stays_local_and_is_answered_sooner():
    figures = {}
    for rule in ("latency", "credit"):
        sim, client = region(rule)
        before = sim.brokers["A"].core.counters.forwarded_up
        ms = burst(sim, client, 16)  # 16 x 5 ms on 2 slots: 40 ms here; 45 ms away at best
        figures[rule] = (sim.brokers["A"].core.counters.forwarded_up - before, statistics.median(ms), max(ms))
    up_latency, p50_latency, worst_latency = figures["latency"]
    up_credit, p50_credit, worst_credit = figures["credit"]
    assert up_latency == 0 and up_credit >= 4  # credit alone sent a share of it across the link
    assert p50_latency < 0.8 * p50_credit
    assert worst_latency < worst_credit
    assert worst_latency <= 1000 * (2 * FAR + 0.005)  # all done before an answer from the master


def test_a_sustained_overload_still_overflows_and_serves_more_than_the_region_alone():
    served = {}
    for far in (FAR, None):
        sim, client = region("latency", far or 0.0)
        if far is None:
            sim.kill_broker("broker")  # the region alone
            sim.run_for(3)
        start = sim.clock.now()
        n0 = len(client.completed)
        for i in range(1200):  # 1,200 a second for 1 s against 400 a second of local slots
            client.submit("echo", i, timeout=30)
            sim.run_for(0.001 / 1.2)
        sim.run_for(1.2 - (sim.clock.now() - start))
        served[far] = len(client.completed) - n0
        if far:
            forwarded = sim.brokers["A"].core.counters.forwarded_up
    assert forwarded > 100  # the queue grew past what a round trip costs: the rest went up
    assert served[FAR] > 1.3 * served[None]


def test_the_master_sends_down_only_what_would_wait_longer_than_the_round_trip():
    figures = {}
    for rule in ("latency", "credit"):
        sim, _ = region(rule)
        cm = sim.add_client("cm")  # a client of the master itself
        sim.run_for(0.1)
        for i in range(20):
            cm.submit("echo", i, timeout=30)
            sim.run_for(0.01)
        a = sim.brokers["A"].core.counters
        before = a.tasks_from_up
        small = burst(sim, cm, 30)  # 19 ms of work on the master's 8 slots; 45 ms down and back
        small_down = a.tasks_from_up - before
        before = a.tasks_from_up
        burst(sim, cm, 800)  # 0.5 s of work: the region's slots are worth the trip
        figures[rule] = (small_down, max(small), a.tasks_from_up - before)
    assert figures["latency"][0] == 0 and figures["credit"][0] > 0
    assert figures["latency"][1] < 2 * FAR * 1000 < figures["credit"][1]
    assert figures["latency"][2] > 20  # a deep queue still goes down


def test_work_a_region_sends_up_still_flows_down_to_the_other_region_past_a_busy_master_worker():
    """The master's own slot is busy: what region A sent up goes down to region B at once (it
    would otherwise go back to A), though the master weighs B's link against its own queue."""
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    sim.add_broker("B", upstream=("broker",))
    sim.add_worker("central", concurrency=1, service_time=0.01)
    sim.add_worker("wa", concurrency=2, service_time=0.01, via=("A",))
    sim.add_worker("wb", concurrency=4, service_time=0.01, via=("B",))
    ca = sim.add_client("ca", via=("A",))
    sim.run_for(2.5)
    for i in range(20):
        ca.submit("echo", i, timeout=30)
        sim.run_for(0.02)
    for i in range(700):
        ca.submit("echo", i, timeout=30)
    sim.run_for(10)
    assert_each_ended_once(ca, 720)
    a, b, m = (len(sim.workers[n].executed) for n in ("wa", "wb", "central"))
    assert a + b + m == 720
    assert b > 300  # B has the most slots: it served the most (2 : 4 : 1)
    assert b > a > m
