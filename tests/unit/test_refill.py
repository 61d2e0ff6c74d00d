"""A worker that frees a slot while its queue waits is refilled at once (Dispatcher.refill): the
same outcome, in the same order, as the general path (offer, then pump), whatever happens."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_broker_core import hello, make, replies, tasks
from zmqdist import protocol as p

WORKERS = {b"A": (1, ("echo",)), b"B": (3, ("echo",)), b"M": (2, ("echo", "other"))}  # capacity, services

requests = st.tuples(
    st.just("request"), st.sampled_from([b"C", b"D"]), st.sampled_from(["echo", "other"]), st.integers(1, 800)
)
results = st.tuples(
    st.just("result"),
    st.sampled_from(sorted(WORKERS)),
    st.integers(0, 3),
    st.sampled_from([p.RS_OK, p.RS_OK, p.RS_FAILED, p.RS_REFUSED, p.RS_CANCELLED, p.RS_RETRY]),
    st.sampled_from([0, 50]),  # a retried run's delay (ms): 0 requeues it at once, avoiding its worker
)
ops = st.one_of(
    requests,
    requests,
    results,
    results,
    st.tuples(st.just("credit"), st.sampled_from(sorted(WORKERS)), st.integers(0, 4)),
    st.tuples(st.just("time"), st.floats(0.0, 0.3)),  # the clock moves; the timers run only at "tick"
    st.tuples(st.just("tick")),
    st.tuples(st.just("cancel"), st.sampled_from([b"C", b"D"]), st.integers(1, 40)),
)


def run(core, op, now, rids):
    kind = op[0]
    if kind == "request":
        _, client, service, budget = op
        rids[client] = rids.get(client, 0) + 1
        return core.receive(client, p.Request(rids[client], service, budget, (), b"v"), now)
    if kind == "result":
        _, worker, k, status, delay_ms = op
        held = sorted(core.d.members[worker].inflight) if worker in core.d.members else []
        ticket = held[k % len(held)] if held else 10_000 + k  # none held: a late or bogus one
        return core.receive(worker, p.Result(ticket, status, b"r", delay_ms if status == p.RS_RETRY else 0), now)
    if kind == "credit":
        return core.receive(op[1], p.Credit(op[2]), now)
    if kind == "cancel":
        return core.receive(op[1], p.Cancel(op[2]), now)
    if kind == "time":
        return []
    out = []
    for worker in WORKERS:  # heartbeats keep the workers alive while time passes
        out += core.receive(worker, p.Heartbeat(p.ROLE_WORKER, worker.decode(), 0, ()), now)
    return out + core.tick(now)


def picture(core):
    """Everything the two paths must agree on (not the heaps: the general one leaves stale entries)."""
    d = core.d
    held = {w.ident: dict(w.inflight) for w in d.members.values()}
    queues = {name: list(pool.queue) for name, pool in d.pools.items()}
    opened = {c: r.open for c, r in d.callers.items()}
    return core.counters.as_dict(), held, queues, core.open_requests, core.queued, opened


# Ten times the profile's count (400 in the suite): a head past its deadline is a rare case to reach.
@settings(max_examples=10 * settings.default.max_examples, deadline=None)
@given(st.lists(requests, min_size=6, max_size=16), st.lists(ops, max_size=60))
def test_a_worker_refilled_at_once_gets_what_the_general_pump_would_give_it(first, steps):
    fast, general = make(max_queue=20, max_client_inflight=15), make(max_queue=20, max_client_inflight=15)
    general.d.fast_refill = False
    for core in (fast, general):
        for ident, (capacity, services) in WORKERS.items():
            hello(core, ident, capacity=capacity, services=services)
    now = 0.0
    rids_fast, rids_general = {}, {}
    for op in [*first, *steps]:  # first: enough requests that some wait in the queues
        if op[0] == "time":
            now += op[1]
        out_fast, out_general = run(fast, op, now, rids_fast), run(general, op, now, rids_general)
        assert out_fast == out_general, op
        assert picture(fast) == picture(general), op


def test_refill_takes_the_freed_slot_without_a_trip_through_the_heap():
    """The case it is for: one service, its queue waiting, the only free slot the one just freed."""
    core = make()
    hello(core, b"A", capacity=1)
    for rid in (1, 2, 3):
        core.receive(b"C", p.Request(rid, "echo", 5000, (), b"v"), 0.0)
    first = min(core.d.reqs)
    a = core.d.members[b"A"]
    version = a.version  # bumped by every offer of A (the general path: one as it frees, one as it takes)
    out = core.receive(b"A", p.Result(first, p.RS_OK, b"r"), 0.1)
    assert [m.rid for m in replies(out)] == [1]
    assert [(peer, m.ticket) for peer, m in tasks(out)] == [(b"A", first + 1)]
    assert a.version == version + 1  # offered once, as it took the next: no entry pushed to be popped
    assert core.queued == 1
