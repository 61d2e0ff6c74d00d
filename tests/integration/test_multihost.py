"""Two hosts: the master runs in a network namespace of its own, reached over a veth pair.

Cutting the veth link is a vanished host: no process dies, no TCP reset arrives, packets just stop.
Only heartbeats can tell. Skipped (with the reason) where the machine cannot create namespaces.
"""

import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import ROOT, status, wait_for
from zmqdist import Client

pytestmark = pytest.mark.integration


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


@pytest.fixture
def master_host():
    """A namespace 'host' at 10.231.x.2, linked to this host (10.231.x.1) by a veth pair."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = secrets.token_hex(3)
    ns, here, there = f"zd{tag}", f"zdh{tag}", f"zdn{tag}"
    net = f"10.231.{int(tag[:2], 16) % 250}"
    try:
        sh("ip", "netns", "add", ns)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        sh("ip", "link", "set", there, "netns", ns)
        sh("ip", "addr", "add", f"{net}.1/24", "dev", here)
        sh("ip", "link", "set", here, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", there)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", there, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield {"ns": ns, "ip": f"{net}.2", "link": here}
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.mark.timeout(120)
def test_proxy_on_another_host_survives_a_cut_link_and_recovers(procs, tmp_path, master_host):
    ns, ip = master_host["ns"], master_host["ip"]
    master_ep = f"tcp://{ip}:5755"
    proxy_ep = f"ipc://{tmp_path}/proxy.sock"
    procs.spawn("broker", "--bind", master_ep, "--name", "master", netns=ns)
    procs.spawn("worker", "testworkers:echo", "--connect", master_ep, "--name", "central", netns=ns)
    procs.spawn("broker", "--bind", proxy_ep, "--name", "proxy", "--upstream", master_ep)
    procs.spawn("worker", "testworkers:regional", "--connect", proxy_ep, "--name", "local")
    with Client([proxy_ep], timeout=30) as c:
        wait_for(lambda: (s := status(c))["upstream"]["registered"] and len(s["workers"]) == 1, 30, "proxy ready")
        # 'echo' is served only on the master's host: across the link and back.
        assert [c.call("echo", i)[0] for i in range(20)] == list(range(20))
        sh("ip", "link", "set", master_host["link"], "down")  # the cable is cut: silence, no reset
        pending = [c.submit("echo", i) for i in range(20, 60)]
        # Heartbeats find the silent upstream (ttl 1 s); local work never stops.
        wait_for(lambda: status(c)["upstream"]["losses"] >= 1, 10, "the proxy noticing the silent master")
        assert [c.call("regional", i)[0] for i in range(20)] == list(range(20))
        assert not any(f.done() for f in pending), "upstream work cannot complete while the link is down"
        sh("ip", "link", "set", master_host["link"], "up")
        assert [f.result(30)[0] for f in pending] == list(range(20, 60))
        wait_for(lambda: status(c)["upstream"]["registered"], 20, "proxy registered again")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_burst(client, n):
    """Submit ``n`` requests at once; return (latencies in ms, the pids that served them)."""
    done = {}
    t0 = time.monotonic()
    futures = [client.submit("work", i, timeout=30) for i in range(n)]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _f, i=i: done.setdefault(i, time.monotonic()))
    pids = [f.result(30)[1] for f in futures]
    wait_for(lambda: len(done) == n, 5, "completion times")
    return [1000 * (done[i] - t0) for i in range(n)], pids


@pytest.mark.timeout(180)
def test_a_far_region_keeps_what_it_can_absorb_and_overflows_a_sustained_load(procs, tmp_path, master_host):
    """Master (8 slots) on its own host, 20 ms each way from two regional proxies (2 slots each)
    through a userspace delay relay; one proxy decides by latency, the other by credit alone."""
    ns, ip = master_host["ns"], master_host["ip"]
    master_ep = f"tcp://{ip}:5756"
    procs.spawn("broker", "--bind", master_ep, "--name", "master", netns=ns)
    procs.spawn("worker", "testworkers:geo", "--connect", master_ep, "--concurrency", "8", netns=ns)
    port = free_port()
    relay = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "integration" / "delayrelay.py"), str(port), ip, "5756", "0.02"],
        stdout=subprocess.PIPE,
    )
    procs.procs.append(relay)
    assert relay.stdout is not None and relay.stdout.readline().strip() == b"ready"
    far = f"tcp://127.0.0.1:{port}"
    eps, local = {}, {}
    for rule in ("latency", "credit"):
        eps[rule] = f"ipc://{tmp_path}/{rule}.sock"
        procs.spawn("broker", "--bind", eps[rule], "--name", rule, "--upstream", far, "--overflow", rule)
        local[rule] = procs.spawn("worker", "testworkers:geo", "--connect", eps[rule], "--concurrency", "2").pid
    clients = {rule: Client([eps[rule]], timeout=30) for rule in eps}
    try:
        for c in clients.values():

            def ready(c=c):
                s = status(c)
                return s["upstream"]["registered"] and len(s["workers"]) == 1 and s["upstream"]["rtt_ms"] >= 38

            wait_for(ready, 30, "proxy registered, its worker in, the far link measured")
            for i in range(20):  # the region's service time, measured
                assert c.call("work", i)[0] == i
        # A burst the region absorbs within the delay: 8 x 10 ms on 2 slots = 40 ms here, 50 away.
        lat, went_up = {}, {}
        for rule, c in clients.items():
            up0 = status(c)["counters"]["forwarded_up"]
            ms = []
            for _ in range(5):
                m, _pids = timed_burst(c, 8)
                ms += m
            lat[rule] = statistics.median(ms)
            went_up[rule] = status(c)["counters"]["forwarded_up"] - up0
        assert went_up["latency"] == 0, went_up
        assert went_up["credit"] >= 10, went_up  # credit alone sent some 40 ms away and back
        assert lat["latency"] < lat["credit"], lat
        # A sustained overload still overflows: 800 requests at 400 a second, 200 a second of slots here.
        c = clients["latency"]
        t0 = time.monotonic()
        futures = []
        for i in range(800):
            futures.append(c.submit("work", i, timeout=60))
            time.sleep(max(0.0, t0 + (i + 1) / 400 - time.monotonic()))
        pids = [f.result(60)[1] for f in futures]
        rate = 800 / (time.monotonic() - t0)
        away = sum(1 for pid in pids if pid != local["latency"])
        assert away >= 100, away
        assert rate > 250, rate  # above what the region's 2 slots can serve (200 a second)
    finally:
        for c in clients.values():
            c.close()
