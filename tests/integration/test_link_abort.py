"""A link must read what a broker sent before it died, not let libzmq abort the process.

With IMMEDIATE on a DEALER, libzmq 4.3.5 cuts the pipe of a dropped connection when the socket
takes that news, which recv does every 100th call, also between two frames of a message; the next
frame is then gone and libzmq aborts ("Assertion failed: !_more (src/fq.cpp:80)"). A chaos soak
client died so while its proxy was killed. Checked by hand (pyzmq 27.3.0, libzmq 4.3.5,
2026-12-04): the burst reader aborts with ``immediate=True``, and the paced reader aborts when an
immediate link probes instead of ending its reads on zmq.Again. linkabort.py builds both moments.
"""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HELPER = Path(__file__).with_name("linkabort.py")


def _run(tmp_path: Path, mode: str, immediate: bool) -> int:
    ep = f"ipc://{tmp_path}/{mode}.sock"
    cmd = [sys.executable, str(HELPER), mode, ep, "1" if immediate else "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert r.returncode != -signal.SIGABRT, f"libzmq aborted the reader: {r.stderr[-1000:]}"
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


@pytest.mark.timeout(60)
def test_a_link_reads_a_whole_burst_from_a_broker_that_died_before_it_was_read(tmp_path):
    assert _run(tmp_path, "reader", immediate=False) == 301  # every message, whole


@pytest.mark.timeout(60)
@pytest.mark.parametrize("immediate", [True, False], ids=["pair-link", "link"])
def test_a_link_read_one_message_at_a_time_survives_its_broker_dying_at_the_100th_recv(tmp_path, immediate):
    """The pair link keeps IMMEDIATE; its reads end on zmq.Again, which restarts libzmq's count."""
    assert _run(tmp_path, "paced", immediate) == 50
