"""`zmqdist up examples/geo/topology.toml` as a user runs it: start, a call through each region,
a worker that dies is started again, SIGTERM stops everything (nothing left running)."""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

from tests.integration.helpers import ROOT, wait_for
from zmqdist import Client
from zmqdist.transport.security import generate

pytestmark = pytest.mark.integration

GEO = ROOT / "examples" / "geo" / "topology.toml"


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


ENV = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'integration'}")


@contextmanager
def running_up(*args):
    """Run ``zmqdist up ARGS``; yield the process and the lines it printed so far (a list that
    grows). At the end nothing it started is left running, whatever the test did."""
    up = subprocess.Popen(
        [sys.executable, "-m", "zmqdist", "up", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(up.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        yield up, lines
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        reader.join(5)
        up.stdout.close()
        for pid in re.findall(r"\(pid (\d+)\)", "".join(lines)):
            if alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)


@pytest.mark.xdist_group("geo-ports")  # examples/geo binds fixed TCP ports: one at a time
@pytest.mark.timeout(150)
def test_up_starts_shows_restarts_and_stops_the_geo_topology(tmp_path):
    with running_up(GEO, "--interval", "1", "--log-dir", tmp_path) as (up, lines):

        def started():
            found = dict(re.findall(r"started \w+ ([\w-]+) \(pid (\d+)\)", "".join(lines)))
            return found if len(found) == 12 else None

        pids = wait_for(started, 30, "all 12 processes started")
        with Client(["tcp://127.0.0.1:7200", "tcp://127.0.0.1:7201"], timeout=30) as east:
            assert east.call("work", 1)["x"] == 1
        with Client(["tcp://127.0.0.1:7300", "tcp://127.0.0.1:7301"], timeout=30) as west:
            assert west.call("work", 2)["x"] == 2
        # The table shows the pairs and where requests went.
        wait_for(lambda: re.search(r"east-a .* active +served here \d+ +sent up \d+", "".join(lines)), 20, "table")
        # (waited for: on a loaded machine a table can show east-b still pending, or its status
        # query unanswered within the table's interval: a whole-suite run here met that once)
        wait_for(lambda: re.search(r"east-b +broker +\d+ up +0 +passive", "".join(lines)), 20, "east-b passive")
        # A worker that dies is started again (the file says restart = true), and the table says so.
        os.kill(int(pids["east-w"]), signal.SIGKILL)
        wait_for(lambda: "east-w ended (killed by SIGKILL); starting it again" in "".join(lines), 10, "noticed")
        wait_for(lambda: re.search(r"east-w +worker +\d+ up +1 ", "".join(lines)), 15, "restarted once")
        pids.update(re.findall(r"started \w+ ([\w-]+) \(pid (\d+)\)", "".join(lines)))
        with Client(["tcp://127.0.0.1:7200", "tcp://127.0.0.1:7201"], timeout=30) as east:
            assert east.call("work", 3)["x"] == 3
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        wait_for(lambda: all(f"stopped master-{x}" in "".join(lines) for x in "ab"), 5, "the last lines read")
        out = "".join(lines)
        assert out.index("stopped east-users") < out.index("stopped east-w") < out.index("stopped east-a")
        assert out.index("stopped west-b") < out.index("stopped master-a")
        every = [int(p) for p in pids.values()] + [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
        assert not [p for p in every if alive(p)], "processes left running"


@pytest.mark.timeout(60)
def test_zmqdist_load_sends_its_rate_and_reports_each_second(procs, ipc_ep):
    procs.spawn("broker", "--bind", ipc_ep, "--name", "ld")
    procs.spawn("worker", "testworkers:echo", "--connect", ipc_ep)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "zmqdist",
            "-q",
            "load",
            "echo",
            "--connect",
            ipc_ep,
            "--rate",
            "200",
            "--duration",
            "3.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=40,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr
    reports = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(reports) >= 3
    last = reports[-1]
    assert last["errors"] == {} and last["held"] == 0
    assert 400 <= last["ok"] <= 720  # about 200 a second since the first report
    assert all(a["ok"] <= b["ok"] for a, b in itertools.pairwise(reports))
    bad = subprocess.run(
        [sys.executable, "-m", "zmqdist", "load", "echo", "--connect", ipc_ep, "--value", "{x"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr


@pytest.mark.timeout(90)
def test_up_shows_a_curve_broker_given_a_status_key_and_says_why_not_without(tmp_path):
    keys = tmp_path / "keys"
    for name in ("broker", "admin", "w"):
        generate(name, keys)
    for role, name in (("clients", "admin"), ("workers", "w")):
        (tmp_path / role).mkdir()
        shutil.copy(keys / f"{name}.key", tmp_path / role)
    ep = f"ipc://{tmp_path}/b.sock"
    body = f"""
[[broker]]
name = "secure"
bind = ["{ep}"]
key = "keys/broker.key_secret"
allow-clients = "clients"
allow-workers = "workers"

[[worker]]
name = "w"
target = "testworkers:echo"
connect = ["{ep}"]
server-key = "keys/broker.key"
key = "keys/w.key_secret"
"""
    for status_key, expect in (
        ('status_key = "keys/admin.key_secret"', r"secure +broker +\d+ up +0  served here \d+"),
        ("", r"secure .*CURVE on: give \[settings\] status_key"),
    ):
        topo = tmp_path / "t.toml"
        topo.write_text(f"[settings]\n{status_key}\n{body}")
        with running_up(topo, "--interval", "0.5", "--log-dir", tmp_path / "logs") as (up, lines):
            wait_for(lambda expect=expect: re.search(expect, "".join(lines)), 30, expect)
            up.send_signal(signal.SIGTERM)
            assert up.wait(30) == 0


@pytest.mark.timeout(60)
def test_a_process_that_fails_says_why_and_up_ends_when_nothing_is_left(tmp_path):
    topo = tmp_path / "t.toml"
    topo.write_text('[[worker]]\nname = "w"\ntarget = "nosuchmodule:worker"\nconnect = ["tcp://127.0.0.1:7530"]\n')
    r = subprocess.run(
        [sys.executable, "-m", "zmqdist", "up", str(topo), "--interval", "0.5", "--log-dir", str(tmp_path / "l")],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert r.returncode == 1
    assert "warning: worker 'w': module 'nosuchmodule' is not found here" in r.stderr
    assert "w: Error: cannot import module 'nosuchmodule'" in r.stdout  # the reason, from its log
    assert "w ended (exit code 1); not started again (restart = false)" in r.stdout
    assert "every process has ended" in r.stdout


@pytest.mark.timeout(60)
def test_a_topology_never_outlives_its_supervisor_even_after_sigkill(tmp_path):
    ep = f"ipc://{tmp_path}/b.sock"
    topo = tmp_path / "t.toml"
    topo.write_text(
        f'[[broker]]\nname = "b"\nbind = ["{ep}"]\n\n'
        f'[[worker]]\nname = "w"\ntarget = "testworkers:echo"\nconnect = ["{ep}"]\ncount = 2\n'
    )
    with running_up(topo, "--log-dir", tmp_path / "l") as (up, lines):
        pids = wait_for(
            lambda: (found := re.findall(r"\(pid (\d+)\)", "".join(lines))) and len(found) == 3 and found,
            20,
            "3 processes started",
        )
        with Client([ep], timeout=20) as c:
            assert c.call("echo", 1)[0] == 1  # they run (and have set their death signal)
        up.kill()
        up.wait(10)
        wait_for(lambda: not [p for p in pids if alive(int(p))], 20, "the processes to end with their supervisor")


@pytest.mark.timeout(60)
def test_a_process_whose_supervisor_died_while_it_started_ends_at_once(tmp_path):
    # `up` was SIGKILLed before this child set its death signal: its parent is no longer the pid
    # ZMQDIST_SUPERVISOR names. It must end instead of running on, an orphan nobody stops.
    env = dict(ENV, ZMQDIST_SUPERVISOR=str(os.getpid() + 10**6))  # no such process
    child = subprocess.Popen(
        [sys.executable, "-m", "zmqdist", "broker", "--bind", f"ipc://{tmp_path}/b.sock"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGTERM
        assert f"the zmqdist up that started this process (pid {env['ZMQDIST_SUPERVISOR']}) has ended" in err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
