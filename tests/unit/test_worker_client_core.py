"""The worker and client machines, driven with plain numbers for time."""

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings, HeartbeatSettings
from zmqdist.core.client import ClientCore, Completed
from zmqdist.core.link import EPSILON, Connect, Problem, Stopped
from zmqdist.core.worker import Abort, Execute, WorkerCore
from zmqdist.testing import tick_until

HB = HeartbeatSettings(0.25, 4)
WELCOME = p.Welcome("b", "inc1", 250, 4)


def worker(concurrency=2, eps=("tcp://a:1", "tcp://b:1")):
    w = WorkerCore(eps, ("echo",), concurrency, "w", HB, 0.0)
    out = w.start(0.0)
    hello = p.Hello(p.ROLE_WORKER, "w", ("echo",), concurrency, 250, batch=p.MAX_BATCH, seq=1)
    assert out == [Connect("tcp://a:1", "start"), hello]
    w.receive(WELCOME, 0.0)
    return w


def task(ticket, budget_ms=1000):
    return p.Task(ticket, "echo", budget_ms, 1, f"k{ticket}", ticket, (), b"v")


def test_worker_executes_within_capacity_and_refuses_beyond():
    w = worker(concurrency=1)
    (ex,) = w.receive(task(1), 0.0)
    assert type(ex) is Execute and ex.deadline == 1.0 and ex.key == "k1"
    assert w.receive(task(2), 0.0) == [p.Result(2, p.RS_REFUSED, b"")]
    # The broker counts a refusing worker full until it says its room: the slot that frees next is told.
    assert w.task_done(1, ex.session, True, b"r", 0.1) == [p.Result(1, p.RS_OK, b"r"), p.Credit(1)]
    (ex,) = w.receive(task(3), 0.2)
    assert w.task_done(3, ex.session, True, b"r", 0.3) == [p.Result(3, p.RS_OK, b"r")]  # once


def test_a_result_over_the_brokers_message_limit_goes_as_a_failure_that_says_so():
    """The broker refuses a message over its --max-message-size (and its caller would wait out the
    deadline): the worker knows the limit from WELCOME and fails the task with the reason."""
    w = WorkerCore(("tcp://a:1",), ("echo",), 2, "w", HB, 0.0)
    w.start(0.0)
    w.receive(p.Welcome("b", "inc1", 250, 4, 0, "", 10, 100), 0.0)
    (ex1,) = w.receive(task(1), 0.0)
    (ex2,) = w.receive(task(2), 0.0)
    assert w.task_done(1, ex1.session, True, b"x" * 100, 0.1) == [p.Result(1, p.RS_OK, b"x" * 100)]
    [r] = w.task_done(2, ex2.session, True, b"x" * 101, 0.1)
    assert r.ticket == 2 and r.status == p.RS_FAILED
    kind, why, _ = p.unpack_error(r.payload)
    assert kind == "ResultTooLarge" and "(101 bytes)" in why and "limit of 100 bytes" in why
    assert w.counters["too_large"] == 1
    # A stream's part over the limit: the handler is stopped, its RESULT fails saying why.
    (ex3,) = w.receive(p.Task(3, "echo", 1000, 1, "k3", 3, (), b"v", "", 4), 0.2)
    assert w.part(3, ex3.session, b"p" * 100, 0.2) == [p.Part(3, 0, b"p" * 100)]
    [stop] = w.part(3, ex3.session, b"p" * 101, 0.2)
    assert type(stop) is Abort and stop.ticket == 3 and "part 2 of the stream (101 bytes)" in stop.reason
    assert w.part(3, ex3.session, b"p", 0.2) == []  # nothing more of it goes
    [r] = w.task_done(3, ex3.session, True, b"", 0.3)
    assert (r.status, r.parts, p.unpack_error(r.payload)[0]) == (p.RS_FAILED, 1, "ResultTooLarge")
    assert w.counters["too_large"] == 2 and w.counters["abandoned"] == 0


def test_a_progress_report_over_the_limit_is_not_sent_and_says_why_the_next_that_fits_goes():
    w = WorkerCore(("tcp://a:1",), ("echo",), 2, "w", HB, 0.0)
    w.start(0.0)
    w.receive(p.Welcome("b", "inc1", 250, 4, 0, "", 10, 100), 0.0)
    (ex,) = w.receive(task(1), 0.0)
    [problem] = w.progress(1, ex.session, b"x" * 101, 1.0)
    assert type(problem) is Problem and problem.key and "(101 bytes)" in problem.message
    assert "limit of 100 bytes" in problem.message and w.counters["too_large"] == 1
    assert w.progress(1, ex.session, b"x" * 100, 1.0) == [p.Progress(1, b"x" * 100)]


def test_a_handlers_failure_over_the_limit_keeps_its_type_cut_to_fit_and_a_retry_stays_a_retry():
    w = WorkerCore(("tcp://a:1",), ("echo",), 2, "w", HB, 0.0)
    w.start(0.0)
    w.receive(p.Welcome("b", "inc1", 250, 4, 0, "", 10, 500), 0.0)
    err = p.pack_error("KeyError", "m" * 2000, "Traceback...\n" + "t" * 2000 + "\nKeyError: the end")
    (ex1,) = w.receive(task(1), 0.0)
    [r] = w.task_done(1, ex1.session, False, err, 0.1)
    kind, message, tb = p.unpack_error(r.payload)
    assert r.status == p.RS_FAILED and len(r.payload) <= 500 and kind == "KeyError"
    assert message.startswith("mmm") and message.endswith("[cut to the broker's message limit]")
    (ex2,) = w.receive(task(2), 0.2)
    short = p.pack_error("KeyError", "m" * 100, "t" * 2000 + "\nKeyError: the end")
    [r] = w.task_done(2, ex2.session, False, short, 0.3, retry_ms=50)  # its policy retries it
    kind, message, tb = p.unpack_error(r.payload)
    assert (r.status, r.delay_ms, kind, message) == (p.RS_RETRY, 50, "KeyError", "m" * 100)
    assert tb.endswith("\nKeyError: the end") and len(r.payload) <= 500  # the traceback's end is kept


def test_worker_heartbeats_every_interval_and_fails_over_after_ttl():
    w = worker()
    assert w.tick(0.24) == []
    assert w.tick(0.25) == [p.Heartbeat(p.ROLE_WORKER, "inc1", 0, ())]
    for t in (0.5, 0.75):  # ticked at every deadline, as a runtime does
        w.tick(t)
    assert w.tick(1.0) == [p.Heartbeat(p.ROLE_WORKER, "inc1", 0, ())]  # silent exactly ttl: still alive
    out = w.tick(1.0 + EPSILON)
    assert type(out[0]) is Connect and out[0].endpoint == "tcp://b:1"
    assert type(out[1]) is p.Hello


def test_a_machine_that_was_paused_itself_does_not_count_the_pause_as_its_brokers_silence():
    """SIGSTOP of the worker for 2.5 s (its loop says so): the broker sent nothing because the
    worker sent nothing, so the pause does not count. Heartbeat at once; judge the rest."""
    w = worker()
    w.tick(0.25)  # the broker was last heard at 0.0
    w.resumed(2.5, 2.8)  # stopped from 0.3 to 2.8
    assert w.tick(2.8) == [p.Heartbeat(p.ROLE_WORKER, "inc1", 0, ())]  # no failover, a heartbeat
    for t in (3.05, 3.3, 3.5):
        assert not any(type(o) is Connect for o in w.tick(t))  # heard at 0.0 + 2.5 paused: alive to 3.5
    out = w.tick(3.5 + EPSILON)
    assert type(out[0]) is Connect and out[0].endpoint == "tcp://b:1"  # silent a full ttl it was awake


def test_worker_drops_results_from_a_void_session_and_advertises_reduced_capacity():
    w = worker(concurrency=2)
    (ex,) = w.receive(task(1), 0.0)
    out = w.receive(p.Heartbeat(p.ROLE_BROKER, "inc2", 0, ()), 0.1)  # broker restarted
    # the old run is told to stop (it runs elsewhere now); one slot stays busy until it has
    assert out == [
        Abort(1, ex.session, "its broker was lost: it runs elsewhere"),
        p.Hello(p.ROLE_WORKER, "w", ("echo",), 1, 250, batch=p.MAX_BATCH, seq=2),
    ]
    w.receive(p.Welcome("b", "inc2", 250, 4), 0.1)
    assert w.task_done(1, ex.session, True, b"r", 0.2) == [p.Credit(2)]
    assert w.counters["void_results"] == 1


def test_stale_work_ending_between_hello_and_welcome_frees_its_slot_at_the_broker():
    """HELLO said capacity 1 (one slot held by a void session's run); that run ends before the
    WELCOME: the WELCOME is answered with CREDIT(2), else the broker keeps 1 for good (found by the
    pair property test)."""
    w = worker(concurrency=2)
    (ex,) = w.receive(task(1), 0.0)
    out = w.receive(p.Heartbeat(p.ROLE_BROKER, "inc2", 0, ()), 0.1)  # broker restarted
    assert p.Hello(p.ROLE_WORKER, "w", ("echo",), 1, 250, batch=p.MAX_BATCH, seq=2) in out
    assert w.task_done(1, ex.session, True, b"r", 0.15) == []  # not registered: nothing to tell yet
    assert w.receive(p.Welcome("b", "inc2", 250, 4), 0.2) == [p.Credit(2)]
    assert w.receive(p.Welcome("b", "inc2", 250, 4), 0.3) == []  # nothing changed since


def test_a_client_not_welcomed_says_hello_again_instead_of_heartbeating():
    """Its HELLO was lost (a link cut, then healed): the broker answers its heartbeats, so the
    client never fails over; it says HELLO again and learns the quota (found by the pair property
    test: the client stalled at a quota of one)."""
    c = ClientCore(("tcp://a:1",), "c", HB, 0.0)
    c.start(0.0)  # HELLO lost
    out = c.tick(0.25)
    assert out == [p.Hello(p.ROLE_CLIENT, "c", (), 0, 250, batch=p.MAX_BATCH, seq=2)]
    c.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()), 0.26)
    c.receive(WELCOME, 0.3)
    assert c.registered and [type(o) for o in c.tick(0.6)] == [p.Heartbeat]


def test_a_peer_configured_with_slower_heartbeats_beats_at_the_brokers_interval_from_its_welcome():
    """A Worker or Client made with heartbeat_s=10 against a broker of 0.25 s x 4: its first
    heartbeat was still due 10 s after connecting, so the broker took it for dead after 1 s: it
    requeued the worker's tasks (run twice) and stopped the client's requests (sent again)."""
    slow = HeartbeatSettings(10.0, 3)
    w = WorkerCore(("tcp://a:1",), ("echo",), 1, "w", slow, 0.0)
    c = ClientCore(("tcp://a:1",), "c", slow, 0.0)
    for m in (w, c):
        m.start(0.0)
        m.receive(WELCOME, 0.1)
        assert [type(o) for o in m.tick(0.24)] == []
        assert [type(o) for o in m.tick(0.25)] == [p.Heartbeat]  # within the broker's ttl of 1 s
        assert m.tick(0.49) == [] and [type(o) for o in m.tick(0.5)] == [p.Heartbeat]
    fast = HeartbeatSettings(0.1, 3)  # a faster one of its own beats once early, then at the broker's
    w = WorkerCore(("tcp://a:1",), ("echo",), 1, "w", fast, 0.0)
    w.start(0.0)
    w.receive(WELCOME, 0.05)
    assert [type(o) for o in w.tick(0.1)] == [p.Heartbeat]
    assert w.tick(0.34) == [] and [type(o) for o in w.tick(0.35)] == [p.Heartbeat]


def test_worker_drain_runs_tasks_in_transit_and_says_bye_after_the_broker_answered():
    w = worker()
    (ex1,) = w.receive(task(1), 0.0)
    assert w.drain(0.1, timeout_s=5) == [p.Credit(0), p.Heartbeat(p.ROLE_WORKER, "inc1", 1, (1,))]
    (ex2,) = w.receive(task(2), 0.1)  # sent before the broker saw CREDIT(0): run it, don't bounce it
    assert type(ex2) is Execute
    assert w.task_done(1, ex1.session, True, b"r", 0.2) == [p.Result(1, p.RS_OK, b"r")]
    assert w.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 2, ()), 0.3) == []  # answered; task 2 still runs
    out = w.task_done(2, ex2.session, True, b"s", 0.4)
    assert out == [p.Result(2, p.RS_OK, b"s"), p.Bye("drained"), Stopped("drained")]
    assert w.stopped and w.tick(9.0) == []


def test_worker_drain_ignores_the_answer_to_a_heartbeat_sent_before_credit_zero():
    w = worker()
    assert type(w.tick(0.25)[0]) is p.Heartbeat  # sent before the drain; its answer is still coming
    w.drain(0.3, timeout_s=5)
    assert w.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()), 0.31) == []  # the old answer
    (ex,) = w.receive(task(7), 0.32)  # dispatched before the broker saw CREDIT(0)
    assert w.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 7, ()), 0.33) == []  # drain answered, task runs
    assert w.task_done(7, ex.session, True, b"", 0.4)[-1] == Stopped("drained")


def test_worker_drain_with_nothing_in_flight_waits_only_for_the_broker_answer():
    w = worker()
    assert w.drain(0.0, timeout_s=5)[0] == p.Credit(0)
    assert not w.stopped
    out = w.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()), 0.01)
    assert out == [p.Bye("drained"), Stopped("drained")]


def test_worker_drain_timeout():
    w = worker()
    w.receive(task(1), 0.0)
    w.drain(0.0, timeout_s=2.0)
    assert w.next_deadline() is not None
    out = w.tick(2.0)
    assert type(out[-1]) is Stopped and "timed out" in out[-1].reason


def test_worker_reconnect_command_registers_again():
    w = worker()
    hello = p.Hello(p.ROLE_WORKER, "w", ("echo",), 2, 250, batch=p.MAX_BATCH, seq=2)
    assert w.receive(p.Reconnect("who?"), 0.1) == [hello]
    assert not w.registered
    assert w.receive(task(1), 0.1) == []  # sent to the registration the HELLO replaces: requeued there
    assert w.counters["void_tasks"] == 1


def test_a_worker_not_welcomed_for_a_ttl_says_hello_again_and_takes_only_the_latest_welcome():
    """A HELLO lost while the broker kept the last session's registration (a link cut, healed):
    the broker answers heartbeats and sends tasks, so the worker never finds it silent. A ttl after
    its HELLO it says HELLO again (numbered; heartbeats until then). A WELCOME answering an earlier
    HELLO is ignored: the later one registers again, and the broker requeues what it sent between;
    a TASK that comes unregistered is dropped, not refused (a refusal would be counted against the
    registration that replaces it)."""
    w = worker()
    assert w.receive(p.Reconnect("who?"), 0.1) == [
        p.Hello(p.ROLE_WORKER, "w", ("echo",), 2, 250, batch=p.MAX_BATCH, seq=2)
    ]
    for t in (0.35, 0.6, 0.85):  # answered (the broker lives), not welcomed: heartbeats for a ttl
        assert w.tick(t) == [p.Heartbeat(p.ROLE_WORKER, "", 0, ())]
        w.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()), t)
    assert w.receive(task(1), 0.9) == [] and w.counters["void_tasks"] == 1
    assert w.tick(1.1) == [p.Hello(p.ROLE_WORKER, "w", ("echo",), 2, 250, batch=p.MAX_BATCH, seq=3)]
    assert w.counters["hellos_again"] == 1 and w.counters["failovers"] == 0
    assert w.receive(p.Welcome("b", "inc1", 250, 4, hello=2), 1.15) == [] and not w.registered
    assert w.receive(task(2), 1.15) == []  # sent to the registration HELLO 3 replaces
    assert w.receive(p.Welcome("b", "inc1", 250, 4, hello=3), 1.2) == [] and w.registered
    (ex,) = w.receive(task(3), 1.2)
    assert type(ex) is Execute and w.tick(1.35) == [p.Heartbeat(p.ROLE_WORKER, "inc1", 3, (3,))]


def client():
    c = ClientCore(("tcp://a:1", "tcp://b:1"), "c", HB, 0.0)
    out = c.start(0.0)
    assert type(out[0]) is Connect and type(out[1]) is p.Hello
    c.receive(WELCOME, 0.0)
    return c


def test_a_burst_before_the_first_welcome_sends_one_then_the_quota_welcome_says():
    """The quota is not known until WELCOME: one request goes at once (every quota allows one),
    the rest wait; WELCOME's quota of 50 then lets 49 more go. (Sending the burst on a guess made a
    client trip its own quota when a broker's is below the default.)"""
    c = ClientCore(("tcp://a:1",), "c", HB, 0.0)
    c.start(0.0)
    sent = [o for i in range(1, 101) for o in c.submit(i, "echo", b"v", 5.0, 0.0) if type(o) is p.Request]
    assert [r.rid for r in sent] == [1]
    out = c.receive(p.Welcome("b", "inc1", 250, 4, 0, "", 50), 0.01)
    assert [r.rid for r in out if type(r) is p.Request] == list(range(2, 51))
    assert c.sent == 50 and len(c.waiting) == 50


def test_a_client_leaving_cancels_what_its_broker_holds_and_nothing_it_kept():
    """Close: the broker's requests are cancelled at once (it stopped them only after the client's
    silence passed its ttl, logging it gone); what the client kept back was never sent. The broker
    that registered it is told BYE last (it forgets the client at once); one that did not, not."""
    c = ClientCore(("tcp://a:1",), "c", HB, 0.0)
    c.start(0.0)
    c.receive(p.Welcome("b", "inc1", 250, 4, 0, "", 2), 0.0)  # a quota of 2: the third waits here
    for rid in (1, 2, 3):
        c.submit(rid, "echo", b"v", 5.0, 0.0)
    c.receive(p.Reply(1, p.ST_OK, "", b"r"), 0.1)  # 3 goes in its place
    assert c.leave() == [p.Cancel(2), p.Cancel(3), p.Bye("client closed")]
    assert not c.pending and not c.waiting and c.sent == 0 and c.leave() == []
    c = ClientCore(("tcp://a:1",), "c", HB, 0.0)
    c.start(0.0)
    c.submit(1, "echo", b"v", 5.0, 0.0)
    c.submit(2, "echo", b"v", 5.0, 0.0)  # not welcomed: one goes ahead, the other is kept
    assert c.leave() == [p.Cancel(1)]


def test_client_request_budget_undercuts_deadline_and_reply_completes_once():
    c = client()
    (req,) = c.submit(1, "echo", b"v", 2.0, 0.0)
    assert req == p.Request(1, "echo", 1950, (), b"v")
    assert c.receive(p.Reply(1, p.ST_OK, "", b"r"), 0.1) == [Completed(1, p.ST_OK, "", b"r")]
    assert c.receive(p.Reply(1, p.ST_OK, "", b"r"), 0.1) == []
    assert c.counters["duplicates"] == 1


def test_client_local_timeout_at_deadline():
    c = client()
    c.submit(1, "echo", b"v", 0.5, 0.0)
    assert c.next_deadline() <= 0.25
    c.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()), 0.4)
    assert [o for o in c.tick(0.49) if type(o) is Completed] == []
    (done,) = [o for o in c.tick(0.5) if type(o) is Completed]
    assert done.status == p.ST_TIMEOUT and "before the deadline" in done.message


def test_a_request_that_waited_for_a_welcome_past_its_deadline_says_so():
    """Sent away (BYE) and never welcomed by the next broker: the timeout said "the client had as
    many open as its broker allows" of a client with one request open."""
    c = client()
    c.submit(1, "echo", b"v", 2.0, 0.0)
    c.receive(p.Bye("broker shutting down", "b"), 0.5)  # taken back: it goes at the next WELCOME
    (done,) = [o for o in tick_until(c, 2.0) if type(o) is Completed]
    assert done.status == p.ST_TIMEOUT
    assert "waiting here: the broker at tcp://" in done.message
    assert "has not welcomed this client since it failed over" in done.message


def test_client_resends_pending_with_same_rid_when_broker_restarted():
    c = client()
    c.submit(1, "echo", b"v", 5.0, 0.0)
    c.submit(2, "echo", b"w", 5.0, 0.0)
    c.receive(p.Reply(2, p.ST_OK, "", b""), 0.1)
    out = c.receive(p.Heartbeat(p.ROLE_BROKER, "inc2", 0, ()), 1.0)
    assert out == [p.Request(1, "echo", 4000, (), b"v")]
    assert c.counters["broker_restarts"] == 1


def test_client_fails_over_to_next_endpoint_and_resends():
    c = client()
    c.submit(1, "echo", b"v", 5.0, 0.0)
    for t in (0.25, 0.5, 0.75, 1.0):
        c.tick(t)
    out = c.tick(1.0 + EPSILON)
    assert out[0] == Connect("tcp://b:1", out[0].reason) and "silent" in out[0].reason
    assert [type(o) for o in out] == [Connect, p.Hello]  # sent again once b's WELCOME says its quota
    (again,) = c.receive(p.Welcome("b", "inc2", 250, 4), 1.1)
    assert again.rid == 1 and again.budget_ms == 3900 and c.counters["resent"] == 1


def test_a_request_over_the_limit_of_the_broker_failed_over_to_ends_invalid_instead_of_going_again():
    """A failover to a broker with a smaller --max-message-size (a pair or a list whose limits
    differ: a rolling change of them): a request sent again over its limit was refused, or over
    twice it dropped by libzmq with the connection and whatever followed it, and timed out. What
    the broker had goes again once its WELCOME has said its limit (and quota), and what that
    limit refuses ends at once, saying so; a status request goes at once (a passive broker
    answers it, and sends no WELCOME)."""
    c = client()
    c.receive(p.Welcome("a", "inc1", 250, 4, 0, "", 10, 100_000), 0.0)
    c.submit(1, "echo", b"x" * 50_000, 30.0, 0.0)
    c.submit(2, "echo", b"v", 30.0, 0.0)
    c.submit(3, "echo", b"y" * 10_000, 30.0, 0.0)
    for t in (0.25, 0.5, 0.75, 1.0):
        c.tick(t)
    assert [type(o) for o in c.tick(1.0 + EPSILON)] == [Connect, p.Hello]
    assert c.submit(4, "echo", b"z" * 30_000, 30.0, 1.05) == [] and c.submit(5, "echo", b"s", 30.0, 1.05) == []
    assert c.submit(6, "zmqdist.status", b"", 30.0, 1.05) == []  # (not registered: it waits too)
    out = c.receive(p.Welcome("b", "inc2", 250, 4, 0, "", 10, 20_000), 1.1)
    assert [o.rid for o in out if type(o) is p.Request] == [2, 3, 5, 6]  # the older first
    ends = [o for o in out if type(o) is Completed]
    assert [(e.rid, e.status) for e in ends] == [(1, p.ST_INVALID), (4, p.ST_INVALID)]
    assert all("broker b's limit of 20000 bytes" in e.message for e in ends)
    assert c.sent == 4 and sorted(c.pending) == [2, 3, 5, 6] and c.counters["too_large"] == 2
    # and back to a: a status request goes with the HELLO, the rest at the WELCOME
    for t in (1.35, 1.6, 1.85, 2.1):
        c.tick(t)
    out = c.tick(2.1 + EPSILON)
    assert [o.rid for o in out if type(o) is p.Request] == [6]
    out = c.receive(p.Welcome("a", "inc1", 250, 4, 0, "", 10, 100_000), 2.2)
    assert [o.rid for o in out if type(o) is p.Request] == [2, 3, 5]


def test_after_a_failover_what_the_broker_had_goes_again_within_the_new_brokers_quota():
    """The broker failed over to takes fewer open requests per client: sent again all at once,
    the rest were refused Busy (380 of 500 in a simulation). They go within its quota now."""
    c = client()
    c.receive(p.Welcome("a", "inc1", 250, 4, 0, "", 1000, 100_000), 0.0)
    for rid in range(1, 501):
        c.submit(rid, "echo", b"v", 30.0, 0.0)
    assert c.sent == 500
    for t in (0.25, 0.5, 0.75, 1.0):
        c.tick(t)
    c.tick(1.0 + EPSILON)
    out = c.receive(p.Welcome("b", "inc2", 250, 4, 0, "", 100, 100_000), 1.1)
    assert [o.rid for o in out if type(o) is p.Request] == list(range(1, 101)) and c.sent == 100
    out = c.receive(p.Reply(1, p.ST_OK, "", b""), 1.2)
    assert [o.rid for o in out if type(o) is p.Request] == [101]


def test_a_busy_over_the_quota_for_a_request_sent_within_it_sends_it_again_instead_of_failing_it():
    """The broker's count of a client's open requests can pass the client's own: a request sent
    again after a failover crossed its reply (the broker takes it as new and runs it again), or a
    pair's new active broker holds copies. Each request that then met the quota ended Busy, though
    the client had paced itself to it (a property test of a proxy pair found it). It goes again,
    first; nothing more goes while as many are open as now, until the broker's next heartbeat."""
    c = client()
    c.receive(p.Welcome("b", "inc1", 250, 4, 0, "", 3), 0.0)
    for rid in (1, 2, 3, 4):
        c.submit(rid, "echo", b"v", 30.0, 0.0)
    assert c.sent == 3 and list(c.waiting) == [4]
    why = "this client has 3 requests open, its limit is 3"
    assert c.receive(p.Reply(3, p.ST_BUSY, why, p.OVER_QUOTA), 0.1) == []  # not the caller's failure
    assert c.sent == 2 and list(c.waiting) == [3, 4] and c.counters["over_quota"] == 1
    out = c.receive(p.Reply(1, p.ST_OK, "", b"r1"), 0.2)  # room at the broker: the refused one goes
    assert [type(o) for o in out] == [Completed, p.Request] and out[1].rid == 3 and c.sent == 2
    assert [o.rid for o in c.receive(p.Heartbeat(p.ROLE_CLIENT, "inc1", 0, ()), 0.25)] == [4]
    assert c.sent == 3
    # a Busy for another reason (a full queue) is still the caller's
    (done,) = c.receive(p.Reply(4, p.ST_BUSY, "broker b is busy", b""), 0.3)
    assert (done.rid, done.status) == (4, p.ST_BUSY)


def test_a_request_cancelled_or_expired_while_it_waits_to_go_again_is_cancelled_at_the_new_broker():
    """Taken back at a failover, waiting for the new broker's WELCOME: a pair's new active broker
    may hold a copy (its replicated table) and would run it; the CANCEL goes there too."""
    c = client()
    c.submit(1, "echo", b"v", 5.0, 0.0)
    c.submit(2, "echo", b"w", 1.6, 0.0)
    for t in (0.25, 0.5, 0.75, 1.0):
        c.tick(t)
    assert [type(o) for o in c.tick(1.0 + EPSILON)] == [Connect, p.Hello]
    assert c.cancel(1, 1.1) == [p.Cancel(1)] and c.sent == 0
    out = c.tick(1.6)
    assert p.Cancel(2) in out and [o.rid for o in out if type(o) is Completed] == [2]
    assert [o for o in c.receive(p.Welcome("b", "inc2", 250, 4), 1.7) if type(o) is p.Request] == []


def test_what_went_with_a_lost_hello_goes_again_when_the_broker_answers_a_later_one():
    """libzmq 4.3.5 drops what waits on a new socket whose connect fails with no route to the
    host (a cut link on the client's side): the HELLO and every request sent with it at the
    failover were lost, the HELLO said again a heartbeat later was answered, and the requests were
    never sent again (they timed out with the broker up and reachable). HELLOs are numbered on
    their connection and WELCOME says which it answers: the first WELCOME answering a later one
    brings every sent request once more; one answering the first (late, say the broker was not
    up yet and took it when it came) sends nothing twice."""
    c = client()
    c.submit(1, "echo", b"v", 30.0, 0.0)
    for t in (0.25, 0.5, 0.75, 1.0):
        c.tick(t)
    out = c.tick(1.0 + EPSILON)  # to b: its HELLO waits on a socket that loses it
    assert [type(o) for o in out] == [Connect, p.Hello] and out[1].seq == 1
    assert c.submit(2, "echo", b"w", 30.0, 1.1) == []  # after 1, at b's WELCOME
    (again,) = c.tick(1.3)  # not answered for a heartbeat: HELLO again
    assert type(again) is p.Hello and again.seq == 2
    out = c.receive(p.Welcome("b", "inc2", 250, 4, hello=2), 1.31)
    assert [o.rid for o in out if type(o) is p.Request] == [1, 2]
    assert c.counters["lost_hellos"] == 1 and c.counters["resent"] == 1
    assert c.receive(p.Welcome("b", "inc2", 250, 4, hello=3), 1.4) == []  # registered: nothing twice
    # The first HELLO answered late (after a second was said): nothing is sent twice.
    for t in (1.5, 1.75, 2.0, 2.25):
        c.tick(t)
    out = c.tick(2.4 + EPSILON)
    assert type(out[0]) is Connect and [o for o in out if type(o) is p.Request] == []  # at the WELCOME
    assert type(c.tick(2.66)[0]) is p.Hello
    out = c.receive(p.Welcome("a", "inc1", 250, 4, hello=1), 2.7)
    out += c.receive(p.Welcome("a", "inc1", 250, 4, hello=2), 2.7)
    assert [o.rid for o in out if type(o) is p.Request] == [1, 2] and c.counters["lost_hellos"] == 1


def test_a_broker_says_which_hello_its_welcome_answers():
    from zmqdist.core.broker import BrokerCore

    b = BrokerCore(BrokerSettings(name="b"), "inc", 0.0)
    hello = p.Hello(p.ROLE_CLIENT, "c", (), 0, 250, 0, 0)
    (welcome,) = [m for _, m in b.receive(b"c1", hello._replace(seq=3), 0.0) if type(m) is p.Welcome]
    assert welcome.hello == 3
    (welcome,) = [m for _, m in b.receive(b"c2", hello, 0.0) if type(m) is p.Welcome]
    assert welcome.hello == 0  # a client that does not number its HELLOs


def test_client_rejects_reused_rid_and_nonpositive_timeout():
    c = client()
    c.submit(1, "echo", b"", 1.0, 0.0)
    assert c.submit(1, "echo", b"", 1.0, 0.0)[0].status == p.ST_INVALID
    assert c.submit(2, "echo", b"", 0.0, 0.0)[0].status == p.ST_TIMEOUT


def test_a_handler_reads_time_left_on_the_clock_its_deadline_was_made_with():
    from zmqdist.context import RequestContext
    from zmqdist.testing import FakeClock

    clock = FakeClock(100.0)  # a worker's injected clock, far from time.monotonic()
    ctx = RequestContext("k", "echo", 1, 105.0, "", clock)
    assert ctx.remaining() == 5.0
    clock.advance(2.0)
    assert ctx.remaining() == 3.0


def test_a_request_no_broker_answered_since_it_was_made_ends_no_broker_not_timeout():
    from zmqdist.core.client import NO_BROKER

    c = ClientCore(("tcp://a:1", "tcp://b:1"), "c", HB, 0.0)
    c.start(0.0)
    c.submit(1, "echo", b"v", 0.5, 0.0)
    done = [o for o in tick_until(c, 0.5) if type(o) is Completed]
    assert [d.status for d in done] == [NO_BROKER] and "tcp://a:1, tcp://b:1" in done[0].message
    c.receive(WELCOME, 0.6)  # a broker answers
    c.submit(2, "echo", b"v", 0.5, 0.7)
    c.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()), 0.8)  # and is heard after the request was made
    done = [o for o in tick_until(c, 1.2) if type(o) is Completed]
    assert [d.status for d in done] == [p.ST_TIMEOUT] and "broker b" in done[0].message


def test_what_a_broker_can_make_a_peer_log_at_will_is_keyed_for_the_runtimes_rate_limit():
    """An ERROR, or a message a peer does not expect (a client or worker at a pair's --ha-bind
    gets one per message it sends), is a keyed Problem: the runtime logs at most a few per key."""
    w, c = worker(), client()
    for core in (w, c):
        refused = core.receive(p.Error(p.E_COMMAND, "this is the pair link of broker A"), 0.1)
        unexpected = core.receive(p.PairState("A", 1, 1, 5, "inc", 0, 0), 0.1)
        assert [(o.key, o.message) for o in refused + unexpected] == [
            ("broker-input", "broker refused a message: this is the pair link of broker A"),
            ("broker-input", "unexpected PairState from broker ignored"),
        ]


def test_a_handler_that_has_not_returned_stuck_s_after_it_was_stopped_is_said_once():
    """A handler that ignores its stop keeps its slot; the worker said nothing of it (it served
    less and less, and the broker only saw it busy). Now each is logged once, STUCK_S after its
    stop, with its service, why it was stopped, how many slots are held so, and the way out; one
    that returned in time, or was not stopped, is not."""
    from zmqdist.core.worker import STUCK_S

    def stuck_problems(out):
        return [o for o in out if type(o) is Problem and o.key == "stuck"]

    w = worker(concurrency=3)
    hb = HB.heartbeat_s
    (a,) = w.receive(task(1, budget_ms=500), 0.0)  # its deadline passes; it never returns
    (b,) = w.receive(task(2, budget_ms=60_000), 0.0)  # cancelled by its caller; returns in time
    w.receive(task(3, budget_ms=60_000), 0.0)  # runs long, never stopped: not stuck
    assert w.receive(p.Cancel(2), 0.1) == [Abort(2, b.session, "cancelled by its caller")]
    assert [o for o in w.tick(0.5) if type(o) is Abort] == [Abort(1, a.session, "its deadline passed")]
    assert w.next_deadline() <= 0.1 + STUCK_S
    w.task_done(2, b.session, False, b"", 0.1 + STUCK_S - 0.01)  # returned just in time
    out, now = [], 0.5
    while now < 0.5 + 3 * STUCK_S:  # the worker's ticks (heartbeats answered by the broker)
        now += hb
        w.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()), now)
        out += w.tick(now)
    (said,) = stuck_problems(out)
    assert "'echo' has not returned 10 s after it was told to stop (its deadline passed)" in said.message
    assert "1 of 3 slots are held so" in said.message and "terminate_on_cancel" in said.message
    assert w.counters["stuck"] == 1
    assert w.task_done(1, a.session, False, b"", now) != []  # when it returns at last, its slot frees


def test_a_worker_paused_itself_does_not_count_the_pause_as_a_stopped_handlers_time():
    """The worker was stopped (SIGSTOP, a stalled host) right after it told a handler to stop: the
    handler had no time to return. Its STUCK_S counts only time the worker ran (as its broker's
    silence does): no warning at the resume, one STUCK_S of running later if it still runs."""
    from zmqdist.core.worker import STUCK_S

    w = worker()
    (a,) = w.receive(task(1, budget_ms=60_000), 0.0)
    assert w.receive(p.Cancel(1), 0.1) == [Abort(1, a.session, "cancelled by its caller")]
    w.resumed(30.0, 30.2)  # stopped from 0.2 to 30.2
    w.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()), 30.2)
    assert not [o for o in w.tick(30.2) if type(o) is Problem and o.key == "stuck"]
    assert w.next_deadline() <= 30.1 + STUCK_S
    w.receive(p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()), 30.1 + STUCK_S)
    assert [o.key for o in w.tick(30.1 + STUCK_S) if type(o) is Problem] == ["stuck"]
