"""The example topology and the demo run and report correct results."""

import os
import re
import subprocess
import sys
import tempfile

import pytest

from tests.integration.helpers import ROOT

pytestmark = pytest.mark.integration


@pytest.mark.timeout(90)
def test_parallel_example_shares_load_by_speed(tmp_path):
    env = dict(os.environ, ENDPOINT=f"ipc://{tmp_path}/ex.sock")
    r = subprocess.run(
        [sys.executable, "examples/parallel/run.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=80
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every reply correct" in r.stdout
    counts = {line.split()[0]: int(line.split()[1]) for line in r.stdout.splitlines()[1:] if line.strip()}
    assert counts["fast"] > counts["medium"] > counts["slow"] > 0


@pytest.mark.timeout(90)
def test_demo_runs_kills_a_worker_and_loses_nothing():
    r = subprocess.run(
        [sys.executable, "-m", "zmqdist", "demo", "--duration", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SIGKILL worker 'medium'" in r.stdout and "every request got exactly one correct reply" in r.stdout
    assert "lost 0" in r.stdout


@pytest.mark.timeout(90)
@pytest.mark.parametrize("variant", [[], ["--secure"]], ids=["plain", "curve"])
def test_tiers_example_overflows_into_the_other_region_and_survives_a_proxy_kill(variant):
    cmd = [sys.executable, "examples/tiers/run.py", *variant]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("CURVE on every link" in r.stdout) == bool(variant)
    assert "every one answered once and in order" in r.stdout
    first = next(line for line in r.stdout.splitlines() if "first half" in line).split()
    # east's one worker (2 slots) served some, west's two (4 slots) took the overflow
    east, west = int(first[-3].rstrip(",")), int(first[-1])
    assert east > 0 and west > east


@pytest.mark.timeout(90)
@pytest.mark.parametrize("variant", [[], ["--secure"]], ids=["plain", "curve"])
def test_ha_example_takes_over_after_a_sigkill_and_the_primary_comes_back_passive(variant):
    cmd = [sys.executable, "examples/ha/run.py", *variant]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert ("CURVE on every link" in r.stdout) == bool(variant), out
    assert "every one answered once and in order" in r.stdout, out
    assert "before: main-a active" in r.stdout and "main-b passive" in r.stdout, out
    line = next(x for x in r.stdout.splitlines() if x.startswith("takeover:"))
    assert float(line.split("answered ")[1].split("s")[0]) < 2.0, out
    assert "after the restart: main-a passive" in r.stdout and "main-b active" in r.stdout, out


@pytest.mark.timeout(60)
def test_the_parallel_example_refuses_to_report_on_a_broker_it_did_not_start(tmp_path):
    """Another broker already at the example's address: the example's own broker cannot bind, and
    the example says so and fails, instead of running its checks against the other one."""
    import socket

    from zmqdist import Broker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ep = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # as the port 5555 it used to take for granted
    other = Broker(bind=[ep], name="someone-else").start()
    try:
        env = dict(os.environ, ENDPOINT=ep)
        r = subprocess.run([sys.executable, "examples/parallel/run.py"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=50)  # fmt: skip
        assert r.returncode != 0 and "every reply correct" not in r.stdout
        assert "exited at once" in r.stderr and "Address already in use" in r.stderr, r.stderr[-2000:]
    finally:
        other.stop()


@pytest.mark.timeout(90)
def test_the_examples_leave_no_temporary_folder_behind():
    # A folder of its own, short: the examples put their ipc sockets in TMPDIR, and a pytest-xdist
    # worker's tmp_path left too few of the 107 bytes an ipc path may have.
    with tempfile.TemporaryDirectory(prefix="zx", dir="/tmp") as tmp:
        env = dict(os.environ, TMPDIR=tmp)
        for cmd in (["examples/parallel/run.py"], ["examples/tiers/run.py", "--secure"]):
            r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=80)
            assert r.returncode == 0, r.stdout + r.stderr
        assert os.listdir(tmp) == []


@pytest.mark.xdist_group("geo-ports")  # examples/geo binds fixed TCP ports: one at a time
@pytest.mark.timeout(120)
def test_the_geo_demo_shows_each_regions_traffic_and_survives_a_proxy_kill():
    r = subprocess.run(
        [sys.executable, "-m", "zmqdist", "demo", "--geo", "--duration", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "east's active proxy: its pair takes over" in r.stdout
    assert "no user request failed" in r.stdout
    m = re.search(
        r"east served (\d+) locally \(\d+%\) and sent (\d+) up: the master served (\d+) itself and handed (\d+)",
        r.stdout,
    )
    assert m, r.stdout
    local, up, master, down = map(int, m.groups())
    assert local > 0 and up > 0 and master + down > 0  # east's overflow was served elsewhere
