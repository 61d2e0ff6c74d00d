"""Chaos soak: a real deployment's topology under random faults, every request accounted for.

    python3 tests/chaos/soak.py --duration 600 --seed 7 [--requests 100000] [--report soak.json]

Topology (every process real, on ipc endpoints in a temporary directory): a master pair MA/MB, two
regional proxy pairs R1A/R1B and R2A/R2B below it, two workers per region and one at the master,
their handlers running each of the four ways a handler can run (tests/chaos/soakworker.py: on
handler threads in WR1-0, as async handlers on the event loop in WR1-1 and WM-0, inline on the
socket thread in WR2-0, in 4 child processes of WR2-1 with isolation="process"), and two
Majordomo workers (tests/chaos/mdpsoak.py, raw MDP/0.2) at the master pair, each serving at one
of its brokers at a time and moving to the other when sent away or met with silence.
Regional workers and clients list their proxy pair first and the master pair next; the master's
worker lists the master pair. Load: per region, a client that calls one at a time, one that keeps
up to 200 submits in flight, one that maps batches of 500, one that submits bursts of 1,000-3,000
at once (past the brokers' quota of 500 per client: the client holds back what its broker would
refuse), one that runs the request lifecycle one at a time: a stream (its parts checked for
order, gaps and repeats, also when it is cut), a key that two clients send together (brokers run
with --join-same-key: both get the same right value), a request cancelled while it runs (in R2
half of them to a service with terminate_on_cancel: the cancel kills its handler process), or one
whose handler fails its first 1-2 runs under a retry policy of 5 runs (it must end right); and
one Majordomo client (raw MDP/0.2 to both brokers of its pair, sending again to the other one when
told BUSY or after 6 s of silence) that calls the native workers or, through the tier, the
Majordomo workers, beside a native client that calls the Majordomo workers. And per region two
client processes (tests/chaos/soakclient.py, 100 submits in flight each): one is SIGKILLed now and
then (restarted with new numbers), one SIGSTOPped past the ttl.

Faults, one every 2-5 s (seeded; every kind in each round of ten, in a random order): SIGKILL of
a worker, Majordomo workers included (restarted 0.5-2 s later), SIGSTOP of a worker for 1-3 s,
SIGKILL of a client process (restarted 0.5-2 s later), SIGSTOP of one for 1.5-3 s (its broker
takes it for gone and stops its requests; resumed, it is told so and sends them again), SIGKILL
of one of WR2-1's handler processes (the worker replaces it; the request it ran, if any, ends in a
RemoteError saying so, as docs/worker.md promises: at most one such end per kill, none otherwise),
SIGKILL of the active broker of a regional pair (twice a round) or of the master pair (restarted
1-3 s later), SIGSTOP of the active broker of any pair for 2-4 s (its host stalled: the other
takes over, and the stopped one must step down when it resumes); a stalled host that a pair
shares ("stall host"): SIGSTOP of both brokers of the pair and the workers of its region
(handler processes too) for 0.7-3 s (about a ttl, a VM's live migration, or past it), resumed in
a random order 10 ms apart, a third of the time the master's host and a proxy pair's together
(each pair must keep its active broker, with no takeover and no step-down, and the active broker
every native worker of the host: its own pause is no peer's silence);
never while the other broker of its pair is down or not yet in sync (then the fault is skipped).
Faults stop a few seconds before the end so that everything in flight can end.

Every request ends in one of: the right value, a wrong value, an error (counted by type), a cancel,
or no end at all (lost); a stream or a joined request that waits out its deadline is a defect too
(a fault here never lasts that long). A client process writes how each of its requests ended; at
the end it is told to stop (SIGTERM) and waits for what it has open: a request of its last run that
never ended, one that ended twice or wrong (any run) is a defect. Once every client is done, no
broker may hold an open request (a SIGKILLed client's were stopped by its broker), and within 15
ttls none may remember more peers than it has (its status' `remembered`: clients, batch limits,
Majordomo peers; gone ones are forgotten every 10 ttls). Executions are counted per request from
the workers' logs (re-execution after a kill is allowed and reported), and per handler mode: each
must have run requests. Broker logs are read for step-downs of a broker that carried the pair's
table (a defect, unless it was the stopped one resuming), for a broker taking over again within a
second of stepping down (a flap), for tracebacks and for crashes (a process that died by itself: a
libzmq assertion, a fatal Python error; faulthandler shows its threads) in every process. Exit
status 1 if anything was lost, wrong or duplicated, left open at a broker or remembered past the
forgetting, a live active broker stepped down, a stalled host's pair changed its active broker
or gave a worker of the host up, a broker flapped, a traceback or a crash was printed, or errors
passed --max-error-rate.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

import zmq  # noqa: E402
from mdpsoak import secure  # noqa: E402
from soakworker import answer  # noqa: E402

from zmqdist import Client, Retry  # noqa: E402
from zmqdist.errors import RequestError, RequestTimeout  # noqa: E402
from zmqdist.transport.security import generate  # noqa: E402

PAIRS = {"M": ("MA", "MB"), "R1": ("R1A", "R1B"), "R2": ("R2A", "R2B")}
BROKERS = {name for pair in PAIRS.values() for name in pair}
# Each native worker's object in soakworker.py: how its handlers run (threads, async, inline, process)
WORKER_MODES = {"WR1-0": "worker", "WR1-1": "aworker", "WR2-0": "iworker", "WR2-1": "pworker", "WM-0": "aworker"}
HANDLER_MODES = ("threads", "async", "inline", "process")  # the names their execution logs carry
# How a request whose handler process the soak SIGKILLed ends (a RemoteError; docs/worker.md)
HANDLER_DIED = "the process running the handler of"
KILLED = "handler-killed"  # that outcome: expected, at most one per kill
UNAWAITED = "not awaited (map stopped at an error)"
UNAWAITED_KILLED = "not awaited (map stopped at a killed handler)"  # expected too
TIMEOUT_S = 30.0  # a request's deadline: generous, so that any request not answered is lost
QUOTA = 500  # each broker's --max-client-inflight: the bursts pass it, the other roles do not
MDP_RESEND_S = 6.0  # a Majordomo client with no answer this long sends again, to the other broker
MDPC02, C_REQUEST, C_FINAL, MDP_ERROR = b"MDPC02", b"\x01", b"\x03", b"zmqdist.error"


class MdpError(Exception):
    """A Majordomo request ended with zmqdist's error body (status, message)."""


class Proc:
    """One process of the topology: its command, its log, restarts."""

    def __init__(self, name: str, args: list[str], logdir: Path, env: dict[str, str], module: str = "zmqdist") -> None:
        self.name, self.args, self.env, self.module = name, args, env, module
        self.log = logdir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stopped = False

    def start(self) -> None:
        with self.log.open("ab") as out:
            cmd = [sys.executable, "-m", self.module, *self.args]
            self.popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        self.starts += 1
        self.stopped = False

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)


class Topology:
    def __init__(self, tmp: Path, hb: float, curve: bool = False) -> None:
        self.tmp = tmp
        self.logdir = tmp / "logs"
        self.logdir.mkdir()
        # PYTHONFAULTHANDLER: a process that libzmq aborts leaves every thread's Python stack in its log
        self.env = dict(
            os.environ,
            SOAK_LOG_DIR=str(self.logdir),
            PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]),
            PYTHONFAULTHANDLER="1",
        )
        self.procs: dict[str, Proc] = {}
        timing = ["--heartbeat", str(hb)]
        # Majordomo workers cannot learn the broker's heartbeat: theirs is set on both sides
        mdp_timing = ["--mdp-heartbeat", str(2 * hb), "--mdp-liveness", "3"]
        # --curve: CURVE on every link (one key for the brokers, one per role, allow-lists), the
        # pair links and the proxies' upstream links too
        self.keys: dict[str, str] = {}
        broker_sec: list[str] = []
        worker_opts = list(timing)
        mdp_keys: list[str] = []
        if curve:
            keys = tmp / "keys"
            for role in ("broker", "worker", "client"):
                generate(role, keys)
                (keys / f"{role}s").mkdir()
                (keys / f"{role}s" / f"{role}.key").write_bytes((keys / f"{role}.key").read_bytes())
            pub = str(keys / "broker.key")
            self.keys = {"server_key": pub, "key": str(keys / "client.key_secret")}
            broker_sec = ["--key", str(keys / "broker.key_secret"), "--peer-server-key", pub]
            broker_sec += [x for r in ("clients", "workers", "brokers") for x in (f"--allow-{r}", str(keys / r))]
            worker_opts += ["--server-key", pub, "--key", str(keys / "worker.key_secret")]
            mdp_keys = ["--key", str(keys / "worker.key_secret"), "--server-key", pub]
        for region, (a, b) in PAIRS.items():
            up = [] if region == "M" else ["--upstream", self.ep("MA"), "--upstream", self.ep("MB")]
            if up and curve:
                up += ["--upstream-server-key", self.keys["server_key"]]
            for name, role, other in ((a, "primary", b), (b, "backup", a)):
                args = ["broker", "--bind", self.ep(name), "--name", name, "--ha", role, *broker_sec]
                args += ["--ha-bind", self.ha(name), "--peer", self.ha(other), *up, *timing, *mdp_timing]
                args += ["--join-same-key", "--max-client-inflight", str(QUOTA)]
                self.procs[name] = Proc(name, args, self.logdir, self.env)
        for region in ("R1", "R2"):
            a, b = PAIRS[region]
            for k in range(2):
                self.worker(f"W{region}-{k}", [a, b, "MA", "MB"], worker_opts)
        self.worker("WM-0", ["MA", "MB"], worker_opts)
        # Two Majordomo workers of "mdpup" at the master pair, each starting at one of its brokers
        for k, at in enumerate((("MA", "MB"), ("MB", "MA"))):
            args = ["mdpup", str(2 * hb), "3", *mdp_keys, *(self.ep(n) for n in at)]
            self.procs[f"WMDP-{k}"] = Proc(f"WMDP-{k}", args, self.logdir, self.env, module="mdpsoak")
        # Per region two client processes (tests/chaos/soakclient.py): one SIGKILLed, one SIGSTOPped
        self.clients: list[str] = []
        client_keys = ["--server-key", self.keys["server_key"], "--key", self.keys["key"]] if curve else []
        for region in ("R1", "R2"):
            eps = [self.ep(n) for n in (*PAIRS[region], "MA", "MB")]
            for fate in ("kill", "stop"):
                name = f"C{region}-{fate}"
                self.clients.append(name)
                args = [str(self.logdir / f"{name}.out"), str(self.client_first(name, 0)), *eps, *client_keys]
                self.procs[name] = Proc(name, args, self.logdir, self.env, module="soakclient")

    def worker(self, name: str, at: list[str], options: list[str]) -> None:
        eps = [x for n in at for x in ("--connect", self.ep(n))]
        spec = f"soakworker:{WORKER_MODES[name]}"
        self.procs[name] = Proc(name, ["worker", spec, "--name", name, *eps, *options], self.logdir, self.env)

    def client_first(self, name: str, run: int) -> int:
        """The first request number of client process ``name``'s run ``run`` (0, 1, ... after
        each restart): apart from the soak's own numbers and from each other."""
        return (1 + self.clients.index(name)) * 10**9 + run * 10**7

    def ep(self, name: str) -> str:
        return f"ipc://{self.tmp}/{name}.sock"

    def ha(self, name: str) -> str:
        return f"ipc://{self.tmp}/{name}.ha"

    def start(self) -> None:
        """Start the brokers and workers (the client processes start with the load)."""
        for name, p in self.procs.items():
            if name not in self.clients:
                p.start()

    def status(self, name: str) -> dict[str, Any] | None:
        """The status of broker ``name`` (None if it does not answer)."""
        if not self.procs[name].alive():
            return None
        try:
            with Client([self.ep(name)], timeout=1.5, **self.keys) as c:
                st = c.call("zmqdist.status")
        except Exception:
            return None
        return st if isinstance(st, dict) else None

    def state(self, name: str) -> dict[str, Any] | None:
        """The pair state of broker ``name`` (None if it does not answer)."""
        st = self.status(name)
        return st.get("ha") if st is not None else None

    def open_requests(self) -> dict[str, int | None]:
        """Each broker's count of open requests (None: it does not answer)."""
        return {name: None if (st := self.status(name)) is None else st["requests_open"] for name in sorted(BROKERS)}

    def remembered(self, within: float) -> dict[str, dict[str, int]]:
        """Each live broker whose status still remembers more peers than it has (one client, this
        one; its members' batch limits; its Majordomo workers) ``within`` seconds after every client
        was done: the forgetting runs every 10 ttls, and a table that keeps gone peers grows for
        ever (a pair's batch limits and the bridge's vanished Majordomo workers did)."""
        clients = {n: Client([self.ep(n)], timeout=1.5, **self.keys) for n in sorted(BROKERS) if self.procs[n].alive()}
        try:
            deadline = time.monotonic() + within
            while True:
                over: dict[str, dict[str, int]] = {}
                for name, c in clients.items():
                    try:
                        st = c.call("zmqdist.status")
                    except Exception:
                        continue  # (it does not answer: the open requests' check says so)
                    kept = st["remembered"]
                    members = len(st["workers"]) + len(st.get("brokers") or [])
                    mdp = sum(1 for w in st["workers"] if w["name"].startswith("mdp-"))
                    if kept["clients"] > 1 or kept["batch_limits"] > members + 1 or kept["mdp_peers"] > mdp:
                        over[name] = {**kept, "members": members, "mdp_workers": mdp}
                if not over or time.monotonic() > deadline:
                    return over
                time.sleep(1.0)
        finally:
            for c in clients.values():
                c.close()

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()


class Load:
    """Clients that drive calls, submits and maps, and record how each request ended."""

    def __init__(self, topo: Topology, limit: int | None) -> None:
        self.topo, self.limit = topo, limit
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self.outcome: dict[int, str] = {}
        self.issued = 0
        self.stop = threading.Event()
        self.clients: list[Client] = []
        self.threads: list[threading.Thread] = []
        self.lifecycle_outcomes: collections.Counter[str] = collections.Counter()  # "stream ok", ...
        self.lifecycle_errors: list[str] = []  # what the first errors said
        self.mdp_outcomes: collections.Counter[str] = collections.Counter()  # "mdp up ok", resends, ...
        self.mdp_errors: list[str] = []
        self.bursts = 0  # bursts past the quota whose every request ended
        self.mdp_resends: list[str] = []  # when and why a Majordomo request was sent again
        self.t0 = time.monotonic()

    def next_id(self) -> int | None:
        with self.lock:
            if self.stop.is_set() or (self.limit is not None and self.issued >= self.limit):
                return None
            self.issued += 1
            return next(self.ids)

    def record(self, i: int, result: Any = None, error: BaseException | None = None, cancelled: bool = False) -> str:
        if cancelled:
            kind = "cancelled"
        elif error is not None and HANDLER_DIED in str(error):
            kind = KILLED
        elif error is not None:
            kind = "lost" if isinstance(error, RequestTimeout) and "no reply" in str(error) else type(error).__name__
        elif isinstance(result, dict) and result.get("i") == i and result.get("v") == answer(i):
            kind = "ok"
        else:
            kind = "wrong"
        with self.lock:
            if i in self.outcome:
                self.outcome[i] = "duplicate"  # a second outcome for one request: never expected
            else:
                self.outcome[i] = kind
        return kind

    def client(self, region: str) -> Client:
        a, b = PAIRS[region]
        c = Client([self.topo.ep(n) for n in (a, b, "MA", "MB")], timeout=TIMEOUT_S, **self.topo.keys)
        self.clients.append(c)
        return c

    @staticmethod
    def value(i: int, rng: random.Random) -> dict[str, int]:
        return {"i": i, "ms": rng.choice((0, 0, 0, 1, 5))}

    def caller(self, region: str, seed: int) -> None:
        rng, c = random.Random(seed), self.client(region)
        while (i := self.next_id()) is not None:
            try:
                self.record(i, c.call("work", self.value(i, rng)))
            except RequestError as exc:
                self.record(i, error=exc)

    def submitter(self, region: str, seed: int) -> None:
        rng, c = random.Random(seed), self.client(region)
        window: collections.deque[tuple[int, Any]] = collections.deque()
        while True:
            i = self.next_id() if len(window) < 200 else None
            if i is not None:
                window.append((i, c.submit("work", self.value(i, rng))))
                continue
            if not window:
                return
            j, fut = window.popleft()
            try:
                self.record(j, fut.result(TIMEOUT_S + 10))
            except RequestError as exc:
                self.record(j, error=exc)

    def mapper(self, region: str, seed: int) -> None:
        rng, c = random.Random(seed), self.client(region)
        while True:
            batch = [i for _ in range(500) if (i := self.next_id()) is not None]
            if not batch:
                return
            pos = 0
            try:
                for v in c.map("work", [self.value(i, rng) for i in batch], window=200):
                    self.record(batch[pos], v)
                    pos += 1
            except RequestError as exc:  # map stops at the first error: the rest is not awaited
                why = UNAWAITED_KILLED if self.record(batch[pos], error=exc) == KILLED else UNAWAITED
                with self.lock:
                    for i in batch[pos + 1 :]:
                        self.outcome[i] = why

    def burster(self, region: str, seed: int) -> None:
        """Bursts of 1,000-3,000 submits at once, past the brokers' quota per client: the client
        keeps what its broker would refuse and sends it as replies free room (none may end BUSY)."""
        rng, c = random.Random(seed), self.client(region)
        while True:
            batch = [i for _ in range(rng.randint(1000, 3000)) if (i := self.next_id()) is not None]
            if not batch:
                return
            futs = [(i, c.submit("work", self.value(i, rng))) for i in batch]
            for i, fut in futs:
                try:
                    self.record(i, fut.result(TIMEOUT_S + 10))
                except RequestError as exc:
                    self.record(i, error=exc)
            with self.lock:
                self.bursts += 1

    def lifecycle(self, region: str, seed: int) -> None:
        """One at a time: a stream (its parts in order, no gap, no repeat, also when cut), a key
        that two clients send together (one run, the same right value to both: the brokers join
        them), a request cancelled while it runs (or answered right, if it ended first), or one
        whose handler fails its first runs under the caller's retry policy (answered right). In R2
        half the cancels are of "killwork", which only WR2-1 serves, with terminate_on_cancel: the
        cancel kills the handler's process, and the worker starts another."""
        rng, c, twin = random.Random(seed), self.client(region), self.client(region)
        while (i := self.next_id()) is not None:
            what = rng.choice(("stream", "joined", "cancel", "retry"))
            if what == "stream":
                kind = self.stream(c, i, rng, region)
            elif what == "joined":
                value, key = self.value(i, rng), f"joined-{i}"
                futs = [c.submit("work", value, key=key), twin.submit("work", value, key=key)]
                ends = []
                for fut in futs:
                    try:
                        ends.append((fut.result(TIMEOUT_S + 10), None))
                    except RequestError as exc:
                        ends.append((None, exc))
                error = next((e for _, e in ends if e is not None), None)
                if error is not None:
                    with self.lock:
                        self.lifecycle_errors.append(f"joined {i}: {error}"[:300])
                same = ends[0][0] == ends[1][0]
                kind = self.record(i, ends[0][0], error) if same or error is not None else self.record(i, "differ")
            elif what == "retry":  # fails on its first 1-2 runs: the caller's policy runs it again
                policy = Retry(on=(ValueError,), attempts=5, backoff=0.01, max_backoff=0.05)
                try:
                    kind = self.record(i, c.call("flaky", {"i": i, "fail": rng.choice((1, 2))}, retry=policy))
                except RequestError as exc:
                    kind = self.record(i, error=exc)
                    with self.lock:
                        self.lifecycle_errors.append(f"retry {i}: {exc}"[:300])
            else:
                service = "killwork" if region == "R2" and rng.random() < 0.5 else "work"
                what = "cancel" if service == "work" else "killing cancel"
                fut = c.submit(service, {"i": i, "ms": rng.choice((20, 50, 100))})
                time.sleep(rng.uniform(0.0, 0.08))
                if fut.cancel():
                    kind = self.record(i, cancelled=True)
                else:
                    try:
                        kind = self.record(i, fut.result(TIMEOUT_S + 10))
                    except RequestError as exc:
                        kind = self.record(i, error=exc)
                        with self.lock:
                            self.lifecycle_errors.append(f"{what} {i} (too late): {exc}"[:300])
            with self.lock:
                self.lifecycle_outcomes[f"{what} {kind}"] += 1

    def stream(self, c: Client, i: int, rng: random.Random, region: str) -> str:
        n = rng.randint(1, 20)
        t0 = time.monotonic()
        want = [{"i": i, "k": k, "v": answer(i) + k} for k in range(n)]
        got: list[Any] = []
        try:
            s = c.stream("parts", {"i": i, "n": n, "ms": rng.choice((0, 1, 5))}, window=rng.choice((1, 4, 16)))
            for part in s:
                got.append(part)
        except RequestError as exc:  # StreamInterrupted too: what arrived before it must be right
            with self.lock:
                said = f"stream {i} ({region}, {time.monotonic() - t0:.1f} s) of {n} parts, {len(got)} arrived: {exc}"
                self.lifecycle_errors.append(said[:300])
            return self.record(i, error=exc) if got == want[: len(got)] else self.record(i, "parts out of order")
        if got != want:
            return self.record(i, "parts out of order")
        # an async generator cannot return a value: its stream's result is None (the parts are the check)
        return self.record(i, s.result if s.result is not None else {"i": i, "v": answer(i)})

    def mdp(self, region: str, seed: int) -> None:
        """One request at a time: a Majordomo client (MDP/0.2 on raw DEALER sockets, one to each
        broker of its regional pair) calls "mdpwork" (native workers) or "mdpup" (Majordomo workers
        at the master pair, through the proxy tier), and a native client calls "mdpup". In R1 the
        MDP client's sockets share one routing id, so the broker that takes over from the other
        knows it by the identity its requests had there; in R2 each socket has its own."""
        rng, native = random.Random(seed), self.client(region)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        socks = []
        for name in PAIRS[region]:
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            if region == "R1":
                s.routing_id = b"mdp-client-R1"
            if self.topo.keys:
                secure(s, self.topo.keys["key"], self.topo.keys["server_key"])
            s.connect(self.topo.ep(name))
            socks.append(s)
        at = [0]  # the broker this client sends to (MDP has no failover list: it keeps its own)
        try:
            while (i := self.next_id()) is not None:
                what = rng.choice(("mdp up", "mdp work", "native up"))
                body, value = b"%d" % i, {"i": i, "v": answer(i)}
                if what == "native up":
                    try:
                        got = native.call("mdpup", body)
                        kind = self.record(i, value if got == [body, b"%d" % answer(i)] else got)
                    except RequestError as exc:
                        kind = self.record(i, error=exc)
                        with self.lock:
                            self.mdp_errors.append(f"native up {i}: {exc}"[:300])
                else:
                    up = what == "mdp up"
                    want = [body, b"%d" % answer(i)] if up else [b"%d %d" % (i, answer(i))]
                    kind = self.mdp_call(i, socks, at, b"mdpup" if up else b"mdpwork", want, region)
                with self.lock:
                    self.mdp_outcomes[f"{what} {kind}"] += 1
        finally:
            for s in socks:
                s.close()

    def mdp_call(
        self, i: int, socks: list[zmq.Socket[bytes]], at: list[int], service: bytes, want: list[bytes], region: str
    ) -> str:
        """Call ``service`` as an MDP client in front of a pair must: to the other broker when told
        BUSY (a passive broker names the active one) or when no answer came for MDP_RESEND_S."""
        body = b"%d" % i
        end = time.monotonic() + TIMEOUT_S
        socks[at[0]].send_multipart([MDPC02, C_REQUEST, service, body])
        sent = time.monotonic()

        def again(why: str) -> float:
            at[0] = 1 - at[0]
            with self.lock:
                self.mdp_outcomes[why] += 1
                self.mdp_resends.append(f"{time.monotonic() - self.t0:8.2f} {service.decode()} {i} ({region}): {why}")
            socks[at[0]].send_multipart([MDPC02, C_REQUEST, service, body])
            return time.monotonic()

        while time.monotonic() < end:
            for s in socks:
                while s.poll(0 if s is not socks[at[0]] else 50):
                    msg = s.recv_multipart()
                    reply = msg[3:] if len(msg) >= 3 and msg[:2] == [MDPC02, C_FINAL] else [b"?", *msg]
                    if reply[:1] == [MDP_ERROR]:
                        status, why = [*reply, b"", b""][1:3]
                        if status == b"BUSY":  # no id in an error body: it may be an earlier copy's
                            time.sleep(0.05)
                            sent = again("BUSY: sent again to the other broker")
                            continue
                        with self.lock:
                            self.mdp_errors.append(f"{service.decode()} {i}: {status!r} {why!r}"[:300])
                        return self.record(i, error=MdpError(f"{status!r}: {why!r}"))
                    if reply == want:
                        return self.record(i, {"i": i, "v": answer(i)})
                    if reply[:1] == [body]:
                        return self.record(i, reply)  # its number, a wrong value
                    with self.lock:  # the answer to an earlier request sent twice
                        self.mdp_outcomes["stale answers dropped"] += 1
                        if not (msg[:2] == [MDPC02, C_FINAL] and reply and reply[0].split(b" ")[0].isdigit()):
                            self.mdp_errors.append(f"{service.decode()} {i} ({region}): not an answer: {msg!r}"[:300])
            if time.monotonic() - sent > MDP_RESEND_S:
                sent = again("no answer: sent again to the other broker")
        return self.record(i, error=RequestTimeout(f"no reply to MDP request {i} in {TIMEOUT_S:.0f} s"))

    def start(self, seed: int) -> None:
        self.t0 = time.monotonic()
        for k, region in enumerate(("R1", "R2")):
            for role in (self.caller, self.submitter, self.mapper, self.burster, self.lifecycle, self.mdp):
                t = threading.Thread(target=role, args=(region, seed * 100 + k * 10 + len(self.threads)), daemon=True)
                t.start()
                self.threads.append(t)

    def finish(self, timeout: float) -> None:
        self.stop.set()
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, end - time.monotonic()))
        for c in self.clients:
            c.close()


def _pair_record(state: dict[str, Any] | None) -> tuple[Any, ...]:
    """What a stalled host must not change of a pair's broker: its state, takeovers, step-downs."""
    return () if state is None else (state["state"], state["takeovers"], state["step_downs"])


class Watch(NamedTuple):
    """What a stalled host's pair must keep: checked once the host has run 3 ttls again."""

    a: str
    b: str
    was: dict[str, tuple[Any, ...]]  # each broker's state, takeovers and step-downs before
    active: str  # the active broker before
    served: dict[str, int]  # what it had counted served by each native worker of the host
    host: list[str]  # the pair's host's processes, kept from other faults until the check


class Chaos:
    """Random faults, one every 2-5 s, restarts scheduled."""

    def __init__(self, topo: Topology, rng: random.Random) -> None:
        self.topo, self.rng = topo, rng
        self.pending: list[tuple[float, str, str]] = []  # (when, action, process)
        self.faults: collections.Counter[str] = collections.Counter()
        self.log: list[str] = []
        self.kinds: list[str] = []  # the next faults: every kind once per round, in a random order
        self.takeovers: list[float] = []  # seconds from killing an active broker to the other one active
        self.watchers: list[threading.Thread] = []
        self.resumed: dict[str, list[float]] = collections.defaultdict(list)  # broker: wall clock of each SIGCONT
        self.resumed_first = 0  # stopped active brokers that were back before their peer took over
        self.stalls_changed: list[str] = []  # stalled hosts whose pair changed its active broker
        self.stalls_expired: list[str] = []  # stalled hosts whose active broker gave a worker of the host up
        # A stalled host's processes, kept from other faults until its watcher has checked them: a
        # check after the end of a fixed window once read a broker killed meanwhile as one that had
        # given its workers up (seed 173).
        self.watching: set[str] = set()
        self.exited: list[str] = []  # processes found gone that the soak had not killed: each a defect

    def due(self, now: float) -> None:
        for item in [x for x in self.pending if x[0] <= now]:
            self.pending.remove(item)
            _, action, name = item
            if action == "cont-pid":  # a handler process of a stalled host
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(name), signal.SIGCONT)
                continue
            proc = self.topo.procs[name]
            if action == "restart":
                if name in self.topo.clients:  # a client's new run numbers its requests afresh
                    proc.args[1] = str(self.topo.client_first(name, proc.starts))
                proc.start()
            elif action == "cont":
                if name in BROKERS:  # taken before the signal: a resumed broker logs within a millisecond
                    self.resumed[name].append(time.time())
                proc.signal(signal.SIGCONT)
                proc.stopped = False

    def note_exits(self, now: float) -> None:
        """A process of the topology found gone that the soak had not killed exited by itself: a
        defect, noted, and the process started again. (A worker whose start failed when a handler
        process was killed as it started exited so, seed 175, and nothing noticed or restarted it:
        the soak ran on without that region's process worker.)"""
        for name, proc in self.topo.procs.items():
            if proc.popen is not None and not proc.alive() and not self.busy(name):
                self.exited.append(f"{now:8.2f} {name} (exit code {proc.popen.returncode})")
                self.pending.append((now, "restart", name))

    def busy(self, name: str) -> bool:
        return name in self.watching or any(x[2] == name for x in self.pending)

    def fault(self, now: float) -> None:
        if not self.kinds:
            self.kinds = ["kill worker", "stop worker", "kill proxy", "kill proxy", "kill master", "stop broker"]
            self.kinds += ["kill client", "stop client", "kill handler", "stall host"]
            self.rng.shuffle(self.kinds)
        kind = self.kinds.pop()
        if kind == "kill handler":
            procs = self.topo.procs
            kids = [
                (n, pid)
                for n, m in WORKER_MODES.items()
                if m == "pworker" and not self.busy(n)
                for pid in handler_processes(procs[n])
            ]
            if not kids:  # its worker is down (restarting): at the next fault, then
                self.kinds.insert(0, kind)  # after the others of this round: none waits on it
                return
            name, pid = self.rng.choice(kids)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            name = f"{name} (handler process {pid})"
        elif kind == "stall host":
            name = self._stall(now)
            if name is None:  # a pair not settled, or a process of the host busy: at the next fault
                self.kinds.insert(0, kind)  # after the others of this round: none waits on it
                return
        elif kind.endswith(("worker", "client")):
            fate, who = kind.split()
            procs = self.topo.procs
            pool = self.topo.clients if who == "client" else [n for n in procs if n.startswith("W")]
            names = [n for n in pool if n.endswith(fate) or who == "worker"]
            names = [n for n in names if not self.busy(n) and procs[n].alive()]
            if not names:
                return
            name = self.rng.choice(names)
            proc = procs[name]
            if fate == "kill":
                proc.kill()
                self.pending.append((now + self.rng.uniform(0.5, 2.0), "restart", name))
            else:  # SIGSTOP: a client past the ttl is taken for gone, its requests stopped
                proc.signal(signal.SIGSTOP)
                proc.stopped = True
                low = 1.5 if who == "client" else 1.0
                self.pending.append((now + self.rng.uniform(low, 3.0), "cont", name))
        else:
            if kind == "stop broker":
                region = self.rng.choice(["M", "R1", "R2"])
            else:
                region = "M" if kind == "kill master" else self.rng.choice(["R1", "R2"])
            a, b = PAIRS[region]
            if self.busy(a) or self.busy(b):
                return
            settled = self._settled(a, b)
            if settled is None:
                return  # the pair is not settled: killing now could leave it with no copy of its table
            name, other, _ = settled
            killed = time.monotonic()
            if kind == "stop broker":
                self.topo.procs[name].signal(signal.SIGSTOP)
                self.topo.procs[name].stopped = True
                self.pending.append((now + self.rng.uniform(2.0, 4.0), "cont", name))
            else:
                self.topo.procs[name].kill()
                self.pending.append((now + self.rng.uniform(1.0, 3.0), "restart", name))
            stopped = name if kind == "stop broker" else None
            t = threading.Thread(target=self._watch_takeover, args=(other, killed, stopped), daemon=True)
            t.start()
            self.watchers.append(t)
        self.faults[kind] += 1
        self.log.append(f"{now:8.2f} {kind} {name}")

    def _settled(self, a: str, b: str) -> tuple[str, str, dict[str, dict[str, Any]]] | None:
        """(the active broker, the passive one, both states) if pair a/b has exactly one active
        broker and one passive broker with a copy of its table; None otherwise."""
        states = {a: self.topo.state(a), b: self.topo.state(b)}
        active = [n for n, s in states.items() if s and s["state"] == "active"]
        ready = [n for n, s in states.items() if s and s["state"] == "passive" and s["seq"] >= 0]
        if len(active) != 1 or len(ready) != 1:
            return None
        return active[0], ready[0], {n: s for n, s in states.items() if s is not None}

    def _stall(self, now: float) -> str | None:
        """A stalled host (a VM paused): SIGSTOP a pair's two brokers and the workers of its region
        (handler processes too) at once, about a ttl or past it, then SIGCONT them in a random
        order 10 ms apart; a third of the time the master pair's host and a proxy pair's together
        (a hypervisor pausing both tiers). The clients are elsewhere: they find the pair silent
        and go to the passive broker or up a tier. Each pair must keep its active broker, with no
        takeover and no step-down (a broker that counted its own pause as its peer's silence took
        over), and that broker every native worker of the host. Returns what was stalled."""
        both = self.rng.random() < 1 / 3
        regions = ["M", self.rng.choice(["R1", "R2"])] if both else [self.rng.choice(["M", "R1", "R2"])]
        procs = self.topo.procs
        host: list[str] = []
        watch: list[Watch] = []
        for region in regions:
            a, b = PAIRS[region]
            mine = [a, b, *(n for n in procs if n.startswith(f"W{region}"))]  # WM also starts WMDP-k
            if any(self.busy(n) or not procs[n].alive() for n in mine):
                return None
            settled = self._settled(a, b)
            if settled is None:
                return None  # a takeover may be under way
            # What the active broker has counted served by each native worker of the host: one it
            # took for gone registers again and counts from 0. (A Majordomo worker is left out: it
            # knows nothing of pauses, and after one past its liveness connects anew, as MDP says.)
            st = self.topo.status(settled[0])
            if st is None:
                return None
            native = [n for n in mine if n.startswith("W") and not n.startswith("WMDP")]
            served = {w["name"]: w["served"] for w in st["workers"] if w["name"] in native}
            watch.append(Watch(a, b, {n: _pair_record(s) for n, s in settled[2].items()}, settled[0], served, mine))
            host += mine
        kids = [str(pid) for n in host if WORKER_MODES.get(n) == "pworker" for pid in handler_processes(procs[n])]
        order = [*host, *kids]
        self.rng.shuffle(order)
        for n in order:
            if n in procs:
                procs[n].signal(signal.SIGSTOP)
                procs[n].stopped = True
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(n), signal.SIGSTOP)
        self.rng.shuffle(order)
        back = now + self.rng.uniform(0.7, 3.0)
        for i, n in enumerate(order):
            self.pending.append((back + 0.01 * i, "cont" if n in procs else "cont-pid", n))
        settled_at = back + 0.01 * len(order) + 3.0  # 3 s after the last resume (3 ttls by default)
        self.watching.update(host)  # no other fault of theirs until their watcher has checked
        for w in watch:
            t = threading.Thread(target=self._watch_stall, args=(w, time.monotonic() + settled_at - now), daemon=True)
            t.start()
            self.watchers.append(t)
        kids_said = f" and {len(kids)} handler processes" if kids else ""
        counts = ", ".join(f"{len(w.served)} at {w.active}" for w in watch)
        return f"{'+'.join(regions)}: {', '.join(host)}{kids_said} (workers' counts watched: {counts})"

    def _watch_stall(self, w: Watch, settled: float) -> None:
        try:
            self._check_stall(w, settled)
        finally:
            self.watching.difference_update(w.host)  # their other faults may come now

    def _check_stall(self, w: Watch, settled: float) -> None:
        """Once the stalled host has run 3 ttls again: each broker of the pair in the same state,
        with no takeover and no step-down since, and the active one still counting what each
        native worker of the host served before (one it gave up registered again from 0). (Its
        epoch may have risen: a client that called the master pair meanwhile says the higher epoch
        it saw there, and the active broker moves above it, as docs/ha.md says.)"""
        time.sleep(max(0.0, settled - time.monotonic()))
        deadline = time.monotonic() + 5
        while True:
            states = {n: self.topo.state(n) for n in (w.a, w.b)}
            if all(states.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        now = {n: _pair_record(s) for n, s in states.items()}
        if now != w.was:
            why = f"{w.a}/{w.b} (state, takeovers, step-downs): before the stall {w.was}, after {now}"
            self.stalls_changed.append(why)
            return
        st = self.topo.status(w.active)
        after = {} if st is None else {x["name"]: x["served"] for x in st["workers"]}
        if gone := {n: (k, after.get(n)) for n, k in w.served.items() if after.get(n, -1) < k}:
            self.stalls_expired.append(f"{w.active}: workers given up (served before, after): {gone}")

    def _watch_takeover(self, name: str, killed: float, stopped: str | None = None) -> None:
        """How long the pair had no active broker after its active one was killed or ``stopped``
        (a stopped one that resumes still active, before ``name`` took over, ends the watch too)."""
        while time.monotonic() - killed < 20:
            st = self.topo.state(name)
            if st is not None and st["state"] == "active":
                self.takeovers.append(time.monotonic() - killed)
                return
            if stopped is not None and not self.topo.procs[stopped].stopped:
                back = self.topo.state(stopped)
                if back is not None and back["state"] == "active":
                    self.resumed_first += 1
                    return
            time.sleep(0.05)
        self.takeovers.append(float("inf"))

    def settle(self) -> None:
        """Carry out what is scheduled at once (the end of the soak)."""
        self.due(float("inf"))
        for t in self.watchers:
            t.join(25)


NUL = b"\0"  # what separates the strings of /proc/PID/cmdline and environ


def processes() -> dict[int, tuple[int, bytes, bytes]]:
    """Every process now: pid -> (parent pid, command line, environment). A zombie's environment is
    empty; one gone while read is left out."""
    table = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rpartition(")")[2].split()[1])
            table[int(d.name)] = (ppid, (d / "cmdline").read_bytes(), (d / "environ").read_bytes())
        except (OSError, ValueError, IndexError):
            continue
    return table


def handler_processes(proc: Proc) -> list[int]:
    """The handler processes of a worker with isolation="process" (its children that multiprocessing
    spawned, not its resource tracker)."""
    if not proc.alive():
        return []
    assert proc.popen is not None
    parent = proc.popen.pid
    return [pid for pid, (ppid, cmd, _) in processes().items() if ppid == parent and b"spawn_main" in cmd]


def orphans(logdir: Path) -> list[str]:
    """Processes of this soak (its SOAK_LOG_DIR in their environment) whose parent is neither one of
    them nor the soak: a handler process that outlived its SIGKILLed worker, for one."""
    marker = f"SOAK_LOG_DIR={logdir}".encode()
    mine = {pid: (ppid, cmd) for pid, (ppid, cmd, env) in processes().items() if marker in env.split(NUL)}
    lost = [(pid, ppid, cmd) for pid, (ppid, cmd) in mine.items() if ppid != os.getpid() and ppid not in mine]
    return [
        f"{pid} (parent {ppid}): {b' '.join(cmd.split(NUL)).decode(errors='replace')[:160]}" for pid, ppid, cmd in lost
    ]


def takeover_figures(times: list[float]) -> dict[str, Any]:
    """Seconds from killing an active broker until the other one of its pair was active."""
    done = sorted(t for t in times if t != float("inf"))
    if not done:
        return {"count": len(times), "never": len(times)}
    return {
        "count": len(times),
        "never": len(times) - len(done),
        "median": round(done[len(done) // 2], 2),
        "p90": round(done[int(len(done) * 0.9)], 2),
        "max": round(done[-1], 2),
    }


def executions(logdir: Path) -> tuple[collections.Counter[int], collections.Counter[str]]:
    """How often each request ran, and how many runs each handler mode made (a native worker's log
    is exec-MODE-PID.log, a Majordomo worker's exec-PID.log)."""
    runs: collections.Counter[int] = collections.Counter()
    by_mode: collections.Counter[str] = collections.Counter({m: 0 for m in HANDLER_MODES})
    for f in logdir.glob("exec-*.log"):
        mode = f.stem.partition("-")[2].rpartition("-")[0] or "majordomo"
        for line in f.read_text().splitlines():
            if line.strip().isdigit():
                runs[int(line)] += 1
                by_mode[mode] += 1
    return runs, by_mode


STEP_DOWN = re.compile(r"(\S+) stepped down to passive \((\d+) open requests, (warm|cold)\): (.*)")


TAKEOVER = re.compile(r"(\S+) is active, epoch \d+ \((.*)\); \d+ open requests taken over")
RESUME_GRACE_S = 10.0  # a step-down this soon after its broker's SIGCONT is the stopped one's own
LOG_RESOLUTION_S = 0.001  # log lines carry whole milliseconds (truncated)
FLAP_S = 1.0  # a takeover this soon after the same broker stepped down is a flap (nothing changed)


def logged_at(line: str) -> float | None:
    """The wall-clock time at the start of a log line (the default format), or None."""
    try:
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def stop_clients(topo: Topology) -> set[str]:
    """SIGTERM each client process: it sends no more and waits for what it has open. Return those
    that had not ended within the requests' deadline (then killed)."""
    hung = set()
    for name in topo.clients:
        topo.procs[name].signal(signal.SIGTERM)
    end = time.monotonic() + TIMEOUT_S + 15
    for name in topo.clients:
        popen = topo.procs[name].popen
        if popen is not None:
            try:
                popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung.add(name)
                topo.procs[name].kill()
    return hung


def client_record(topo: Topology, name: str, hung: bool) -> dict[str, Any]:
    """How the requests of client process ``name`` ended, from its file: every outcome, numbers
    that ended twice, and (its last run ended on SIGTERM) numbers of that run that never ended.
    A SIGKILLed run's open requests end nowhere: only a wrong value or a second end counts there."""
    ended: collections.Counter[str] = collections.Counter()
    seen: set[int] = set()
    twice = 0
    issued = None
    path = topo.logdir / f"{name}.out"
    for line in path.read_text().splitlines() if path.exists() else []:
        a, b = line.split()
        if a == "done":
            issued = int(b)
            continue
        i = int(a)
        twice += i in seen
        seen.add(i)
        ended[b] += 1
    proc = topo.procs[name]
    first = topo.client_first(name, proc.starts - 1)
    never = None if issued is None else sum(1 for i in range(first, first + issued) if i not in seen)
    return {
        "runs": proc.starts,
        "ended": dict(ended),
        "twice": twice,
        "last_run_issued": issued,
        "never": never,
        "hung": hung,
    }


def read_logs(logdir: Path, resumed: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Step-downs, tracebacks and crashes in every process's log. A broker that carried the pair's
    table stepping down is a defect, unless it was stopped (SIGSTOP) and has just resumed: its
    peer took over meanwhile, so stepping down is what it must do (``resumed``: the SIGCONTs)."""
    resumed = resumed or {}
    step_downs, flaps, tracebacks, crashes = [], [], [], []
    gone = 0  # clients a broker took for gone (silent past the ttl: the client processes' faults)
    for f in sorted(logdir.glob("*.log")):
        if f.name.startswith("exec-"):
            continue
        text = f.read_text(errors="replace")
        stepped: float | None = None  # when this broker last stepped down
        for k, line in enumerate(text.splitlines()):
            if (m := TAKEOVER.search(line)) and stepped is not None:
                at = logged_at(line)
                if at is not None and at - stepped <= FLAP_S:
                    flaps.append(f"{f.name}:{k + 1}: {m[1]} took over {at - stepped:.3f}s after stepping down ({m[2]})")
            if m := STEP_DOWN.search(line):
                at = stepped = logged_at(line)
                # Seconds since the broker's last SIGCONT before this line (a resumed broker that
                # hears its peer took over steps down 0.5-60 ms after it: often within the line's ms).
                since = (
                    None
                    if at is None
                    else min((at - t for t in resumed.get(m[1], ()) if at - t >= -LOG_RESOLUTION_S), default=None)
                )
                step_downs.append(
                    {
                        "broker": m[1],
                        "open": int(m[2]),
                        "carried": m[3],
                        "why": m[4][:120],
                        "resumed": since is not None and since <= RESUME_GRACE_S,
                        "since_resume_s": None if since is None else round(since, 4),
                        "line": f"{f.name}:{k + 1}: {line[:23]}",
                    }
                )
            if "taken for gone" in line:
                gone += 1
            if line.startswith("Traceback"):
                tracebacks.append(f"{f.name}:{k + 1}")
            elif line.startswith(("Fatal Python error", "Assertion failed")):  # a process died by itself
                crashes.append(f"{f.name}:{k + 1}: {line[:120]}")
    live = [
        s for s in step_downs if s["carried"] == "warm" and not s["why"].startswith("handed over") and not s["resumed"]
    ]
    return {
        "step_downs": step_downs,
        "live_active_step_downs": live,
        "flaps": flaps,
        "tracebacks": tracebacks,
        "crashes": crashes,
        "clients_taken_for_gone": gone,
    }


def _exit_on_sigterm() -> Any:
    """SIGTERM ends the soak through ``run``'s ``finally``, which kills every process of the
    topology: ``timeout`` and a test runner that stops send it, and the topology outlived them
    (its brokers, workers and clients ran on, loading the machine). Returns the handler it
    replaced (None off the main thread, where no handler can be set)."""

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup is not interrupted again
        raise SystemExit(f"soak: stopped by signal {signum}; every process of the topology is killed")

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, stop)


def _term_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (``--stop-with-parent``), so the topology
    is killed with it (see :func:`_exit_on_sigterm`), even when the parent was SIGKILLed."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM) != 0:  # PR_SET_PDEATHSIG
        raise SystemExit(f"soak: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() == 1:  # the parent died before the prctl
        raise SystemExit("soak: the parent is gone already")


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="zmqdist-soak-"))
    topo = Topology(tmp, args.heartbeat, args.curve)
    load = Load(topo, args.requests)
    chaos = Chaos(topo, rng)
    before = _exit_on_sigterm()
    try:
        topo.start()
        for name in ("MA", "R1A", "R2A"):
            deadline = time.monotonic() + 30
            while (st := topo.state(name)) is None or st["state"] != "active":
                if time.monotonic() > deadline:
                    raise SystemExit(f"soak: {name} did not become active")
                time.sleep(0.2)
        time.sleep(2)  # workers register, proxies register upstream, passives sync
        start = time.monotonic()
        load.start(args.seed)
        for name in topo.clients:
            topo.procs[name].start()
        next_fault = start + rng.uniform(2, 5)
        quiet_from = start + max(0.0, args.duration - args.settle)
        while True:
            now = time.monotonic()
            chaos.due(now - start)
            chaos.note_exits(now - start)
            if now >= start + args.duration or (args.requests is not None and load.issued >= args.requests):
                break
            if now >= next_fault and now < quiet_from:
                chaos.fault(now - start)
                next_fault = now + rng.uniform(2, 5)
            time.sleep(0.05)
        chaos.settle()
        load.finish(TIMEOUT_S + 30)
        hung = stop_clients(topo)
        elapsed = time.monotonic() - start
        left: dict[str, int | None] = {}  # every client is done: nothing may stay open at a broker
        settled_by = time.monotonic() + 20
        while time.monotonic() < settled_by:
            left = {n: k for n, k in topo.open_requests().items() if k}
            if not left:
                break
            time.sleep(0.5)
        kept = topo.remembered(15 * 4 * args.heartbeat)  # 15 ttls (liveness 4): the forgetting runs every 10
        outcome = collections.Counter(load.outcome.values())
        never = load.issued - len(load.outcome)
        if never:
            outcome["lost"] += never  # submitted, and no outcome at all by the end
        runs, by_mode = executions(topo.logdir)
        stray = orphans(topo.logdir)  # killed workers' handler processes died with them, long ago
        ok_ids = [i for i, k in load.outcome.items() if k == "ok"]
        report = {
            "seed": args.seed,
            "curve": args.curve,
            "seconds": round(elapsed, 1),
            "requests": load.issued,
            "per_second": round(load.issued / elapsed, 1) if elapsed else 0,
            "outcomes": dict(outcome),
            "errors": sum(
                v
                for k, v in outcome.items()
                if k not in ("ok", "lost", "wrong", "duplicate", "cancelled", KILLED, UNAWAITED_KILLED)
            ),
            "lifecycle": dict(sorted(load.lifecycle_outcomes.items())),
            "lifecycle_errors": load.lifecycle_errors[:20],
            "bursts_past_the_quota": load.bursts,
            "mdp": dict(sorted(load.mdp_outcomes.items())),
            "mdp_errors": load.mdp_errors[:20],
            "mdp_resends": load.mdp_resends[:40],
            "left_open_at_brokers": left,
            "remembered_past_the_forgetting": kept,
            "faults": dict(chaos.faults),
            "fault_count": sum(chaos.faults.values()),
            "restarts": {n: p.starts - 1 for n, p in topo.procs.items() if p.starts > 1},
            "takeover_s": takeover_figures(chaos.takeovers),
            "stopped_broker_back_before_a_takeover": chaos.resumed_first,
            "stalls_that_changed_the_active_broker": chaos.stalls_changed,
            "stalls_that_gave_a_worker_up": chaos.stalls_expired,
            "processes_that_exited_by_themselves": chaos.exited,
            "executions": {
                "never_run_but_ok": sum(1 for i in ok_ids if runs[i] == 0),
                "ran_twice_or_more": sum(1 for i in load.outcome if runs[i] >= 2),
                "max_runs": max(runs.values(), default=0),
                "by_handler_mode": dict(by_mode),
            },
            "duplicates_absorbed_by_clients": sum(c._core.counters["duplicates"] for c in load.clients if c._core),
            "client_processes": {n: client_record(topo, n, n in hung) for n in topo.clients},
            "orphans": stray,
            **read_logs(topo.logdir, chaos.resumed),
            "fault_log": chaos.log,
            "logs": str(topo.logdir) if args.keep else None,
        }
        return report
    finally:
        topo.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def verdict(report: dict[str, Any], max_error_rate: float) -> list[str]:
    """What went wrong (empty: the soak passed)."""
    o = report["outcomes"]
    bad = [f"{o[k]} {k}" for k in ("lost", "wrong", "duplicate") if o.get(k)]
    if report["live_active_step_downs"]:
        live = report["live_active_step_downs"]
        bad.append(f"{len(live)} step-downs of a live active broker")
        bad += [f"  {s['line']} {s['broker']} (resumed {s['since_resume_s']} s before): {s['why']}" for s in live]
    if report["flaps"]:
        bad.append(f"brokers that took over again right after stepping down: {report['flaps'][:5]}")
    if changed := report.get("stalls_that_changed_the_active_broker"):
        bad.append(f"stalled hosts whose pair changed its active broker: {changed[:5]}")
    if expired := report.get("stalls_that_gave_a_worker_up"):
        bad.append(f"stalled hosts whose active broker gave a worker of the host up: {expired[:5]}")
    if exited := report.get("processes_that_exited_by_themselves"):
        bad.append(f"processes that exited by themselves (the soak had not killed them): {exited[:5]}")
    if report["tracebacks"]:
        bad.append(f"tracebacks: {report['tracebacks'][:5]}")
    if report.get("orphans"):
        bad.append(f"processes that outlived their parent: {report['orphans'][:5]}")
    if report["crashes"]:
        bad.append(f"crashes: {report['crashes'][:5]}")
    if report["takeover_s"].get("never"):
        bad.append(f"{report['takeover_s']['never']} pairs had no active broker 20 s after losing theirs")
    if hung := {k: v for k, v in report.get("lifecycle", {}).items() if k.endswith("RequestTimeout")}:
        bad.append(f"streams or joined requests that waited out their {TIMEOUT_S:.0f} s deadline: {hung}")
    if left := report.get("left_open_at_brokers"):
        bad.append(f"requests still open at brokers 20 s after every client was done: {left}")
    if kept := report.get("remembered_past_the_forgetting"):
        bad.append(f"brokers that remember more peers than they have, 15 ttls after every client was done: {kept}")
    for name, c in report.get("client_processes", {}).items():
        if c["ended"].get("wrong") or c["twice"] or c["never"] or c["hung"] or c["last_run_issued"] is None:
            bad.append(f"client process {name}: {c}")
    if report["executions"]["never_run_but_ok"]:
        bad.append(f"{report['executions']['never_run_but_ok']} answered OK but never run")
    if idle := [m for m, n in report["executions"]["by_handler_mode"].items() if not n]:
        bad.append(f"handler modes that ran no request (the soak did not test them): {idle}")
    killed = o.get(KILLED, 0) + sum(c["ended"].get(KILLED, 0) for c in report.get("client_processes", {}).values())
    if killed > (kills := report.get("faults", {}).get("kill handler", 0)):  # one request at most per kill
        bad.append(f"{killed} requests ended by a killed handler process, for {kills} kills of one")
    if report["requests"] and report["errors"] / report["requests"] > max_error_rate:
        bad.append(f"error rate {report['errors'] / report['requests']:.4%} over {max_error_rate:.4%}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (faults stop --settle before)")
    ap.add_argument("--requests", type=int, default=None, help="stop after this many requests (if sooner)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--settle", type=float, default=8.0, help="seconds without faults at the end")
    ap.add_argument("--heartbeat", type=float, default=0.25)
    ap.add_argument("--max-error-rate", type=float, default=0.001)
    ap.add_argument("--report", default=None, help="write the report as JSON here")
    ap.add_argument("--curve", action="store_true", help="CURVE on every link (keys made in the temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory with every log")
    ap.add_argument("--stop-with-parent", action="store_true", help="Linux: stop (and kill all) if the parent dies")
    args = ap.parse_args()
    if args.stop_with_parent:
        _term_with_parent()
    report = run(args)
    bad = verdict(report, args.max_error_rate)
    report["verdict"] = bad or "passed"
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    short = {k: v for k, v in report.items() if k != "fault_log"}
    print(json.dumps(short, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
