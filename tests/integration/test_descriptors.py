"""A broker and its file descriptors: every peer's connection is one.

At its limit a broker cannot accept a connection, and libzmq says so to nobody (the peers see no
broker at all): the broker must say it itself, keep serving the peers it has, and accept again once
descriptors free. `zmqdist broker` raises its soft limit to the hard one, so the limit is a
deliberate one rather than a distribution's default of 1,024.
"""

import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest
import zmq

from tests.integration.helpers import ROOT, free_port, status, wait_for
from zmqdist import Broker, Client, Worker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc"),
]


def start_broker(procs, tmp_path, soft, hard):
    """`zmqdist broker` on a free tcp port, with this limit of open files; its log in a file."""
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    log = tmp_path / "broker.log"
    run = (
        "import resource, runpy, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        f"sys.argv = ['zmqdist', 'broker', '--bind', {ep!r}]\n"
        "runpy.run_module('zmqdist', run_name='__main__', alter_sys=True)"
    )
    with open(log, "wb") as err:  # (the broker writes to its own copy)
        p = subprocess.Popen([sys.executable, "-c", run], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    procs.procs.append(p)
    return ep, port, log


def hard_limit():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)


@pytest.mark.timeout(60)
def test_the_broker_command_raises_its_soft_limit_to_the_hard_one(procs, tmp_path):
    hard = hard_limit()
    if hard <= 256:
        pytest.skip(f"the hard limit of open files here is {hard}")
    ep, _, log = start_broker(procs, tmp_path, 256, hard)
    with Client([ep], timeout=10) as c:
        fds = wait_for(lambda: status(c).get("fds"), 20, "the broker's status")
        assert fds["limit"] == hard and 0 < fds["open"] < 256
    assert f"raised the limit of open files from 256 to {hard}" in log.read_text()


@pytest.mark.timeout(90)
def test_a_broker_out_of_descriptors_says_so_serves_its_peers_and_accepts_again(procs, tmp_path):
    ep, port, log = start_broker(procs, tmp_path, 64, 64)
    w = Worker([ep], concurrency=2)
    w.add_service("echo", lambda x: x)
    w.start()
    flood: list[socket.socket] = []
    try:
        with Client([ep], timeout=15) as c:
            assert c.call("echo", 1) == 1
            # Plain TCP connections that never speak: each takes one of the broker's descriptors
            # (libzmq accepts them and waits for their greeting) until there are none left.
            for _ in range(80):
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            warned = "has all 64 file descriptors it may open in use"
            wait_for(lambda: warned in log.read_text(), 20, "the broker's warning", interval=0.2)
            assert status(c)["fds"] == {"open": 64, "limit": 64}
            assert [c.call("echo", i) for i in range(20)] == list(range(20))  # its peers are served
            for s in flood:
                s.close()
            flood.clear()
            wait_for(lambda: "below 80% again" in log.read_text(), 20, "the all-clear", interval=0.2)
        with Client([ep], timeout=15) as late:  # a new peer is accepted again
            assert late.call("echo", "late") == "late"
        assert status_open(ep) < 0.8 * 64
    finally:
        for s in flood:
            s.close()
        w.stop(drain=False)


def status_open(ep):
    with Client([ep], timeout=10) as c:
        return status(c)["fds"]["open"]


class FullableContext(zmq.Context):
    """A context that makes no socket while ``full`` (libzmq says EMFILE then, as when the process
    is out of file descriptors or the context at its MAX_SOCKETS). A real full context is not
    steady enough for a test: a socket that closes frees its place a little later, on libzmq's
    reaper thread, and a proxy's failover closes its old socket just before it makes the new one."""

    full = False

    def socket(self, *args, **kwargs):
        if self.full:
            raise zmq.ZMQError(errno.EMFILE)
        return super().socket(*args, **kwargs)


@pytest.mark.timeout(90)
def test_a_proxy_that_cannot_make_a_socket_at_a_failover_lives_and_fails_over_later(procs, caplog):
    """A proxy's upstream failover makes a new socket. Out of sockets (or descriptors) then, the
    proxy's loop died, and every client below it lost its broker; now it waits for the next
    failover, and serves again once it can connect."""
    a, b = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    masters = {ep: procs.spawn("broker", "--bind", ep) for ep in (a, b)}
    workers = []
    for ep in (a, b):
        w = Worker([ep], concurrency=2)
        w.add_service("echo", lambda x: x)
        workers.append(w.start())
    ctx = FullableContext()
    proxy = Broker(bind=["tcp://127.0.0.1:*"], upstream=[a, b], context=ctx).start()
    try:
        with Client(proxy.endpoints, timeout=20) as c:
            assert c.call("echo", 1) == 1
            # the master the proxy is registered with (under load a master slow to start can be
            # passed over already, and the proxy is at the other one)
            up = wait_for(lambda: (u := proxy.status()["upstream"])["registered"] and u["endpoint"], 20)
            ctx.full = True
            with caplog.at_level(logging.WARNING, logger="zmqdist"):
                masters[up].send_signal(signal.SIGKILL)
                wait_for(lambda: "cannot open a socket to" in caplog.text, 20, "the failed failover", interval=0.1)
                assert proxy.status()["upstream"]["registered"] is False  # alive, and says where it stands
            ctx.full = False
            assert c.call("echo", 2) == 2  # through the other master, once a failover could make its socket
            wait_for(lambda: proxy.status()["upstream"]["registered"], 20, "the proxy registered again")
    finally:
        ctx.full = False
        proxy.stop()
        for w in workers:
            w.stop(drain=False)
        ctx.term()
