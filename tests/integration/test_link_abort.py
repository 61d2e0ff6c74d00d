"""A link reading a burst from a broker that died must read it whole, not abort the process.

With IMMEDIATE on a DEALER, libzmq 4.3.5 cuts the pipe of a dropped connection when the socket
processes that news, which recv does every 100th call, also between two frames of a message; the
next frame is gone and libzmq aborts ("Assertion failed: !_more (src/fq.cpp:80)"). A chaos soak
client died so while its proxy was killed. The same reader with ``immediate=True`` aborts here
(checked by hand: pyzmq 27.3.0, libzmq 4.3.5, 2026-12-04); DealerLink's sockets must not.
"""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HELPER = Path(__file__).with_name("linkabort.py")


@pytest.mark.timeout(60)
def test_a_link_reads_every_message_of_a_broker_that_died_before_they_were_read(tmp_path):
    ep = f"ipc://{tmp_path}/burst.sock"
    r = subprocess.run([sys.executable, str(HELPER), "reader", ep, "0"], capture_output=True, text=True, timeout=50)
    assert r.returncode != -signal.SIGABRT, f"libzmq aborted the reader: {r.stderr[-1000:]}"
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == 301  # every message that arrived before the drop, whole
