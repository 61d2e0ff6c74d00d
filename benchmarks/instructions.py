"""Instructions the broker spends per request, counted by callgrind (robust to the hour).

    python3 benchmarks/instructions.py [--few 200] [--many 1200] [--window 1]

Runs ``zmqdist broker`` under ``valgrind --tool=callgrind`` twice, sends ``few`` and then ``many``
lone calls of 100 bytes through it (a ``Client`` to a ``Worker`` of one slot, both outside
valgrind), and prints (many - few) / (many - few calls) instructions per request: start-up and
shutdown cancel out. ``--window 100`` sends them with ``Client.map`` instead, 100 in flight, to a
worker of 16 slots: the pipelined path. Run it with the interpreter of the install under test;
it needs valgrind.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import subprocess
import sys
import tempfile

from lab import free_port  # benchmarks/lab.py, beside this file

from zmqdist import Client, Worker


def broker_instructions(calls: int, out: str, window: int) -> int:
    """Total instructions of a broker process that served ``calls`` requests (lone calls, or
    ``Client.map`` with ``window`` in flight)."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    b = subprocess.Popen([*cmd, sys.executable, "-m", "zmqdist", "broker", "--bind", ep], stderr=subprocess.PIPE)
    w = Worker([ep], concurrency=1 if window == 1 else 16)
    w.add_service("echo", lambda x: x)
    w.start()
    try:
        with Client([ep], timeout=120) as c:
            c.call("echo", b"x" * 100)  # the first one waits for everything to be up
            if window == 1:
                for _ in range(calls):
                    c.call("echo", b"x" * 100)
            else:
                assert sum(1 for _ in c.map("echo", [b"x" * 100] * calls, window=window)) == calls
    finally:
        w.stop()
        b.send_signal(signal.SIGTERM)
    err = b.communicate(timeout=300)[1].decode()
    found = re.findall(r"Collected : (\d+)", err)
    if not found:
        raise SystemExit(f"callgrind printed no total:\n{err[-2000:]}")
    return int(found[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--few", type=int, default=200)
    ap.add_argument("--many", type=int, default=1200)
    ap.add_argument("--window", type=int, default=1, help="1: lone calls; more: Client.map, this many in flight")
    a = ap.parse_args()
    # the broker starts slowly under valgrind: the worker's "no broker has accepted it" is expected
    logging.getLogger("zmqdist").setLevel(logging.ERROR)
    if not 0 <= a.few < a.many:
        ap.error("--few must be at least 0 and less than --many")
    if a.window < 1:
        ap.error("--window must be at least 1")
    with tempfile.TemporaryDirectory() as d:
        few = broker_instructions(a.few, f"{d}/few.out", a.window)
        many = broker_instructions(a.many, f"{d}/many.out", a.window)
    per = (many - few) / (a.many - a.few)
    how = "synchronous" if a.window == 1 else f"pipelined ({a.window} in flight)"
    print(f"broker: {per:,.0f} instructions per {how} request ({few:,} for {a.few}, {many:,} for {a.many})")


if __name__ == "__main__":
    main()
