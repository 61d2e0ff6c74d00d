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
from typing import Any

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
