"""The request lifecycle, rule by rule, on the fake clock: cancel (queued, running, across a tier,
racing the reply), retry policies within the deadline, joining by caller key, streams with their
window through a tier and across a takeover (issue 20; docs/semantics.md states each rule)."""

import dataclasses

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.client import Completed
from zmqdist.policy import Retry
from zmqdist.testing import Simulation

EVEN = Retry(on=(OSError,), attempts=3, backoff=0.2, max_backoff=1.0, jitter=False)


def one_worker(service_time=2.0, concurrency=1, settings=None):
    sim = Simulation(settings)
    w = sim.add_worker("w", concurrency=concurrency, service_time=service_time)
    c = sim.add_client("c")
    sim.run_for(0.5)
    return sim, w, c


def a_tier(worker_at, client_at, service_time=5.0):
    """A master "m" and a proxy "p" below it; a worker and a client each at the broker named."""
    sim = Simulation()
    sim.add_broker("m")
    sim.add_broker("p", upstream=("m",))
    w = sim.add_worker("w", service_time=service_time, via=(worker_at,))
    c = sim.add_client("c", via=(client_at,))
    sim.run_for(1)
    return sim, w, c


def key_of(c, rid):
    return f"{c.ident.hex()}:{rid}"


# --- cancel ---------------------------------------------------------------------------------------


def test_a_request_cancelled_while_queued_never_runs_and_frees_its_quota_at_once():
    sim, w, c = one_worker()
    a = c.submit("echo", "a", timeout=30)
    b = c.submit("echo", "b", timeout=30)
    sim.run_for(0.1)  # a runs, b waits in the broker's queue
    assert sim.broker.queued == 1
    c.cancel(b)
    sim.run_for(0.1)
    assert sim.broker.queued == 0 and sim.broker.open_requests == 1
    assert sim.broker.status(sim.clock.now())["counters"]["cancelled"] == 1
    sim.run_for(5)
    assert key_of(c, b) not in w.executed and b not in c.completed  # it never ran; no outcome but the cancel
    assert [x.status for x in c.completed[a]] == [p.ST_OK]
    assert sim.broker.open_requests == 0 and sim.broker.d.callers == {}


def test_a_running_request_cancelled_stops_its_handler_and_its_slot_frees_when_the_handler_stops():
    sim, w, c = one_worker(service_time=2.0)
    a = c.submit("echo", "long", timeout=30)
    b = c.submit("echo", "next", timeout=30)
    sim.run_for(0.3)
    t_cancel = sim.clock.now()
    c.cancel(a)
    sim.run_for(5)
    assert w.aborted == [key_of(c, a)]  # the handler was told to stop
    assert a not in c.completed  # one outcome: the cancel (the client resolved it then)
    # b got the slot when a's handler stopped, not when a would have ended (t=2.5)
    assert [x.status for x in c.completed[b]] == [p.ST_OK]
    assert c.completed_at[b] < t_cancel + 2.0 + 0.01
    assert sim.broker.open_requests == 0
    st = sim.broker.status(sim.clock.now())["counters"]
    assert st["cancelled"] == 1 and st["replies_ok"] == 1 and st["bogus_results"] == 0


def test_a_request_past_its_deadline_is_stopped_at_the_worker_and_the_broker_is_told():
    sim, w, c = one_worker(service_time=3.0)
    a = c.submit("echo", "long", timeout=1.0)
    sim.run_for(1.5)
    (end,) = c.completed[a]
    assert end.status == p.ST_TIMEOUT and "stopped at the request's deadline" in end.message
    assert w.aborted == [key_of(c, a)]  # the worker stopped it at the deadline, not after 3 s
    assert sim.broker.open_requests == 0 and w.core.inflight == {}
    # a client whose deadline passes first (its reply lost) tells the broker to stop the request too
    sim.cut_link("c", "broker")
    b = c.submit("echo", "lost", timeout=1.0)
    out = c.core.tick(sim.clock.now() + 1.0)
    assert p.Cancel(b) in out and [o.rid for o in out if type(o) is Completed] == [b]


def test_a_cancel_crosses_a_tier_both_ways():
    # up: the client's proxy forwarded the request to the master, whose worker runs it
    sim, w, c = a_tier("m", "p")
    a = c.submit("echo", "up", timeout=30)
    sim.run_for(0.5)
    assert sim.brokers["p"].core.status(sim.clock.now())["upstream"]["forwarded"] == 1
    c.cancel(a)
    sim.run_for(1)
    assert len(w.aborted) == 1 and w.core.inflight == {}
    assert sim.brokers["m"].core.open_requests == 0 and sim.brokers["p"].core.open_requests == 0
    # down: the master handed the request to the proxy, whose worker runs it
    sim, w, c = a_tier("p", "m")
    a = c.submit("echo", "down", timeout=30)
    sim.run_for(0.5)
    m = sim.brokers["m"].core
    proxy = next(x for x in m.d.members.values() if x.name == "p")
    assert len(proxy.inflight) == 1
    c.cancel(a)
    sim.run_for(1)
    assert len(w.aborted) == 1
    assert proxy.inflight == {}  # the proxy answered CANCELLED once its worker let go: the slot is free
    assert m.open_requests == 0 and sim.brokers["p"].core.open_requests == 0
    assert a not in c.completed


def test_a_cancel_racing_the_reply_leaves_exactly_one_outcome_either_way():
    # the cancel leaves while the reply is on its way: the client keeps its cancel, drops the reply
    sim, w, c = one_worker(service_time=1.0)
    a = c.submit("echo", "x", timeout=30)
    sim.run_until(0.5 + 2 * 0.0001 + 1.0 + 0.00005)  # the worker answered; the broker has not heard it yet
    assert w.core.inflight == {} and sim.broker.open_requests == 1
    c.cancel(a)
    sim.run_for(1)
    assert a not in c.completed and c.core.counters["duplicates"] == 1  # the reply came, and was dropped
    assert sim.broker.open_requests == 0
    # the reply arrives first: cancel finds nothing to cancel; the reply is the one outcome
    b = c.submit("echo", "y", timeout=30)
    sim.run_for(2)
    assert c.core.cancel(b, sim.clock.now()) == []
    assert [x.status for x in c.completed[b]] == [p.ST_OK]


# --- callers that go silent (rule 4) -------------------------------------------------------------


def test_a_dead_clients_requests_stop_at_the_ttl_and_a_live_callers_request_runs_next():
    sim, w, c = one_worker(service_time=0.5)
    d = sim.add_client("d")
    sim.run_for(0.5)
    mine = [c.submit("echo", i, timeout=60) for i in range(20)]
    sim.run_for(0.1)
    other = d.submit("echo", "live", timeout=60)
    sim.run_for(0.1)
    sim.kill("c")  # SIGKILL: it sends nothing more, its requests open at the broker
    t_kill = sim.clock.now()
    sim.run_for(15)
    ran = [k for k in w.executed if k.startswith(c.ident.hex())]
    assert len(ran) <= 4  # the one running, and those started before the ttl (1 s) was up: not 20
    assert w.aborted == ran[-1:]  # the run going on at the ttl was told to stop
    # the live caller's request ran next, not after the dead one's backlog (20 x 0.5 s)
    assert [x.status for x in d.completed[other]] == [p.ST_OK]
    assert d.completed_at[other] < t_kill + 1.0 + 2 * 0.5 + 0.1
    st = sim.broker.status(sim.clock.now())["counters"]
    assert st["abandoned"] == len(mine) - (len(ran) - 1) and st["cancelled"] == 0
    assert sim.broker.open_requests == 0 and sim.broker.d.callers == {}


def test_a_client_frozen_past_the_ttl_is_told_to_send_again_and_every_request_ends_right_once():
    sim, w, c = one_worker(service_time=0.5)
    mine = [c.submit("echo", i, timeout=60) for i in range(10)]
    sim.run_for(0.3)
    sim.freeze("c", 3.0)  # SIGSTOP past the ttl: the broker takes it for dead and stops its requests
    sim.run_for(2.0)
    assert sim.broker.open_requests <= 1  # (one whose run was told to stop, until it lets go)
    assert sim.broker.status(sim.clock.now())["counters"]["abandoned"] > 5
    sim.run_for(10)  # resumed: its heartbeat is answered RECONNECT, it says HELLO and sends them again
    assert [x.status for r in mine for x in c.completed[r]] == [p.ST_OK] * 10
    assert [c.completed[r][0].payload for r in mine] == [p.pack_value(i) for i in range(10)]
    assert c.core.counters["duplicates"] == 0 and sim.broker.open_requests == 0
    assert sorted(set(w.executed)) == sorted(key_of(c, r) for r in mine)  # the stopped ones ran again
    assert sim.broker.life.left == {}  # told once


def test_a_silent_joiner_leaves_the_run_which_goes_on_for_its_first_caller_and_the_other_way():
    for dies in ("d", "c"):
        sim, w, c = one_worker(service_time=3.0, settings=BrokerSettings(join_same_key=True))
        d = sim.add_client("d")
        sim.run_for(0.5)
        a = c.submit("echo", "order", timeout=30, key="order-42")
        sim.run_for(0.1)
        b = d.submit("echo", "order", timeout=30, key="order-42")
        sim.run_for(0.2)
        sim.kill(dies)
        sim.run_for(6)
        live, rid = (c, a) if dies == "d" else (d, b)
        assert w.aborted == [] and w.executed == ["order-42"]  # one run, never stopped
        assert [x.status for x in live.completed[rid]] == [p.ST_OK]
        assert sim.broker.status(sim.clock.now())["counters"]["abandoned"] == 1
        assert sim.broker.open_requests == 0 and sim.broker.d.callers == {}


def test_a_dead_clients_requests_a_proxy_sent_up_are_stopped_at_the_master():
    sim, w, c = a_tier("m", "p", service_time=2.0)
    for i in range(5):
        c.submit("echo", i, timeout=60)
    sim.run_for(0.5)
    sim.kill("c")
    sim.run_for(3)
    assert len(w.executed) == 1 and len(w.aborted) == 1  # four never ran; the one running was stopped
    assert sim.brokers["m"].core.open_requests == 0 and sim.brokers["p"].core.open_requests == 0


def test_what_a_dead_proxy_sent_up_stops_at_the_master_queued_or_running():
    """A proxy SIGKILLed with five requests of 2 s sent up (one running at the master's worker):
    the master takes the proxy for gone after the ttl. What waited was forgotten then already; the
    run went on for nobody until its end, ahead of live callers' work. Now it is told CANCEL."""
    sim, w, c = a_tier("m", "p", service_time=2.0)
    for i in range(5):
        c.submit("echo", i, timeout=60)
    sim.run_for(0.5)
    sim.kill_broker("p")
    sim.run_for(1.3)  # the master expires the proxy 1.0 s after its last heartbeat
    m = sim.brokers["m"].core
    assert m.counters.workers_expired == 1 and m.open_requests == 0
    assert len(w.executed) == 1 and len(w.aborted) == 1  # four never ran; the one running was stopped
    assert m.counters.abandoned == 5


# --- retry ----------------------------------------------------------------------------------------


def test_a_flaky_handler_is_retried_after_its_backoff_on_the_other_worker_within_the_deadline():
    sim = Simulation()
    w1 = sim.add_worker("w1", service_time=0.1)
    w2 = sim.add_worker("w2", service_time=0.1)
    w1.retry = w2.retry = EVEN
    c = sim.add_client("c")
    sim.run_for(0.5)
    t0 = sim.clock.now()
    a = c.submit("echo", {"flaky": 2}, timeout=10)
    sim.run_for(3)
    assert [x.status for x in c.completed[a]] == [p.ST_OK]
    runs = [ident for t, ident in sim.tasks_sent if t >= t0]
    assert len(runs) == 3 and runs[0] != runs[1] and runs[1] != runs[2]  # each retry on the other worker
    # three runs of 0.1 s, and the two backoffs (0.2 s, then 0.4 s) between them
    assert 0.1 * 3 + 0.2 + 0.4 <= c.completed_at[a] - t0 < 0.1 * 3 + 0.2 + 0.4 + 0.01
    assert sim.broker.status(sim.clock.now())["counters"]["retried"] == 2


def test_a_retry_that_would_not_start_before_the_deadline_ends_with_the_handlers_error_not_a_timeout():
    sim, w, c = one_worker(service_time=0.1)
    w.retry = Retry(on=(OSError,), attempts=5, backoff=0.3, jitter=False)
    a = c.submit("echo", {"flaky": 9}, timeout=0.9)
    sim.run_for(2)
    (done,) = c.completed[a]
    assert done.status == p.ST_FAILED and "OSError" in p.unpack_error(done.payload)[0]
    assert c.completed_at[a] - 0.5 < 0.9  # before the deadline: 0.1, +0.3, 0.1, then 0.6 would not fit
    assert w.executed.count(key_of(c, a)) == 2


def test_the_callers_policy_overrides_the_services_and_retries_do_not_count_against_max_attempts():
    settings = BrokerSettings(max_attempts=2)
    sim, w, c = one_worker(service_time=0.05, settings=settings)
    w.retry = None  # the service retries nothing
    a = c.submit("echo", {"flaky": 3}, timeout=10, retry=Retry(on="OSError", attempts=5, backoff=0.01))
    b = c.submit("echo", {"flaky": 1}, timeout=10)  # no policy anywhere: one run, its error
    sim.run_for(3)
    assert [x.status for x in c.completed[a]] == [p.ST_OK] and w.executed.count(key_of(c, a)) == 4
    assert [x.status for x in c.completed[b]] == [p.ST_FAILED] and w.executed.count(key_of(c, b)) == 1


def test_a_client_whose_policy_lists_busy_sends_again_what_a_full_broker_refused():
    from zmqdist.errors import Busy

    sim, _, c = one_worker(service_time=0.5, settings=BrokerSettings(max_queue=1))
    policy = Retry(on=(Busy,), attempts=10, backoff=0.1, max_backoff=0.4)
    rids = [c.submit("echo", i, timeout=10, retry=policy) for i in range(4)]
    plain = c.submit("echo", "no policy", timeout=10)
    sim.run_for(6)
    assert all([x.status for x in c.completed[r]] == [p.ST_OK] for r in rids)
    assert [x.status for x in c.completed[plain]] == [p.ST_BUSY]
    assert c.core.counters["busy_retries"] > 0


# --- caller keys ----------------------------------------------------------------------------------


def test_requests_with_the_same_key_join_one_run_and_each_caller_gets_the_reply():
    sim, w, c = one_worker(service_time=1.0, settings=BrokerSettings(join_same_key=True))
    d = sim.add_client("d")
    sim.run_for(0.5)
    a = c.submit("echo", "order", timeout=10, key="order-42")
    b = d.submit("echo", "order", timeout=10, key="order-42")
    other = d.submit("echo", "other", timeout=10, key="order-43")
    sim.run_for(3)
    assert w.executed.count("order-42") == 1 and w.executed.count("order-43") == 1  # the key the handler sees
    assert [x.status for x in c.completed[a]] == [p.ST_OK] == [x.status for x in d.completed[b]]
    assert c.completed[a][0].payload == d.completed[b][0].payload
    assert [x.status for x in d.completed[other]] == [p.ST_OK]
    assert sim.broker.status(sim.clock.now())["counters"]["joined"] == 1
    # the first caller cancels: the run goes on for the one that joined
    a = c.submit("echo", "again", timeout=10, key="order-44")
    b = d.submit("echo", "again", timeout=10, key="order-44")
    sim.run_for(0.2)
    c.cancel(a)
    sim.run_for(2)
    assert w.aborted == [] and [x.status for x in d.completed[b]] == [p.ST_OK]
    assert sim.broker.open_requests == 0 and sim.broker.d.callers == {}


def test_without_join_same_key_the_same_key_runs_twice_and_every_attempt_sees_the_callers_key():
    sim, w, c = one_worker(service_time=0.2, concurrency=2)
    w.retry = EVEN
    c.submit("echo", "x", timeout=10, key="k-1")
    c.submit("echo", {"flaky": 1}, timeout=10, key="k-1")
    sim.run_for(2)
    assert w.executed.count("k-1") == 3  # two requests, the second one run twice: one key throughout


# --- streams --------------------------------------------------------------------------------------


def test_a_stream_through_a_tier_keeps_order_and_the_worker_never_runs_past_its_window():
    sim = Simulation()
    sim.add_broker("m")
    sim.add_broker("p", upstream=("m",))
    w = sim.add_worker("w", service_time=0.001, via=("m",))
    c = sim.add_client("c", via=("p",))
    sim.run_for(1)
    c.consume_s = 0.02  # a slow consumer
    a = c.submit("echo", {"stream": 200}, timeout=60, window=8)
    sim.run_for(10)
    assert c.parts[a] == list(range(200)) and [x.status for x in c.completed[a]] == [p.ST_OK]
    assert w.max_ahead <= 8  # back-pressure held through both brokers
    assert sim.brokers["m"].core.status(sim.clock.now())["counters"]["parts"] == 200


def test_a_stream_handed_down_ends_at_a_part_over_the_upstreams_limit_and_its_run_stops():
    """The master hands a stream to a proxy whose worker's parts are over the master's message
    limit: the proxy ends the stream upstream with the failure that says so (the parts before it
    delivered), stops the run, and sends nothing more up for it."""
    sim = Simulation()
    sim.add_broker("m", settings=BrokerSettings(max_message_size=1000))
    sim.add_broker("p", upstream=("m",))
    w = sim.add_worker("w", service_time=0.001, via=("p",))
    c = sim.add_client("c", via=("m",))
    sim.run_for(1)
    a = c.submit("echo", {"stream": 50, "pad": 100}, timeout=60, window=8)  # fits
    sim.run_for(2)
    assert [x[0] for x in c.parts[a]] == list(range(50)) and [x.status for x in c.completed[a]] == [p.ST_OK]
    made = w.parts_made
    b = c.submit("echo", {"stream": 50, "pad": 2000}, timeout=60, window=8)
    sim.run_for(2)
    (done,) = c.completed[b]
    kind, message, _ = p.unpack_error(done.payload)
    assert done.status == p.ST_FAILED and kind == p.RESULT_TOO_LARGE and not c.parts.get(b)
    assert "part 1 of the stream" in message and "limit of 1000 bytes" in message, message
    assert w.core.runs == {} and w.parts_made - made <= 8  # stopped within its window, not run to the end
    m, px = sim.brokers["m"].core, sim.brokers["p"].core
    assert m.open_requests == 0 and px.open_requests == 0
    assert m.counters.late_results == 0 and m.counters.bad_input == 0  # nothing more of it went up
    d = c.submit("echo", "after", timeout=10)
    sim.run_for(1)
    assert [x.status for x in c.completed[d]] == [p.ST_OK]


def test_a_takeover_mid_stream_ends_it_interrupted_with_no_gap_and_no_repeat():
    sim = Simulation()
    sim.add_broker("m")
    sim.add_pair("pa", "pb", upstream=("m",))
    w = sim.add_worker("w", service_time=0.01, via=("m",))
    c = sim.add_client("c", via=("pa", "pb"))
    sim.run_for(2)
    c.consume_s = 0.01
    a = c.submit("echo", {"stream": 500}, timeout=60, window=4)
    sim.run_for(0.5)
    got = len(c.parts[a])
    assert 0 < got < 500
    sim.kill_broker("pa")
    sim.run_for(6)
    assert sim.active("pa", "pb") == ["pb"]
    (end,) = c.completed[a]
    assert end.status == p.ST_INTERRUPTED
    assert c.parts[a] == list(range(len(c.parts[a])))  # in order, none missing before the cut, none twice
    assert w.core.runs == {} and sim.brokers["m"].core.open_requests == 0  # the run was stopped upstream
    # a stream that starts after the takeover runs whole
    b = c.submit("echo", {"stream": 20}, timeout=60, window=4)
    sim.run_for(3)
    assert c.parts[b] == list(range(20)) and [x.status for x in c.completed[b]] == [p.ST_OK]


def test_a_stream_whose_worker_dies_after_a_part_is_interrupted_not_run_again():
    sim = Simulation()
    w1 = sim.add_worker("w1", service_time=0.05)
    sim.add_worker("w2", service_time=0.05)
    c = sim.add_client("c")
    sim.run_for(0.5)
    a = c.submit("echo", {"stream": 100}, timeout=60, window=4)
    sim.run_for(0.3)
    runner = next(w for w in sim.workers.values() if w.runs)
    sim.kill(runner.core.name)
    sim.run_for(3)
    (end,) = c.completed[a]
    assert end.status == p.ST_INTERRUPTED and "after" in end.message
    assert c.parts[a] == list(range(len(c.parts[a]))) and c.parts[a]
    other = w1 if runner is not w1 else sim.workers["w2"]
    assert key_of(c, a) not in other.executed  # not run again from the start


def test_a_stream_of_a_plain_service_yields_its_one_value_and_a_call_of_a_stream_gets_a_list():
    sim, _, c = one_worker(service_time=0.01)
    a = c.submit("echo", "plain", timeout=5, window=4)
    b = c.submit("echo", {"stream": 3}, timeout=5)  # a call, not a stream: the sim worker sends no parts
    sim.run_for(1)
    assert c.parts.get(a) is None or c.parts[a] == []  # the sim's plain handler replies in one piece
    assert [x.status for x in c.completed[a]] == [p.ST_OK]
    assert [x.status for x in c.completed[b]] == [p.ST_OK]


def test_progress_reports_are_relayed_and_held_back_to_ten_a_second():
    sim, w, c = one_worker(service_time=2.0)
    a = c.submit("echo", "x", timeout=10)
    sim.run_for(0.05)
    ex_ticket, run = next(iter(w.core.runs.items()))
    now = sim.clock.now()
    for i in range(50):  # 50 reports within 50 ms: the first goes, the rest collapse into the latest
        w.handle(w.core.progress(ex_ticket, run.session, p.pack_value(i), now + i * 0.001))
    sim.run_for(0.5)
    assert c.progress[a] == [0, 49]
    assert dataclasses.is_dataclass(EVEN)
