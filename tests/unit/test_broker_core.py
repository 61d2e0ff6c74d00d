"""The broker machine, driven with plain numbers for time."""

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings, HeartbeatSettings
from zmqdist.core.broker import EPSILON, FORGET_EVERY_TTLS, GONE_SILENT, BrokerCore
from zmqdist.core.records import LOG
from zmqdist.errors import RemoteProtocolError

HB = HeartbeatSettings(heartbeat_s=0.25, liveness=4)  # ttl 1.0 s


def make(**kw):
    return BrokerCore(BrokerSettings(name="b", heartbeat_s=HB.heartbeat_s, liveness=HB.liveness, **kw), "inc1", now=0.0)


def hello(core, ident, capacity=1, services=("echo",), now=0.0):
    out = core.receive(ident, p.Hello(p.ROLE_WORKER, ident.decode(), services, capacity, 250), now)
    welcome = out[0][1]
    assert out[0][0] == ident and welcome[:4] == ("b", "inc1", 250, 4)
    assert welcome.quota == core.settings.max_client_inflight and welcome.max_message == core.settings.max_message_size
    return out[1:]


def request(core, rid, service="echo", budget_ms=5000, client=b"C", now=0.0, payload=b"x"):
    return core.receive(client, p.Request(rid, service, budget_ms, (), payload), now)


def tasks(out):
    return [(peer, m) for peer, m in out if type(m) is p.Task]


def replies(out):
    return [m for _, m in out if type(m) is p.Reply]


def test_least_loaded_by_free_fraction_then_least_recently_used():
    core = make()
    hello(core, b"A", capacity=2)
    hello(core, b"B", capacity=4)
    order = [tasks(request(core, i))[0][0] for i in range(6)]
    # loads: A 0/2, B 0/4 tie -> A (registered first, never used, lower serial) ... always least loaded
    assert order == [b"A", b"B", b"B", b"A", b"B", b"B"]
    assert core.worker_load() == {b"A": (2, 2), b"B": (4, 4)}
    # full: the next request queues
    assert tasks(request(core, 6)) == [] and core.queued == 1


def test_lru_breaks_ties():
    core = make()
    for w in (b"A", b"B", b"C"):
        hello(core, w, capacity=10)
    first = [tasks(request(core, i))[0][0] for i in range(3)]
    assert sorted(first) == [b"A", b"B", b"C"]
    # All at 1/10: the one used longest ago goes next.
    assert tasks(request(core, 3))[0][0] == first[0]


def test_capacity_is_never_exceeded_and_result_frees_a_slot():
    core = make()
    hello(core, b"A", capacity=1)
    ((peer, t1),) = tasks(request(core, 1))
    assert tasks(request(core, 2)) == []
    out = core.receive(b"A", p.Result(t1.ticket, p.RS_OK, b"r1"), 0.1)
    assert replies(out) == [p.Reply(1, p.ST_OK, "", b"r1")]
    ((peer, t2),) = tasks(out)
    assert peer == b"A" and t2.attempt == 1
    assert core.worker_load()[b"A"] == (1, 1)


def test_task_carries_remaining_budget_and_stable_key():
    core = make()
    request(core, 5, budget_ms=2000, now=0.0)
    out = hello(core, b"A", now=0.5)
    ((_, t),) = tasks(out)
    assert t.budget_ms == 1500
    assert t.key == f"{b'C'.hex()}:5"


def test_the_default_key_is_the_clients_identity_and_rid():
    """Each request without a caller key gets "<client hex>:<rid>" (stable across brokers and
    resends), made in C when compiled and in Python otherwise, alike (test_heads checks C's at
    every edge); a request from no peer (handed down by an upstream) keys as ":<rid>"."""
    assert p.default_key(b"", 5) == ":5"
    core = make()
    hello(core, b"A", capacity=2)
    ((_, t1),) = tasks(request(core, 7, client=b"\x00\xff"))
    ((_, t2),) = tasks(request(core, 8, client=b"\x00\xff"))
    assert (t1.key, t2.key) == ("00ff:7", "00ff:8")


def test_worker_alive_at_ttl_and_expired_just_past_it():
    core = make()
    hello(core, b"A", now=0.0)
    assert core.next_deadline() == pytest.approx(1.0 + EPSILON)
    assert core.tick(1.0) == [] and b"A" in core.worker_load()
    core.tick(1.0 + EPSILON)
    assert b"A" not in core.worker_load()
    assert core.counters.workers_expired == 1


def test_a_broker_stopped_past_the_ttl_judges_its_members_silence_only_from_its_resume():
    """SIGSTOP of the broker for 2.5 s: its members sent nothing it could read (a cut link, or
    heartbeats its loop reads after its first tick), so the stop proves nothing of them. Expired at
    once on resuming, a worker's runs were requeued with an attempt spent and ran twice (found while
    trying to lose a worker's HELLO with real processes: the broker expired the worker first)."""
    core = make()
    hello(core, b"A", now=0.0)
    hello(core, b"B", now=0.0)
    ((holder, t),) = tasks(request(core, 1))
    core.resumed(2.5, 2.5)
    assert core.tick(2.5) == [] and set(core.worker_load()) == {b"A", b"B"}
    assert core.next_deadline() == pytest.approx(3.5 + EPSILON)
    core.receive(b"A", p.Heartbeat(p.ROLE_WORKER, "inc1", 0, (t.ticket,) if holder == b"A" else ()), 3.0)
    assert core.tick(3.5) == [] and core.counters.workers_expired == 0
    core.tick(3.5 + EPSILON)  # B, silent a ttl after the resume: it is gone
    assert set(core.worker_load()) == {b"A"} and core.counters.workers_expired == 1


def test_a_broker_paused_again_and_again_still_finds_a_dead_worker_gone_and_runs_its_task_elsewhere():
    """Pauses of the broker's own more often than once a ttl (a host stalled every half second, a
    starved thread). Silence once counted from the last resume: a dead worker never reached its
    ttl, kept its task for good, and the caller waited out its budget. Silence now counts the time
    the broker ran, so the dead one goes after a ttl of it, and so does a silent client's run."""
    core = make()
    hello(core, b"A")  # dies now with its task
    hello(core, b"B", capacity=2)  # lives, and has room for A's task while it runs P's
    core.receive(b"P", p.Hello(p.ROLE_CLIENT, "p", (), 0, 250), 0.0)  # dies too, with a run open at B
    ((dead, t),) = tasks(request(core, 1, budget_ms=600_000))
    ((live, _),) = tasks(request(core, 1, client=b"P", budget_ms=600_000))
    assert (dead, live) == (b"A", b"B")
    now, moved_at, stopped_at, stops = 0.0, None, None, 0
    while now < 20.0 and (moved_at is None or stopped_at is None):
        now = round(now + 0.3, 6)
        core.resumed(0.3, now)  # stopped 0.3 s, then runs 0.3 s: the live worker and client C beat
        stops += 1
        for _ in range(3):
            core.receive(live, p.Heartbeat(p.ROLE_WORKER, "inc1", 0, ()), now)
            core.receive(b"C", p.Heartbeat(p.ROLE_CLIENT, "", 0, ()), now)
            out = core.tick(now)
            if moved_at is None and [m for peer, m in tasks(out) if m.ticket == t.ticket]:
                moved_at = now
            if stopped_at is None and core.counters.abandoned:
                stopped_at = now
            now = round(now + 0.1, 6)
    # 1 s (the ttl) of silence while the broker ran (its 0.3-s runs from 0.3 on): in its fourth run.
    assert moved_at is not None and 2.1 <= moved_at <= 2.3, moved_at
    assert core.counters.workers_expired == 1 and dead not in core.worker_load()
    assert stopped_at is not None and 2.1 <= stopped_at <= 2.3, stopped_at  # P's run (rule 4)
    assert (core.counters.pauses, core.counters.paused_ms) == (stops, 300 * stops) and stops == 4  # for operators


def test_a_broker_paused_in_its_grace_after_a_takeover_still_gives_the_members_the_whole_grace():
    """After a takeover, a request the old active broker had sent to member X waits a grace (a ttl
    and a heartbeat) for X to register here and carry it over. A pause of the new active broker's
    own during the grace (a stalled host) used it up: the request was requeued as X's HELLO, sent
    in that time, waited to be read, and X ran it twice. The grace now lasts its length of time
    the broker ran."""
    from zmqdist.core.records import Copy

    core = make()
    core.restore({7: Copy(p.OpAccepted(7, b"N", 1, "echo", 60.0, (), "", "", 1, b"v"), member=b"X")}, 0.0)
    core.tick(0.5)
    core.resumed(2.0, 2.5)  # stopped from 0.5 to 2.5: the grace (to 1.25) had 0.75 s left
    core.tick(2.5)
    out = hello(core, b"X", now=2.6)  # its HELLO, read after the resume: it carries ticket 7
    assert tasks(out) == [] and core.counters.adopted == 1
    out = core.receive(b"X", p.Result(7, p.RS_OK, b"r"), 2.7)
    assert replies(out) == [p.Reply(1, p.ST_OK, "", b"r")] and core.counters.requeues == 0
    # Without the member, the grace ends its length of running time later: at 1.25 + 2.0.
    core = make()
    core.restore({7: Copy(p.OpAccepted(7, b"N", 1, "echo", 60.0, (), "", "", 1, b"v"), member=b"X")}, 0.0)
    core.resumed(2.0, 2.5)
    hello(core, b"Y", now=2.5)
    assert tasks(core.tick(3.24)) == []
    ((peer, task),) = tasks(core.tick(3.25))
    assert peer == b"Y" and task.ticket == 7


def test_pauses_move_a_silence_on_by_the_time_not_run_after_it():
    """The arithmetic of :class:`Pauses`: a spell before ``seen`` counts nothing, one ``seen``
    falls in counts its part after it, overlapping reports are clipped, old ones dropped."""
    from zmqdist.core.link import PAUSES_KEPT, Pauses

    pauses = Pauses()
    assert pauses.since(5.0) == 5.0
    pauses.note(2.0, 4.0)  # not run from 2 to 4
    pauses.note(1.0, 7.0)  # from 6 to 7
    assert pauses.since(1.0) == 4.0 and pauses.since(3.0) == 5.0 and pauses.since(4.0) == 5.0
    assert pauses.since(6.5) == 7.0 and pauses.since(7.0) == 7.0
    pauses.note(3.0, 8.0)  # said again, overlapping the last: only 7 to 8 is new
    assert pauses.spells[-1] == (8.0, 1.0) and pauses.since(1.0) == 5.0
    pauses.note(0.5, 8.0)  # nothing new
    assert len(pauses.spells) == 3
    for i in range(PAUSES_KEPT):
        pauses.note(0.5, 9.0 + i)
    assert len(pauses.spells) == PAUSES_KEPT and pauses.spells[0][0] == 9.0
    assert pauses.since(8.5) == 8.5 + PAUSES_KEPT * 0.5  # only the spells kept count


def test_any_message_counts_as_a_sign_of_life():
    core = make()
    hello(core, b"A", now=0.0)
    core.receive(b"A", p.Heartbeat(p.ROLE_WORKER, "inc1", 0, ()), 0.9)
    core.tick(1.5)
    assert b"A" in core.worker_load()
    core.tick(1.9 + 2 * EPSILON)
    assert b"A" not in core.worker_load()


def test_dead_worker_requests_are_requeued_to_live_workers_with_attempt_spent():
    core = make()
    hello(core, b"A")
    ((_, t),) = tasks(request(core, 1))
    hello(core, b"B", now=0.5)
    core.receive(b"B", p.Heartbeat(p.ROLE_WORKER, "inc1", 0, ()), 1.0)
    out = core.tick(1.0 + 2 * EPSILON)
    ((peer, t2),) = tasks(out)
    assert peer == b"B" and t2.ticket == t.ticket and t2.attempt == 2
    assert core.counters.requeues == 1


def test_attempt_cap_gives_worker_lost():
    core = make(max_attempts=2)
    hello(core, b"A")
    request(core, 1)
    now = 0.0
    for w in (b"B",):
        core.tick(now + 1.0 + 2 * EPSILON)  # A dies, request requeued (attempt 1 spent)
        now += 1.0 + 2 * EPSILON
        hello(core, w, now=now)
    out = core.tick(now + 1.0 + 2 * EPSILON)  # B dies holding it: attempt 2 = cap
    (r,) = replies(out)
    assert r.rid == 1 and r.status == p.ST_LOST and "attempt cap 2" in r.message
    assert core.open_requests == 0


def test_queued_request_times_out_at_deadline_and_is_never_dispatched():
    core = make()
    request(core, 1, budget_ms=300)
    assert core.next_deadline() == pytest.approx(0.3)
    assert core.tick(0.299) == []
    (r,) = replies(core.tick(0.3))
    assert r.status == p.ST_TIMEOUT and "no worker for service 'echo' was registered" in r.message
    assert tasks(hello(core, b"A", now=0.31)) == []


def test_expired_request_is_not_dispatched_when_a_slot_frees_late():
    core = make()
    hello(core, b"A")
    ((_, t),) = tasks(request(core, 1, budget_ms=10_000))
    request(core, 2, budget_ms=100)
    out = core.receive(b"A", p.Result(t.ticket, p.RS_OK, b""), 0.1)  # exactly at request 2's deadline
    assert tasks(out) == []
    assert [r.status for r in replies(out)] == [p.ST_OK, p.ST_TIMEOUT]
    assert "busy" in replies(out)[1].message


def test_spent_budget_is_refused_at_once():
    core = make()
    (r,) = replies(request(core, 1, budget_ms=0))
    assert r.status == p.ST_TIMEOUT


def test_full_queue_answers_busy_at_once():
    core = make(max_queue=3)
    for i in range(3):
        assert request(core, i) == []
    (r,) = replies(request(core, 3))
    assert r.status == p.ST_BUSY and "busy" in r.message
    assert core.counters.busy == 1


def test_queue_bytes_bound():
    core = make(max_queue_bytes=10)
    assert request(core, 1, payload=b"x" * 8) == []
    (r,) = replies(request(core, 2, payload=b"x" * 8))
    assert r.status == p.ST_BUSY


def test_duplicate_request_in_progress_is_absorbed():
    core = make()
    hello(core, b"A")
    request(core, 1)
    assert request(core, 1) == []
    assert core.counters.duplicates == 1
    request(core, 1, client=b"D")  # the same rid from another client is another request
    assert core.open_requests == 2 and core.counters.duplicates == 1


def test_one_reply_even_if_former_holder_and_new_holder_both_answer():
    core = make()
    hello(core, b"A")
    ((_, t),) = tasks(request(core, 1))
    hello(core, b"B", now=0.9)
    core.tick(1.0 + 2 * EPSILON)  # A expired, task requeued to B
    assert core.worker_load()[b"B"] == (1, 1)
    out = core.receive(b"A", p.Result(t.ticket, p.RS_OK, b"from A"), 1.1)
    assert replies(out) == [p.Reply(1, p.ST_OK, "", b"from A")]
    assert (b"A", p.Reconnect("unknown worker: register again")) in out
    assert core.worker_load()[b"B"] == (1, 1)  # B still runs it: its slot stays taken
    out = core.receive(b"B", p.Result(t.ticket, p.RS_OK, b"from B"), 1.2)
    assert replies(out) == [] and core.counters.late_results == 1
    assert core.worker_load()[b"B"] == (0, 1)


def test_a_refused_task_is_requeued_unspent_and_its_worker_counted_full_until_it_says_its_room():
    """A worker refuses a task only when it is full by its own count: offered it again at once, it
    refuses again, round after round (a property test found a broker and a worker doing that
    690,000 times). Its refusal holds until its CREDIT or HELLO."""
    core = make()
    hello(core, b"A", capacity=2)
    ((_, t),) = tasks(request(core, 1))
    out = core.receive(b"A", p.Result(t.ticket, p.RS_REFUSED, b""), 0.1)
    assert tasks(out) == [] and core.counters.refused == 1
    assert tasks(request(core, 2, now=0.2)) == []  # A is counted full: both wait
    ((peer, t1),) = tasks(hello(core, b"B", now=0.3))  # the refused one first, no attempt spent
    assert (peer, t1.ticket, t1.attempt) == (b"B", t.ticket, 1)
    ((peer, t2),) = tasks(core.receive(b"A", p.Credit(2), 0.4))  # A says its room again
    assert peer == b"A" and t2.ticket != t.ticket and core.open_requests == 2
    # A refusal from a worker that does not hold the ticket (it went elsewhere) changes nothing.
    assert core.receive(b"A", p.Result(t.ticket, p.RS_REFUSED, b""), 0.5) == []
    assert core.counters.refused == 1 and core.worker_load()[b"A"] == (1, 2)


def test_result_for_a_ticket_never_given_is_bogus():
    core = make()
    hello(core, b"A")
    hello(core, b"B")
    ((peer, t),) = tasks(request(core, 1))
    other = b"B" if peer == b"A" else b"A"
    assert core.receive(other, p.Result(t.ticket, p.RS_OK, b""), 0.1) == []
    assert core.counters.bogus_results == 1 and core.open_requests == 1


def test_unknown_worker_heartbeat_gets_reconnect_and_client_gets_pong():
    core = make()
    assert core.receive(b"W", p.Heartbeat(p.ROLE_WORKER, "", 0, ()), 0) == [
        (b"W", p.Reconnect("unknown worker: register again"))
    ]
    assert core.receive(b"C", p.Heartbeat(p.ROLE_CLIENT, "", 0, ()), 0) == [
        (b"C", p.Heartbeat(p.ROLE_BROKER, "inc1", 0, ()))
    ]


def test_an_unknown_peer_is_told_reconnect_once_a_ttl_until_it_registers():
    """A broker back within a ttl finds a worker's heartbeats and results of the old session queued
    in its connection: one RECONNECT answers the lot (one for each made the worker register once
    per message, each registration requeuing what the one before had just been sent)."""
    core = make()
    ttl = core.settings.heartbeat.ttl_s
    hb = p.Heartbeat(p.ROLE_WORKER, "old", 0, ())
    told = (b"W", p.Reconnect("unknown worker: register again"))
    assert core.receive(b"W", hb, 1.0) == [told]
    assert core.receive(b"W", hb, 1.0) == []
    assert core.receive(b"W", p.Result(7, p.RS_OK, b"r"), 1.01) == []  # a late result: counted, not told
    assert core.receive(b"W", p.Credit(3), 1.02) == []
    assert core.receive(b"X", hb, 1.02) == [(b"X", told[1])]  # another peer is told on its own
    assert core.receive(b"W", hb, 1.0 + ttl + 0.01) == [told]  # a ttl later: the last one was lost
    hello(core, b"W", now=1.5 + ttl)
    core.receive(b"W", p.Bye("gone"), 1.6 + ttl)  # forgotten again at once...
    assert core.receive(b"W", hb, 1.6 + ttl) == [told]  # ...and told at once, not a ttl later


def test_credit_zero_drains_then_bye_requeues():
    core = make()
    hello(core, b"A", capacity=2)
    hello(core, b"B", capacity=2)
    core.receive(b"A", p.Credit(0), 0.0)
    assert {peer for peer, _ in (tasks(request(core, i))[0] for i in range(2))} == {b"B"}
    hello(core, b"C", capacity=1)
    ((_, _t),) = tasks(request(core, 9))
    out = core.receive(b"C", p.Bye("leaving"), 0.1)
    assert core.counters.workers_left == 1
    assert core.queued == 1 and tasks(out) == []  # A has no credit, B is full


def test_reserved_service_names_are_refused_and_status_answers():
    core = make()
    out = core.receive(b"A", p.Hello(p.ROLE_WORKER, "a", ("zmqdist.status",), 1, 250), 0)
    assert type(out[0][1]) is p.Error and "reserved" in out[0][1].message
    (r,) = replies(request(core, 1, service="zmqdist.status"))
    st = p.unpack_value(r.payload)
    assert r.status == p.ST_OK and st["broker"] == "b" and st["counters"]["requests"] == 1
    (r,) = replies(request(core, 2, service="zmqdist.nope"))
    assert r.status == p.ST_INVALID


def test_bad_input_through_the_door_is_answered_counted_and_logged():
    core = make()
    out = []
    head = p.HEAD_PREFIX[p.Request] + msgpack.packb([5, "", 100, []])  # an empty service name
    core.receive_frames(b"X", head, b"", 0.0, out)
    ((dest, r),) = [(d, m) for d, m in out if d is not LOG]
    assert dest == b"X" and r.rid == 5 and r.status == p.ST_INVALID and "service" in r.message
    assert [m.key for d, m in out if d is LOG] == ["bad-input"]
    out = []
    core.receive_frames(b"X", b"GET / HTTP/1.1", b"", 0.0, out)
    assert [m for d, m in out if d is not LOG] == [p.Error(p.E_VERSION, "not a zmqdist message (bad protocol tag)")]
    out = []
    core.bad_input(b"X", RemoteProtocolError("message has 1 frame, expected 2", p.E_FRAMES), b"", out)
    assert [m.code for d, m in out if d is not LOG] == [p.E_FRAMES]
    assert core.receive(b"X", p.Welcome("x", "y", 1, 1), 0)[0][1].code == p.E_COMMAND
    assert core.counters.bad_input == 4 and core.counters.invalid == 1


def test_unreachable_worker_is_dropped_and_its_task_requeued():
    core = make()
    hello(core, b"A")
    hello(core, b"B")
    ((peer, t),) = tasks(request(core, 1))
    out = core.send_failed(peer, t, 0.0)
    ((peer2, t2),) = tasks(out)
    assert peer2 != peer and t2.ticket == t.ticket and t2.attempt == 1


def test_a_stream_cut_by_its_unreachable_worker_says_how_many_held_it():
    """An unreachable worker spends no attempt: the message counted attempts and said "0 workers
    serving 'echo' died while holding it" (seen in the chaos soak)."""
    core = make()
    hello(core, b"A")
    ((peer, t),) = tasks(core.receive(b"C", p.Request(1, "echo", 5000, (), b"x", "", "", 4), 0.0))
    core.receive(peer, p.Part(t.ticket, 0, b"p0"), 0.1)
    (r,) = replies(core.send_failed(peer, t, 0.2))
    assert r.status == p.ST_INTERRUPTED
    why = "stream interrupted after 1 parts: 1 workers serving 'echo' lost while holding it (A unreachable)"
    assert r.message == why


def test_reregistration_voids_what_the_worker_held():
    core = make()
    hello(core, b"A")
    ((_, t),) = tasks(request(core, 1))
    out = hello(core, b"A", now=0.5)
    ((_, t2),) = tasks(out)
    assert t2.ticket == t.ticket and t2.attempt == 1  # not the worker's fault: no attempt spent


def test_unknown_service_pools_do_not_accumulate():
    core = make()
    for i in range(100):
        request(core, i, service=f"s{i}", budget_ms=10)
    core.tick(1.0)
    assert core.status(1.0)["services"] == {} and core.open_requests == 0


def test_deadline_heap_is_compacted():
    core = make()
    hello(core, b"A", capacity=1)
    ((_, t),) = tasks(request(core, 0))
    for i in range(1, 3000):
        request(core, i)
        out = core.receive(b"A", p.Result(t.ticket, p.RS_OK, b""), 0.0)
        ((_, t),) = tasks(out)
    assert len(core.d.deadlines) <= 2 * core.queued + 1024


def test_task_lost_in_transit_is_found_by_seq_and_requeued():
    core = make()
    hello(core, b"A", capacity=2)
    ((_, t1),) = tasks(request(core, 1))
    ((_, t2),) = tasks(request(core, 2))
    assert (t1.seq, t2.seq) == (1, 2)
    # The worker saw up to seq 1 and holds nothing: t1 was lost (or its result was); t2 may be in flight.
    out = core.receive(b"A", p.Heartbeat(p.ROLE_WORKER, "inc1", 1, ()), 0.1)
    assert out[0] == (b"A", p.Heartbeat(p.ROLE_BROKER, "inc1", 2, ()))
    ((_, again),) = tasks(out)
    assert again.ticket == t1.ticket and again.attempt == 1 and again.seq == 3
    assert core.counters.lost_in_transit == 1
    # Holding what it was sent: nothing is requeued.
    assert tasks(core.receive(b"A", p.Heartbeat(p.ROLE_WORKER, "inc1", 3, (t2.ticket, t1.ticket)), 0.2)) == []
    assert core.worker_load()[b"A"] == (2, 2)


def test_per_client_quota_answers_busy_and_frees_as_requests_end():
    core = make(max_client_inflight=2)
    hello(core, b"W", capacity=1)
    assert core.receive(b"A", p.Request(1, "echo", 1000, (), b""), 0)[0][1].ticket  # dispatched
    assert core.receive(b"A", p.Request(2, "echo", 1000, (), b""), 0) == []  # queued
    ((_, busy),) = core.receive(b"A", p.Request(3, "echo", 1000, (), b""), 0)
    assert busy.status == p.ST_BUSY and "limit is 2" in busy.message
    assert busy.payload == p.OVER_QUOTA  # the client tells it from a full broker's Busy
    assert core.receive(b"B", p.Request(1, "echo", 1000, (), b""), 0) == []  # another client is not affected
    out = core.receive(b"W", p.Result(1, p.RS_OK, b"r"), 0)
    assert (b"A", p.Reply(1, p.ST_OK, "", b"r")) in out
    assert core.receive(b"A", p.Request(4, "echo", 1000, (), b""), 0) == []  # a slot was freed
    assert core.counters.over_quota == 1


def test_downstream_brokers_are_exempt_from_the_client_quota():
    core = make(max_client_inflight=1)
    core.receive(b"P", p.Hello(p.ROLE_BROKER, "proxy", (), 0, 250), 0)
    for rid in range(1, 6):
        out = core.receive(b"P", p.Request(rid, "nosvc", 1000, ("proxy",), b""), 0)
        assert all(m.status != p.ST_BUSY for _, m in out if type(m) is p.Reply)
    assert core.open_requests == 5


def test_a_client_is_taken_for_gone_only_by_its_own_silence_never_by_the_brokers():
    """Lifecycle rule 4: a client's requests stop when it said HELLO or HEARTBEAT once and then
    nothing, neither beat nor request, past the ttl (1 s here), counted from the broker's own pause."""

    def run(core, t0, t1, beat=(), send=()):
        """Tick every 0.05 s; worker A and the clients in ``beat`` heartbeat, those in ``send``
        send a request each tick (as a peer that never heartbeats but keeps sending)."""
        out, t, rid = [], t0, 100
        while t <= t1 + 1e-9:
            core.receive(b"A", p.Heartbeat(p.ROLE_WORKER, "", 0, ()), t)
            for c in beat:
                out += core.receive(c, p.Heartbeat(p.ROLE_CLIENT, "", 0, ()), t)
            for c in send:
                rid += 1
                out += request(core, rid, client=c, now=t, budget_ms=60_000)
            out += core.tick(t)
            t = round(t + 0.05, 6)
        return out

    core = make()
    hello(core, b"A", capacity=1)  # it never answers: what it runs stays open
    core.receive(b"H", p.Hello(p.ROLE_CLIENT, "h", (), 0, 250), 0.0)
    core.receive(b"R", p.Hello(p.ROLE_CLIENT, "raw", (), 0, 250), 0.0)
    assert tasks(request(core, 1, client=b"H", budget_ms=60_000)) != []  # H's runs at A
    request(core, 2, client=b"H", budget_ms=60_000)
    request(core, 3, client=b"M", budget_ms=60_000)  # M never says HELLO (a Majordomo client)
    out = run(core, 0.0, 0.5, beat=[b"H"], send=[b"R"])
    out += run(core, 0.55, 1.55, send=[b"R"])  # H is silent from 0.5: past the ttl at 1.55
    assert [(peer, m) for peer, m in out if type(m) is p.Cancel] == [(b"A", p.Cancel(1))]  # H's run
    assert core.counters.abandoned == 2 and core.counters.cancelled == 0
    assert set(core.d.callers) == {b"R", b"M"}  # R keeps sending, M is not judged
    assert not replies(out) or all(m.status == p.ST_BUSY for m in replies(out))  # nothing told to H
    (back,) = core.receive(b"H", p.Heartbeat(p.ROLE_CLIENT, "", 0, ()), 1.6)
    assert back == (b"H", p.Reconnect(GONE_SILENT))  # it sends again what it still waits for
    assert core.receive(b"H", p.Heartbeat(p.ROLE_CLIENT, "", 0, ()), 1.7)[0][1] == core._pong  # told once
    # The broker itself stopped for 2.5 s (SIGSTOP): its clients' silence then proves nothing.
    core = make()
    hello(core, b"A", capacity=1)
    core.receive(b"P", p.Hello(p.ROLE_CLIENT, "p", (), 0, 250), 0.0)
    request(core, 1, client=b"P", budget_ms=60_000)
    run(core, 0.0, 0.5, beat=[b"P"])
    core.resumed(2.5, 3.0)
    out = run(core, 3.0, 3.9, beat=[])
    assert core.counters.abandoned == 0 and not [m for _, m in out if type(m) is p.Cancel]
    out = run(core, 4.0, 4.1)  # still silent a full ttl after the broker resumed: gone
    assert core.counters.abandoned == 1 and [m for _, m in out if type(m) is p.Cancel] == [p.Cancel(1)]


# --- the per-request fast path (receive_plain), on its own ------------------------------------


def frames(msg):
    return p.encode(msg)


def state(core):
    """What a refused fast-path attempt must leave untouched."""
    opened = {c: r.open for c, r in core.d.callers.items()}
    return core.counters.as_dict(), core.open_requests, core.queued, opened, core.d.next_ticket


def test_fast_path_takes_a_plain_request_and_dispatches_it_like_the_general_path():
    core = make()
    hello(core, b"A", capacity=1)
    out = []
    head, payload = frames(p.Request(1, "echo", 2000, (), b"x", "trace-1"))
    assert core.receive_plain(b"C", head, payload, 0.5, out)
    ((peer, task),) = tasks(out)
    assert peer == b"A" and task.budget_ms == 2000 and task.trace == "trace-1" and task.payload == b"x"
    assert core.counters.requests == 1 and core.open_requests == 1
    out = []  # the worker is full: the next one queues, on the fast path too
    assert core.receive_plain(b"C", *frames(p.Request(2, "echo", 2000, (), b"y")), 0.5, out)
    assert out == [] and core.queued == 1


@pytest.mark.parametrize(
    "msg, why",
    [
        (p.Request(1, "zmqdist.status", 100, (), b""), "internal service"),
        (p.Request(1, "echo", 100, ("up",), b""), "hops (from a proxy)"),
        (p.Credit(1), "not a request or result"),
    ],
)
def test_fast_path_leaves_internal_services_hops_and_other_commands_untouched(msg, why):
    core = make()
    hello(core, b"A")
    before = state(core)
    assert not core.receive_plain(b"C", *frames(msg), 0.0, out := []), why
    assert out == [] and state(core) == before


def twins(**kw):
    """Two brokers in the same state: one hit through the fast path, one through the general path."""
    cores = []
    for _ in range(2):
        core = make(**kw)
        hello(core, b"A", capacity=1)
        hello(core, b"B", capacity=1)
        request(core, 1)  # dispatched to A (registered first)
        request(core, 2, client=b"D")  # dispatched to B
        request(core, 3, client=b"F")  # queued: both workers are full
        cores.append(core)
    return cores


def both_ways(cores, peer, msg, now=0.1):
    fast, general = cores
    out_fast = []
    assert fast.receive_plain(peer, *frames(msg), now, out_fast)
    out_general = general.receive(peer, p.decode(*frames(msg)), now)
    assert out_fast == out_general
    assert state(fast) == state(general)
    return out_fast


@pytest.mark.parametrize(
    "peer, msg, what",
    [
        (b"C", p.Request(1, "echo", 1000, (), b""), "a duplicate is absorbed"),
        (b"C", p.Request(9, "echo", 0, (), b""), "budget spent: TIMEOUT"),
        (b"C", p.Request(9, "echo", 1000, (), b""), "over its quota: BUSY"),
        (b"E", p.Request(9, "echo", 1000, (), b""), "the queue is full: BUSY"),
        (b"A", p.Request(9, "other", 1000, (), b""), "from a member"),
    ],
)
def test_fast_path_admits_and_refuses_requests_exactly_as_the_general_path(peer, msg, what):
    out = both_ways(twins(max_client_inflight=1, max_queue=1), peer, msg)
    if "BUSY" in what or "TIMEOUT" in what:
        assert [m.status for m in replies(out)] == [p.ST_BUSY if "BUSY" in what else p.ST_TIMEOUT], what


@pytest.mark.parametrize(
    "peer, msg, what",
    [
        (b"A", lambda t: p.Result(t, p.RS_OK, b"r"), "the holder answers: a reply, the next task goes"),
        (b"A", lambda t: p.Result(t, p.RS_FAILED, b"err"), "the handler raised"),
        (b"A", lambda t: p.Result(t, p.RS_REFUSED, b""), "refused: requeued, no attempt spent"),
        (b"B", lambda t: p.Result(t, p.RS_OK, b"r"), "not its holder: bogus, ignored"),
        (b"A", lambda t: p.Result(t + 99, p.RS_OK, b"r"), "a ticket nobody holds: late"),
        (b"Z", lambda t: p.Result(t, p.RS_OK, b"r"), "not a member: register again"),
    ],
)
def test_fast_path_completes_results_exactly_as_the_general_path(peer, msg, what):
    cores = twins()
    ticket = min(cores[0].d.reqs)  # A holds the first request
    out = both_ways(cores, peer, msg(ticket))
    if what.startswith("the holder"):
        assert replies(out) == [p.Reply(1, p.ST_OK, "", b"r")] and len(tasks(out)) == 1
    if what.startswith("not a member"):
        assert [type(m) for _, m in out] == [p.Reconnect]


def test_a_service_nobody_serves_any_more_is_forgotten_after_its_grace():
    core = make(forget_service_s=60.0)
    hello(core, b"A", services=("short-lived", "echo"))
    hello(core, b"B", services=("echo",))
    core.receive(b"A", p.Bye("done"), 10.0)
    assert set(core.status(10.0)["services"]) == {"short-lived", "echo"}  # listed, with no worker
    assert core.status(10.0)["services"]["short-lived"]["workers"] == 0
    core.receive(b"B", p.Heartbeat(p.ROLE_WORKER, "inc1", 0, ()), 69.0)
    core.tick(69.9)
    assert "short-lived" in core.status(69.9)["services"]
    assert core.next_deadline() <= 70.0
    core.tick(70.0)
    assert set(core.status(70.0)["services"]) == {"echo"}  # forgotten; the served one stays
    hello(core, b"C", services=("again",), now=70.0)  # a worker that comes back in time keeps it
    core.receive(b"C", p.Bye("brief"), 71.0)
    hello(core, b"D", services=("again",), now=100.0)
    core.tick(131.5)
    assert "again" in core.status(131.5)["services"]


def test_the_forgetting_of_an_idle_service_is_done_at_the_time_next_deadline_names():
    """next_deadline said since + grace; the sweep asked now - since < grace, which rounding can
    keep true at that very time (5.0486749705520495 + 60 and back): a tick at the named time did
    nothing and named it again. The simulation spun on it (2,000,000 steps at one instant); a
    runtime spins until its clock has moved past the rounding."""
    core = make(forget_service_s=60.0)
    since = 5.0486749705520495
    hello(core, b"A", services=("short-lived",), now=since)
    core.receive(b"A", p.Bye("done"), since)
    assert (since + 60.0) - since < 60.0  # the rounding this test is about
    times = []
    while (t := core.next_deadline()) is not None and len(times) < 20:  # as a runtime's loop does
        times.append(t)
        core.tick(t)
    assert "short-lived" not in core.status(times[-1])["services"]
    assert times[-1] == since + 60.0 and len(set(times)) == len(times)  # no instant named twice


def test_a_workers_result_or_part_over_the_limit_ends_its_task_saying_so_and_frees_the_slot():
    """The runtime reads the head of a message over --max-message-size, not its payload. A RESULT
    (or a stream's PART) from a worker that does not check its results itself, as older ones do
    not, ends the task as a ResultTooLarge failure: the caller waited out its deadline."""
    core = make(max_message_size=1000)
    hello(core, b"W")
    ((_, t1),) = tasks(request(core, 1))
    out = []
    core.oversized(b"W", p.encode(p.Result(t1.ticket, p.RS_OK, b""))[0], 5000, 0.1, out)
    (reply,) = replies(out)
    kind, why, _ = p.unpack_error(reply.payload)
    assert (reply.rid, reply.status, kind) == (1, p.ST_FAILED, p.RESULT_TOO_LARGE)
    assert "the result from its worker" in why and "5000 bytes" in why and "limit of 1000 bytes" in why
    assert core.counters.bad_input == 1 and any(peer == LOG for peer, _ in out)
    # the slot is free: the next request goes to the same worker at once
    ((peer, t2),) = tasks(request(core, 2, now=0.2))
    assert peer == b"W"
    # a stream's part: its run is cancelled, the caller told after the parts that went before
    core.receive(b"W", p.Result(t2.ticket, p.RS_OK, p.pack_value(1)), 0.3)
    ((_, t3),) = tasks(core.receive(b"C", p.Request(3, "echo", 5000, (), b"x", "", "", 4), 0.4))
    assert core.receive(b"W", p.Part(t3.ticket, 0, b"p0"), 0.5) == [(b"C", p.Part(3, 0, b"p0"))]
    out = []
    core.oversized(b"W", p.encode(p.Part(t3.ticket, 1, b""))[0], 3000, 0.6, out)
    assert (b"W", p.Cancel(t3.ticket)) in out
    (reply,) = replies(out)
    assert (reply.status, reply.parts) == (p.ST_FAILED, 1)
    assert "part 2 of the stream" in p.unpack_error(reply.payload)[1]
    # anything else over the limit is bad input, answered with an ERROR; a request, INVALID
    out = []
    core.oversized(b"W", p.encode(p.Heartbeat(p.ROLE_WORKER, "", 0, ()))[0], 3000, 0.7, out)
    assert [type(m) for peer, m in out if peer == b"W"] == [p.Error]
    out = []
    core.oversized(b"C", p.encode(p.Request(9, "echo", 5000, ("up",), b""))[0], 3000, 0.7, out)
    assert [(m.rid, m.status) for m in replies(out)] == [(9, p.ST_INVALID)]


@pytest.mark.parametrize("services", [("busy", "quiet"), ("quiet", "busy")])
def test_a_busy_services_backlog_never_starves_a_quieter_one_served_by_the_same_workers(services):
    """A worker serving two services frees a slot: the request that has waited longest goes,
    whichever service it is for. Old code pumped the worker's services in their order, so a
    service listed first with a backlog kept every freed slot while the other's request waited
    (measured through a real broker: a single call waited 15 s behind two map clients)."""
    core = make()
    hello(core, b"W", capacity=1, services=services)
    rid = iter(range(1000))
    running = [tasks(request(core, next(rid), "busy"))[0][1]]
    for _ in range(2):
        request(core, next(rid), "busy")  # a backlog
    quiet = next(rid)
    request(core, quiet, "quiet")
    ran, answered = [], []
    for _ in range(6):  # each answer frees the slot; a new "busy" request keeps the backlog up
        task = running.pop()
        out = core.receive(b"W", p.Result(task.ticket, p.RS_OK, b"ok"), 0.1)
        out += request(core, next(rid), "busy", now=0.1)
        ran.append(task.service)
        answered += [r.rid for r in replies(out)]
        running += [m for _, m in tasks(out)]
    assert ran == ["busy", "busy", "busy", "quiet", "busy", "busy"]
    assert answered == [0, 1, 2, quiet, 4, 5]  # in order of arrival


def test_the_deadline_heap_of_a_proxy_with_thousands_forwarded_is_swept_now_and_then_not_at_every_push():
    """The sweep of dead entries ran once the heap passed twice the queue: a proxy's forwarded
    requests live in the heap but not in the queue, so past 1,024 of them every request rebuilt
    the whole heap. A proxy with thousands up spun at 100% CPU and went silent past its ttl
    (test_batches_stay_under_a_small_max_message_size_through_a_proxy timed out)."""
    from zmqdist.core.dispatch import Dispatcher
    from zmqdist.core.records import FORWARDED, Counters, Req

    d = Dispatcher(BrokerSettings(name="A"), Counters(), 0.0)
    heaps = 0
    for t in range(1, 5001):
        req = d.reqs[t] = Req(t, b"c", t, "echo", b"", 30.0 + t)
        req.state = FORWARDED
        before = d.deadlines.sweeps
        d.push_deadline(req)
        heaps += d.deadlines.sweeps != before
    assert len(d.deadlines) == 5000 and 1 <= heaps <= 3
    for t in range(1, 4001):  # answered: their entries are dead; the next sweep drops them
        del d.reqs[t]
    for t in range(5001, 12001):
        d.reqs[t] = Req(t, b"c", t, "echo", b"", 30.0 + t)
        d.push_deadline(d.reqs[t])
    assert len(d.deadlines) < 2 * len(d.reqs) + 1024 and min(t for _, t in d.deadlines) > 4000


def test_clients_silent_past_the_ttl_with_nothing_open_are_forgotten_with_their_batch_limits():
    """A closed or killed client stayed in the broker's tables (the clients heard, the batch limits)
    until they filled, at 2x and 4x --max-queue entries. Every FORGET_EVERY_TTLS ttls the broker
    forgets those silent past the ttl with nothing open; live ones and members stay, and after a
    pause of the broker's own, silence counts from its resume."""
    core = make()
    hello(core, b"W", capacity=1)
    core.note_batching(b"W", 16)  # a worker's batch limit: a member's, kept
    for c in (b"gone", b"live", b"holds"):
        assert core.receive(c, p.Hello(p.ROLE_CLIENT, "c", (), 0, 250, batch=16), 0.0)
        core.note_batching(c, 16)
    request(core, 1, client=b"holds", budget_ms=600_000, now=0.0)  # open at the worker
    every = FORGET_EVERY_TTLS * HB.ttl_s
    at = 0.0
    while at < every + 2 * HB.heartbeat_s:  # "live", "holds" and the worker beat; "gone" is silent
        at += HB.heartbeat_s
        for peer in (b"live", b"holds"):
            core.receive(peer, p.Heartbeat(p.ROLE_CLIENT, "", 0, ()), at)
        core.receive(b"W", p.Heartbeat(p.ROLE_WORKER, "", 0, ()), at)
        core.tick(at)
    assert set(core._clients) == {b"live", b"holds"}
    assert set(core.batching) == {b"W", b"live", b"holds"}
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= core._clients_pruned + every  # due without a member
    # The broker itself stops for 30 s: nobody's silence counts from before its resume.
    core.receive(b"gone", p.Hello(p.ROLE_CLIENT, "c", (), 0, 250, batch=16), at)
    core.note_batching(b"gone", 16)
    core.resumed(30.0, at + 30.0)
    core.tick(at + 30.5)
    assert set(core._clients) == {b"live", b"holds", b"gone"}
    core.tick(at + 30.5 + every)  # all silent past the ttl since: "holds" lost its request first
    assert core._clients == {} and b"W" not in core.d.members  # the worker, silent too, expired
    assert core.batching == {}  # and its limit went with it
    assert core.counters.abandoned == 1


def test_the_forgetting_deadline_moves_on_once_it_is_due_whatever_the_rounding():
    """next_deadline() offers the next forgetting at pruned + 10 ttls; tick() at that moment must
    do it. Compared as ``now - pruned >= 10 ttls``, 23.44 - 13.44 came out below 10.0, the
    forgetting never ran, and the broker (here the simulations) turned at the same time for ever."""
    core = make()
    core.receive(b"C", p.Hello(p.ROLE_CLIENT, "c", (), 0, 250), 13.44)
    core.tick(13.44)  # the first forgetting (none silent), at 13.44
    due = core.next_deadline()
    assert due == 13.44 + FORGET_EVERY_TTLS * HB.ttl_s
    core.receive(b"C", p.Heartbeat(p.ROLE_CLIENT, "", 0, ()), due)  # alive: it stays, and so does a deadline
    core.tick(due)
    after = core.next_deadline()
    assert after is not None and after > due
    assert set(core._clients) == {b"C"}


def test_a_full_table_of_clients_forgets_the_silent_ones_but_not_one_with_a_request_open():
    """At 2x --max-queue clients a new one makes room by forgetting those silent past the ttl, as
    the forgetting every 10 ttls does. It once forgot a silent client with a request open too, and
    rule 4, finding no sign of life of it at all, then never stopped that request."""
    core = make(max_queue=2)  # room for 4 clients
    for c in (b"c1", b"c2", b"c3", b"c4"):
        core.receive(c, p.Hello(p.ROLE_CLIENT, "c", (), 0, 250, batch=16), 0.0)
        core.note_batching(c, 16)
    request(core, 1, client=b"c1", now=0.0)  # queued: no worker
    core.receive(b"c5", p.Hello(p.ROLE_CLIENT, "c", (), 0, 250), 2.0)  # all four silent for 2 ttls
    assert set(core._clients) == {b"c1", b"c5"}
    assert set(core.batching) == {b"c1"}


def test_a_client_that_says_bye_is_forgotten_at_once_unless_a_request_of_it_is_open():
    """A closing client says BYE after its cancels. It was kept 10 ttls like a silent one: with
    many short-lived clients, the table stayed full of closed ones."""
    core = make()
    for c in (b"c1", b"c2"):
        core.receive(c, p.Hello(p.ROLE_CLIENT, "c", (), 0, 250, batch=16), 0.0)
        core.note_batching(c, 16)
    request(core, 1, client=b"c2", now=0.0)  # queued: no worker
    assert core.remembered()["clients"] == 2
    for c in (b"c1", b"c2"):
        assert core.receive(c, p.Bye("client closed"), 0.1) == []
    assert set(core._clients) == {b"c2"} and set(core.batching) == {b"c2"}  # its request is open
    assert core.counters.workers_left == 0
    core.receive(b"c2", p.Cancel(1), 0.2)
    core.receive(b"c2", p.Bye("client closed"), 0.2)
    assert core.remembered()["clients"] == 0 and not core.batching
    assert core.receive(b"c3", p.Bye("never said hello"), 0.3) == []  # nothing to forget, nothing said


def test_a_peer_on_a_connection_no_zap_handler_checked_is_told_bye_once_a_second():
    """No rights on a CURVE connection: libzmq admitted it while no ZAP handler ran. The peer is
    told BYE (it connects again, and is checked then), at most once a second: sent away again at
    once, a peer would spin while the handler is down. Nothing it sent is answered or served."""
    from zmqdist.core.rights import UNCHECKED

    core = make()
    unchecked = ("", "")
    hello = p.encode(p.Hello(p.ROLE_CLIENT, "c", (), 0, 250))
    request = p.encode(p.Request(1, "echo", 1000, (), b"x"))

    def said(now, *msg):
        out = []
        core.receive_frames(b"C", *msg, now, out, unchecked)
        return [m for peer, m in out if peer == b"C"]

    assert said(0.0, *hello) == [p.Bye(UNCHECKED)]
    assert said(0.5, *request) == []  # neither served nor answered: it comes again on the next connection
    assert said(1.0, *hello) == [p.Bye(UNCHECKED)]
    out = []
    core.receive_frames(b"D", *hello, 1.0, out, ("clients", "*"))  # a checked peer is served
    assert [type(m) for peer, m in out if peer == b"D"] == [p.Welcome]
    assert core.counters.refused_by_role == 3 and core.counters.requests == 0


def test_request_keys_are_per_caller_absorb_duplicates_and_leave_nothing_when_answered():
    """The table of open requests by (caller, request id), nested by caller: two callers' equal
    ids are two requests, the same caller's id again is a duplicate, and a key that names another
    request now survives the end of the one it named before."""
    core = make()
    hello(core, b"W", capacity=4)
    sent = tasks(request(core, 1, client=b"C")) + tasks(request(core, 1, client=b"D"))
    assert len(sent) == 2 and sent[0][1].ticket != sent[1][1].ticket
    assert request(core, 1, client=b"C") == [] and core.counters.duplicates == 1
    assert core.holds(b"C", 1) and core.holds(b"D", 1) and not core.holds(b"C", 2)
    for _, task in sent:
        core.receive(b"W", p.Result(task.ticket, p.RS_OK, b"r"), 0.1)
    d = core.d
    assert d.keys.by_origin == {} and d.callers == {} and not core.holds(b"C", 1)
    d.keys.put(b"C", 7, 10)
    d.keys.put(b"C", 7, 11)  # the id names another request now
    d.keys.drop(b"C", 7, 10)
    assert d.keys.ticket(b"C", 7) == 11
    d.keys.drop(b"C", 7, 11)
    assert d.keys.ticket(b"C", 7) is None and d.keys.by_origin == {}


_QUEUE_OPS = st.lists(
    st.tuples(st.sampled_from(["append", "popleft", "pop", "appendleft", "put_back"]), st.integers(0, 300)),
    max_size=400,
)


@given(_QUEUE_OPS)
def test_a_pools_queue_behaves_as_a_deque_of_its_tickets(ops):
    """records.Queue (a list and the index of its head, the front cut off as it grows) holds,
    yields and gives up its tickets as a deque does, through every operation the dispatcher uses,
    including runs of popleft long enough to cut the front off and empty ones that raise."""
    from collections import deque

    from zmqdist.core.records import Queue

    q, ref = Queue(), deque()
    for op, n in ops:
        if op == "append":
            for i in range(n % 100):
                q.append(n + i)
                ref.append(n + i)
        elif op == "appendleft":
            q.appendleft(n)
            ref.appendleft(n)
        elif op == "put_back":
            q.put_back([n, n + 1, n + 2])
            ref.extendleft(reversed([n, n + 1, n + 2]))
        else:
            for _ in range(n % 70):
                if not ref:
                    with pytest.raises(IndexError):
                        getattr(q, op)()
                    break
                assert getattr(q, op)() == getattr(ref, op)()
        assert len(q) == len(ref) and bool(q) == bool(ref) and list(q) == list(ref)
        if ref:
            assert (q.first(), q.last()) == (ref[0], ref[-1])
        else:
            for peek in (q.first, q.last):
                with pytest.raises(IndexError):
                    peek()


@given(st.lists(st.tuples(st.floats(0, 50), st.booleans()), max_size=300), st.lists(st.floats(0, 60), max_size=30))
def test_deadlines_come_due_in_order_whichever_way_they_were_pushed(pushes, clocks):
    """records.Deadlines keeps requests with in-order deadlines in a list and earlier ones in a
    heap: what falls due by each time is what a sorted list of every waiting request says,
    earliest first, whatever the mix; a sweep keeps exactly the requests that still wait."""
    from zmqdist.core.records import ASSIGNED, FORWARDED, Deadlines, Req

    reqs: dict = {}
    dl, ref, last = Deadlines(reqs), [], 0.0
    for i, (at, in_order) in enumerate(pushes):
        d = max(at, last) if in_order else at  # runs of in-order deadlines, and others earlier
        last = max(last, d)
        reqs[i] = Req(i, b"c", i, "s", b"", d)
        dl.push(reqs[i])
        ref.append((d, i))
    assert len(dl) == len(ref) and sorted(dl) == sorted(ref)
    if len(ref) > 10:  # every third request ended, one in nine of the rest is forwarded, another assigned
        for t in range(len(ref)):
            if t % 3 == 0:
                del reqs[t]
            elif t % 9 == 2:
                reqs[t].state = FORWARDED
            elif t % 9 == 5:
                reqs[t].state = ASSIGNED
        dl.sweep()
        ref = [e for e in ref if e[1] % 3 != 0 and e[1] % 9 != 5]
        assert len(dl) == len(ref) == dl.swept and sorted(dl) == sorted(ref)
    for now in [*sorted(clocks), 100.0]:
        due = sorted(e for e in ref if e[0] <= now)
        got = []
        while (t := dl.pop_due(now)) is not None:
            got.append(t)
        deadline_of = {t: d for d, t in ref}
        assert [deadline_of[t] for t in got] == [d for d, _ in due]  # earliest first
        assert set(got) == {t for _, t in due}
        ref = [e for e in ref if e[0] > now]
        assert dl.first() == (min(ref)[0] if ref else None)
    assert len(dl) == 0


def test_requests_that_stopped_waiting_leave_the_deadlines_as_new_ones_come_without_a_sweep():
    """Requests dispatched soon after they came (the common case) are dropped from the head of
    the in-order list as the next ones are pushed: it stays short with no sweep; one that still
    waits at the head keeps its place (and what is behind it waits for the sweep)."""
    from zmqdist.core.records import ASSIGNED, Deadlines, Req

    reqs: dict = {}
    dl = Deadlines(reqs)
    for t in range(10_000):
        reqs[t] = Req(t, b"c", t, "s", b"", 30.0 + t / 1000)
        dl.push(reqs[t])
        if t >= 3:
            reqs[t - 3].state = ASSIGNED  # dispatched three arrivals later
    assert len(dl) <= 6 and dl.sweeps == 0 and dl.first() == pytest.approx(30.0 + 9_996 / 1000, abs=0.002)
    reqs[10_000] = Req(10_000, b"c", 10_000, "s", b"", 50.0)
    dl.push(reqs[10_000])  # waits, then the rest ahead of it ends: still there
    assert dl.pop_due(49.9) is not None and 10_000 in {t for _, t in dl}
