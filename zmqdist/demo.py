"""``zmqdist demo``: a broker, three worker processes of different speeds and a pipelined client.

Shows live how the least-loaded broker shares the work (faster workers serve more), SIGKILLs one
worker halfway (its in-flight requests are requeued: nothing is lost), then prints a summary.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any, cast

from zmqdist.broker import Broker
from zmqdist.client import Client
from zmqdist.errors import ZmqdistError
from zmqdist.worker import Worker

SPEEDS = {"fast": 0.001, "medium": 0.002, "slow": 0.004}  # seconds of work per request


def _make(name: str, delay: float) -> Worker:
    w = Worker(["tcp://127.0.0.1:5555"], concurrency=2, name=name)

    @w.service("work")
    def work(x: Any) -> dict[str, Any]:
        time.sleep(delay)
        return {"worker": name, "x": x}

    return w


fast = _make("fast", SPEEDS["fast"])
medium = _make("medium", SPEEDS["medium"])
slow = _make("slow", SPEEDS["slow"])


def _bar(n: int, total: int, width: int = 30) -> str:
    k = round(width * n / total) if total else 0
    return "#" * k + "." * (width - k)


def run(duration: float = 6.0, kill: bool = True, out: Any = None) -> int:
    """Run the demo; return the exit status (0 when every request got its correct reply)."""
    out = out or sys.stdout
    zlog = logging.getLogger("zmqdist")
    if zlog.getEffectiveLevel() >= logging.INFO:
        zlog.setLevel(logging.WARNING)  # the demo's own lines tell the story; -v brings logs back
    broker = Broker(bind=["tcp://127.0.0.1:*"], name="demo").start()
    ep = broker.endpoints[0]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in SPEEDS:
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "zmqdist", "-q", "worker", f"zmqdist.demo:{name}", "--connect", ep], env=env
        )
    print(f"broker on {ep}; workers fast (1 ms), medium (2 ms), slow (4 ms), 2 slots each", file=out)
    served: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    wrong = 0
    try:
        with Client([ep], timeout=10.0) as client:
            deadline = time.monotonic() + 15
            while len(broker.status()["workers"]) < len(SPEEDS):
                if time.monotonic() > deadline:
                    print("workers did not register within 15 s", file=out)
                    return 1
                time.sleep(0.05)
            window: deque[tuple[int, float, Future[Any]]] = deque()
            start = time.monotonic()
            next_show = start + 0.5
            killed = not kill
            i = 0
            while True:
                now = time.monotonic()
                if now - start < duration:
                    while len(window) < 40:
                        window.append((i, time.perf_counter(), client.submit("work", i)))
                        i += 1
                elif not window:
                    break
                x, t0, fut = window.popleft()
                try:
                    r = fut.result()
                    latencies.append(time.perf_counter() - t0)
                    served[r["worker"]] += 1
                    wrong += r["x"] != x
                except ZmqdistError as exc:
                    errors[type(exc).__name__] += 1
                if not killed and now - start >= duration / 2:
                    procs["medium"].send_signal(signal.SIGKILL)
                    killed = True
                    print(
                        f"  t={now - start:4.1f}s  SIGKILL worker 'medium' (its in-flight requests will be requeued)",
                        file=out,
                    )
                if now >= next_show:
                    next_show = now + 0.5
                    total = sum(served.values())
                    shares = "  ".join(f"{n}:{served[n]:6d}" for n in SPEEDS)
                    print(f"  t={now - start:4.1f}s  done {total:6d}  {shares}", file=out)
        total = sum(served.values())
        st = broker.status()
        latencies.sort()
        print("\nsummary", file=out)
        print(
            f"  requests {i}, replies {total}, errors {sum(errors.values())} {dict(errors) or ''}, "
            f"wrong replies {wrong}",
            file=out,
        )
        for n in SPEEDS:
            print(
                f"  {n:7} {_bar(served[n], total)} {served[n]:6d} ({100 * served[n] / max(total, 1):4.1f}%)", file=out
            )
        if latencies:
            p50 = latencies[len(latencies) // 2] * 1000
            p99 = latencies[int(len(latencies) * 0.99)] * 1000
            print(f"  throughput {total / duration:,.0f} req/s, latency p50 {p50:.1f} ms p99 {p99:.1f} ms", file=out)
        c = st["counters"]
        print(f"  broker: requeued {c['requeues']}, workers expired {c['workers_expired']}, lost {c['lost']}", file=out)
        ok = total == i and wrong == 0 and not errors
        print("  every request got exactly one correct reply" if ok else "  SOME REQUESTS FAILED", file=out)
        return 0 if ok else 1
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                pr.send_signal(signal.SIGTERM)
        for pr in procs.values():
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
        broker.stop()


GEO = Path(__file__).resolve().parents[1] / "examples" / "geo" / "topology.toml"


class _Tally:
    """Counts read from brokers' status over time: a count that drops (a restart, a worker that
    left) keeps what it had counted, so totals only grow."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], int] = {}
        self.banked: dict[tuple[str, str], int] = {}

    def see(self, broker: str, what: str, value: int) -> None:
        k = (broker, what)
        last = self.last.get(k, 0)
        if value < last:
            self.banked[k] = self.banked.get(k, 0) + last - value
        self.last[k] = value

    def total(self, brokers: tuple[str, ...], what: str) -> int:
        return sum(self.last.get((b, what), 0) + self.banked.get((b, what), 0) for b in brokers)


class _Events:
    """Passes on the supervisor's lines about processes that ended or started again."""

    def __init__(self, out: Any) -> None:
        self.out = out

    def write(self, text: str) -> None:
        if "ended" in text or "again" in text:
            self.out.write("  " + text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return False


def run_geo(duration: float = 20.0, kill: bool = True, out: Any = None) -> int:
    """Run examples/geo (a master pair, two regions of a proxy pair each) under its client loads;
    show per region what was served locally, what overflowed and where; with ``kill``, SIGKILL
    east's active proxy halfway. Return 0 when no user request failed."""
    from zmqdist import topology
    from zmqdist.up import Supervisor, where_served

    out = out or sys.stdout
    if not GEO.is_file():
        print(f"zmqdist demo --geo runs {GEO}, which is part of a source checkout (not found here)", file=out)
        return 2
    zlog = logging.getLogger("zmqdist")
    if zlog.getEffectiveLevel() >= logging.INFO:
        zlog.setLevel(logging.WARNING)
    topo = topology.load(GEO)
    sup = Supervisor(topo, topo.processes, cast(IO[str], _Events(out)), interval=1.0)
    regions = {"east": ("east-a", "east-b"), "west": ("west-a", "west-b"), "master": ("master-a", "master-b")}
    tally = _Tally()
    print(
        f"{GEO.relative_to(GEO.parents[2])}: master pair; east (1 worker, users at 300 req/s) and west "
        "(2 workers, 100 req/s), each a proxy pair; every request 10 ms of work",
        file=out,
    )
    loads = [r for r in sup.running if r.spec.kind == "load"]
    try:
        sup.start()
        start = time.monotonic()
        killed = not kill
        next_show = start + 2
        while time.monotonic() - start < duration:
            sup.watch(time.monotonic())
            now = time.monotonic()
            if now < next_show:
                time.sleep(0.1)
                continue
            next_show = now + 2
            sup.poll_status()
            for name, st in sup.statuses.items():
                if st is None or (st.get("ha") or {}).get("state") == "passive":
                    continue
                for what, n in where_served(st).items():
                    tally.see(name, what, n)
            east, west, master = regions["east"], regions["west"], regions["master"]
            ok = {r.spec.name: r.report.get("ok", 0) for r in loads}
            errs = sum(sum(r.report.get("errors", {}).values()) for r in loads)
            print(
                f"  t={now - start:4.0f}s  east: here {tally.total(east, 'here'):6d} up {tally.total(east, 'up'):6d}"
                f" | master: here {tally.total(master, 'here'):6d} down {tally.total(master, 'down'):6d}"
                f" | west: here {tally.total(west, 'here'):6d} (from master {tally.total(west, 'from_up'):5d})"
                f" | users ok {sum(ok.values()):6d} errors {errs}",
                file=out,
            )
            if not killed and now - start >= duration / 2:
                active = next(
                    (n for n in east if ((sup.statuses.get(n) or {}).get("ha") or {}).get("state") == "active"),
                    east[0],  # no answer in time (a loaded machine): the primary, active unless it failed
                )
                victim = next((r for r in sup.running if r.spec.name == active), None)
                if victim is not None and victim.popen is not None:
                    victim.popen.send_signal(signal.SIGKILL)
                    killed = True
                    print(
                        f"  t={now - start:4.0f}s  SIGKILL {active}, east's active proxy: its pair takes over", file=out
                    )
        sup.poll_status()
        reports = {r.spec.name: r.report for r in loads}
    finally:
        sup.stop()
    east_here, east_up = tally.total(regions["east"], "here"), tally.total(regions["east"], "up")
    print("\nsummary", file=out)
    for name, rep in reports.items():
        print(
            f"  {name:11} ok {rep.get('ok', 0):6d}  errors {sum(rep.get('errors', {}).values())} "
            f"{rep.get('errors') or ''} "
            f"p50 {rep.get('p50_ms', '-')} ms  p99 {rep.get('p99_ms', '-')} ms (last second)",
            file=out,
        )
    total = east_here + east_up
    print(
        f"  east served {east_here} locally ({100 * east_here / max(total, 1):.0f}%) and sent {east_up} up: the master"
        f" served {tally.total(regions['master'], 'here')} itself and handed {tally.total(regions['master'], 'down')}"
        f" down to west",
        file=out,
    )
    failed = sum(sum(rep.get("errors", {}).values()) for rep in reports.values())
    print("  no user request failed" if not failed else f"  {failed} USER REQUESTS FAILED", file=out)
    return 0 if not failed and reports else 1
