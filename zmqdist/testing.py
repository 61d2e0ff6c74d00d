"""Test helpers shipped with zmqdist: a fake clock and an in-memory network of core machines.

:class:`Simulation` wires one :class:`~zmqdist.core.broker.BrokerCore` to any number of worker and
client machines. Every message goes through the real encoder and decoder. Time is a
:class:`FakeClock` that jumps to the next deadline, so seconds of heartbeats and failures run in
milliseconds without a single sleep. Knobs: kill a node, partition it, drop messages at random,
restart the broker.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from heapq import heappop, heappush
from typing import Any

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings, HeartbeatSettings
from zmqdist.core.broker import BrokerCore
from zmqdist.core.client import ClientCore, Completed
from zmqdist.core.link import Connect, Problem, Stopped
from zmqdist.core.worker import Execute, WorkerCore


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


class InvariantError(AssertionError):
    """Raised by :class:`Simulation` when a dispatch invariant breaks."""


class SimWorker:
    """A worker machine in the simulation with a fixed service time per task."""

    def __init__(self, sim: Simulation, ident: bytes, core: WorkerCore, service_time: float) -> None:
        self.sim = sim
        self.ident = ident
        self.core = core
        self.service_time = service_time
        self.alive = True
        self.executed: list[str] = []  # idempotency keys, in order
        self.running = 0
        self.max_running = 0

    def handle(self, outs: list[Any]) -> None:
        for o in outs:
            t = type(o)
            if t is Execute:
                self.executed.append(o.key)
                self.running += 1
                self.max_running = max(self.max_running, self.running)
                self.sim.at(self.sim.clock.now() + self.service_time, functools.partial(self._done, o))
            elif t is Connect or t is Stopped or t is Problem:
                continue
            else:
                self.sim.send_to_broker(self.ident, o)

    def _done(self, o: Execute) -> None:
        if not self.alive:
            return
        self.running -= 1
        value = p.unpack_value(o.payload)
        self.handle(self.core.task_done(o.ticket, o.session, True, p.pack_value(value), self.sim.clock.now()))


class SimClient:
    """A client machine that records every completion (duplicates would show as a list > 1)."""

    def __init__(self, sim: Simulation, ident: bytes, core: ClientCore) -> None:
        self.sim = sim
        self.ident = ident
        self.core = core
        self.alive = True
        self.completed: dict[int, list[Completed]] = {}
        self._rid = 0

    def submit(self, service: str, value: Any, timeout: float = 5.0) -> int:
        """Send a request; return its id."""
        self._rid += 1
        self.handle(self.core.submit(self._rid, service, p.pack_value(value), timeout, self.sim.clock.now()))
        return self._rid

    def handle(self, outs: list[Any]) -> None:
        for o in outs:
            t = type(o)
            if t is Completed:
                self.completed.setdefault(o.rid, []).append(o)
            elif t is Connect or t is Problem:
                continue
            else:
                self.sim.send_to_broker(self.ident, o)


class Simulation:
    """An in-memory network of one broker, workers and clients on a fake clock."""

    BROKER = "sim://broker"

    def __init__(
        self,
        settings: BrokerSettings | None = None,
        *,
        latency: float = 0.0001,
        seed: int = 0,
        hb: HeartbeatSettings | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.settings = settings or BrokerSettings()
        self.hb = hb or self.settings.heartbeat
        self.latency = latency
        self.rng = random.Random(seed)
        self.drop_rate = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._incarnations = 0
        self.broker = self._new_broker()
        self.broker_alive = True
        self.workers: dict[str, SimWorker] = {}
        self.clients: dict[str, SimClient] = {}
        self.partitioned: set[bytes] = set()
        self._nodes: dict[bytes, SimWorker | SimClient] = {}
        self.tasks_sent: list[tuple[float, bytes]] = []
        self.expired_at: dict[bytes, float] = {}

    # --- building -------------------------------------------------------------------------------

    def _new_broker(self) -> BrokerCore:
        self._incarnations += 1
        return BrokerCore(self.settings, f"inc{self._incarnations}", self.clock.now())

    def add_worker(
        self, name: str, services: tuple[str, ...] = ("echo",), concurrency: int = 1, service_time: float = 0.01
    ) -> SimWorker:
        """Add a worker and start it (it registers after one network latency)."""
        ident = f"w:{name}".encode()
        core = WorkerCore((self.BROKER,), services, concurrency, name, self.hb, self.clock.now())
        w = SimWorker(self, ident, core, service_time)
        self.workers[name] = w
        self._nodes[ident] = w
        w.handle(core.start(self.clock.now()))
        return w

    def add_client(self, name: str = "client") -> SimClient:
        """Add a client and start it."""
        ident = f"c:{name}".encode()
        core = ClientCore((self.BROKER,), name, self.hb, self.clock.now())
        c = SimClient(self, ident, core)
        self.clients[name] = c
        self._nodes[ident] = c
        c.handle(core.start(self.clock.now()))
        return c

    # --- knobs ----------------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """Kill a worker or client: it sends and receives nothing more, like SIGKILL."""
        node = self.workers.get(name) or self.clients[name]
        node.alive = False

    def partition(self, name: str) -> None:
        """Cut a node off from the broker (both directions) until :meth:`heal`."""
        node = self.workers.get(name) or self.clients[name]
        self.partitioned.add(node.ident)

    def heal(self, name: str) -> None:
        node = self.workers.get(name) or self.clients[name]
        self.partitioned.discard(node.ident)

    def kill_broker(self) -> None:
        self.broker_alive = False

    def restart_broker(self) -> None:
        """Start a new broker run (empty tables, new incarnation) at the same endpoint."""
        self.broker = self._new_broker()
        self.broker_alive = True

    # --- network --------------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heappush(self._events, (t, self._seq, fn))

    def _lost(self, ident: bytes) -> bool:
        return ident in self.partitioned or (self.drop_rate > 0 and self.rng.random() < self.drop_rate)

    def send_to_broker(self, ident: bytes, msg: p.Message) -> None:
        if self._lost(ident):
            return
        frames = p.encode(msg)
        self.at(self.clock.now() + self.latency, lambda: self._broker_receive(ident, frames))

    def _broker_receive(self, ident: bytes, frames: tuple[bytes, bytes]) -> None:
        if not self.broker_alive:
            return
        self._broker_out(self.broker.receive(ident, p.decode(*frames), self.clock.now()))

    def _broker_out(self, outs: list[tuple[bytes, p.Message]]) -> None:
        now = self.clock.now()
        for ident, msg in outs:
            if type(msg) is p.Task:
                if ident in self.expired_at and ident not in self.broker.worker_load():
                    raise InvariantError(f"task sent to {ident!r}, which the broker declared dead")
                self.tasks_sent.append((now, ident))
            if self._lost(ident):
                continue
            frames = p.encode(msg)
            self.at(now + self.latency, functools.partial(self._node_receive, ident, frames))
        for ident, (n, cap) in self.broker.worker_load().items():
            if n > cap:
                raise InvariantError(f"worker {ident!r} holds {n} tasks, capacity {cap}")

    def _node_receive(self, ident: bytes, frames: tuple[bytes, bytes]) -> None:
        node = self._nodes.get(ident)
        if node is None or not node.alive:
            return
        node.handle(node.core.receive(p.decode(*frames), self.clock.now()))

    # --- running --------------------------------------------------------------------------------

    def _tick_all(self) -> None:
        now = self.clock.now()
        before = set(self.broker.worker_load())
        if self.broker_alive:
            self._broker_out(self.broker.tick(now))
        for ident in before - set(self.broker.worker_load()):
            self.expired_at[ident] = now
        for node in list(self._nodes.values()):
            if node.alive:
                d = node.core.next_deadline()
                if d is not None and d <= now:
                    node.handle(node.core.tick(now))

    def _next_time(self) -> float | None:
        times = []
        if self._events:
            times.append(self._events[0][0])
        if self.broker_alive and (d := self.broker.next_deadline()) is not None:
            times.append(d)
        for node in self._nodes.values():
            if node.alive and (d := node.core.next_deadline()) is not None:
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
