"""Prometheus metrics for a broker, through the official prometheus_client library.

A custom collector turns the broker's status snapshot into metric families at scrape time, so the
broker's loop pays nothing per request for counters and gauges (only its latency histograms, kept
in the core, cost about 0.3 us a request). ``serve_metrics`` starts the HTTP endpoint.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from zmqdist.core.mdp import COUNTERS as MDP_COUNTERS
from zmqdist.core.records import COUNTER_NAMES
from zmqdist.errors import ConfigError
from zmqdist.transport import RateLimitedLog

log = logging.getLogger(__name__)

# The lowest prometheus_client setup.cfg accepts and .ci/lowest runs the suite with (its
# start_http_server, which the endpoint used before it had its own server below, returned
# nothing before 0.20). An older one installed anyway (a --no-deps install, a pinned environment)
# gets a clear error at start.
PROMETHEUS_MIN: Final = (0, 20)
# The endpoint's HTTP server (prometheus_client's own has neither bound): a connection that sends
# or takes nothing for SCRAPE_TIMEOUT_S is closed, and at most SCRAPE_CONNECTIONS are served at
# once (a thread each); more are closed at once. Without them every idle connection held a thread
# and a file descriptor of the broker for good, and enough of them left it none to accept peers.
SCRAPE_TIMEOUT_S: Final = 10.0
SCRAPE_CONNECTIONS: Final = 16
TURNED_AWAY_LOG_S: Final = 30.0  # a refused connection is logged at most this often

REPLIES = (
    ("ok", "replies_ok"),
    ("failed", "replies_failed"),
    ("busy", "busy"),
    ("timeout", "timeouts"),
    ("lost", "lost"),
    ("invalid", "invalid"),
    ("cancelled", "cancelled"),
    ("interrupted", "interrupted"),
)
DROPS = (
    ("send_failed", "send_drops"),
    ("bad_input", "bad_input"),
    ("duplicate", "duplicates"),
    ("late_result", "late_results"),
    ("bogus_result", "bogus_results"),
    ("abandoned", "abandoned"),
    ("over_quota", "over_quota"),
    ("refused_by_role", "refused_by_role"),
    ("handshake_failed", "handshakes_failed"),
)


# The Majordomo bridge's counters (status "mdp"): label, key.
MDP = (
    ("request", "mdp_requests"),
    ("reply", "mdp_replies"),
    ("worker_ready", "mdp_workers"),
    ("partial", "mdp_partials"),
    ("too_large", "mdp_too_large"),
)


# Every counter a table above names exists (a typo fails at import, not silently at scrape time).
_unknown = [key for _, key in (*REPLIES, *DROPS) if key not in COUNTER_NAMES]
_unknown += [key for _, key in MDP if key not in MDP_COUNTERS]
if _unknown:
    raise ImportError(f"zmqdist.metrics names counters the broker does not have: {_unknown}")


class BrokerCollector(Collector):  # (explicit: an ABC in older prometheus_client, a Protocol in newer)
    """Collects one broker's metrics from its status snapshot (``status()``, as ``Broker.status``)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        c = st["counters"]
        yield CounterMetricFamily("zmqdist_requests", "Requests received", value=c["requests"])
        replies = CounterMetricFamily("zmqdist_replies", "Requests ended, by final status", labels=["status"])
        for label, key in REPLIES:
            replies.add_metric([label], c.get(key, 0))
        yield replies
        yield CounterMetricFamily(
            "zmqdist_requeues", "Requests requeued after their holder was lost", value=c["requeues"]
        )
        yield CounterMetricFamily("zmqdist_retries", "Runs scheduled again by a retry policy", value=c["retried"])
        yield CounterMetricFamily("zmqdist_stream_parts", "Parts of streamed replies relayed", value=c["parts"])
        yield CounterMetricFamily(
            "zmqdist_joined", "Requests that joined an open one with the same caller key", value=c["joined"]
        )
        batches = CounterMetricFamily(
            "zmqdist_batches", "BATCH frames received from and sent to peers that read them", labels=["direction"]
        )
        batches.add_metric(["in"], c.get("batches_in", 0))
        batches.add_metric(["out"], c.get("batches_out", 0))
        yield batches
        batched = CounterMetricFamily(
            "zmqdist_batched_messages", "Messages inside BATCH frames, received and sent", labels=["direction"]
        )
        batched.add_metric(["in"], c.get("batched_in", 0))
        batched.add_metric(["out"], c.get("batched_out", 0))
        yield batched
        mdp = st.get("mdp") or {}
        majordomo = CounterMetricFamily(
            "zmqdist_mdp_messages", "Majordomo messages the broker translated, by kind", labels=["kind"]
        )
        for label, key in MDP:
            majordomo.add_metric([label], mdp.get(key, 0))
        yield majordomo
        drops = CounterMetricFamily("zmqdist_drops", "Messages dropped or refused, by cause", labels=["cause"])
        for label, key in DROPS:
            drops.add_metric([label], c.get(key, 0))
        yield drops
        yield CounterMetricFamily(
            "zmqdist_heartbeat_misses",
            "Members declared dead after missing their heartbeats",
            value=c["workers_expired"],
        )
        yield CounterMetricFamily(
            "zmqdist_pauses",
            "Times the broker found it had not run for 0.2 s or more (stopped, a stalled host, starved)",
            value=c.get("pauses", 0),
        )
        yield CounterMetricFamily(
            "zmqdist_paused_seconds",
            "Time the broker did not run in those pauses (its peers' silence then is not counted)",
            value=c.get("paused_ms", 0) / 1000.0,
        )
        yield GaugeMetricFamily("zmqdist_queue_depth", "Requests waiting for a worker", value=st["queued"])
        yield GaugeMetricFamily(
            "zmqdist_requests_open", "Requests accepted and not yet answered", value=st["requests_open"]
        )
        yield GaugeMetricFamily("zmqdist_workers", "Workers registered", value=len(st["workers"]))
        remembered = GaugeMetricFamily(
            "zmqdist_remembered_peers", "Peers the broker keeps in a table, by table", labels=["table"]
        )
        for table, n in (st.get("remembered") or {}).items():
            remembered.add_metric([table], n)
        yield remembered
        per: dict[str, GaugeMetricFamily] = {
            "workers": GaugeMetricFamily("zmqdist_service_workers", "Members serving the service", labels=["service"]),
            "capacity": GaugeMetricFamily("zmqdist_service_capacity", "Slots of the service", labels=["service"]),
            "inflight": GaugeMetricFamily(
                "zmqdist_service_inflight", "Tasks of the service running", labels=["service"]
            ),
            "queued": GaugeMetricFamily(
                "zmqdist_service_queued", "Requests of the service waiting", labels=["service"]
            ),
        }
        util = GaugeMetricFamily("zmqdist_service_utilisation", "In-flight / capacity (0..1)", labels=["service"])
        for name, s in st["services"].items():
            for key, fam in per.items():
                fam.add_metric([name], s[key])
            util.add_metric([name], s["inflight"] / s["capacity"] if s["capacity"] else 0.0)
        yield from per.values()
        yield util
        served = CounterMetricFamily("zmqdist_worker_served", "Answers from each worker", labels=["worker"])
        failed = CounterMetricFamily("zmqdist_worker_failed", "Answers whose handler raised", labels=["worker"])
        busy = GaugeMetricFamily("zmqdist_worker_utilisation", "In-flight / capacity of each worker", labels=["worker"])
        mean = GaugeMetricFamily(
            "zmqdist_worker_service_seconds_mean", "Mean dispatch-to-answer time", labels=["worker"]
        )
        for w in st["workers"]:
            served.add_metric([w["name"]], w["served"])
            failed.add_metric([w["name"]], w["failed"])
            busy.add_metric([w["name"]], w["inflight"] / w["capacity"] if w["capacity"] else 0.0)
            if w["mean_service_ms"] is not None:
                mean.add_metric([w["name"]], w["mean_service_ms"] / 1000)
        yield from (served, failed, busy, mean)
        hists = st.get("histograms") or {}
        if hists:
            lat = HistogramMetricFamily(
                "zmqdist_latency_seconds",
                "Queue wait, service time and end-to-end time in this broker",
                labels=["kind"],
            )
            for kind, h in hists.items():
                buckets = [(repr(b), n) for b, n in zip(h["bounds_s"], h["cumulative"], strict=False)]
                buckets.append(("+Inf", h["cumulative"][-1]))
                lat.add_metric([kind], buckets, sum_value=h["sum_s"])
            yield lat


def serve_metrics(status: Callable[[], dict[str, Any]], port: int, addr: str) -> tuple[Any, int]:
    """Start the /metrics HTTP endpoint for a broker's ``status``; return (server, bound port).
    ``port`` 0 picks a free one."""
    try:
        installed = version("prometheus_client")
    except PackageNotFoundError:  # importable without its metadata (a vendored copy): nothing to check
        installed = ""
    if installed and tuple(int(n) for n in re.findall(r"\d+", installed)[:2]) < PROMETHEUS_MIN:
        need = ".".join(map(str, PROMETHEUS_MIN))
        raise ConfigError(
            f"metrics need prometheus_client {need} or later (installed: {installed}): "
            f"pip install 'prometheus_client>={need}'"
        )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(status))
    # the process's CPU, memory and file descriptors (process_open_fds against process_max_fds: a
    # broker out of descriptors accepts no more peers; see transport/fds.py)
    ProcessCollector(registry=registry)
    family, host = _family(addr, port)
    server = _Server((host, port), _Handler, family, SCRAPE_CONNECTIONS)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="zmqdist-metrics", daemon=True).start()
    return server, int(server.server_port)


def _family(addr: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family and host to bind ``addr`` with (an IPv6 address needs AF_INET6)."""
    try:
        info = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {addr}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = info[0]
    return family, str(sockaddr[0])


class _Handler(WSGIRequestHandler):
    """One scrape connection: a socket timeout (a silent peer lets go of its thread), no access log."""

    timeout = SCRAPE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``slots`` at once; more are closed without a thread."""

    daemon_threads = True
    request_queue_size = 64  # (socketserver's 5 held a burst of connections back at the kernel)

    def __init__(
        self, address: tuple[str, int], handler: type[_Handler], family: socket.AddressFamily, slots: int
    ) -> None:
        self.address_family = family
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(slots)
        self.turned_away = 0
        self._log = RateLimitedLog(log, TURNED_AWAY_LOG_S, 1)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.turned_away += 1
            self._log.warning(
                "turned-away",
                time.monotonic(),
                "metrics endpoint: %d connections are open already (each waits at most %gs for its request): "
                "closed one from %s (%d so far)",
                SCRAPE_CONNECTIONS,
                SCRAPE_TIMEOUT_S,
                client_address[0],
                self.turned_away,
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # (starts its thread)
        except BaseException:
            self._slots.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that timed out or went away is routine; socketserver printed its traceback."""
        log.debug("metrics endpoint: a connection from %s ended early", client_address[0], exc_info=True)
