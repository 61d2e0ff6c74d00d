"""The poll loop every runtime uses: timers, ready sockets (also one replaced mid-run), the mailbox."""

import pytest
import zmq

from zmqdist.clock import MonotonicClock
from zmqdist.transport import Loop, Mailbox
from zmqdist.transport.loop import WATCH_MS


def _pair(ctx, ep):
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.linger = b.linger = 0
    b.bind(ep)
    a.connect(ep)
    return a, b


def test_the_loop_reads_ready_sockets_follows_a_replaced_socket_and_stops_from_the_mailbox():
    ctx = zmq.Context.instance()
    (a1, b1), (a2, b2) = _pair(ctx, "inproc://loop-1"), _pair(ctx, "inproc://loop-2")
    mailbox = Mailbox()
    loop = Loop(MonotonicClock(), mailbox)
    current = [b1]
    got, ticks, mail = [], [], []

    def read(now):
        got.append(current[0].recv())
        if got[-1] == b"one":
            current[0] = b2  # a failover replaced the socket: the loop must poll the new one
            a2.send(b"two")
        else:
            mailbox.post("stop")
        return False

    def on_mail(items, now):
        mail.extend(items)
        if "stop" in items:
            loop.stop()

    loop.watch(lambda: current[0], read)
    a1.send(b"one")
    loop.run(tick=lambda now: ticks.append(now) or now + 0.5, mail=on_mail)
    assert got == [b"one", b"two"] and mail == ["stop"]
    assert len(ticks) >= 2  # timers ran before each wait
    for s in (a1, b1, a2, b2):
        s.close()
    mailbox.close()


def test_a_backlog_is_read_again_before_the_timers_and_before_wait_runs_last_before_every_wait():
    """No timers while messages still wait (a read that hit its batch limit); ``before_wait`` (a
    worker hands its handler threads their tasks there) after the timers and the stuck check,
    before each poll, whether the turn read a backlog or waited."""
    ctx = zmq.Context.instance()
    a, b = _pair(ctx, "inproc://loop-before")
    mailbox = Mailbox()
    loop = Loop(MonotonicClock(), mailbox)
    order = []

    def read(now):
        order.append("read")
        b.recv()
        if order.count("read") == 3:
            loop.stop()
        return order.count("read") < 2  # the first read leaves a backlog, the second does not

    loop.watch(lambda: b, read)
    for _ in range(3):
        a.send(b"x")
    loop.run(
        tick=lambda now: order.append("tick") or None,
        mail=lambda items, now: None,
        stuck=lambda: order.append("stuck") or False,
        before_wait=lambda: order.append("before"),
    )
    assert order == ["tick", "stuck", "before", "read", "stuck", "before", "read", "tick", "stuck", "before", "read"]
    a.close()
    b.close()
    mailbox.close()


def test_a_source_without_a_socket_is_left_out_until_it_has_one_and_a_descriptor_is_watched_too():
    """A DealerLink has no socket between a failover's close and its connect (None); the loop polls
    the others meanwhile and the new socket once it is there. A source may be a file descriptor."""
    import os

    ctx = zmq.Context.instance()
    a, b = _pair(ctx, "inproc://loop-4")
    r, w = os.pipe()
    mailbox = Mailbox()
    loop = Loop(MonotonicClock(), mailbox)
    current = [None]
    got = []

    def read_fd(now):
        got.append(os.read(r, 10))
        current[0] = b  # the link has its socket now
        a.send(b"on the socket")
        return False

    def read_sock(now):
        got.append(b.recv())
        loop.stop()
        return False

    loop.watch(lambda: current[0], read_sock)
    loop.watch(lambda: r, read_fd)
    os.write(w, b"fd")
    loop.run(tick=lambda now: now + 0.5, mail=lambda items, now: None)
    assert got == [b"fd", b"on the socket"]
    for s in (a, b):
        s.close()
    os.close(r)
    os.close(w)
    mailbox.close()


class ScriptedClock:
    """Returns the given times in turn (then the last one): a wait that took longer than asked."""

    def __init__(self, *times):
        self.times = list(times)

    def now(self):
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


@pytest.mark.parametrize(
    ("due_in", "woke_at", "late"),
    [
        (0.1, 2.5, 2.4),  # asked to wait 0.1 s, woke 2.5 s later: paused 2.4 s
        # Nothing due for 10 s (a broker's next expiry): the wait is WATCH_MS, not a second (its
        # most), and a stop of 0.9 s inside it overran it. A stop inside a wait that ended before
        # the wait did was seen by nothing: a stall of about a ttl that ended just past a member's
        # expiry expired the member (stalled too) on the resume.
        (10.0, 0.9, 0.9 - WATCH_MS / 1000),
    ],
)
def test_a_wait_that_ends_much_later_than_asked_is_reported_as_a_pause_before_reading(due_in, woke_at, late):
    mailbox = Mailbox()
    mailbox.post("stop")  # the wait returns at once; the clock says time passed meanwhile
    clock = ScriptedClock(0.0, 0.0, 0.0, woke_at)  # the mark, turn start, before the wait, after the wait
    loop = Loop(clock, mailbox)
    seen = []

    def on_mail(items, now):
        seen.append(("mail", now))
        loop.stop()

    loop.run(tick=lambda now: now + due_in, mail=on_mail, paused=lambda s, now: seen.append(("paused", round(s, 3))))
    assert seen == [("paused", round(late, 3)), ("mail", woke_at)]
    mailbox.close()


def test_a_turn_whose_work_took_past_the_pause_threshold_is_reported_as_a_pause_before_the_next_tick():
    """Stopped while it worked (a read, the mail), not in the wait: the next turn says so before
    its tick, so the broker does not take its own stop for its clients' silence."""
    mailbox = Mailbox()
    mailbox.post("work")
    # the mark, turn 1 (start, before the wait, after it), turn 2 (start: 2.5 s on), then steady
    clock = ScriptedClock(0.0, 0.0, 0.0, 0.0, 2.5, 2.5)
    loop = Loop(clock, mailbox)
    seen = []

    def tick(now):
        seen.append(("tick", now))
        if len(seen) > 2:
            loop.stop()
        return now + 0.1

    loop.run(
        tick=tick, mail=lambda items, now: seen.append(("mail", now)), paused=lambda s, now: seen.append(("paused", s))
    )
    assert seen == [("tick", 0.0), ("mail", 0.0), ("paused", 2.5), ("tick", 2.5)]
    mailbox.close()


class SetClock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t


@pytest.mark.parametrize("stopped_in", ["tick", "before_wait"])
def test_a_stop_while_the_timers_ran_is_reported_as_a_pause_before_the_wait(stopped_in):
    """Stopped in the tick or just before the wait (a worker wakes its handler threads there), not
    in the wait nor in a read: nothing said so, the wait ended when asked, and the next tick took
    the pause for the broker's silence. A worker of a whole topology SIGSTOPped for 5 s failed
    over so, and its vote made the passive broker of the pair depose the live active one."""
    mailbox = Mailbox()
    mailbox.post("work")
    clock = SetClock()
    loop = Loop(clock, mailbox)
    seen = []

    def stop_here():
        if not any(e[0] == "paused" for e in seen) and clock.t == 0.0:
            clock.t = 2.5

    def tick(now):
        seen.append(("tick", now))
        if stopped_in == "tick":
            stop_here()
        if len([e for e in seen if e[0] == "tick"]) > 1:
            loop.stop()
        return now + 0.1

    loop.run(
        tick=tick,
        mail=lambda items, now: seen.append(("mail", now)),
        paused=lambda s, now: seen.append(("paused", s)),
        before_wait=stop_here if stopped_in == "before_wait" else None,
    )
    assert seen == [("tick", 0.0), ("paused", 2.5), ("mail", 2.5), ("tick", 2.5)]
    mailbox.close()


def test_a_debug_check_asks_its_logger_again_only_once_its_answer_is_old():
    import logging

    from zmqdist.transport.loop import DEBUG_RECHECK_S, DebugCheck

    logger = logging.getLogger("zmqdist.test.debugcheck")
    logger.setLevel(logging.INFO)
    check = DebugCheck(logger)
    assert check.at(100.0) is False
    logger.setLevel(logging.DEBUG)  # turned on at run time
    assert check.at(100.0 + DEBUG_RECHECK_S / 2) is False  # the last answer is still fresh
    assert check.at(100.0 + DEBUG_RECHECK_S) is True and check.on
    logger.setLevel(logging.NOTSET)


def test_an_idle_loop_lets_a_caller_drive_its_sockets_and_reads_what_came_meanwhile_before_its_timers():
    """A client's socket thread with nothing open lets go of its sockets for its wait (which then
    watches the mailbox and its deadline only); a caller's thread that takes them runs the same
    loop until its own condition holds; the socket thread, back, reads what came meanwhile
    before its timers run."""
    import threading

    ctx = zmq.Context.instance()
    a, b = _pair(ctx, "inproc://loop-park")
    mailbox = Mailbox()
    loop = Loop(MonotonicClock(), mailbox)
    hold = threading.Lock()
    events = []  # (thread, what, data)
    parked, owner_read = threading.Event(), threading.Event()

    def read(now):
        events.append((threading.current_thread(), "read", b.recv()))
        if threading.current_thread() is owner:
            owner_read.set()
        return False

    def tick(now):
        events.append((threading.current_thread(), "tick", None))
        return now + 60  # no deadline within the test: only the mailbox ends a parked wait

    def on_mail(items, now):
        events.append((threading.current_thread(), "mail", tuple(items)))
        if "stop" in items:
            loop.stop()

    def idle():
        parked.set()
        return True

    def run_owner():
        with hold:
            loop.run(tick=tick, mail=on_mail, hold=hold, idle=idle)

    loop.watch(lambda: b, read)
    owner = threading.Thread(target=run_owner)
    owner.start()
    assert parked.wait(10)
    assert hold.acquire(timeout=10)  # the socket thread let go while idle
    me = threading.current_thread()
    a.send(b"mine")
    loop.run(tick=tick, mail=on_mail, until=lambda: any(e[1] == "read" for e in events))
    assert [e for e in events if e[1] == "read"] == [(me, "read", b"mine")]  # on the caller's thread
    a.send(b"meanwhile")  # arrives while the caller still holds the sockets
    n = len(events)
    hold.release()
    mailbox.post("wake")  # what Client.call posts when it leaves requests open
    assert owner_read.wait(10)
    later = [what for who, what, _ in events[n:] if who is owner]
    assert (owner, "read", b"meanwhile") in events
    assert "tick" not in later[: later.index("read")]  # read before its timers
    mailbox.post("stop")
    owner.join(10)
    assert not owner.is_alive()
    a.close()
    b.close()
    mailbox.close()
