"""Natural batching in simulation: brokers send what one step made for a peer as one BATCH when
that peer reads them, and single messages to peers that do not (the simulation raises if a BATCH
reaches one). Batching changes how requests travel, not who gets them or how they end."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist.testing import Simulation, assert_each_ended_once


def test_batching_peers_get_batches_and_the_others_single_messages_side_by_side():
    sim = Simulation()
    sim.add_worker("wb", concurrency=8, service_time=0.01)
    sim.add_worker("ws", concurrency=8, service_time=0.01, batch=False)
    cb = sim.add_client("cb")
    cs = sim.add_client("cs", batch=False)
    sim.run_for(0.1)
    for i in range(200):
        cb.submit("echo", i)
        cs.submit("echo", i)
    sim.run_for(5)
    for c in (cb, cs):
        assert_each_ended_once(c, 200, p.ST_OK)
    assert sim.batches.get(b"w:wb", 0) > 0 and sim.batches.get(b"c:cb", 0) > 0
    assert b"w:ws" not in sim.batches and b"c:cs" not in sim.batches
    wb, ws = sim.workers["wb"], sim.workers["ws"]
    assert len(wb.executed) > 50 and len(ws.executed) > 50  # both served: least-loaded, batch or not


def test_a_master_batches_to_its_proxy_and_the_proxy_to_its_peers():
    sim = Simulation()
    sim.add_broker("A", upstream=("broker",))
    sim.add_worker("wm", concurrency=8, service_time=0.01)
    c = sim.add_client("ca", via=("A",))
    sim.run_for(1.0)
    for i in range(300):
        c.submit("echo", i, timeout=30)
    sim.run_for(10)
    assert_each_ended_once(c, 300, p.ST_OK)
    proxy = sim.brokers["A"].ident
    assert sim.batches.get(proxy, 0) > 0  # tasks down from the master, in batches
    assert sim.batches.get(b"c:ca", 0) > 0  # replies from the proxy


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**32 - 1),
    peers=st.lists(st.booleans(), min_size=4, max_size=4),
    faults=st.lists(st.sampled_from(["kill", "stop", "partition", "heal", "run"]), min_size=1, max_size=6),
    drop=st.sampled_from([0.0, 0.02]),
)
def test_property_mixed_peers_under_faults_every_request_ends_once(seed, peers, faults, drop):
    sim = Simulation(seed=seed)
    workers = [sim.add_worker(f"w{i}", concurrency=4, service_time=0.005, batch=peers[i]) for i in range(2)]
    clients = [sim.add_client(f"c{i}", batch=peers[2 + i]) for i in range(2)]
    sim.run_for(0.1)
    sim.drop_rate = drop
    n = 0
    for step, fault in enumerate(faults):
        for c in clients:
            for i in range(40):
                c.submit("echo", i, timeout=5)
        n += 40
        victim = workers[step % 2].core.name
        if fault == "kill":
            sim.kill(victim)
            sim.add_worker(f"{victim}-{step}", concurrency=4, service_time=0.005, batch=peers[step % 2])
        elif fault == "stop":
            sim.freeze(victim, 0.5)
        elif fault in ("partition", "heal"):
            getattr(sim, fault)(victim)
        sim.run_for(0.3)
    sim.drop_rate = 0.0
    sim.run_for(30)
    for c in clients:
        assert_each_ended_once(c, n)
