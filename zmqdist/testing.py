"""Test helpers shipped with zmqdist: a fake clock and an in-memory network of core machines.

:class:`Simulation` wires broker machines (one by default; any tree of proxies with ``add_broker``,
backup pairs with ``add_pair``) to any number of worker and client machines. Every message goes
through the real encoder and decoder, and into a broker through its one door for raw frames
(``receive_frames``), as in the runtime. Time is a :class:`FakeClock` that jumps to the next
deadline, so seconds of heartbeats and failures run in milliseconds without a single sleep. Knobs:
kill a node or a broker, partition it, drop messages at random, restart a broker.

Peers follow the ``Connect`` actions of their machines, like DEALER sockets: a message goes to the
broker at the endpoint a peer is connected to, and a broker's send to a peer that is connected
elsewhere fails (as ROUTER_MANDATORY reports EHOSTUNREACH) and is reported with ``send_failed``.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable
from heapq import heappop, heappush
from typing import Any

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings, HeartbeatSettings
from zmqdist.core.broker import BrokerMachine
from zmqdist.core.client import ClientCore, Completed, PartIn, Progressed
from zmqdist.core.failover import make_broker
from zmqdist.core.link import Connect, EndProbe, Probe, Problem, Stopped
from zmqdist.core.records import LOG, PAIR, UPSTREAM, Channel, Dest, Out
from zmqdist.core.worker import Abort, Execute, Window, WorkerCore
from zmqdist.errors import RemoteProtocolError
from zmqdist.policy import Retry


class FakeClock:
    """A clock that moves only when told, and never backwards."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds`` (>= 0)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards (advance by {seconds})")
        self._now += seconds

    def jump_to(self, t: float) -> None:
        """Move to time ``t`` (>= now)."""
        if t < self._now:
            raise ValueError(f"a clock cannot go backwards (from {self._now} to {t})")
        self._now = t


def tree_members(tree: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Return (broker names, worker names) found anywhere in a ``zmqdist.tree`` status."""
    brokers, workers = {tree["broker"]}, {w["name"] for w in tree["workers"]}
    for sub in tree.get("below", []):
        b, w = tree_members(sub)
        brokers |= b
        workers |= w
    return brokers, workers


def tick_until(machine: WorkerCore | ClientCore | BrokerMachine, t: float) -> list[Any]:
    """Run a machine's timers the way its runtime does, at each of its deadlines up to ``t`` (and
    at ``t``); return everything they emitted, in order."""
    out: list[Any] = []
    while (d := machine.next_deadline()) is not None and d < t:
        out += machine.tick(d)
    out += machine.tick(t)
    return out


def feed(machine: BrokerMachine, peer: bytes | Channel, frames: list[bytes], now: float) -> list[Out]:
    """Give ``machine`` one message of raw ``frames`` from ``peer`` the way the runtime does: from a
    ROUTER peer through its door, from the upstream link (``UPSTREAM``) decoded first (a message
    that does not decode is dropped there, as the upstream link's socket loop drops it)."""
    out: list[Out] = []
    if isinstance(peer, Channel):
        try:
            msg = p.decode(frames[0], frames[1]) if len(frames) == 2 else None
        except RemoteProtocolError:
            msg = None
        return machine.upstream_receive(msg, now) if msg is not None else out
    machine.receive_message(peer, frames, now, out)
    return out


class InvariantError(AssertionError):
    """Raised by :class:`Simulation` when a dispatch invariant breaks."""


def assert_each_ended_once(client: SimClient, n: int, status: int | None = None) -> None:
    """Every one of the ``n`` requests ``client`` submitted ended exactly once (and, if ``status``
    is given, every one with that status)."""
    missing = n - len(client.completed)
    assert missing == 0, f"{missing} requests never ended"
    twice = [rid for rid, v in client.completed.items() if len(v) != 1]
    assert not twice, f"requests that ended more than once: {twice[:5]}"
    if status is not None:
        bad = [v[0] for v in client.completed.values() if v[0].status != status]
        assert not bad, bad[:3]


class _Node:
    """A peer that connects to a broker endpoint (worker, client, or a proxy's upstream link)."""

    def __init__(self, sim: Simulation, ident: bytes) -> None:
        self.sim = sim
        self.ident = ident
        self.alive = True
        self.endpoint = ""
        self.conn = 0  # bumped at every Connect: a new socket (what was sent to the old one is lost)
        self.frozen_until = -1.0  # SIGSTOP: nothing runs until then; what arrives waits in its socket

    def deliver(self, msg: p.Message) -> None:
        raise NotImplementedError

    def probe_action(self, o: Probe | EndProbe) -> None:
        """A look at the first choice on a separate connection (its own identity)."""
        assert isinstance(self, (SimWorker, SimClient))
        node = self.sim.probes.get(self.ident)
        if node is None:
            node = self.sim.probes[self.ident] = _ProbeNode(self.sim, self.ident + b"~probe", self)
            self.sim.nodes[node.ident] = node
        node.conn += 1
        if type(o) is Probe:
            node.endpoint = o.endpoint
            self.sim.send_to_broker(node, o.message)
        else:
            node.endpoint = ""


class _ProbeNode(_Node):
    """The probe connection of a worker or client: what comes back goes to ``probe_receive``."""

    def __init__(self, sim: Simulation, ident: bytes, owner: SimWorker | SimClient) -> None:
        super().__init__(sim, ident)
        self.owner = owner

    def deliver(self, msg: p.Message) -> None:
        owner = self.owner
        if owner.alive:
            owner.handle(owner.core.probe_receive(msg, self.sim.clock.now()))


class _SimRun:
    """A task a SimWorker runs."""

    __slots__ = ("acked", "ex", "failures", "stopped", "streamed")

    def __init__(self, ex: Execute) -> None:
        self.ex = ex
        self.stopped = False  # aborted: the handler returns at once
        self.acked = 0
        self.streamed = 0  # parts produced
        self.failures = 0


class SimWorker(_Node):
    """A worker machine in the simulation with a fixed service time per task. Its handler, by value:

    - a string starting with ``fail``: raises ``ValueError``;
    - ``{"flaky": n}``: raises ``OSError`` on its first ``n`` runs (counted by ``attempt``), then
      returns the value; a retry policy (the caller's, else :attr:`retry`) decides what follows;
    - ``{"progress": n, "id": i}``: reports progress ``[i, 1]`` to ``[i, n]``, one per service
      time, then returns the value;
    - ``{"stream": n}``: a generator of ``n`` parts (0 to n-1), one per service time, never more
      than the caller's window ahead of its acknowledgements; with ``"pad": k`` each part is
      ``[i, k bytes]`` (parts of a size);
    - anything else: echoed.

    A cancel (or the deadline) stops a handler at once, as one that checks ``cancelled`` would.
    """

    def __init__(self, sim: Simulation, ident: bytes, core: WorkerCore, service_time: float) -> None:
        super().__init__(sim, ident)
        self.core = core
        self.service_time = service_time
        self.executed: list[str] = []  # idempotency keys, in order
        self.running = 0
        self.max_running = 0
        self.retry: Retry | None = None  # the service's retry policy
        self.runs: dict[tuple[int, int], _SimRun] = {}
        self.aborted: list[str] = []  # keys of the runs a cancel or deadline stopped
        self.parts_made = 0
        self.max_ahead = 0  # most parts of one stream produced and not yet acknowledged

    def deliver(self, msg: p.Message) -> None:
        self.handle(self.core.receive(msg, self.sim.clock.now()))

    def handle(self, outs: list[Any]) -> None:
        for o in outs:
            t = type(o)
            if t is Execute:
                self.executed.append(o.key)
                self.running += 1
                self.max_running = max(self.max_running, self.running)
                new = self.runs[(o.ticket, o.session)] = _SimRun(o)
                self.sim.at(self.sim.clock.now() + self.service_time, functools.partial(self._step, new))
            elif t is Abort:
                run = self.runs.get((o.ticket, o.session))
                if run is not None and not run.stopped:
                    run.stopped = True
                    self.aborted.append(run.ex.key)
                    self.sim.at(self.sim.clock.now(), functools.partial(self._step, run))
            elif t is Window:
                run = self.runs.get((o.ticket, o.session))
                if run is not None:
                    blocked = run.streamed >= run.acked + run.ex.window
                    run.acked = max(run.acked, o.acked)
                    if blocked and run.streamed < run.acked + run.ex.window:
                        self.sim.at(self.sim.clock.now() + self.service_time, functools.partial(self._step, run))
            elif t is Connect:
                self.endpoint = o.endpoint
                self.conn += 1
            elif t is Probe or t is EndProbe:
                self.probe_action(o)
            elif t is Stopped or t is Problem:
                continue
            else:
                self.sim.send_to_broker(self, o)

    def _step(self, run: _SimRun) -> None:
        """The handler of ``run`` advances: it ends, or (a stream) produces its next part."""
        o = run.ex
        key = (o.ticket, o.session)
        if not self.alive or self.runs.get(key) is not run:
            return
        now = self.sim.clock.now()
        if self.frozen_until > now:  # its handler threads are stopped too
            self.sim.at(self.frozen_until, functools.partial(self._step, run))
            return
        if run.stopped:
            self._end(run, False, b"")
            return
        value = p.unpack_value(o.payload)
        if isinstance(value, dict) and "stream" in value:
            n = int(value["stream"])
            if run.streamed < n:
                if o.window and run.streamed >= run.acked + o.window:
                    return  # wait for the consumer (a Window resumes it)
                self.parts_made += 1
                run.streamed += 1
                self.max_ahead = max(self.max_ahead, run.streamed - run.acked)
                i = run.streamed - 1
                part = [i, b"x" * int(value["pad"])] if "pad" in value else i
                self.handle(self.core.part(o.ticket, o.session, p.pack_value(part), now))
                if not o.window or run.streamed < run.acked + o.window or run.streamed == n:
                    self.sim.at(now + self.service_time, functools.partial(self._step, run))
                return
            self._end(run, True, p.pack_value(None))
            return
        if isinstance(value, dict) and "progress" in value and run.streamed < int(value["progress"]):
            run.streamed += 1  # one report per service time, then the value
            self.handle(self.core.progress(o.ticket, o.session, p.pack_value([value["id"], run.streamed]), now))
            self.sim.at(now + self.service_time, functools.partial(self._step, run))
            return
        if isinstance(value, dict) and "flaky" in value and o.attempt <= int(value["flaky"]):
            policy = Retry.from_spec(o.retry) if o.retry else self.retry
            exc = OSError(f"flaky run {o.attempt}")
            delay = policy.decide(exc, o.attempt, self.sim.rng.random) if policy is not None else None
            self._end(run, False, p.pack_error("OSError", str(exc), ""), delay)
            return
        if type(value) is str and value.startswith("fail"):  # the handler raises
            self._end(run, False, p.pack_error("ValueError", value, ""))
            return
        self._end(run, True, p.pack_value(value))

    def _end(self, run: _SimRun, ok: bool, payload: bytes, retry_ms: int | None = None) -> None:
        o = run.ex
        del self.runs[(o.ticket, o.session)]
        self.running -= 1
        self.handle(self.core.task_done(o.ticket, o.session, ok, payload, self.sim.clock.now(), retry_ms))


class SimClient(_Node):
    """A client machine that records every completion (duplicates would show as a list > 1), and
    every part of its streams (consumed ``consume_s`` apart: 0 takes each at once)."""

    def __init__(self, sim: Simulation, ident: bytes, core: ClientCore) -> None:
        super().__init__(sim, ident)
        self.core = core
        self.completed: dict[int, list[Completed]] = {}
        self.completed_at: dict[int, float] = {}  # fake time of each request's first completion
        self.parts: dict[int, list[Any]] = {}  # stream -> the values of its parts, in arrival order
        self.progress: dict[int, list[Any]] = {}
        self.consume_s = 0.0
        self._backlog: dict[int, int] = {}  # stream -> parts arrived and not consumed yet
        self._rid = 0

    def submit(
        self,
        service: str,
        value: Any,
        timeout: float = 5.0,
        *,
        key: str = "",
        window: int = 0,
        retry: Retry | None = None,
    ) -> int:
        """Send a request (``window`` > 0: a stream); return its id."""
        self._rid += 1
        options = (key, window, retry.spec() if retry is not None else ())
        busy = (retry.attempts, retry.backoff, retry.max_backoff) if retry is not None and retry.retries_busy else None
        now = self.sim.clock.now()
        self.handle(self.core.submit(self._rid, service, p.pack_value(value), timeout, now, "", options, busy))
        return self._rid

    def cancel(self, rid: int) -> None:
        """Cancel request ``rid`` (as ``Future.cancel()`` does)."""
        self.handle(self.core.cancel(rid, self.sim.clock.now()))

    def deliver(self, msg: p.Message) -> None:
        self.handle(self.core.receive(msg, self.sim.clock.now()))

    def handle(self, outs: list[Any]) -> None:
        for o in outs:
            t = type(o)
            if t is Completed:
                self.completed.setdefault(o.rid, []).append(o)
                self.completed_at.setdefault(o.rid, self.sim.clock.now())
            elif t is PartIn:
                self.parts.setdefault(o.rid, []).append(p.unpack_value(o.payload))
                n = self._backlog[o.rid] = self._backlog.get(o.rid, 0) + 1
                if self.consume_s <= 0:
                    self._consume(o.rid)
                elif n == 1:
                    self.sim.at(self.sim.clock.now() + self.consume_s, functools.partial(self._consume, o.rid))
            elif t is Progressed:
                self.progress.setdefault(o.rid, []).append(p.unpack_value(o.payload))
            elif t is Connect:
                self.endpoint = o.endpoint
                self.conn += 1
            elif t is Probe or t is EndProbe:
                self.probe_action(o)
            elif t is Problem:
                continue
            else:
                self.sim.send_to_broker(self, o)

    def _consume(self, rid: int) -> None:
        """The caller takes the next part of stream ``rid``."""
        if not self.alive or self._backlog.get(rid, 0) <= 0:
            return
        self._backlog[rid] -= 1
        taken = len(self.parts[rid]) - self._backlog[rid]
        self.handle(self.core.consumed(rid, taken))
        if self._backlog[rid] > 0 and self.consume_s > 0:
            self.sim.at(self.sim.clock.now() + self.consume_s, functools.partial(self._consume, rid))


class SimBroker(_Node):
    """A broker machine at ``endpoint``; as a node it is its own upstream link (a DEALER)."""

    def __init__(self, sim: Simulation, name: str, endpoint: str, settings: BrokerSettings) -> None:
        super().__init__(sim, b"")
        self.name = name
        self.at_endpoint = endpoint
        self.settings = settings
        self.runs = 0
        self.plain_served = 0  # messages the per-request fast path took (straight from their frames)
        self._held: list[tuple[Dest, Any]] = []  # for peers that read batches, until the end of the instant
        self.problems: list[str] = []
        self.pair_peer: SimBroker | None = None  # the other broker of its backup pair
        self.core = self._new_core()

    def _new_core(self) -> BrokerMachine:
        self.runs += 1
        self.ident = f"b:{self.name}#{self.runs}".encode()  # a new run has a new DEALER identity
        self._held = []
        self.endpoint = ""
        self.expired_at: dict[bytes, float] = {}
        now = self.sim.clock.now()
        # a pair's epoch floor: the (fake) wall clock in milliseconds, as the runtime gives it
        return make_broker(
            self.settings, f"{self.name}-inc{self.runs}", now, rng=self.sim.rng.random, epoch_floor=int(now * 1000)
        )

    def start(self) -> None:
        self.out(self.core.start(self.sim.clock.now()))

    def restart(self) -> None:
        """A new run (empty tables, new incarnation) at the same endpoint. The other broker of its
        pair reconnects to it after ``Simulation.pair_reconnect_s`` (libzmq's backoff)."""
        if self.pair_peer is not None:
            self.sim.pair_down_until[self.pair_peer.name] = self.sim.clock.now() + self.sim.pair_reconnect_s
        self.core = self._new_core()
        self.alive = True
        self.frozen_until = -1.0
        self.sim.nodes[self.ident] = self
        self.start()

    def deliver(self, msg: p.Message) -> None:
        self.out(self.core.upstream_receive(msg, self.sim.clock.now()))

    def receive_from(self, ident: bytes, frames: tuple[bytes, bytes]) -> None:
        if self.alive and self.frozen_until > self.sim.clock.now():  # waits in its socket
            self.sim.at(self.frozen_until, functools.partial(self.receive_from, ident, frames))
        elif self.alive:
            now = self.sim.clock.now()
            out: list[Out] = []
            if self.sim.plain:
                if self.core.receive_frames(ident, frames[0], frames[1], now, out):  # the door, as the runtime
                    self.plain_served += 1
            else:
                msg = p.decode(*frames)  # the general path only
                if type(msg) is p.Hello:
                    self.core.note_batching(ident, msg.batch)
                out = self.core.receive(ident, msg, now)
            self.out(out)
            self.out(self.core.flush(now))

    def receive_pair(self, run: int, frames: tuple[bytes, bytes]) -> None:
        """A message on the pair link, sent to our run ``run`` (a restarted run has a new link)."""
        if self.alive and run == self.runs and self.frozen_until > self.sim.clock.now():
            self.sim.at(self.frozen_until, functools.partial(self.receive_pair, run, frames))
        elif self.alive and run == self.runs:
            self.out(self.core.receive_pair_frames(list(frames), self.sim.clock.now()))

    def out(self, outs: list[Any]) -> None:
        """Send what the machine produced. What goes to a peer that reads BATCH frames is held
        until the end of this instant (every message arriving now handled first) and goes as one
        BATCH: the runtime's natural batching (it reads what is waiting, then writes)."""
        sim = self.sim
        now = sim.clock.now()
        tasked: set[bytes] = set()  # workers sent a task in this batch (checked against capacity)
        batching = self.core.batching
        for ident, msg in outs:
            t = type(msg)
            if sim.sent is not None:
                sim.sent.append((now, self.name, ident, msg))
            if ident is PAIR:
                if t is Problem:
                    self.problems.append(msg.message)
                elif self._pair_link_up(reply=t is p.PairState):
                    peer = self.pair_peer
                    assert peer is not None
                    sim.at(now + sim.latency, functools.partial(peer.receive_pair, peer.runs, p.encode(msg)))
                continue
            if ident is LOG:
                self.problems.append(msg.message)
                continue
            if ident is UPSTREAM:
                if t is Connect:
                    self.endpoint = msg.endpoint
                    self.conn += 1
                elif t is Problem:
                    self.problems.append(msg.message)
                else:
                    sim.send_to_broker(self, msg)
                continue
            if t is p.Task:
                if ident in self.expired_at and ident not in self.core.members():
                    raise InvariantError(f"{self.name} sent a task to {ident!r}, which it had declared dead")
                sim.tasks_sent.append((now, ident))
                tasked.add(ident)
            if ident in batching:
                if not self._held:
                    sim.at(now, functools.partial(self._flush_held, self.runs))
                self._held.append((ident, msg))
                continue
            self._send(ident, [msg], now)
        if tasked:
            # A worker may hold more than its capacity after lowering it (CREDIT 0 to drain or to
            # move home, with work still running): what must never happen is a task sent beyond it.
            load = self.core.worker_load()
            for ident in tasked:
                n, cap = load.get(ident, (0, 0))
                if n > cap:
                    raise InvariantError(f"{self.name} sent a task to worker {ident!r}: it holds {n}, capacity {cap}")

    def _send(self, ident: bytes, msgs: list[p.Message], now: float) -> None:
        """Send ``msgs`` to peer ``ident``: one message as itself, several as one BATCH (all of it
        arrives, or none)."""
        sim = self.sim
        node = sim.nodes.get(ident)
        if node is None or node.endpoint != self.at_endpoint:
            # The peer's connection is not with us (it moved on): the ROUTER cannot route it.
            for msg in msgs:
                self.out(self.core.send_failed(ident, msg, now))
            return
        if sim.lost(self.ident_of_endpoint(), ident):
            return
        if len(msgs) == 1:
            frames = p.encode(msgs[0])
        else:
            sim.batches[ident] = sim.batches.get(ident, 0) + 1
            frames = (p.BATCH_HEAD, p.pack_batch([f for msg in msgs for f in p.encode(msg)]))
        delay = sim.latency + (sim.far.get(node.name, 0.0) if isinstance(node, SimBroker) else 0.0)
        sim.at(now + delay, functools.partial(sim.deliver_to_node, ident, frames, node.conn))

    def _flush_held(self, run: int) -> None:
        """The end of an instant: what was held for peers that read batches goes out, several
        messages for one peer as one BATCH (all of it arrives, or none)."""
        if run != self.runs:
            return  # held by a run that was killed since: lost with it (_new_core dropped them)
        held, self._held = self._held, []  # (killed since: what it made before was written already)
        sim = self.sim
        now = sim.clock.now()
        batches, rest = self.core.group(held)
        for ident, msg in rest:
            self._send(ident, [msg], now)  # type: ignore[arg-type,list-item]  # to a peer: bytes, a message
        for ident, msgs in batches:
            self._send(ident, msgs, now)

    def _pair_link_up(self, reply: bool = False) -> bool:
        """Can a message go to the other broker of the pair? On our own connection to it (down
        while it reconnects, see ``Simulation.pair_reconnect``), or (``reply``: a PairState, which
        the runtime also answers on the connection the peer made to us) on the peer's."""
        peer, sim = self.pair_peer, self.sim
        if peer is None or not peer.alive or {self.name, peer.name} & sim.pair_cut:
            return False
        if self.ident in sim.partitioned or peer.ident in sim.partitioned:
            return False
        now = sim.clock.now()
        if now >= sim.pair_down_until.get(self.name, 0.0):
            return True
        return reply and now >= sim.pair_down_until.get(peer.name, 0.0)

    def ident_of_endpoint(self) -> bytes:
        return self.at_endpoint.encode()

    def tick(self) -> None:
        now = self.sim.clock.now()
        before = self.core.members()
        self.out(self.core.tick(now))
        self.out(self.core.flush(now))
        for ident in before - self.core.members():
            self.expired_at[ident] = now


class Simulation:
    """An in-memory network of brokers, workers and clients on a fake clock.

    ``Simulation()`` has one broker, named ``broker`` at :attr:`BROKER`; :meth:`add_broker` adds
    more (``upstream`` makes a proxy). Workers and clients connect to the default broker unless
    given ``endpoints``.
    """

    BROKER = "sim://broker"

    def __init__(
        self,
        settings: BrokerSettings | None = None,
        *,
        latency: float = 0.0001,
        seed: int = 0,
        hb: HeartbeatSettings | None = None,
        plain: bool = True,
    ) -> None:
        self.clock = FakeClock()
        # Brokers take messages through their door (fast path first), as the runtime does;
        # False sends every message through decode and receive (the equivalence test runs both).
        self.plain = plain
        self.sent: list[tuple[float, str, object, p.Message | Connect | Problem]] | None = (
            None  # a list: every message brokers send is recorded
        )
        self.settings = settings or BrokerSettings()
        self.hb = hb or self.settings.heartbeat
        self.latency = latency
        self.rng = random.Random(seed)
        self.drop_rate = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.brokers: dict[str, SimBroker] = {}  # by name
        self._at: dict[str, SimBroker] = {}  # by endpoint
        self.workers: dict[str, SimWorker] = {}
        self.clients: dict[str, SimClient] = {}
        self.nodes: dict[bytes, _Node] = {}
        self.probes: dict[bytes, _ProbeNode] = {}  # a peer's identity -> its probe connection
        self.partitioned: set[bytes] = set()
        self.pair_cut: set[str] = set()  # brokers whose pair link is cut
        # broker -> until when its own connection to the other broker of its pair is down (libzmq
        # reconnects with a backoff after the other one restarted; ``pair_reconnect_s``)
        self.pair_down_until: dict[str, float] = {}
        self.pair_reconnect_s = 0.0
        self.cut_links: set[frozenset[bytes]] = set()  # (node, broker endpoint) connections cut
        self.far: dict[str, float] = {}  # broker name -> one-way delay added on its upstream link
        self.tasks_sent: list[tuple[float, bytes]] = []
        self.batches: dict[bytes, int] = {}  # BATCH frames brokers sent, by peer
        self.add_broker("broker", settings=self.settings)

    # --- building -------------------------------------------------------------------------------

    @staticmethod
    def endpoint(name: str) -> str:
        """The endpoint of the broker named ``name``."""
        return f"sim://{name}"

    def add_broker(
        self, name: str, upstream: tuple[str, ...] = (), settings: BrokerSettings | None = None
    ) -> SimBroker:
        """Add a broker named ``name``; ``upstream`` lists broker names in failover order (a proxy)."""
        base = settings or self.settings
        settings = dataclasses.replace(base, name=name, upstream=tuple(self.endpoint(u) for u in upstream))
        b = SimBroker(self, name, self.endpoint(name), settings)
        self.brokers[name] = b
        self._at[b.at_endpoint] = b
        self.nodes[b.ident] = b
        b.start()
        return b

    def add_pair(
        self,
        primary: str,
        backup: str,
        upstream: tuple[str, ...] = (),
        settings: BrokerSettings | None = None,
        failback: str = "manual",
        backup_settings: BrokerSettings | None = None,
    ) -> tuple[SimBroker, SimBroker]:
        """Add a backup pair of brokers (``upstream`` as for :meth:`add_broker`; the backup takes
        ``backup_settings`` if given, else the primary's); peers list both names in ``via``."""
        base = settings or self.settings
        a = self.add_broker(primary, upstream, dataclasses.replace(base, ha="primary", failback=failback))
        base = backup_settings or base
        b = self.add_broker(backup, upstream, dataclasses.replace(base, ha="backup", failback=failback))
        a.pair_peer, b.pair_peer = b, a
        return a, b

    def cut_pair(self, name: str) -> None:
        """Cut the pair link of broker ``name`` (both ways) until :meth:`heal_pair`."""
        self.pair_cut.add(name)

    def heal_pair(self, name: str) -> None:
        self.pair_cut.discard(name)

    def cut_link(self, node: str, broker: str) -> None:
        """Cut the connection between worker or client ``node`` and broker ``broker`` only."""
        self.cut_links.add(frozenset((self._node(node).ident, self.endpoint(broker).encode())))

    def heal_link(self, node: str, broker: str) -> None:
        self.cut_links.discard(frozenset((self._node(node).ident, self.endpoint(broker).encode())))

    def active(self, *names: str) -> list[str]:
        """The names (of those given) of live brokers that are active (brokers alone count)."""
        return [n for n in names if self.brokers[n].alive and not self.brokers[n].core.standby]

    @property
    def broker(self) -> BrokerMachine:
        """The default broker's machine."""
        return self.brokers["broker"].core

    @property
    def expired_at(self) -> dict[bytes, float]:
        """When the default broker declared each member dead (fake seconds), by identity."""
        return self.brokers["broker"].expired_at

    def _endpoints(self, endpoints: tuple[str, ...] | None, via: tuple[str, ...] | None) -> tuple[str, ...]:
        if via is not None:
            return tuple(self.endpoint(v) for v in via)
        return endpoints or (self.BROKER,)

    def add_worker(
        self,
        name: str,
        services: tuple[str, ...] = ("echo",),
        concurrency: int = 1,
        service_time: float = 0.01,
        *,
        via: tuple[str, ...] | None = None,
        endpoints: tuple[str, ...] | None = None,
        batch: bool = True,
    ) -> SimWorker:
        """Add a worker and start it; ``via`` names the brokers it connects to, in failover order;
        ``batch=False``: it does not read BATCH frames (a peer of the first protocol revision)."""
        ident = f"w:{name}".encode()
        eps = self._endpoints(endpoints, via)
        core = WorkerCore(eps, services, concurrency, name, self.hb, self.clock.now(), self.rng.random)
        if not batch:
            core.batch = 0
        w = SimWorker(self, ident, core, service_time)
        self.workers[name] = w
        self.nodes[ident] = w
        w.handle(core.start(self.clock.now()))
        return w

    def add_client(
        self,
        name: str = "client",
        *,
        via: tuple[str, ...] | None = None,
        endpoints: tuple[str, ...] | None = None,
        batch: bool = True,
    ) -> SimClient:
        """Add a client and start it; ``via`` names the brokers it connects to, in failover order;
        ``batch=False``: it does not read BATCH frames."""
        ident = f"c:{name}".encode()
        core = ClientCore(self._endpoints(endpoints, via), name, self.hb, self.clock.now(), self.rng.random)
        if not batch:
            core.batch = 0
        c = SimClient(self, ident, core)
        self.clients[name] = c
        self.nodes[ident] = c
        c.handle(core.start(self.clock.now()))
        return c

    # --- knobs ----------------------------------------------------------------------------------

    def _node(self, name: str) -> _Node:
        return self.workers.get(name) or self.clients.get(name) or self.brokers[name]

    def freeze(self, name: str, seconds: float) -> None:
        """Stop a worker, client or broker for ``seconds`` (SIGSTOP, then SIGCONT): its timers do
        not run and what is sent to it waits, delivered in order when it resumes, before its timers
        run. On resuming it is told it was paused, as the runtime's poll loop tells it."""
        node = self._node(name)
        node.frozen_until = until = self.clock.now() + seconds
        if isinstance(node, (SimWorker, SimClient)):
            self.at(until, functools.partial(node.core.resumed, seconds, until))
        elif isinstance(node, SimBroker):
            self.at(until, lambda: node.core.resumed(seconds, until))  # its run then, if restarted

    def kill(self, name: str) -> None:
        """Kill a worker, client or broker: it sends and receives nothing more, like SIGKILL."""
        self._node(name).alive = False

    def partition(self, name: str) -> None:
        """Cut a node (for a broker: its endpoint and its upstream link) off until :meth:`heal`."""
        node = self._node(name)
        self.partitioned.add(node.ident)
        if isinstance(node, SimBroker):
            self.partitioned.add(node.ident_of_endpoint())

    def heal(self, name: str) -> None:
        node = self._node(name)
        self.partitioned.discard(node.ident)
        if isinstance(node, SimBroker):
            self.partitioned.discard(node.ident_of_endpoint())

    def kill_broker(self, name: str = "broker") -> None:
        self.brokers[name].alive = False

    def restart_broker(self, name: str = "broker") -> None:
        """Start a new run of a broker (empty tables, new incarnation) at the same endpoint."""
        self.brokers[name].restart()

    # --- network --------------------------------------------------------------------------------

    MAX_IN_FLIGHT = 200_000  # messages and timers pending at once: more is a message storm

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heappush(self._events, (t, self._seq, fn))
        if len(self._events) > self.MAX_IN_FLIGHT:
            raise InvariantError(f"{len(self._events)} messages in flight at t={self.clock.now():.3f}: a message storm")

    def lost(self, a: bytes, b: bytes) -> bool:
        """Return True if a message between ``a`` and ``b`` is lost (partition or random drop)."""
        part = self.partitioned
        if a in part or b in part or (self.cut_links and frozenset((a, b)) in self.cut_links):
            return True
        return self.drop_rate > 0 and self.rng.random() < self.drop_rate

    def send_to_broker(self, node: _Node, msg: p.Message) -> None:
        """``node`` sends ``msg`` on its connection (to the broker at its endpoint)."""
        broker = self._at.get(node.endpoint)
        if broker is None or self.lost(node.ident, node.endpoint.encode()):
            return
        frames = p.encode(msg)
        ident = node.ident
        delay = self.latency + (self.far.get(node.name, 0.0) if isinstance(node, SimBroker) else 0.0)
        self.at(self.clock.now() + delay, functools.partial(self._to_broker, broker, node, ident, frames))

    def _to_broker(self, broker: SimBroker, node: _Node, ident: bytes, frames: tuple[bytes, bytes]) -> None:
        # A connection carries messages only while both ends are on it.
        if node.endpoint == broker.at_endpoint and node.ident == ident:
            broker.receive_from(ident, frames)

    def deliver_to_node(self, ident: bytes, frames: tuple[bytes, bytes], conn: int | None = None) -> None:
        node = self.nodes.get(ident)
        if node is None or not node.alive or node.ident != ident:
            return
        if node.frozen_until > self.clock.now():
            self.at(node.frozen_until, functools.partial(self.deliver_to_node, ident, frames, conn))
            return
        if conn is not None and node.conn != conn:
            return  # sent on a connection the node has closed since (a failover): lost, as with zmq
        if frames[0] == p.BATCH_HEAD:
            core = getattr(node, "core", None)
            if isinstance(core, (WorkerCore, ClientCore)) and not core.batch:
                raise InvariantError(f"a BATCH went to {ident!r}, which said in HELLO that it does not read them")
            for one in p.frames_of(*frames):
                if node.alive and node.ident == ident and (conn is None or node.conn == conn):
                    node.deliver(p.decode(*one))
            return
        node.deliver(p.decode(*frames))

    # --- running --------------------------------------------------------------------------------

    def _tick_all(self) -> None:
        now = self.clock.now()
        for b in list(self.brokers.values()):
            if b.alive and b.frozen_until <= now and (d := b.core.next_deadline()) is not None and d <= now:
                b.tick()
        for node in list(self.nodes.values()):
            if node.alive and isinstance(node, (SimWorker, SimClient)) and node.frozen_until <= now:
                d = node.core.next_deadline()
                if d is not None and d <= now:
                    node.handle(node.core.tick(now))

    def _next_time(self) -> float | None:
        times = []
        if self._events:
            times.append(self._events[0][0])
        now = self.clock.now()
        for b in self.brokers.values():
            if b.alive and b.frozen_until > now:
                times.append(b.frozen_until)  # its timers wait until it resumes
            elif b.alive and (d := b.core.next_deadline()) is not None:
                times.append(d)
        for node in self.nodes.values():
            if node.alive and isinstance(node, (SimWorker, SimClient)):
                if node.frozen_until > now:
                    times.append(node.frozen_until)  # its timers wait until it resumes
                    continue
                d = node.core.next_deadline()
                if d is not None:
                    times.append(d)
        return min(times) if times else None

    def run_until(self, t_end: float, max_steps: int = 2_000_000) -> None:
        """Run events and timers in time order until ``t_end`` (fake seconds)."""
        for _ in range(max_steps):
            t = self._next_time()
            if t is None or t > t_end:
                self.clock.jump_to(max(self.clock.now(), t_end))
                self._tick_all()
                return
            self.clock.jump_to(max(self.clock.now(), t))
            while self._events and self._events[0][0] <= self.clock.now():
                heappop(self._events)[2]()
            self._tick_all()
        raise InvariantError(f"simulation did not reach t={t_end} within {max_steps} steps")

    def run_for(self, seconds: float) -> None:
        """Run for ``seconds`` of fake time."""
        self.run_until(self.clock.now() + seconds)
