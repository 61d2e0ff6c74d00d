"""``zmqdist load``: a client that sends a steady load to one service and reports each second.

Used by topology files (``[[load]]``) to stand in for a region's users, and by hand to put a
broker under load. Each second it writes one JSON line: the totals so far (``ok``, ``errors`` by
kind, ``held`` = not sent because ``inflight`` requests were open) and the last second's ``rate``
and latency percentiles, so that a supervisor (``zmqdist up``) can show them.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import Counter
from typing import IO, Any

from zmqdist.client import Client
from zmqdist.errors import ZmqdistError


class Load:
    """Send ``rate`` requests a second of ``value`` to ``service`` until :meth:`stop`."""

    def __init__(
        self,
        client: Client,
        service: str,
        rate: float,
        value: Any = None,
        timeout: float = 10.0,
        inflight: int = 1000,
    ) -> None:
        self.client = client
        self.service = service
        self.rate = rate
        self.value = value
        self.timeout = timeout
        self.inflight = inflight
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.held = 0
        self.open = 0
        self._lat: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _done(self, t0: float, fut: Any) -> None:
        took = time.monotonic() - t0
        with self._lock:
            self.open -= 1
            try:
                fut.result()
                self.ok += 1
                self._lat.append(took)
            except ZmqdistError as exc:
                self.errors[type(exc).__name__] += 1

    def report(self, since_ok: int, seconds: float) -> dict[str, Any]:
        """The totals, and the rate and latencies since the last report."""
        with self._lock:
            lat, self._lat = sorted(self._lat), []
            line: dict[str, Any] = {
                "ok": self.ok,
                "errors": dict(self.errors),
                "held": self.held,
                "open": self.open,
                "rate": round((self.ok - since_ok) / seconds, 1) if seconds > 0 else 0.0,
            }
        if lat:
            line["p50_ms"] = round(1000 * lat[len(lat) // 2], 2)
            line["p99_ms"] = round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2)
        return line

    def run(self, out: IO[str], report_s: float = 1.0) -> None:
        """Send until stopped; write a JSON report line to ``out`` every ``report_s`` seconds."""
        start = last = time.monotonic()
        sent = 0
        last_ok = 0
        while not self._stop.is_set():
            now = time.monotonic()
            due = int((now - start) * self.rate) + 1 - sent
            for _ in range(max(0, min(due, 1000))):
                sent += 1
                if self.open >= self.inflight:
                    self.held += 1
                    continue
                with self._lock:
                    self.open += 1
                t0 = time.monotonic()
                try:
                    fut = self.client.submit(self.service, self.value, timeout=self.timeout)
                except ZmqdistError as exc:
                    with self._lock:
                        self.open -= 1
                        self.errors[type(exc).__name__] += 1
                    continue
                fut.add_done_callback(functools.partial(self._done, t0))
            if now - last >= report_s:
                line = self.report(last_ok, now - last)
                last_ok, last = line["ok"], now
                out.write(json.dumps(line) + "\n")
                out.flush()
            self._stop.wait(min(0.05, max(0.001, (sent + 1) / self.rate - (time.monotonic() - start))))
