"""Simulations: machines on an in-memory network with a fake clock. No sleeps, no sockets."""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.client import NO_BROKER
from zmqdist.testing import FakeClock, Simulation, assert_each_ended_once


def statuses(client):
    return Counter(v[0].status for v in client.completed.values())


def test_fake_clock_refuses_to_go_backwards():
    c = FakeClock(5.0)
    c.advance(1.0)
    assert c.now() == 6.0
    with pytest.raises(ValueError):
        c.jump_to(1.0)
    with pytest.raises(ValueError):
        c.advance(-0.1)


def test_faster_workers_serve_proportionally_more():
    sim = Simulation(BrokerSettings(max_client_inflight=10_000))
    for name, t in (("fast", 0.001), ("medium", 0.002), ("slow", 0.004)):
        sim.add_worker(name, concurrency=2, service_time=t)
    c = sim.add_client()
    sim.run_for(0.01)
    for i in range(7000):
        c.submit("echo", i, timeout=60)
    sim.run_for(30)
    assert_each_ended_once(c, 7000)
    assert statuses(c) == {p.ST_OK: 7000}
    served = {n: len(w.executed) for n, w in sim.workers.items()}
    # service rates 1000:500:250 per slot -> shares 4:2:1
    assert served["fast"] / served["slow"] == pytest.approx(4, rel=0.15)
    assert served["medium"] / served["slow"] == pytest.approx(2, rel=0.15)


def test_killed_workers_lose_nothing():
    sim = Simulation()
    for i in range(4):
        sim.add_worker(f"w{i}", concurrency=3, service_time=0.005)
    c = sim.add_client()
    sim.run_for(0.01)
    for i in range(2000):
        c.submit("echo", i, timeout=60)
    sim.run_for(0.5)
    sim.kill("w1")
    sim.run_for(0.7)
    sim.kill("w2")
    sim.run_for(30)
    assert_each_ended_once(c, 2000)
    assert statuses(c) == {p.ST_OK: 2000}
    assert all(p.unpack_value(v[0].payload) == rid - 1 for rid, v in c.completed.items())
    assert sim.broker.counters.workers_expired == 2 and sim.broker.counters.requeues >= 2


def test_broker_restart_pending_requests_complete_under_same_id():
    sim = Simulation()
    sim.add_worker("w", concurrency=2, service_time=0.01)
    c = sim.add_client()
    sim.run_for(0.01)
    for i in range(100):
        c.submit("echo", i, timeout=10)
    sim.run_for(0.1)
    sim.kill_broker()
    sim.run_for(0.5)
    sim.restart_broker()
    sim.run_for(10)
    assert_each_ended_once(c, 100)
    assert statuses(c) == {p.ST_OK: 100}
    assert c.core.counters["broker_restarts"] + c.core.counters["failovers"] >= 1
    assert sim.broker.counters.workers_registered == 1


def test_no_worker_for_service_times_out_with_reason():
    sim = Simulation()
    c = sim.add_client()
    rid = c.submit("nobody", 1, timeout=1.0)
    sim.run_for(2)
    (done,) = c.completed[rid]
    assert done.status == p.ST_TIMEOUT and "no worker for service 'nobody'" in done.message


def test_partitioned_worker_is_declared_dead_and_gets_no_more_work():
    sim = Simulation()
    sim.add_worker("a", concurrency=1, service_time=0.01)
    sim.add_worker("b", concurrency=1, service_time=0.01)
    c = sim.add_client()
    sim.run_for(0.01)
    sim.partition("a")
    for i in range(300):
        c.submit("echo", i, timeout=30)
    sim.run_for(20)
    assert_each_ended_once(c, 300)
    assert statuses(c) == {p.ST_OK: 300}
    ident = sim.workers["a"].ident
    dead_at = sim.expired_at[ident]
    assert not [t for t, i in sim.tasks_sent if i == ident and t > dead_at]


def test_a_worker_whose_hello_was_lost_while_its_broker_kept_it_registers_again_and_serves():
    """A cut between a worker and its broker, healed after the worker gave the broker up (it said
    HELLO on a new connection, lost in the cut) and before the broker gave the worker up: the broker
    still holds the last session's registration and sends it tasks. The worker used to refuse each
    one and the broker offered it again at once, round after round, for as long as both lived (a
    property test found 690,000 refusals; here 50,000 in 5 s and nothing served). Now the worker
    says HELLO again a ttl after the lost one, drops what comes for the old registration (the
    broker requeues it at the new HELLO), and serves."""
    sim = Simulation(seed=1)
    w = sim.add_worker("w", concurrency=2, service_time=0.05)
    c = sim.add_client()
    sim.run_for(2)
    sim.cut_link("w", "broker")
    sim.freeze("broker", 1.5)  # stopped, it cannot give the worker up; resumed, it knows it was
    sim.run_for(1.2)  # the worker gave its broker up after a ttl (1.0 s): its HELLO was lost
    assert not w.core.registered and w.core.counters["failovers"] == 1
    sim.heal_link("w", "broker")
    sim.run_for(0.35)  # the broker has resumed, holding the worker's old registration
    assert w.ident in sim.broker.worker_load() and not w.core.registered
    for i in range(10):
        c.submit("echo", i, timeout=10)
    sim.run_for(5)
    assert_each_ended_once(c, 10)
    assert statuses(c) == {p.ST_OK: 10} and len(w.executed) == 10
    assert w.core.registered and w.core.counters["hellos_again"] == 1 and w.core.counters["refused"] == 0
    assert sim.broker.counters.refused == 0 and sim.broker.worker_load()[w.ident] == (0, 2)


def test_attempt_cap_reports_lost_when_every_worker_dies():
    sim = Simulation(BrokerSettings(max_attempts=2))
    sim.add_worker("a", service_time=10)
    c = sim.add_client()
    sim.run_for(0.01)
    rid = c.submit("echo", 1, timeout=60)
    sim.run_for(0.1)
    sim.kill("a")
    sim.add_worker("b", service_time=10)
    sim.run_for(1.5)
    sim.kill("b")
    sim.run_for(3)
    (done,) = c.completed[rid]
    assert done.status == p.ST_LOST


@given(
    data=st.data(),
    n_workers=st.integers(1, 5),
    n_requests=st.integers(1, 150),
    drop_rate=st.sampled_from([0.0, 0.0, 0.01, 0.05]),
)
def test_property_every_request_ends_exactly_once(data, n_workers, n_requests, drop_rate):
    """Random kills, partitions, broker restarts and message loss: no task to a dead worker (checked
    on every send by the simulation), in-flight never above capacity (ditto), every request ends
    once, and nothing is left open in the broker."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    sim = Simulation(seed=seed)
    for i in range(n_workers):
        sim.add_worker(
            f"w{i}",
            concurrency=data.draw(st.integers(1, 4)),
            service_time=data.draw(st.sampled_from([0.001, 0.01, 0.1])),
        )
    c = sim.add_client()
    sim.run_for(0.01)
    sim.drop_rate = drop_rate
    for i in range(n_requests):
        c.submit("echo", i, timeout=data.draw(st.sampled_from([0.5, 5.0, 30.0])))
    for _ in range(data.draw(st.integers(0, 4))):
        sim.run_for(data.draw(st.floats(0.0, 1.0)))
        victim = f"w{data.draw(st.integers(0, n_workers - 1))}"
        action = data.draw(st.sampled_from(["kill", "partition", "heal", "add", "restart_broker"]))
        if action == "restart_broker":
            sim.kill_broker()
            sim.run_for(data.draw(st.floats(0.0, 2.0)))
            sim.restart_broker()
        elif action == "kill":
            sim.kill(victim)
        elif action == "partition":
            sim.partition(victim)
        elif action == "heal":
            sim.heal(victim)
        else:
            sim.add_worker(f"x{len(sim.workers)}", concurrency=2, service_time=0.01)
    sim.run_for(40)
    assert_each_ended_once(c, n_requests)
    for rid, (done,) in c.completed.items():
        if done.status == p.ST_OK:
            assert p.unpack_value(done.payload) == rid - 1
        else:
            assert done.status in (p.ST_TIMEOUT, p.ST_LOST, NO_BROKER)
    if drop_rate == 0.0:
        assert sim.broker.open_requests == 0, "the broker kept a request no one will answer"
    for w in sim.workers.values():
        assert w.max_running <= w.core.concurrency
