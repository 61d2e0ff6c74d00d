"""``zmqdist up TOPOLOGY.toml``: start every process of a topology on this machine and watch them.

Starts brokers first (the root of the tree first: a proxy finds its master up), then workers, then
client loads; shows a table of them (up or down, restarts, and for each broker what its own
workers served, what it sent up, what it handed down and what its upstream handed it); starts a
process that dies again only if the file says ``restart = true`` (after a pause that doubles from
1 s to 30 s, and says so); stops everything on SIGINT/SIGTERM: loads, workers, then brokers from
the leaves to the root, each with ``stop_timeout`` seconds before SIGKILL.

Each process's output goes to ``LOG_DIR/NAME.log``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from zmqdist.client import Client
from zmqdist.errors import ZmqdistError
from zmqdist.topology import Process, Topology

log = logging.getLogger("zmqdist.up")

BACKOFF_S = 1.0
BACKOFF_MAX_S = 30.0


class Running:
    """One process of the topology under supervision."""

    def __init__(self, spec: Process) -> None:
        self.spec = spec
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.state = "not started"
        self.start_at: float | None = None  # a restart due then
        self.backoff = BACKOFF_S
        self.started = 0.0
        self.report: dict[str, Any] = {}  # a load's last report line
        self.log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def status_endpoint(ep: str) -> str:
    """Where to ask a broker bound at ``ep`` (a wildcard address: on this machine)."""
    for wild in ("tcp://*:", "tcp://0.0.0.0:"):
        if ep.startswith(wild):
            return "tcp://127.0.0.1:" + ep[len(wild) :]
    return ep


class Supervisor:
    """Start, watch, restart and stop the processes ``procs`` of ``topology``."""

    def __init__(
        self,
        topology: Topology,
        procs: list[Process],
        out: IO[str],
        *,
        interval: float = 2.0,
        log_dir: str | None = None,
        python: str = sys.executable,
    ) -> None:
        self.topology = topology
        self.out = out
        self.interval = interval
        self.python = python
        self.own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="zmqdist-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Roots first; within a kind, the file's order.
        rank = {"broker": 0, "worker": 1, "load": 2}
        self.running = [Running(p) for p in sorted(procs, key=lambda p: (rank[p.kind], p.order))]
        self.stopping = threading.Event()
        self.failed = False  # every process ended by itself (the command exits 1)
        self.statuses: dict[str, dict[str, Any] | None] = {}
        self._clients: dict[str, Client] = {}
        self._poller: threading.Thread | None = None  # asks the brokers for status (run())
        env = dict(os.environ)
        paths = [*topology.pythonpath, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["ZMQDIST_SUPERVISOR"] = str(os.getpid())  # they get SIGTERM if we die unannounced
        self.env = env

    def say(self, text: str) -> None:
        self.out.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.out.flush()

    # --- processes ------------------------------------------------------------------------------

    def spawn(self, r: Running) -> None:
        spec = r.spec
        cmd = [self.python, "-m", "zmqdist", *spec.args]
        if r.log is not None:
            r.log.close()  # a restart: the same file, opened again for appending
        r.log = (self.log_dir / f"{spec.name}.log").open("ab")
        stdout: Any = subprocess.PIPE if spec.kind == "load" else r.log
        r.popen = subprocess.Popen(cmd, env=self.env, stdout=stdout, stderr=r.log, stdin=subprocess.DEVNULL)
        r.state = "up"
        r.started = time.monotonic()
        r.start_at = None
        if spec.kind == "load":
            threading.Thread(target=self._read_reports, args=(r, r.popen), daemon=True).start()
        self.say(f"started {spec.kind} {spec.name} (pid {r.popen.pid})")

    def _read_reports(self, r: Running, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdout is not None
        with popen.stdout:
            for raw in popen.stdout:
                try:
                    r.report = json.loads(raw)
                except ValueError:
                    log = r.log
                    if log is not None and not log.closed:
                        log.write(raw)

    def watch(self, now: float) -> None:
        """Notice processes that ended; start again those whose file says so, when due."""
        for r in self.running:
            if r.popen is not None and r.state == "up" and (code := r.popen.poll()) is not None:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                if code > 0 and (last := self.last_line(r)):
                    self.say(f"{r.spec.name}: {last}")  # why it ended, as it said it (its log has the rest)
                if r.spec.restart:
                    if now - r.started > 2 * BACKOFF_MAX_S:
                        r.backoff = BACKOFF_S  # it ran a good while: a fresh failure
                    r.start_at = now + r.backoff
                    r.state = "restarting"
                    self.say(f"{r.spec.name} ended ({how}); starting it again in {r.backoff:g} s (restart = true)")
                    r.backoff = min(BACKOFF_MAX_S, r.backoff * 2)
                else:
                    r.state = f"ended ({how})"
                    self.say(f"{r.spec.name} ended ({how}); not started again (restart = false)")
            if r.start_at is not None and now >= r.start_at and not self.stopping.is_set():
                r.restarts += 1
                self.spawn(r)

    def last_line(self, r: Running) -> str:
        """The last line a process wrote to its log (an exit's reason, usually), cut to 200 characters."""
        if r.log is not None:
            r.log.flush()
        try:
            with (self.log_dir / f"{r.spec.name}.log").open("rb") as fh:
                fh.seek(0, 2)
                fh.seek(max(0, fh.tell() - 4096))
                lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:200] if lines else ""

    def start(self) -> None:
        self.say(f"starting {len(self.running)} processes of {self.topology.path}; their logs in {self.log_dir}")
        for r in self.running:
            self.spawn(r)

    def stop(self) -> None:
        """Stop loads, then workers, then brokers from the leaves to the root."""
        self.stopping.set()
        groups: list[list[Running]] = [
            [r for r in self.running if r.spec.kind == "load"],
            [r for r in self.running if r.spec.kind == "worker"],
        ]
        depths = sorted({r.spec.order for r in self.running if r.spec.kind == "broker"}, reverse=True)
        groups += [[r for r in self.running if r.spec.kind == "broker" and r.spec.order == d] for d in depths]
        for group in groups:
            live = [r for r in group if r.alive()]
            for r in live:
                assert r.popen is not None
                r.popen.send_signal(signal.SIGTERM)
            end = time.monotonic() + self.topology.stop_timeout
            for r in live:
                assert r.popen is not None
                try:
                    r.popen.wait(max(0.0, end - time.monotonic()))
                    self.say(f"stopped {r.spec.name}")
                except subprocess.TimeoutExpired:
                    r.popen.kill()
                    r.popen.wait()
                    self.say(f"{r.spec.name} did not stop within {self.topology.stop_timeout:g} s: killed (SIGKILL)")
            for r in group:
                r.state = "stopped"
                r.start_at = None
        for r in self.running:
            if r.log is not None:
                r.log.close()
        if self._poller is not None:
            self._poller.join(5.0)  # it sees `stopping` after its current call (1 s at most each)
        for c in self._clients.values():
            c.close(timeout=1.0)
        if self.own_log_dir and not any(p.stat().st_size for p in self.log_dir.iterdir()):
            shutil.rmtree(self.log_dir, ignore_errors=True)

    # --- what the brokers say ---------------------------------------------------------------------

    def poll_status(self) -> None:
        """Ask every running broker for its status (one with CURVE on only with ``status_key``)."""
        status_key = self.topology.status_key
        for r in self.running:
            spec = r.spec
            if spec.kind != "broker" or not spec.endpoints or (spec.key and not status_key):
                continue
            if not r.alive() or self.stopping.is_set():
                self.statuses[spec.name] = None
                continue
            c = self._clients.get(spec.name)
            if c is None:
                c = self._clients[spec.name] = Client(
                    [status_endpoint(spec.endpoints[0])],
                    name=f"up-{spec.name}",
                    server_key=spec.key,
                    key=status_key if spec.key else None,
                )
            try:
                self.statuses[spec.name] = c.call("zmqdist.status", timeout=min(1.0, self.interval))
            except ZmqdistError:
                self.statuses[spec.name] = None

    def table(self) -> str:
        """The live table: every process, and what each broker's requests became."""
        head = f"{'NAME':18} {'KIND':6} {'PID':>7} {'STATE':22} {'RESTARTS':>8}  DETAIL"
        rows = [head]
        for r in self.running:
            spec = r.spec
            detail = ""
            if spec.kind == "broker":
                secured = bool(spec.key) and not self.topology.status_key
                detail = broker_detail(self.statuses.get(spec.name), secured)
            elif spec.kind == "load" and r.report:
                rep = r.report
                errors = sum(rep.get("errors", {}).values())
                detail = f"ok {rep.get('ok', 0)}  {rep.get('rate', 0):.0f}/s  p50 {rep.get('p50_ms', '-')} ms"
                detail += f"  errors {errors}" + (f"  held {rep['held']}" if rep.get("held") else "")
            state = r.state
            if r.state == "restarting" and r.start_at is not None:
                state = f"restart in {max(0.0, r.start_at - time.monotonic()):.0f} s"
            rows.append(
                f"{spec.name[:18]:18} {spec.kind:6} {r.pid or '-':>7} {state[:22]:22} {r.restarts:>8}  {detail}"
            )
        return "\n".join(rows)

    def run(self) -> None:
        """Start, then watch and show until SIGINT/SIGTERM; then stop everything."""
        old = {s: signal.signal(s, lambda *_: self.stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        tty = self.out.isatty()
        try:
            self.start()
            self._poller = threading.Thread(target=self._status_loop, daemon=True)
            self._poller.start()
            next_show = time.monotonic() + self.interval
            while not self.stopping.is_set():
                now = time.monotonic()
                self.watch(now)
                if now >= next_show:
                    next_show = now + self.interval
                    self.out.write(("\x1b[H\x1b[2J" if tty else "\n") + self.table() + "\n")
                    self.out.flush()
                if all(r.state.startswith("ended") for r in self.running):
                    self.say("every process has ended and none is to start again: stopping")
                    self.failed = True
                    break
                self.stopping.wait(0.1)
            else:
                self.say("stopping (loads, workers, then brokers from the leaves to the root)")
        finally:
            self.stopping.set()
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)

    def _status_loop(self) -> None:
        while not self.stopping.is_set():
            self.poll_status()
            self.stopping.wait(self.interval)


def broker_detail(st: dict[str, Any] | None, secured: bool = False) -> str:
    """A broker's line in the table: its role in a pair, and where its requests went."""
    if secured:
        return "(CURVE on: give [settings] status_key to see it here)"
    if st is None:
        return "(no answer)"
    ha = st.get("ha") or {}
    role = ha.get("state", "") if isinstance(ha, dict) else ""
    n = where_served(st)
    parts = [role] if role else []
    if role != "passive":
        parts.append(f"served here {n['here']}")
        if st.get("upstream"):
            parts.append(f"sent up {n['up']}")
            parts.append(f"from up {n['from_up']}")
        if st.get("brokers"):
            parts.append(f"handed down {n['down']}")
    return "  ".join(parts)


def where_served(st: dict[str, Any]) -> dict[str, int]:
    """Where a broker's requests went, from its status: served by its own workers (``here``),
    sent to its upstream (``up``; a request the upstream handed back and sent again counts once),
    handed down to it by its upstream (``from_up``), and served by proxies below it (``down``)."""
    c = st.get("counters") or {}
    return {
        "here": sum(w.get("served", 0) for w in st.get("workers", [])),
        "up": c.get("forwarded_up", 0) - c.get("returned_from_up", 0),
        "from_up": c.get("tasks_from_up", 0),
        "down": sum(b.get("served", 0) for b in st.get("brokers", [])),
    }
