"""Two hosts: the master runs in a network namespace of its own, reached over a veth pair.

Cutting the veth link is a vanished host: no process dies, no TCP reset arrives, packets just stop.
Only heartbeats can tell. Skipped (with the reason) where the machine cannot create namespaces.
"""

import os
import secrets
import shutil
import subprocess

import pytest

from tests.integration.helpers import status, wait_for
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
