"""Prometheus metrics for a broker, through the official prometheus_client library.

A custom collector turns the broker's status snapshot into metric families at scrape time, so the
broker's loop pays nothing per request for counters and gauges (only its latency histograms, kept
in the core, cost about 0.3 us a request). ``serve_metrics`` starts the HTTP endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

from prometheus_client import ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from zmqdist.core.mdp import COUNTERS as MDP_COUNTERS
from zmqdist.core.records import COUNTER_NAMES
from zmqdist.errors import ConfigError

# start_http_server returns its server (to stop it, and to read the port 0 picked) from 0.20 on;
# before, it returned nothing. setup.cfg asks for this version; an older one installed anyway (a
# --no-deps install, a pinned environment) gets a clear error rather than a TypeError at start.
PROMETHEUS_MIN: Final = (0, 20)

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
    server, _thread = start_http_server(port, addr, registry=registry)
    return server, int(server.server_port)
