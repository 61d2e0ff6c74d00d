"""The worker machine: registration, credit, task bookkeeping, drain, broker failover. Sans-IO.

Rules of this module:
1. Outputs are protocol messages (send to the broker) or actions: :class:`Execute` (run a handler),
   :class:`~zmqdist.core.link.Connect` (new socket to an endpoint), :class:`~zmqdist.core.link.Stopped`.
2. Each connection is a *session*. A result is sent only in the session its task came from: after a
   failover or a broker restart the broker has requeued that work, so a late result is dropped here.
   The exception is a backup pair (WELCOME names the broker's peer): tasks of a session with one
   broker of a pair are *carried* to the next session with either broker of that pair, whose copy
   of the request table expects them; their results are sent there (kept while unregistered),
   and heartbeats list them. A WELCOME from any other broker voids them like any old session's.
   Results sent to a paired broker are kept until it has answered a heartbeat sent after them
   (one connection is FIFO); the unconfirmed ones go again to the pair's other broker, so work
   finished while the active broker died is delivered, not run again.
3. The broker is told the capacity it may use: concurrency minus tasks still running from old
   sessions (carried ones too), raised again by CREDIT as those finish. It is never sent more
   than it can run.
4. A TASK beyond capacity is answered REFUSED (the broker requeues it without spending an
   attempt, and counts this worker full until its CREDIT or HELLO says more: offered again at
   once, it would refuse again); the next slot that frees after a refusal is told with CREDIT.
   A TASK before registration is dropped: one connection is FIFO, so it was sent before the broker
   saw our latest HELLO, to the registration that HELLO replaces (the broker requeues what that
   held; a refusal here would be taken for the new registration's). HELLOs are numbered for the
   worker's life and WELCOME says which it answers: one that answers an earlier HELLO is ignored
   (the later one registers again). Not welcomed a ttl after its HELLO, the worker says HELLO again:
   it was lost (a link cut and healed) while the broker kept the last session's registration.
5. Draining is exact: CREDIT(0) and a HEARTBEAT go out together, and BYE waits for the broker's
   answer to that heartbeat. Messages on one connection arrive in order, so every TASK the broker
   sent before it saw CREDIT(0) has arrived by then, and is run, not bounced.
6. The request lifecycle. A CANCEL from the broker, or a running task's deadline passing, makes
   an :class:`Abort` (the runtime stops the handler: a flag, a cancelled asyncio task, a killed
   process); the slot stays taken until the handler has stopped, and its RESULT is then
   CANCELLED. A streamed task's parts are numbered from 0 and each ACK opens its window
   (:class:`Window`): the runtime does not let a handler run ahead of the consumer by more than
   the window. Progress reports are sent at most every ``PROGRESS_S`` per task (the latest wins).
7. Away from its first choice (after a failover), the worker looks home now and then
   (:class:`~zmqdist.core.link.Homing`); once home answers as a healthy active broker, it quiets
   down exactly as a drain does (CREDIT(0), the answer to its heartbeat, its tasks finished) and
   then says BYE and registers at home. If that takes longer than ``MOVE_WAIT_S`` it stays (and
   takes work again) and looks later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from zmqdist import protocol as p
from zmqdist.config import HeartbeatSettings
from zmqdist.core.heaps import Due, heappop, heappush
from zmqdist.core.link import BrokerLink, Connect, EndProbe, Homing, Probe, Problem, Stopped

MOVE_WAIT_S: Final = 10.0  # longest quiet-down before moving home (else stay and look again later)
PROGRESS_S: Final = 0.1  # at most one progress report per task this often (the latest wins)
# A handler told to stop (cancelled, past its deadline, running elsewhere) that has not returned
# this long after is logged: it holds its slot until it returns, and nothing else would say so
# (the worker serves less and less, and the broker only sees it busy).
STUCK_S: Final = 10.0


def _half() -> float:
    return 0.5


class Execute(NamedTuple):
    """Action: run the handler of ``service`` on ``payload``; report with ``task_done``."""

    ticket: int
    session: int
    service: str
    payload: bytes
    key: str
    attempt: int
    deadline: float
    trace: str = ""
    window: int = 0  # > 0: the caller streams the reply; at most this many parts unacknowledged
    retry: p.RetrySpec = ()  # the caller's retry policy (it overrides the service's own)


EXECUTE_CLS: Final = Execute  # a C static, as protocol.REQUEST_CLS and the others


class Abort(NamedTuple):
    """Action: stop the handler of ``ticket`` (cancelled by its caller, or its deadline passed)."""

    ticket: int
    session: int
    reason: str


class Window(NamedTuple):
    """Action: the consumer of ``ticket``'s stream has taken ``acked`` parts; parts numbered below
    ``acked + window`` may be produced."""

    ticket: int
    session: int
    acked: int


class _Run:
    """A task this worker runs: what its lifecycle needs (cancel, stream, progress)."""

    __slots__ = (
        "acked",
        "cancelled",
        "deadline",
        "failed",
        "parts",
        "pending",
        "reported",
        "service",
        "session",
        "window",
    )

    def __init__(self, session: int, deadline: float, window: int, service: str) -> None:
        self.session = session
        self.deadline = deadline
        self.window = window
        self.service = service
        self.cancelled = False
        self.parts = 0  # parts sent
        self.acked = 0
        self.reported = -1e18  # when the last progress report went out
        self.pending: bytes | None = None  # a progress report held back (PROGRESS_S)
        self.failed = ""  # why the worker stopped it itself (a part over the broker's limit)


WorkerOut = p.Message | Execute | Connect | Stopped | Problem | Probe | EndProbe | Abort | Window


class WorkerCore:
    """Sans-IO worker: feed it broker messages, task completions and time."""

    def __init__(
        self,
        endpoints: tuple[str, ...],
        services: tuple[str, ...],
        concurrency: int,
        name: str,
        hb: HeartbeatSettings,
        now: float,
        rng: Callable[[], float] = _half,
    ) -> None:
        self.services = services
        self.concurrency = concurrency
        self.name = name
        self.batch = p.MAX_BATCH  # BATCH frames this worker reads (said in HELLO; 0: none)
        self.link = BrokerLink(endpoints, hb, now)
        self.session = 0
        self.registered = False
        self.draining = False
        self.stopped = False
        self._drain_deadline: float | None = None
        self._unanswered = 0  # heartbeats sent this session and not yet answered (answers are FIFO)
        self._drain_wait = 0  # answers due until the drain heartbeat's own (<= 0: drain answered)
        self.inflight: dict[p.Boxed, int] = {}  # ticket -> session, current session only
        self.stale = 0  # tasks still running from earlier sessions
        self._told = concurrency  # the capacity the last HELLO said
        self._hellos = 0  # HELLOs said in this worker's life (numbered: rule 4)
        self._hello_at = now  # when the last one was said
        self._refused = False  # a task was refused since the last CREDIT: tell the next free slot
        self.carry: dict[p.Boxed, int] = {}  # ticket -> session: running tasks of a pair's earlier session
        self.parked: list[p.Result] = []  # results of carried tasks finished while unregistered
        self._pair: tuple[str, ...] = ()  # the last broker's name and its pair peer's (if paired)
        # Results sent to a paired broker and not yet confirmed: (heartbeats sent before, result).
        self.unacked: deque[tuple[int, p.Result]] = deque()
        self._hb_sent = 0  # heartbeats sent since WELCOME this session
        self._hb_answered = 0  # answers to them received
        self._hb_early = 0  # heartbeats sent before WELCOME this session (answered first)
        self.seq_seen = 0  # highest task seq the broker is known to have sent this session
        self.homing = Homing(rng)
        self._moving: int | None = None  # the home endpoint we quiet down for
        self._move_until = 0.0
        self.runs: dict[p.Boxed, _Run] = {}  # ticket -> its run, while its handler runs
        self._deadlines = Due(self.runs, 64)  # of running tasks, by ticket
        self._stopping: list[tuple[float, int, str]] = []  # (when to look, ticket, why) of stopped runs
        self._progress_due: float | None = None  # the earliest held-back progress report
        self._abandoned: list[int] = []  # tasks of a void session (not carried): to stop
        self.counters = {
            "tasks": 0,
            "refused": 0,
            "void_results": 0,
            "failovers": 0,
            "broker_restarts": 0,
            "carried": 0,
            "fenced": 0,
            "homecomings": 0,
            "cancelled": 0,
            "hellos_again": 0,
            "void_tasks": 0,
            "expired": 0,
            "abandoned": 0,
            "parts": 0,
            "retries": 0,
            "too_large": 0,  # results over the broker's message limit, sent as a failure saying so
            "stuck": 0,  # handlers that had not returned STUCK_S after they were told to stop
        }
        self.max_message = 0  # the broker's message limit (its WELCOME says; 0: not known)

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, now: float) -> list[WorkerOut]:
        """Connect to the first endpoint and register."""
        return self._new_session(now, "start")

    def drain(self, now: float, timeout_s: float) -> list[WorkerOut]:
        """Stop taking work, finish what is in flight (at most ``timeout_s``), then say BYE."""
        if self.stopped:
            return []
        if self.draining:
            return []
        self.draining = True
        self._drain_deadline = now + timeout_s
        if not self.registered:
            return self._finish("drained before registration")
        out: list[WorkerOut] = [p.Credit(0), self._heartbeat()]
        self._drain_wait = self._unanswered  # the answer to the heartbeat just made is the last due
        return out

    def stop(self) -> list[WorkerOut]:
        """Leave at once: BYE (the broker requeues what we held) and stop."""
        if self.stopped:
            return []
        return self._finish("stopped")

    # --- inputs -----------------------------------------------------------------------------------

    def receive(self, msg: p.Message, now: float) -> list[WorkerOut]:
        """Handle one message from the broker."""
        if self.stopped:
            return []
        link = self.link
        link.last_heard = now
        if type(msg) is p.TASK_CLS:  # one per request: by a C static, before the match's lookups
            return self._on_task(msg, now)
        match msg:
            case p.Heartbeat():
                return self._on_heartbeat(msg, now)
            case p.Welcome():
                return self._on_welcome(msg, now)
            case p.Reconnect():
                return self._rehello(now)
            case p.Bye():
                self.counters["failovers"] += 1
                link.learn(msg.broker, msg.active)
                return self._new_session(now, f"broker said bye: {msg.reason}", to=msg.active)
            case p.Cancel():
                return self._abort(msg.id, "cancelled by its caller", now)
            case p.Ack():
                run = self.runs.get(msg.id)
                if run is None or msg.seq <= run.acked:
                    return []
                run.acked = msg.seq
                return [Window(msg.id, run.session, msg.seq)]
            case p.Error():
                return [Problem(f"broker refused a message: {msg.message}", "broker-input")]
        return [Problem(f"unexpected {type(msg).__name__} from broker ignored", "broker-input")]

    def _abort(self, ticket: int, reason: str, now: float) -> list[WorkerOut]:
        """Stop a running handler (its slot stays taken until it has stopped)."""
        run = self.runs.get(ticket)
        if run is None or run.cancelled:
            return []
        run.cancelled = True
        run.pending = None
        kind = "cancelled" if reason.startswith("cancelled") else "expired" if "deadline" in reason else "abandoned"
        self.counters[kind] += 1
        heappush(self._stopping, (now + STUCK_S, ticket, reason))
        return [Abort(ticket, run.session, reason)]

    def _stuck(self, now: float, out: list[WorkerOut]) -> None:
        """Say which handlers told to stop STUCK_S ago still run (each once): they hold their slots."""
        stopping = self._stopping
        while stopping and stopping[0][0] <= now:
            _, ticket, reason = heappop(stopping)
            run = self.runs.get(ticket)
            if run is None or not run.cancelled:
                continue  # returned (or its ticket runs anew)
            self.counters["stuck"] += 1
            held = sum(1 for r in self.runs.values() if r.cancelled)
            out.append(
                Problem(
                    f"the handler of {run.service!r} has not returned {STUCK_S:g} s after it was told to stop "
                    f"({reason}): it holds its slot until it returns ({held} of {self.concurrency} slots are "
                    "held so). A handler thread cannot be stopped from outside: check "
                    "current_request().cancelled now and then, or run the service with isolation='process' "
                    "and terminate_on_cancel=True",
                    "stuck",
                )
            )

    def part(self, ticket: int, session: int, payload: bytes, now: float) -> list[WorkerOut]:
        """A streaming handler produced its next value: the PART to send (none once its session
        is void or it was stopped)."""
        run = self.runs.get(ticket)
        if run is None or run.session != session or run.cancelled:
            return []
        if not self._sendable(ticket, session):
            return []
        if self.max_message and len(payload) > self.max_message:  # the broker would refuse it
            self.counters["too_large"] += 1
            run.failed = self._too_large(f"part {run.parts + 1} of the stream", len(payload))
            run.cancelled = True  # the handler is stopped; its RESULT says why (see _result)
            run.pending = None
            heappush(self._stopping, (now + STUCK_S, ticket, "its part was too large"))
            return [Abort(ticket, session, run.failed)]
        seq = run.parts
        run.parts = seq + 1
        self.counters["parts"] += 1
        return [p.Part(ticket, seq, payload)]

    def progress(self, ticket: int, session: int, payload: bytes, now: float) -> list[WorkerOut]:
        """A handler reported progress: send it, or hold it back until ``PROGRESS_S`` has passed
        since the last one (a newer report replaces a held one). One over the broker's limit is
        not sent (it is advisory; the broker would refuse it): logged, rate-limited."""
        run = self.runs.get(ticket)
        if run is None or run.session != session or run.cancelled or not self._sendable(ticket, session):
            return []
        if self.max_message and len(payload) > self.max_message:  # the broker would refuse it: stays here
            self.counters["too_large"] += 1
            return [Problem(f"progress report not sent: {self._too_large('it', len(payload))}", "too-large")]
        if now - run.reported >= PROGRESS_S:
            run.reported = now
            run.pending = None
            return [p.Progress(ticket, payload)]
        run.pending = payload
        due = run.reported + PROGRESS_S
        if self._progress_due is None or due < self._progress_due:
            self._progress_due = due
        return []

    def _sendable(self, ticket: int, session: int) -> bool:
        """Is a message about this task for the broker we are registered with now?"""
        if not self.registered:
            return False
        return self.inflight.get(ticket) == session or self.carry.get(ticket) == session

    def _on_heartbeat(self, msg: p.Heartbeat, now: float) -> list[WorkerOut]:
        link = self.link
        if link.restarted(msg.incarnation):
            self.counters["broker_restarts"] += 1
            return self._rehello(now)
        if (why := link.fenced(link.broker, link.peer, msg.epoch)) is not None:
            self.counters["fenced"] += 1
            return [Problem(why), *self._new_session(now, why)]
        self.seq_seen = max(self.seq_seen, msg.seq)
        self._unanswered = max(0, self._unanswered - 1)
        if self._hb_early:
            self._hb_early -= 1
        else:
            self._hb_answered += 1
            unacked = self.unacked
            while unacked and unacked[0][0] < self._hb_answered:
                unacked.popleft()  # a heartbeat sent after it was answered: it arrived
        if (self.draining or self._moving is not None) and self.registered:
            self._drain_wait -= 1
            return self._quiet(now)
        return []

    def probe_receive(self, msg: p.Message, now: float) -> list[WorkerOut]:
        """What the broker at home answered on the probe connection."""
        go, ends = self.homing.answer(self.link, msg, now)
        out: list[WorkerOut] = [*ends]
        if go is not None and self.registered and not self.draining and self._moving is None:
            self._moving = go  # quiet down as a drain does, then move
            self._move_until = now + MOVE_WAIT_S
            out += [p.Credit(0), self._heartbeat()]
            self._drain_wait = self._unanswered
        return out

    def task_done(
        self, ticket: p.Boxed, session: int, ok: bool, payload: bytes, now: float, retry_ms: int | None = None
    ) -> list[WorkerOut]:
        """A handler finished (``retry_ms``: it raised what its retry policy retries, run it again
        after that long). Return the RESULT to send (if its session is still current)."""
        out: list[WorkerOut] = []
        result = self._result(ticket, session, ok, payload, retry_ms)
        held = self.inflight.get(ticket)
        current = held is not None and held == session  # (compiled: two ints compared, none boxed)
        if self.carry and not current and self.carry.get(ticket) == session:
            del self.carry[ticket]
            if not self.registered:
                self.parked.append(result)  # for the next broker of the pair
                return out
            out.append(result)
            self.unacked.append((self._hb_sent, result))
            if not self.draining and not self.stopped and self._moving is None:
                out.append(self._credit())
            if self.draining or self._moving is not None:
                out += self._quiet(now)
            return out
        if session != self.session or not current:
            self.counters["void_results"] += 1
            if session != self.session and self.stale > 0:
                self.stale -= 1
                if self.registered and not self.draining and not self.stopped and self._moving is None:
                    out.append(self._credit())
            return out
        del self.inflight[ticket]
        if self.stopped:
            return out
        out.append(result)
        if self._pair:
            self.unacked.append((self._hb_sent, result))
        if self.draining or self._moving is not None:
            out += self._quiet(now)
        elif self._refused:
            out.append(self._credit())  # rule 4: what the broker now counts may be less than the truth
        return out

    def _result(self, ticket: p.Boxed, session: int, ok: bool, payload: bytes, retry_ms: int | None) -> p.Result:
        """The RESULT of a finished handler: CANCELLED if it was stopped; RETRY if its policy says
        so and no part of it went out; a stream's end says how many parts went before it."""
        run = self.runs.get(ticket)
        if run is not None and run.session == session:
            del self.runs[ticket]
        else:
            run = None
        parts = run.parts if run is not None else 0
        if run is not None and run.failed:
            return p.too_large(ticket, run.failed, parts)
        if run is not None and run.cancelled:
            return p.Result(ticket, p.RS_CANCELLED, b"", 0, parts)
        if self.max_message and len(payload) > self.max_message:
            fitted = self._fit(ok, payload)
            if fitted is None:
                why = self._too_large("the result", len(payload))
                return p.too_large(ticket, why, parts)
            payload = fitted
        if retry_ms is not None and not parts:
            self.counters["retries"] += 1
            return p.Result(ticket, p.RS_RETRY, payload, max(0, min(retry_ms, p.MAX_BUDGET_MS)))
        return p.message(p.RESULT_CLS, (ticket, p.RS_OK if ok else p.RS_FAILED, payload, 0, parts))

    def _fit(self, ok: bool, payload: bytes) -> bytes | None:
        """A result's payload over the broker's limit: the broker would refuse it and the caller
        wait out its deadline. A handler's own failure keeps its type, its message and traceback
        cut to fit; None: it must go as a ResultTooLarge failure."""
        self.counters["too_large"] += 1
        return None if ok else p.fit_error(payload, self.max_message)

    def _refit(self, r: p.Result) -> p.Result:
        """A result made under another broker's limit (parked at a failover), within this one's."""
        if not self.max_message or len(r.payload) <= self.max_message:
            return r
        fitted = self._fit(r.status == p.RS_OK, r.payload)
        if fitted is not None:
            return r._replace(payload=fitted)
        why = self._too_large("the result", len(r.payload))
        return p.too_large(r.ticket, why, r.parts)

    def _too_large(self, what: str, size: int) -> str:
        limit = self.max_message
        return f"{what} ({size} bytes) is over broker {self.link.broker}'s limit of {limit} bytes (--max-message-size)"

    def tick(self, now: float) -> list[WorkerOut]:
        """Heartbeat, detect a silent broker (fail over), enforce the drain timeout, stop handlers
        past their deadline, send held-back progress."""
        if self.stopped:
            return []
        out: list[WorkerOut] = []
        dl = self._deadlines
        while True:
            ticket: p.Boxed | None = dl.pop_due(now)
            if ticket is None:
                break
            run = self.runs.get(ticket)
            if run is not None and run.deadline <= now:
                out += self._abort(ticket, "its deadline passed", now)
        if self._stopping and self._stopping[0][0] <= now:
            self._stuck(now, out)
        if self._progress_due is not None and now >= self._progress_due:
            self._progress_due = None
            for ticket, run in self.runs.items():
                if run.pending is None:
                    continue
                due = run.reported + PROGRESS_S
                if now >= due:
                    if self._sendable(ticket, run.session):
                        out.append(p.Progress(ticket, run.pending))
                    run.pending, run.reported = None, now
                elif self._progress_due is None or due < self._progress_due:
                    self._progress_due = due
        if self._drain_deadline is not None and now >= self._drain_deadline:
            return self._finish(f"drain timed out with {len(self.inflight)} tasks unfinished")
        link = self.link
        if link.silent(now):
            self.counters["failovers"] += 1
            return self._new_session(now, f"broker at {link.endpoint} silent for {now - link.last_heard:.2f}s")
        if link.heartbeat_due(now):
            if self.registered or now - self._hello_at < link.ttl_s:
                out.append(self._heartbeat())
            else:  # rule 4: no WELCOME for a ttl: the HELLO was lost
                self.counters["hellos_again"] += 1
                out.append(self._hello(now))
        if self._moving is not None:
            if now >= self._move_until:  # too busy to quiet down: stay, take work again, look later
                self._moving = None
                out.append(self._credit())
        elif not self.draining:
            out += self.homing.tick(link, self.registered, now)
        return out

    def resumed(self, seconds: float, now: float) -> None:
        """The worker did not run for ``seconds`` (SIGSTOP, a stall): see ``BrokerLink.paused``.
        Nor did its handlers: a stopped one's STUCK_S counts on from where it was."""
        self.link.paused(seconds, now)
        if self._stopping:  # (the same shift for all keeps the heap's order)
            self._stopping = [(t + seconds, ticket, why) for t, ticket, why in self._stopping]

    def next_deadline(self) -> float | None:
        """Return when ``tick`` has something to do next."""
        if self.stopped:
            return None
        d = self.link.next_deadline()
        if self._drain_deadline is not None:
            d = min(d, self._drain_deadline)
        due = self._deadlines.first()
        if due is not None:
            d = min(d, due)
        if self._stopping:
            d = min(d, self._stopping[0][0])
        if self._progress_due is not None:
            d = min(d, self._progress_due)
        h = self.homing.next_deadline(self.link) if self._moving is None else self._move_until
        if h is not None:
            d = min(d, h)
        return d

    # --- internals --------------------------------------------------------------------------------

    def _heartbeat(self) -> p.Heartbeat:
        if not self.registered:
            self._hb_early += 1
            return p.Heartbeat(p.ROLE_WORKER, self.link.incarnation or "", 0, ())
        self._unanswered += 1
        self._hb_sent += 1
        held = (*self.inflight, *self.carry) if self.carry else tuple(self.inflight)
        return p.Heartbeat(p.ROLE_WORKER, self.link.incarnation or "", self.seq_seen, held)

    def _on_welcome(self, m: p.Welcome, now: float) -> list[WorkerOut]:
        if m.hello and m.hello != self._hellos:
            return []  # it answers an earlier HELLO: the latest one registers us (rule 4)
        link = self.link
        if (why := link.fenced(m.broker, m.peer, m.epoch)) is not None:
            self.counters["fenced"] += 1
            return [Problem(why), *self._new_session(now, why)]
        link.welcome(m)
        self.registered = True
        self.max_message = m.max_message
        pair = (m.broker, m.peer) if m.peer else ()
        out: list[WorkerOut] = []
        if self.carry or self.parked:
            if pair and (m.broker in self._pair or m.peer in self._pair):
                # The same pair: its request table expects these (results now, the rest later).
                self.counters["carried"] += len(self.carry) + len(self.parked)
                parked = [self._refit(r) for r in self.parked]  # this broker's limit may be smaller
                out += parked
                self.unacked.extend((0, r) for r in parked)
            else:
                self.counters["void_results"] += len(self.parked)
                self.stale += len(self.carry)  # the same capacity, now as stale work
                self.carry.clear()
            self.parked.clear()
            if not self.draining:
                # HELLO left out what was carried then; what finished since frees those slots.
                out.append(self._credit())
        elif self._capacity() != self._told and not self.draining and self._moving is None:
            # Stale work that HELLO left out ended before this WELCOME: those slots are free now
            # (without this the broker kept the HELLO's smaller capacity for good).
            self._told = self._capacity()
            out.append(p.Credit(self._told))
        self._pair = pair
        return out

    def _on_task(self, m: p.Task, now: float) -> list[WorkerOut]:
        fields: tuple[Any, ...] = m
        ticket: p.Boxed = fields[0]  # the object read (p.Boxed): it goes into three tables and the Execute
        self.seq_seen = max(self.seq_seen, m.seq)
        if ticket in self.inflight:
            return []  # the same task twice in one session: already running
        if ticket in self.runs:  # an earlier session's run of it still goes
            return [*self._disown(ticket, now), *self._on_task(m, now)]
        if not self.registered:
            self.counters["void_tasks"] += 1  # for the registration our latest HELLO replaces (rule 4)
            return []
        if len(self.inflight) + self.stale + len(self.carry) >= self.concurrency:
            self.counters["refused"] += 1
            self._refused = True
            return [p.Result(ticket, p.RS_REFUSED, b"")]
        self.counters["tasks"] += 1
        session = self.session
        self.inflight[ticket] = session
        deadline = p.deadline_at(now, m.budget_ms)
        self.runs[ticket] = _Run(session, deadline, m.window, m.service)
        self._deadlines.push(deadline, ticket)
        run = (ticket, session, m.service, m.payload, m.key, m.attempt, deadline, m.trace, m.window, m.retry)
        return [p.message(EXECUTE_CLS, run)]  # not Execute(...): see protocol.message

    def _disown(self, ticket: int, now: float) -> list[WorkerOut]:
        """The broker sends again a task whose run from an earlier session still goes (carried to
        a pair, or stale): it requeued that run (it took us for dead) and no longer counts on it.
        Stop it; its slot stays taken until it has stopped, and what it returns is dropped. Left
        running, a stream waiting for acknowledgements that now go to the new run would hold its
        thread and its slot for good."""
        run = self.runs[ticket]
        if self.carry.get(ticket) == run.session:
            del self.carry[ticket]
            self.stale += 1  # counted as a stale run now: see task_done
        out = self._abort(ticket, "its broker runs it again", now)
        del self.runs[ticket]
        return out

    def _capacity(self) -> int:
        return max(0, self.concurrency - self.stale - len(self.carry))

    def _hello(self, now: float) -> p.Hello:
        link = self.link
        self._hello_at = now
        self._told = self._capacity()
        self._refused = False
        self._hellos += 1
        hb_ms = round(link.hb_s * 1000)
        return p.Hello(
            p.ROLE_WORKER, self.name, self.services, self._told, hb_ms, link.top_epoch, self.batch, self._hellos
        )

    def _credit(self) -> p.Credit:
        self._refused = False
        return p.Credit(self._capacity())

    def _void_session(self) -> None:
        self.session += 1
        self.seq_seen = 0
        self._unanswered = 0
        self._hb_sent = self._hb_answered = self._hb_early = 0
        if self._pair:
            self.carry.update(self.inflight)  # the other broker of the pair may take them over
            self.parked.extend(r for _, r in self.unacked)  # maybe lost with the old connection
        else:
            self.stale += len(self.inflight)
            self._abandoned.extend(self.inflight)  # runs elsewhere now: stop them (see _stop_stale)
        self.unacked.clear()
        self.inflight.clear()
        self.registered = False

    def _stop_stale(self, now: float) -> list[WorkerOut]:
        """Stop the handlers of a void session's tasks: their broker requeued them (they run
        elsewhere) and drops their results; stopping them gives the capacity back sooner."""
        out: list[WorkerOut] = []
        for ticket in self._abandoned:
            out += self._abort(ticket, "its broker was lost: it runs elsewhere", now)
        self._abandoned.clear()
        return out

    def _rehello(self, now: float) -> list[WorkerOut]:
        """Register again on the same connection (the broker forgot us or restarted)."""
        self._void_session()
        self.link.incarnation = None
        if self.draining:
            return [*self._stop_stale(now), *self._finish("broker forgot us while draining")]
        return [*self._stop_stale(now), self._hello(now)]

    def _new_session(self, now: float, reason: str, to: str = "") -> list[WorkerOut]:
        """A new connection: to broker ``to`` if named (a BYE sent us there), else the next one."""
        self._void_session()
        self._moving = None
        if self.draining:
            return [*self._stop_stale(now), *self._finish(f"broker lost while draining ({reason})")]
        stop = self._stop_stale(now)
        return [*stop, self.link.connect_named(to, now, reason), *self.homing.cancel(), self._hello(now)]

    def _quiet(self, now: float) -> list[WorkerOut]:
        """CREDIT(0) was answered and nothing runs: end the drain, or move home."""
        if self._drain_wait > 0 or self.inflight or self.carry:
            return []
        if self.draining:
            return self._finish("drained")
        j = self._moving
        if j is None:
            return []
        # Every result went out on this connection before this BYE: one connection is FIFO.
        self._moving = None
        self.unacked.clear()
        self._void_session()
        self.counters["homecomings"] += 1
        reason = "going back to the first choice: it is active again"
        return [p.Bye(reason), self.link.connect_to(j, now, reason), self._hello(now)]

    def _finish(self, reason: str) -> list[WorkerOut]:
        self.stopped = True
        return [p.Bye(reason), Stopped(reason)]
