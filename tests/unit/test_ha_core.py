"""The backup pair machine (core.ha.Pair), fencing in BrokerLink, and the worker's carry-over of
tasks between the two brokers of a pair: plain numbers for time."""

import itertools

import msgpack
import pytest

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings, HeartbeatSettings
from zmqdist.core.ha import (
    ACTIVE,
    BECOME_PASSIVE,
    HAND_OVER,
    PASSIVE,
    PENDING,
    RAISE_EPOCH,
    STEP_DOWN,
    TAKE_OVER,
    Pair,
)
from zmqdist.core.link import BrokerLink, Connect
from zmqdist.core.worker import Abort, Execute, Window, WorkerCore
from zmqdist.testing import tick_until

HB = HeartbeatSettings(0.25, 4)  # ttl 1 s


def pair(role="backup", failback="manual", now=0.0):
    return Pair(BrokerSettings(name=f"me-{role}", ha=role, failback=failback), "inc", now)


def state(name="peer", primary=1, st=ACTIVE, epoch=1, inc="pinc", synced=0):
    return p.PairState(name, primary, st, epoch, inc, synced, 0)


def test_cold_start_both_pending_the_primary_takes_over_the_backup_waits():
    a, b = pair("primary"), pair("backup")
    a.heard(state(primary=0, st=PENDING, epoch=0), 0.1)
    b.heard(state(primary=1, st=PENDING, epoch=0), 0.1)
    assert a.decide(0.1) == TAKE_OVER and b.decide(0.1) is None
    assert a.activate(0.1) == 1
    b.heard(state(st=ACTIVE, epoch=1), 0.2)
    assert b.decide(0.2) == BECOME_PASSIVE


def test_a_passive_broker_takes_over_only_after_a_ttl_of_silence_and_a_vote():
    b = pair()
    b.heard(state(), 0.0)
    b.deactivate(0.0, stepped_down=False)
    assert b.decide(1.0) is None  # silent exactly the ttl: still alive
    assert b.decide(1.5) is None  # silent, but nobody came: the pair link may be what failed
    b.vote(b"w1", 1.5)
    assert b.decide(1.5) == TAKE_OVER
    b.votes.clear()
    b.vote(b"w1", 0.2)  # a vote older than the ttl no longer counts
    assert b.decide(1.5) is None


def test_a_peer_that_beats_less_often_is_judged_by_its_own_interval_not_taken_for_gone_between_beats():
    """The active broker of a pair runs --heartbeat 2, its passive one the default 0.25 x 4: the
    passive one took the active for silent a second after each beat, and the first peer that came
    by made it take over from a live broker (which then stepped down)."""
    b = pair()
    assert b.state_message(0.0).heartbeat_ms == 250  # each broker says its own interval
    b.heard(state()._replace(heartbeat_ms=2000), 0.0)
    b.deactivate(0.0, stepped_down=False)
    b.vote(b"c1", 1.5)
    assert b.peer_alive(1.5) and b.decide(1.5) is None  # between two of its beats: alive
    assert b.peer_fresh(3.9) and not b.peer_fresh(4.1)  # two of its beats
    b.peer_endpoint = "ipc://peer.ha"
    assert not b.redial_due(7.9) and b.redial_due(8.1)  # its connection made anew after its own ttl
    b.vote(b"c1", 8.0)
    assert b.peer_alive(8.0) and not b.peer_alive(8.01) and b.decide(8.01) == TAKE_OVER  # 4 of its beats
    a = pair("primary")  # a peer that beats more often (or does not say) is judged by our own
    a.heard(state(primary=0)._replace(heartbeat_ms=100), 0.0)
    assert a.peer_alive(1.0) and not a.peer_alive(1.01)
    a.heard(state(primary=0, inc="older"), 2.0)  # an older broker does not say: our own ttl
    assert a.peer_alive(3.0) and not a.peer_alive(3.01)


def test_a_passive_broker_takes_over_at_once_when_its_peer_restarts():
    b = pair()
    b.heard(state(), 0.0)
    b.deactivate(0.0, stepped_down=False)
    b.heard(state(st=PENDING, epoch=0, inc="new-run"), 0.5)
    assert b.decide(0.5) == TAKE_OVER
    assert b.activate(0.5) == 2  # above the epoch it knew (1), not the restarted peer's 0


def test_a_pending_broker_waits_one_ttl_and_a_heartbeat_for_its_peer_before_votes_count():
    a = pair("primary", now=10.0)
    a.vote(b"c", 10.5)
    assert a.decide(10.5) is None
    assert a.decide(11.25) is None  # ttl 1 s, heartbeat 0.25 s: the grace of a broker that just started
    a.vote(b"c", 11.25)
    assert a.decide(11.25 + 1e-3) == TAKE_OVER


def test_two_active_the_one_that_took_over_cold_steps_down_for_the_one_that_carries_the_table():
    """A broker restarted cold beside a live active one it did not hear: its epoch (the wall-clock
    floor) is higher, but the other holds the pair's work, so the cold one steps down and the warm
    one moves its epoch above."""
    warm = pair("backup")
    warm.heard(state(primary=1, st=ACTIVE, epoch=1), 0.0)
    warm.deactivate(0.0, stepped_down=False)
    warm.apply(p.Replicate(1, 1, 1, p.pack_ops(0.0, [])), 0.0)  # a synced copy (empty is enough)
    warm.activate(1.0)  # takes over: epoch 2, warm
    cold = pair("primary", now=5.0)
    cold.floor = 9_000
    cold.vote(b"c", 6.0)
    assert cold.decide(6.5) == TAKE_OVER
    cold.activate(6.5)  # epoch 9001, cold
    cold.heard(warm.state_message(6.6), 6.6)
    warm.heard(cold.state_message(6.6), 6.6)
    assert cold.decide(6.6) == STEP_DOWN
    assert warm.decide(6.6) == RAISE_EPOCH and warm.raise_epoch(warm.peer_epoch) > 9_001


def test_two_active_the_lower_epoch_steps_down_and_on_a_tie_the_backup():
    a = pair("primary")
    a.activate(0.0)  # epoch 1
    a.heard(state(primary=0, epoch=2), 0.1)
    assert a.decide(0.1) == STEP_DOWN
    b = pair("backup")
    b.activate(0.0)
    b.heard(state(primary=1, epoch=1), 0.1)
    assert b.decide(0.1) == STEP_DOWN
    a2 = pair("primary")
    a2.activate(0.0)
    a2.heard(state(primary=0, epoch=1), 0.1)
    assert a2.decide(0.1) is None


def test_epochs_never_go_below_the_floor():
    a = Pair(BrokerSettings(name="a", ha="primary"), "inc", 0.0, epoch_floor=5000)
    assert a.activate(0.0) == 5001
    assert a.raise_epoch(9000) == 9001


def test_automatic_failback_waits_for_a_synced_primary_and_one_ttl():
    b = pair("backup", failback="auto")
    b.activate(0.0)
    b.seq = 7
    b.heard(state(primary=1, st=PASSIVE, synced=6), 0.5)
    assert b.decide(1.5) is None  # not in sync yet
    b.heard(state(primary=1, st=PASSIVE, synced=7), 1.5)
    assert b.decide(1.5) == HAND_OVER
    manual = pair("backup")
    manual.activate(0.0)
    manual.heard(state(primary=1, st=PASSIVE, synced=0), 1.5)
    assert manual.decide(1.5) is None


def test_automatic_failback_hands_over_only_to_a_primary_heard_since_its_own_pause():
    """After its own pause the backup counts the primary's silence from its resume (a stalled host
    is no peer's silence), so the primary still counts as alive then; but a handover is to a
    primary heard just now, not to one that may have died while the backup was stopped: the work
    would go to nobody until the backup took over again."""
    b = pair("backup", failback="auto")
    b.activate(0.0)
    b.seq = 7
    b.heard(state(primary=1, st=PASSIVE, synced=7), 1.0)
    b.pauses.note(3.9, 5.0)  # stopped from 1.1 to 5.0
    assert b.peer_alive(5.0) and b.decide(5.0) is None
    b.heard(state(primary=1, st=PASSIVE, synced=7), 5.05)
    assert b.decide(5.05) == HAND_OVER


def _ops(*ops, now=100.0):
    return p.pack_ops(now, list(ops))


def add(ticket, member=None):
    ops = [p.OpAccepted(ticket, b"C-1", ticket, "echo", 105.0, (), "", "", 0, b"v")]
    if member:
        ops.append(p.OpSent(ticket, member, 1))
    return ops


def test_replication_deltas_in_order_snapshots_and_deadlines_in_our_clock():
    b = pair()
    b.heard(state(), 0.0)
    b.deactivate(0.0, stepped_down=False)
    assert b.apply(p.Replicate(1, 5, 0, _ops(*add(1))), 50.0) is None
    assert not b.table and b.applied == -1  # a delta before any snapshot is ignored
    assert (
        b.apply(
            p.Replicate(
                1,
                6,
                1,
                _ops(*add(1), *add(2, b"W")),
            ),
            50.0,
        )
        is None
    )
    assert b.applied == 6 and set(b.table) == {1, 2} and b.table[2].member == b"W"
    assert b.table[1].accepted.deadline == pytest.approx(55.0)  # 5 s left in the sender's clock, in ours
    assert b.apply(p.Replicate(1, 7, 0, _ops(p.OpEnded(1), p.OpRequeued(2))), 50.0) is None
    assert set(b.table) == {2} and b.table[2].member is None and b.top == 2
    problem = b.apply(p.Replicate(1, 9, 0, _ops(*add(3))), 50.0)  # seq 8 is missing
    assert "gap" in problem and b.applied == -1 and b.counters["gaps"] == 1
    assert b.state_message(50.0).synced == -1  # asks for a snapshot


@pytest.mark.parametrize(
    "ops",
    [
        b"\xc1",
        msgpack.packb(["not a time"]),
        msgpack.packb([1.0, ["a", 1, "not bytes", 1, "echo", 1.0, [], "", "", 0, b"v"]], use_bin_type=True),
        msgpack.packb([1.0, ["e", 2], ["s", 1]]),  # a good op, then a bad one: nothing is applied
    ],
)
def test_bad_replication_is_counted_applies_nothing_and_asks_for_a_snapshot(ops):
    b = pair()
    b.apply(p.Replicate(1, 1, 1, _ops(*add(1), *add(2))), 0.0)
    problem = b.apply(p.Replicate(1, 2, 0, ops), 0.0)
    assert problem is not None and b.applied == -1 and b.counters["bad_ops"] == 1
    assert set(b.table) == {1, 2}


def test_the_active_sends_a_snapshot_to_a_new_peer_run_then_deltas():
    a = pair("primary")
    a.activate(0.0)
    a.heard(state(primary=0, st=PASSIVE, synced=-1, inc="r1"), 0.0)
    [m] = a.flush(0.0, lambda: [p.OpEnded(9)])
    assert m.snapshot == 1 and p.unpack_ops(m.ops)[1] == [p.OpEnded(9)]
    a.ops.append(p.OpEnded(10))
    [m2] = a.flush(0.1, lambda: [])
    assert m2.snapshot == 0 and m2.seq == m.seq + 1  # deltas go on while it catches up
    assert a.flush(0.2, lambda: []) == []  # nothing new
    a.heard(state(primary=0, st=PASSIVE, synced=-1, inc="r2"), 0.3)  # it restarted
    [m3] = a.flush(0.3, lambda: [])
    assert m3.snapshot == 1
    a.peer_seen = -10.0  # silent: ops are dropped, not piled up
    a.ops.append(p.OpEnded(11))
    assert a.flush(0.4, lambda: []) == [] and not a.ops


def accepted(ticket, size):
    return p.OpAccepted(ticket, b"client", ticket, "echo", 60.0, (), "", "", 1, b"x" * size)


def test_a_snapshot_and_deltas_larger_than_the_message_limit_go_in_parts_the_peer_applies_in_order():
    """A passive broker's pair link refuses a message over the limit whole: a queue of large
    requests goes as several REPLICATEs, each within --max-message-size (one request alone may
    pass it: the link takes twice the limit), a snapshot's first part replacing the table."""
    limit = 100_000
    a = Pair(BrokerSettings(name="a", ha="primary", max_message_size=limit), "inc", 0.0)
    b = Pair(BrokerSettings(name="b", ha="backup", max_message_size=limit), "inc-b", 0.0)
    a.activate(0.0)
    b.heard(a.state_message(0.0), 0.0)
    b.deactivate(0.0, stepped_down=False)
    a.heard(b.state_message(0.0), 0.0)
    table = [accepted(t, 30_000) for t in range(1, 41)] + [accepted(41, limit)]  # 1.3 MB, one of the limit
    ms = a.flush(0.0, lambda: table)
    assert len(ms) > 12 and [m.snapshot for m in ms] == [1] + [0] * (len(ms) - 1)
    assert [m.seq for m in ms] == list(range(ms[0].seq, ms[0].seq + len(ms)))
    assert all(len(m.ops) <= limit for m in ms[:-1]) and len(ms[-1].ops) < 2 * limit
    b.table = {99: None}  # stale: the snapshot replaces it
    for m in ms:
        assert b.apply(m, 0.1) is None
    assert sorted(b.table) == list(range(1, 42)) and b.applied == a.seq
    a.heard(b.state_message(0.1), 0.1)
    a.ops += [accepted(t, 30_000) for t in range(42, 52)]  # deltas: 300 kB in one flush
    ds = a.flush(0.2, lambda: [])
    assert len(ds) >= 3 and not any(m.snapshot for m in ds) and all(len(m.ops) <= limit for m in ds)
    for m in ds:
        assert b.apply(m, 0.3) is None
    assert sorted(b.table) == list(range(1, 52)) and b.applied == a.seq


def test_parts_whose_size_was_underestimated_are_halved_until_each_fits():
    """The one-pass cut estimates an op by its payload and names; a retry policy's exception names
    are not counted, so a part can pack over the limit: it is halved until each part fits."""
    retry = (3, 10, 100, tuple(f"pkg.module.SomeRatherLongExceptionName{k}" for k in range(30)))
    a = Pair(BrokerSettings(name="a", ha="primary", max_message_size=10_000), "inc", 0.0)
    a.activate(0.0)
    a.heard(state(primary=0, st=PASSIVE, synced=-1, inc="r1"), 0.0)
    table = [accepted(t, 10)._replace(retry=retry) for t in range(1, 101)]  # about 1.3 kB each, 130 kB
    assert len(p.pack_ops(0.0, table[:10])) > 10_000  # what one cut would hold at the estimate
    ms = a.flush(0.0, lambda: table)
    assert len(ms) >= 13 and all(len(m.ops) <= 10_000 for m in ms)
    assert [op for m in ms for op in p.unpack_ops(m.ops)[1]] == table  # every op once, in order
    assert [m.snapshot for m in ms] == [1] + [0] * (len(ms) - 1)


def test_link_fencing_refuses_lower_epochs_of_a_broker_or_its_peer():
    link = BrokerLink(("tcp://a:1",), HB, 0.0)
    assert link.fenced("b", "a", 2) is None
    assert "refused" in link.fenced("a", "b", 1)  # a was replaced by b at epoch 2
    assert link.fenced("a", "b", 3) is None
    assert link.fenced("solo", "", 0) is None  # a broker alone is never fenced
    assert link.top_epoch == 3


def test_a_broker_whose_pair_link_reaches_itself_says_so_and_takes_nothing_it_hears_for_its_peer():
    """--peer naming the broker's own --ha-bind in another spelling (localhost for 127.0.0.1):
    it heard its own PAIR_STATE as its peer's, went active, then handed over to itself."""
    from zmqdist.core.failover import PairedBroker
    from zmqdist.core.records import LOG

    core = PairedBroker(BrokerSettings(name="a", ha="primary", peer="tcp://localhost:7001"), "inc", 0.0)
    (own,) = [m for d, m in core.tick(0.0) if type(m) is p.PairState]
    out = core.pair_receive(own, 0.01)
    assert [(d, m.message) for d, m in out] == [
        (LOG, "the pair link reached this broker itself: --peer tcp://localhost:7001 is its own --ha-bind")
    ]
    assert core.pair.peer_seen is None and core.counters.bad_input == 1


def test_a_broker_hearing_a_peer_of_its_own_role_says_the_pair_is_misconfigured_once():
    """Both --ha primary (or both backup): the pair still ends with one active broker, so nothing
    showed the mistake, and a failback would go to whichever of them."""
    from zmqdist.core.failover import PairedBroker
    from zmqdist.core.records import LOG

    core = PairedBroker(BrokerSettings(name="a", ha="primary", peer="tcp://b:1"), "inc", 0.0)
    said = [m.message for d, m in core.pair_receive(state(name="b", primary=1, st=PENDING, epoch=0), 0.1) if d is LOG]
    assert said == ["b is configured primary too: a pair needs one primary and one backup (--ha)"]
    again = core.pair_receive(state(name="b", primary=1, st=PASSIVE, epoch=1), 0.2)
    assert not [m for d, m in again if d is LOG and "configured" in m.message]  # once
    backup = PairedBroker(BrokerSettings(name="b", ha="backup", peer="tcp://a:1"), "inc", 0.0)
    heard = backup.pair_receive(state(name="a", primary=1, st=PENDING, epoch=0), 0.1)
    assert not [m for d, m in heard if d is LOG and "configured" in m.message]


def test_a_worker_carries_tasks_and_unconfirmed_results_to_the_other_broker_of_the_pair():
    w = WorkerCore(("tcp://a:1", "tcp://b:1"), ("echo",), 3, "w", HB, 0.0)
    w.start(0.0)
    w.receive(p.Welcome("a", "inc-a", 250, 4, 1, "b"), 0.0)
    ex = [w.receive(p.Task(t, "echo", 5000, 1, f"k{t}", t, (), b"v"), 0.0)[0] for t in (1, 2, 3)]
    assert w.task_done(1, ex[0].session, True, b"r1", 0.1) == [p.Result(1, p.RS_OK, b"r1")]
    out = tick_until(w, 1.1)  # a silent: fail over to b
    assert out[-1] == p.Hello(p.ROLE_WORKER, "w", ("echo",), 1, 250, 1, p.MAX_BATCH, 2)  # 2 slots still busy
    assert w.task_done(2, ex[1].session, True, b"r2", 1.2) == []  # kept for b
    out = w.receive(p.Welcome("b", "inc-b", 250, 4, 2, "a"), 1.3)
    # 1 was never confirmed; 2 finished since HELLO (which had left its slot out): credit back
    assert out == [p.Result(1, p.RS_OK, b"r1"), p.Result(2, p.RS_OK, b"r2"), p.Credit(2)]
    hb = w.tick(1.55)
    assert hb == [p.Heartbeat(p.ROLE_WORKER, "inc-b", 0, (3,))]  # task 3 still runs, held for b
    assert w.task_done(3, ex[2].session, True, b"r3", 1.6) == [p.Result(3, p.RS_OK, b"r3"), p.Credit(3)]


def test_a_carried_run_whose_task_its_broker_sends_again_is_stopped_and_its_end_dropped():
    """A worker of a pair stopped past its ttl: its broker requeued its tasks and, once it is back
    (RECONNECT, a new session; its runs carried), sends one to it again. The run of the earlier
    session must stop: a stream's acknowledgements now go to the new run, and the old one would
    wait for them with its thread and its slot for good (a simulation of a proxy pair found it)."""
    w = WorkerCore(("tcp://a:1", "tcp://b:1"), ("echo",), 2, "w", HB, 0.0)
    w.start(0.0)
    w.receive(p.Welcome("a", "inc-a", 250, 4, 1, "b"), 0.0)
    (old,) = w.receive(p.Task(7, "echo", 30_000, 1, "k7", 1, (), b"v", "", 4), 0.0)
    assert w.part(7, old.session, b"p0", 0.1) == [p.Part(7, 0, b"p0")]
    w.receive(p.Reconnect("unknown worker: register again"), 3.0)
    assert w.carry == {7: old.session}
    w.receive(p.Welcome("a", "inc-a", 250, 4, 1, "b"), 3.0)
    out = w.receive(p.Task(7, "echo", 20_000, 2, "k7", 1, (), b"v", "", 4), 3.1)
    assert out[0] == Abort(7, old.session, "its broker runs it again")
    new = out[1]
    assert type(new) is Execute and new.attempt == 2 and new.session != old.session
    assert w.carry == {} and w.stale == 1 and w.counters["abandoned"] == 1
    assert w.receive(p.Ack(7, 1), 3.2) == [Window(7, new.session, 1)]  # to the new run
    (hb,) = w.tick(3.25)
    assert hb.held == (7,)  # once: the new run (the old one is not carried)
    assert w.task_done(7, old.session, False, b"", 3.3) == [p.Credit(2)]  # its end dropped, its slot back
    assert w.stale == 0 and w.counters["void_results"] == 1
    assert w.task_done(7, new.session, True, b"r", 3.4)[0] == p.Result(7, p.RS_OK, b"r")


def test_a_worker_voids_carried_work_at_a_broker_outside_the_pair():
    w = WorkerCore(("tcp://a:1", "tcp://x:1"), ("echo",), 2, "w", HB, 0.0)
    w.start(0.0)
    w.receive(p.Welcome("a", "inc-a", 250, 4, 1, "b"), 0.0)
    (ex,) = w.receive(p.Task(1, "echo", 5000, 1, "k1", 1, (), b"v"), 0.0)
    tick_until(w, 1.1)
    assert w.receive(p.Welcome("x", "inc-x", 250, 4), 1.2) == [p.Credit(1)]
    assert w.carry == {} and w.stale == 1
    assert w.task_done(1, ex.session, True, b"r", 1.3) == [p.Credit(2)]
    assert w.counters["void_results"] == 1


def test_a_worker_refuses_a_stale_broker_and_moves_on():
    w = WorkerCore(("tcp://a:1", "tcp://b:1"), ("echo",), 2, "w", HB, 0.0)
    w.start(0.0)
    w.receive(p.Welcome("b", "inc-b", 250, 4, 5, "a"), 0.0)
    tick_until(w, 1.1)  # b silent: to a, which answers with its old epoch
    out = w.receive(p.Welcome("a", "inc-a", 250, 4, 3, "b"), 1.2)
    assert "refused" in out[0].message and type(out[1]) is Connect and type(out[2]) is p.Hello
    assert w.link.connects == 3  # start, the failover from b, and the move on from stale a
    assert not w.registered and w.counters["fenced"] == 1


def test_a_passive_broker_sends_a_peer_away_once_per_heartbeat_not_once_per_message():
    """A client resends all its pending requests after a failover; a BYE for each of them would
    make it fail over once per BYE, resending everything each time: a storm."""
    from zmqdist.core.failover import PairedBroker
    from zmqdist.core.records import PAIR

    core = PairedBroker(BrokerSettings(name="b", ha="backup"), "inc", 0.0)
    core.pair_receive(state(name="a", st=ACTIVE, epoch=1), 0.0)
    assert core.standby and core.pair.state == PASSIVE
    out = core.receive(b"C", p.Hello(p.ROLE_CLIENT, "c", (), 0, 250), 0.01)
    for rid in range(50):
        out += core.receive(b"C", p.Request(rid, "echo", 1000, (), b""), 0.01)
    assert [type(m) for _, m in out] == [p.Bye] and "a is active" in out[0][1].reason
    assert core.receive(b"C", p.Request(51, "echo", 1000, (), b""), 0.1) == []
    core.pair_receive(state(name="a", st=ACTIVE, epoch=1), 0.25)
    assert [type(m) for _, m in core.receive(b"C", p.Request(52, "echo", 1000, (), b""), 0.3)] == [p.Bye]
    status = core.receive(b"C", p.Request(53, "zmqdist.status", 1000, (), b""), 0.3)
    assert p.unpack_value(status[0][1].payload)["ha"]["state"] == "passive"  # status is answered
    assert all(dest is not PAIR for dest, _ in out)


def test_carried_work_that_finished_before_welcome_gives_its_slots_back():
    """HELLO announces concurrency less the carried tasks; if they all finish before WELCOME,
    the worker must say so (CREDIT), or the broker would never send it work again."""
    w = WorkerCore(("tcp://a:1", "tcp://b:1"), ("echo",), 2, "w", HB, 0.0)
    w.start(0.0)
    w.receive(p.Welcome("a", "inc-a", 250, 4, 1, "b"), 0.0)
    ex = [w.receive(p.Task(t, "echo", 5000, 1, f"k{t}", t, (), b"v"), 0.0)[0] for t in (1, 2)]
    out = tick_until(w, 1.1)  # a silent: to b
    assert out[-1].capacity == 0  # both slots carried
    for e in ex:
        assert w.task_done(e.ticket, e.session, True, b"r", 1.2) == []  # parked: not registered
    out = w.receive(p.Welcome("b", "inc-b", 250, 4, 2, "a"), 1.3)
    assert out[-1] == p.Credit(2) and len(out) == 3


def test_the_table_of_clients_to_tell_bye_is_bounded_against_a_flood_of_heartbeats():
    from zmqdist.core.broker import BrokerCore

    core = BrokerCore(BrokerSettings(name="b", max_queue=10), "inc", 0.0)
    for i in range(500):  # heartbeats from 500 connections that never said HELLO
        core.receive(f"c{i}".encode(), p.Heartbeat(p.ROLE_CLIENT, "", 0, ()), 0.001 * i)
    assert len(core._clients) == 20  # twice the queue limit
    core.receive(b"late", p.Heartbeat(p.ROLE_CLIENT, "", 0, ()), 5.0)  # the old ones are silent: pruned
    assert set(core._clients) == {b"late"}


def test_a_state_older_than_one_heard_from_the_same_run_is_ignored():
    """The peer's states come on two connections with no order between them: older news from
    the same run must not undo newer (epoch, then pending < active < passive)."""
    a = pair("primary")
    a.heard(state(st=PASSIVE, epoch=5), 0.0)
    assert not a.heard(state(st=PASSIVE, epoch=4), 0.1)  # an older epoch of the same run
    assert a.peer_epoch == 5 and a.counters["stale_states"] == 1
    assert a.heard(state(st=ACTIVE, epoch=6), 0.2)
    assert not a.heard(state(st=PASSIVE, epoch=5), 0.3) and a.peer_state == ACTIVE
    assert a.heard(state(st=PASSIVE, epoch=6), 0.4)  # stepped down (or handed over) at its epoch
    assert not a.heard(state(st=ACTIVE, epoch=6), 0.5) and a.peer_state == PASSIVE
    assert a.heard(state(st=PENDING, epoch=0, inc="new-run"), 0.6)  # a new run starts afresh
    assert a.peer_state == PENDING and a.counters["stale_states"] == 3
    assert a.peer_seen == 0.6


def test_a_resumed_active_broker_steps_down_once_and_stale_news_never_makes_it_take_over_again():
    """The active A was stopped (SIGSTOP, a stalled host) past the ttl; B took over. On resume A
    reads what waited on both pair connections: on one B's states up to its takeover, on the
    other an answer B gave before it (passive). A steps down on the newer and must stay passive:
    taking over again on the older (it did) deposed B, which held the requests."""
    from zmqdist.core.failover import PairedBroker

    a = PairedBroker(BrokerSettings(name="a", ha="primary"), "inc-a", 0.0)
    a.pair_receive(state(name="b", primary=0, st=PENDING, epoch=0), 0.0)
    a.tick(0.01)
    assert a.pair.state == ACTIVE and a.pair.epoch == 1 and not a.standby
    a.pair_receive(state(name="b", primary=0, st=PASSIVE, epoch=1), 0.1)
    # Stopped at 0.2 for 3 s: B took over at epoch 2 with a synced copy (warm).
    a.pair_receive(state(name="b", primary=0, st=PASSIVE, epoch=1), 3.2)  # its link: before the takeover
    a.pair_receive(state(name="b", primary=0, st=ACTIVE, epoch=2, synced=7)._replace(warm=1), 3.2)
    assert a.pair.state == PASSIVE and a.pair.counters["step_downs"] == 1
    a.pair_receive(state(name="b", primary=0, st=PASSIVE, epoch=1), 3.2)  # our link: an answer from before
    a.tick(3.21)
    assert a.pair.state == PASSIVE and a.standby
    assert a.pair.counters["takeovers"] == 1 and a.pair.counters["stale_states"] == 1


def test_a_silent_peer_is_connected_anew_each_interval_until_it_is_heard():
    """A connection that went silent (a cut cable, a vanished host) is not given up by TCP for
    minutes and its retransmissions back off to one every two minutes: after a 30 s cut the pair
    stayed split, both active, 23 s past the heal. A broker makes the connection to a silent peer
    anew after a ttl of silence (at least REDIAL_MIN_S) and each such interval while it stays
    silent; never while the peer is heard."""
    from zmqdist.core.failover import PairedBroker
    from zmqdist.core.ha import REDIAL_MIN_S

    peer = "tcp://10.0.0.2:5802"  # ttl 0.4 s: the interval is REDIAL_MIN_S
    settings = BrokerSettings(name="a", ha="primary", peer=peer, ha_bind=("tcp://*:5802",), heartbeat_s=0.1, liveness=4)
    a = PairedBroker(settings, "inc-a", 0.0)

    def redials(until, step=0.05):
        got, t = [], now[0]
        while t < until - 1e-9:
            t = round(t + step, 6)
            got += [(t, m) for dest, m in a.tick(t) if isinstance(m, Connect)]
        now[0] = t
        return got

    now = [0.0]
    for t in (0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1):  # heard every 0.3 s: never
        a.pair_receive(state(name="b", primary=0, st=PASSIVE, epoch=1), t)
        assert redials(t) == []
    got = redials(2.1 + 3.5)  # silent from 2.1
    times = [2.1] + [t for t, _ in got]
    assert len(got) == 3 and all(1.0 - 1e-6 <= b - a <= 1.06 for a, b in itertools.pairwise(times)), times
    assert all(m.endpoint == "tcp://10.0.0.2:5802" and "b silent for" in m.reason for _, m in got)
    assert a.pair.counters["redials"] == 3 and REDIAL_MIN_S == 1.0
    a.pair_receive(state(name="b", primary=0, st=PASSIVE, epoch=1), now[0])  # heard again
    assert redials(now[0] + 0.9) == []
    # A peer never heard: the connection is made anew too (a connect into silence backs off).
    b = PairedBroker(settings, "inc-b", 0.0)
    ticks = [(t, m) for t in (0.5, 1.0, 1.5, 2.0) for _, m in b.tick(t)]
    assert [t for t, m in ticks if isinstance(m, Connect)] == [1.0, 2.0]


def test_replicates_keep_within_the_smaller_limit_of_the_two_and_the_state_says_each_ones():
    """A pair whose brokers run different --max-message-size (a rolling change of it): each says
    its own in PAIR_STATE, and the REPLICATEs it is sent keep within it; an older peer that says
    nothing gets ours."""
    a = Pair(BrokerSettings(name="a", ha="primary", max_message_size=200_000), "inc", 0.0)
    b = Pair(BrokerSettings(name="b", ha="backup", max_message_size=50_000), "inc-b", 0.0)
    a.activate(0.0)
    sb = b.state_message(0.0)
    assert sb.max_message == 50_000 and p.decode(*p.Encoder().encode(sb)) == sb
    a.heard(sb._replace(state=PASSIVE, synced=-1), 0.0)
    table = [accepted(t, 20_000) for t in range(1, 21)]  # 400 kB
    ms = a.flush(0.0, lambda: table)
    assert len(ms) >= 8 and all(len(m.ops) <= 50_000 for m in ms)
    a.heard(sb._replace(state=PASSIVE, synced=-1, incarnation="older", max_message=0), 0.1)  # says nothing
    ms = a.flush(0.1, lambda: table)
    assert len(ms) <= 3 and all(len(m.ops) <= 200_000 for m in ms) and len(ms[0].ops) > 100_000


def test_a_request_no_replicate_can_carry_to_a_peer_with_a_smaller_limit_is_left_out_not_the_rest():
    """One op over twice the peer's limit: its pair link would drop the REPLICATE with the
    connection, and then every snapshot holding it, for good (replication stalled, silently).
    It is left out and counted; the rest replicate, and the peer ignores its later ops."""
    a = Pair(BrokerSettings(name="a", ha="primary", max_message_size=100_000), "inc", 0.0)
    b = Pair(BrokerSettings(name="b", ha="backup", max_message_size=20_000), "inc-b", 0.0)
    a.activate(0.0)
    a.heard(b.state_message(0.0)._replace(state=PASSIVE, synced=-1), 0.0)
    table = [accepted(1, 100), accepted(2, 60_000), accepted(3, 100)]
    ms = a.flush(0.0, lambda: table)
    assert a.counters["not_replicated"] == 1 and all(len(m.ops) <= 40_000 for m in ms)
    b.state = PASSIVE
    for m in ms:
        assert b.apply(m, 0.0) is None
    assert sorted(b.table) == [1, 3]
    a.ops.append(p.OpEnded(2))  # the broker appends its ops to this list
    for m in a.flush(0.1, lambda: table):
        assert b.apply(m, 0.1) is None
    assert sorted(b.table) == [1, 3] and b.counters["gaps"] == 0


def test_results_carried_to_the_other_broker_of_the_pair_keep_within_its_smaller_limit():
    """Results made under A's limit and parked at a failover go to B after its WELCOME: one over
    B's limit (a rolling change of it) goes as a failure that says so (over twice it, libzmq drops
    it with the connection, and the request ran again); a handler's failure is cut to fit."""
    w = WorkerCore(("tcp://a:1", "tcp://b:1"), ("echo",), 3, "w", HB, 0.0)
    w.start(0.0)
    w.receive(p.Welcome("a", "inc-a", 250, 4, 1, "b", 10, 100_000), 0.0)
    ex = [w.receive(p.Task(t, "echo", 5000, 1, f"k{t}", t, (), b"v"), 0.0)[0] for t in (1, 2, 3)]
    tick_until(w, 1.1)  # a silent: fail over to b
    err = p.pack_error("KeyError", "m" * 50_000, "")
    assert w.task_done(1, ex[0].session, True, b"x" * 50_000, 1.2) == []  # kept for b
    assert w.task_done(2, ex[1].session, False, err, 1.2) == []
    assert w.task_done(3, ex[2].session, True, b"small", 1.2) == []
    out = w.receive(p.Welcome("b", "inc-b", 250, 4, 2, "a", 10, 20_000), 1.3)
    r1, r2, r3 = [m for m in out if type(m) is p.Result]
    assert (r1.status, p.unpack_error(r1.payload)[0]) == (p.RS_FAILED, p.RESULT_TOO_LARGE)
    assert "limit of 20000 bytes" in p.unpack_error(r1.payload)[1]
    assert r2.status == p.RS_FAILED and p.unpack_error(r2.payload)[0] == "KeyError" and len(r2.payload) <= 20_000
    assert r3 == p.Result(3, p.RS_OK, b"small") and w.counters["too_large"] == 2


def test_a_pair_broker_forgets_the_batch_limits_of_silent_clients_and_gone_workers():
    """A pair's broker notes each peer's batch limit at its door, in a table of its own; the
    machine behind the door forgot silent clients from another, never read. So the pair's table
    kept every client ever heard (a memory probe: +1.45 MB over 10,000 short-lived clients,
    rising), and full, it forgot every peer's limit, the live ones' too. Every broker also kept a
    worker's limit after it left. A passive broker notes none: whoever it holds registers again
    at its takeover."""
    from zmqdist.core.broker import FORGET_EVERY_TTLS
    from zmqdist.core.failover import PairedBroker

    hb = HeartbeatSettings(0.1, 4)
    settings = BrokerSettings(name="a", ha="primary", heartbeat_s=hb.heartbeat_s, liveness=4)
    a = PairedBroker(settings, "inc-a", 0.0)
    enc = p.Encoder()

    def hello(broker, peer, role, now, services=()):
        out: list = []
        msg = p.Hello(role, peer.decode(), services, 1 if services else 0, 100, batch=16)
        broker.receive_frames(peer, *enc.encode(msg), now, out)
        return [m for _, m in out]

    hello(a, b"early", p.ROLE_CLIENT, 0.0)  # not active yet: held (a vote), told to register again later
    assert a.batching == {}
    took_over = a.pair_receive(state(name="b", primary=0, st=PENDING, epoch=0), 0.0) + a.tick(0.01)
    assert a.pair.state == ACTIVE and not a.standby
    assert any(dest == b"early" and isinstance(m, p.Reconnect) for dest, m in took_over)
    for c in (b"gone", b"live"):
        assert any(isinstance(m, p.Welcome) for m in hello(a, c, p.ROLE_CLIENT, 0.02))
    assert any(isinstance(m, p.Welcome) for m in hello(a, b"W", p.ROLE_WORKER, 0.02, ("echo",)))
    assert set(a.batching) == {b"gone", b"live", b"W"}
    a.receive_frames(b"W", *enc.encode(p.Bye("leaving")), 0.03, [])
    at = 0.03
    while at < FORGET_EVERY_TTLS * hb.ttl_s + 3 * hb.heartbeat_s:  # "live" beats, "gone" is silent
        at = round(at + hb.heartbeat_s, 6)
        a.receive_frames(b"live", *enc.encode(p.Heartbeat(p.ROLE_CLIENT, "", 0, ())), at, [])
        a.pair_receive(state(name="b", primary=0, st=PASSIVE, epoch=a.pair.epoch), at)
        a.tick(at)
    assert a.pair.state == ACTIVE
    assert set(a.batching) == {b"live"}
    assert a.inner.batching is a.batching  # the one table, read when replies are grouped
    # B took over while A was cut off: A steps down and forgets the table of its active days.
    a.pair_receive(state(name="b", primary=0, st=ACTIVE, epoch=a.pair.epoch + 1, synced=7)._replace(warm=1), at)
    assert a.pair.state == PASSIVE and a.batching == {} and a.inner.batching is a.batching
    # The passive backup notes nothing; the peer it holds is told to register again at its takeover.
    b = PairedBroker(BrokerSettings(name="b", ha="backup", heartbeat_s=hb.heartbeat_s, liveness=4), "inc-b", 0.0)
    b.pair_receive(state(name="a", primary=1, st=ACTIVE, epoch=1), 0.0)
    assert any(isinstance(m, p.Bye) for m in hello(b, b"c2", p.ROLE_CLIENT, 0.05))
    assert b.batching == {} and b.inner.batching is b.batching


def test_an_active_pair_broker_forgets_a_client_that_says_bye_at_once():
    """A closing client's BYE reaches the machine behind a pair's door: the client and its batch
    limit, in the table the door shares, go at once (a pair kept them 10 ttls, as a lone broker did)."""
    from zmqdist.core.failover import PairedBroker

    settings = BrokerSettings(name="a", ha="primary", heartbeat_s=0.1, liveness=4)
    a = PairedBroker(settings, "inc-a", 0.0)
    enc = p.Encoder()
    a.pair_receive(state(name="b", primary=0, st=PENDING, epoch=0), 0.0)
    a.tick(0.01)
    assert a.pair.state == ACTIVE
    for c in (b"stays", b"closes"):
        out: list = []
        a.receive_frames(c, *enc.encode(p.Hello(p.ROLE_CLIENT, "c", (), 0, 100, batch=16)), 0.02, out)
        assert any(isinstance(m, p.Welcome) for _, m in out)
    assert set(a.batching) == {b"stays", b"closes"} and a.remembered()["clients"] == 2
    out = []
    a.receive_frames(b"closes", *enc.encode(p.Bye("client closed")), 0.03, out)
    assert out == [] and set(a.batching) == {b"stays"} and a.remembered()["clients"] == 1
    assert a.pair.state == ACTIVE


def test_a_passive_broker_forgets_the_peers_it_sent_away_once_a_heartbeat_has_passed():
    """A passive broker sends a peer to the active one at most once a heartbeat, and notes when.
    It kept every peer it had ever sent away until 100,000 of them: clients that list the passive
    broker first, or that come and go, grew it by about 140 bytes each (a probe: +1 MB over 6,000
    short-lived clients, rising). Now the peers told longer than a heartbeat ago are forgotten
    once a heartbeat, from a small table on; one told within the heartbeat is not told again."""
    b = pair("backup")
    hb = b.hb_s
    biggest = 0
    for step in range(400):  # 10 new peers every 10 ms for 4 s: 4,000 in all, 16 heartbeats
        now = step * 0.01
        for k in range(10):
            assert b.redirect_due(b"peer-%d-%d" % (step, k), now)
        biggest = max(biggest, len(b.redirected))
        if step % 50 == 1:  # told 10 ms ago, within the heartbeat: not again, a prune or not
            assert not b.redirect_due(b"peer-%d-0" % (step - 1), now)
    assert hb == 0.25 and biggest <= 1024 + 10 * round(hb / 0.01) + 10, biggest


def test_a_passive_broker_counts_its_peers_silence_from_its_own_resume_after_a_pause():
    """A stalled host (a VM paused, both brokers of a pair on it) stops both brokers at once. The
    passive one, resumed a moment before the active one, found it silent for the whole pause and
    took over with the first peer that came to it (measured: 2 of 4 such 5-s pauses of a whole
    topology; the live active broker stepped down, 16 requests ran twice in one). Silence across our own
    pause proves nothing (as for members, core/dispatch.py): it counts from the resume."""
    from zmqdist.core.failover import PairedBroker

    settings = BrokerSettings(name="b", ha="backup", heartbeat_s=0.25, liveness=4)  # ttl 1 s
    b = PairedBroker(settings, "inc-b", 0.0)
    b.pair_receive(state(name="a", primary=1, st=ACTIVE, epoch=1), 0.0)
    b.tick(0.01)
    assert b.pair.state == PASSIVE
    b.pair_receive(state(name="a", primary=1, st=ACTIVE, epoch=1), 1.0)
    # Both stopped from 1.1 to 6.1; b resumes first and a client comes to it.
    b.resumed(5.0, 6.1)
    req = p.Request(1, "echo", 5000, (), b"x")
    assert b.receive(b"C", req, 6.11) == [] and b"C" in b.pair.held  # held: not sent to a silent broker
    b.tick(6.12)
    assert b.pair.state == PASSIVE and b.pair.counters["takeovers"] == 0
    out = b.pair_receive(state(name="a", primary=1, st=ACTIVE, epoch=1), 6.2)  # a resumed: heard
    out += b.tick(6.21)
    assert b.pair.state == PASSIVE and [type(m) for peer, m in out if peer == b"C"] == [p.Bye]
    # A peer silent a ttl of the time b ran is taken for gone: heard at 6.2, b stopped 7.0 to 10.0.
    b.resumed(3.0, 10.0)
    b.receive(b"C", req, 10.1)
    b.tick(10.15)  # 0.8 s before the stop and 0.15 s after it: alive
    assert b.pair.state == PASSIVE
    b.receive(b"C", req, 10.25)
    b.tick(10.25)  # 1.05 s
    assert b.pair.state == ACTIVE and b.pair.counters["takeovers"] == 1


def test_a_passive_broker_paused_again_and_again_still_takes_over_from_a_dead_active_one():
    """Pauses of its own more often than once a ttl (a host stalled every half second, a starved
    thread): the peer's silence once counted from the last resume, so it never reached the ttl and
    a dead active broker was never taken over, all work refused. It counts the time b ran."""
    from zmqdist.core.failover import PairedBroker

    settings = BrokerSettings(name="b", ha="backup", heartbeat_s=0.25, liveness=4)  # ttl 1 s
    b = PairedBroker(settings, "inc-b", 0.0)
    b.pair_receive(state(name="a", primary=1, st=ACTIVE, epoch=1), 0.0)
    b.tick(0.01)
    assert b.pair.state == PASSIVE  # a dies now: never heard again
    req = p.Request(1, "echo", 5000, (), b"x")
    now, took_over = 0.0, None
    while now < 20.0 and took_over is None:
        now = round(now + 0.3, 6)
        b.resumed(0.3, now)  # stopped 0.3 s, then runs 0.3 s, a client coming to it
        for _ in range(3):
            b.receive(b"C", req, now)
            b.tick(now)
            if b.pair.state == ACTIVE:
                took_over = now
                break
            now = round(now + 0.1, 6)
    # 1 s of silence while b ran (its 0.3-s runs from 0.3 on): in its fourth run, not before.
    assert took_over is not None and 2.1 <= took_over <= 2.3, took_over
