"""The broker's per-request path (``BrokerCore.receive_plain``) against the general one.

The runtime hands every message to ``receive_plain`` first and falls back to ``decode`` +
``receive``. These tests run the same random schedule twice, once that way and once through the
general path only, and require every message every broker sent (time, destination, content) to be
the same, and the same counters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.testing import Simulation

SERVICES = ("echo", "other", "nobody", "zmqdist.status")


def _schedule(data: st.DataObject) -> dict[str, Any]:
    """Draw one scenario: settings, workers, clients, requests and faults."""
    return {
        "seed": data.draw(st.integers(0, 2**32 - 1)),
        "tiers": data.draw(st.booleans()),
        "max_queue": data.draw(st.sampled_from([4, 50, 10_000])),
        "max_client_inflight": data.draw(st.sampled_from([3, 2500])),
        "drop_rate": data.draw(st.sampled_from([0.0, 0.0, 0.02])),
        "batch": data.draw(st.lists(st.booleans(), min_size=8, max_size=8)),  # which peers read BATCHes
        "workers": [
            (
                data.draw(st.sampled_from([("echo",), ("other",), ("echo", "other")])),
                data.draw(st.integers(1, 4)),
                data.draw(st.sampled_from([0.001, 0.01, 0.2])),
            )
            for _ in range(data.draw(st.integers(0, 4)))
        ],
        "steps": [
            (
                data.draw(st.sampled_from(["submit", "submit", "submit", "run", "kill", "partition", "heal", "add"])),
                data.draw(st.integers(0, 2)),  # client
                data.draw(st.sampled_from(SERVICES)),
                data.draw(st.sampled_from([1, "fail", b"x" * 3])),
                data.draw(st.sampled_from([0.005, 0.5, 5.0])),
                data.draw(st.integers(1, 30)),  # how many to submit
                data.draw(st.floats(0.0, 0.5)),  # how long to run
            )
            for _ in range(data.draw(st.integers(1, 25)))
        ],
    }


def _run(s: dict[str, Any], plain: bool) -> tuple[list[Any], list[dict[str, int]], list[Any]]:
    config = BrokerSettings(max_queue=s["max_queue"], max_client_inflight=s["max_client_inflight"])
    sim = Simulation(config, seed=s["seed"], plain=plain)
    sim.sent = []
    # With tiers: a proxy below the broker; odd workers and the last two clients are at the proxy.
    at = ("proxy",) if s["tiers"] else ("broker",)
    if s["tiers"]:
        sim.add_broker("proxy", upstream=("broker",), settings=dataclasses.replace(config, name="proxy"))
    for i, (services, concurrency, service_time) in enumerate(s["workers"]):
        batch = s["batch"][i]
        sim.add_worker(f"w{i}", services, concurrency, service_time, via=at if i % 2 else ("broker",), batch=batch)
    clients = [sim.add_client(f"c{i}", via=at if i else ("broker",), batch=s["batch"][5 + i]) for i in range(3)]
    sim.run_for(0.01)
    sim.drop_rate = s["drop_rate"]
    n_workers = len(s["workers"])
    for action, ci, service, value, timeout, count, run_s in s["steps"]:
        if action == "submit":
            for _ in range(count):
                clients[ci].submit(service, value, timeout=timeout)
        elif action == "run":
            sim.run_for(run_s)
        elif action == "add":
            sim.add_worker(f"w{len(sim.workers)}", ("echo",), 2, 0.01)
        elif n_workers:
            victim = f"w{ci % n_workers}"
            getattr(sim, action)(victim)
    sim.run_for(10)
    completed = [sorted((rid, [(d.status, d.payload) for d in ds]) for rid, ds in c.completed.items()) for c in clients]
    return sim.sent, [b.core.counters.as_dict() for b in sim.brokers.values()], completed


@given(data=st.data())
def test_property_the_plain_path_changes_nothing_but_speed(data: st.DataObject) -> None:
    s = _schedule(data)
    sent_plain, counters_plain, done_plain = _run(s, plain=True)
    sent_general, counters_general, done_general = _run(s, plain=False)
    assert len(sent_plain) == len(sent_general)
    for a, b in zip(sent_plain, sent_general, strict=True):
        assert a == b
    assert counters_plain == counters_general
    assert done_plain == done_general


def test_the_plain_path_serves_the_common_case() -> None:
    """It must not quietly fall back every time (that would make the property test above vacuous)."""
    sim = Simulation()
    sim.add_worker("w", concurrency=4)
    c = sim.add_client()
    sim.run_for(0.01)
    broker = sim.brokers["broker"]
    before = broker.plain_served
    for i in range(20):
        c.submit("echo", i)
    sim.run_for(1)
    assert all(c.completed[r][0].status == p.ST_OK for r in range(1, 21))
    # 20 requests (4 dispatched at once, 16 queued) and 20 results: all by the plain path
    assert broker.plain_served - before == 40
