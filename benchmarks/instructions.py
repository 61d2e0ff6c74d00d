"""Instructions each process spends per request, counted by callgrind (robust to the hour).

    python3 benchmarks/instructions.py [--few 200] [--many 1200] [--window 1] [--path broker] [--inline | --async]

Runs the processes of a path under ``valgrind --tool=callgrind`` twice, sends ``few`` and then
``many`` requests of 100 bytes through it, and prints (many - few) / (many - few requests)
instructions per request for each process counted: start-up and shutdown cancel out. ``--window 1``
sends lone calls; ``--window 100`` keeps 100 in flight (``Client.map`` to a worker of 16 slots: the
pipelined path). Paths:

* ``broker`` - a ``zmqdist broker`` alone under callgrind; the ``Client`` and ``Worker`` run outside
  it, at full speed (so more is waiting for the broker at each read than in a real run);
* ``api``    - the public API path, every process under callgrind at once (they slow down alike):
  a ``Client`` process, the ``zmqdist broker`` and a ``zmqdist worker`` (``--inline``: its handler
  on the socket thread; ``--async``: an async handler, on the worker's event loop);
* ``device`` - the baseline: the minimal DEALER client loop, the C ``zmq.proxy`` device and one
  minimal echo worker (benchmarks/lab.py's loops), every process under callgrind.

``api`` against ``device`` says, in counts the hour does not move, how much more work the whole
path does per request than the baseline does. Run it with the interpreter of the install under
test; it needs valgrind.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from lab import free_port  # benchmarks/lab.py, beside this file

from zmqdist import Client, Worker

SELF = str(Path(__file__).resolve())
HERE = Path(SELF).parent
PAYLOAD = b"x" * 100
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}


def _collected(err: str, what: str) -> int:
    found = re.findall(r"Collected : (\d+)", err)
    if not found:
        raise SystemExit(f"callgrind printed no total for the {what}:\n{err[-2000:]}")
    return int(found[-1])


def _grind(out: str, *args: str) -> subprocess.Popen[bytes]:
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV)


def broker_instructions(calls: int, out: str, window: int) -> int:
    """Total instructions of a broker process that served ``calls`` requests (lone calls, or
    ``Client.map`` with ``window`` in flight) from a client and a worker outside callgrind."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    b = _grind(out, "-m", "zmqdist", "broker", "--bind", ep)
    w = Worker([ep], concurrency=1 if window == 1 else 16)
    w.add_service("echo", lambda x: x)
    w.start()
    try:
        role_client(ep, str(window), str(calls))
    finally:
        w.stop()
        b.send_signal(signal.SIGTERM)
    return _collected(b.communicate(timeout=300)[1].decode(), "broker")


def path_instructions(
    path: str, calls: int, out: str, window: int, inline: bool = False, aio: bool = False
) -> dict[str, int]:
    """Total instructions of each process of ``path`` ("api" or "device"), every one under
    callgrind, for ``calls`` requests with ``window`` in flight (``inline``: the api worker's
    handler runs on its socket thread; ``aio``: it is an async handler, on the worker's loop)."""
    front = f"tcp://127.0.0.1:{free_port()}"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if path == "api":
            procs["broker"] = _grind(f"{out}.broker", "-m", "zmqdist", "broker", "--bind", front)
            slots = "1" if window == 1 else "16"
            fn = "lab:api_aecho" if aio else "lab:api_echo"
            worker = ["-m", "zmqdist", "worker", fn, "--service", "echo", "--connect", front]
            worker += ["--concurrency", slots, *(["--inline"] if inline else [])]
            procs["worker"] = _grind(f"{out}.worker", *worker)
            role = "client"
        else:
            back = f"tcp://127.0.0.1:{free_port()}"
            procs["device"] = _grind(f"{out}.device", SELF, "--role", "device", front, back)
            procs["worker"] = _grind(f"{out}.worker", str(HERE / "lab.py"), "rawworker", back, "connect")
            role = "rawclient"
        client = _grind(f"{out}.client", SELF, "--role", role, front, str(window), str(calls))
        counts = {"client": _collected(client.communicate(timeout=900)[1].decode(), "client")}
        if client.returncode:
            raise SystemExit(f"the {role} failed (exit {client.returncode})")
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
    for name, p in procs.items():
        counts[name] = _collected(p.communicate(timeout=300)[1].decode(), name)
    return counts


def role_client(ep: str, window: str, calls: str) -> None:
    """Send ``calls`` requests through the public API: lone calls, or ``Client.map`` with
    ``window`` in flight (after one call that waits for everything to be up)."""
    n, w = int(calls), int(window)
    with Client([ep], timeout=120) as c:
        c.call("echo", PAYLOAD)
        if w == 1:
            for _ in range(n):
                c.call("echo", PAYLOAD)
        elif sum(1 for _ in c.map("echo", [PAYLOAD] * n, window=w)) != n:
            raise SystemExit("Client.map returned the wrong number of results")


def role_rawclient(ep: str, window: str, calls: str) -> None:
    """The baseline's client: a DEALER keeping ``window`` requests in flight until ``calls``
    replies have come back (after one round trip that waits for everything to be up)."""
    import zmq

    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(ep)
    s.send(PAYLOAD)
    s.recv()
    n, w = int(calls), int(window)
    sent = 0
    for _ in range(min(w, n)):
        s.send(PAYLOAD)
        sent += 1
    for _ in range(n):
        s.recv()
        if sent < n:
            s.send(PAYLOAD)
            sent += 1


def role_device(front: str, back: str) -> None:
    """The baseline's ``zmq.proxy`` device, which binds its front only once the worker has
    connected to its back: with no worker, the device would turn the client's first request
    round its loop until one came, a cost that varies from run to run and is not per request."""
    import zmq

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    f = ctx.socket(zmq.ROUTER)
    b = ctx.socket(zmq.DEALER)
    watch = b.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    b.bind(back)
    watch.recv_multipart()
    b.disable_monitor()
    f.bind(front)
    zmq.proxy(f, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--few", type=int, default=200)
    ap.add_argument("--many", type=int, default=1200)
    ap.add_argument("--window", type=int, default=1, help="1: lone calls; more: this many in flight")
    ap.add_argument("--path", choices=("broker", "api", "device"), default="broker", help="what to count (see above)")
    ap.add_argument("--inline", action="store_true", help="--path api: the handler runs on the worker's socket thread")
    ap.add_argument("--async", dest="aio", action="store_true", help="--path api: an async handler")
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)  # a process of --path api/device
    a = ap.parse_args()
    # the broker starts slowly under valgrind: the worker's "no broker has accepted it" is expected
    logging.getLogger("zmqdist").setLevel(logging.ERROR)
    if a.role:
        {"client": role_client, "rawclient": role_rawclient, "device": role_device}[a.role[0]](*a.role[1:])
        return
    if not 0 <= a.few < a.many:
        ap.error("--few must be at least 0 and less than --many")
    if a.window < 1:
        ap.error("--window must be at least 1")
    if (a.inline or a.aio) and a.path != "api":
        ap.error("--inline and --async are for --path api")
    if a.inline and a.aio:
        ap.error("--inline is for sync handlers: an async handler runs on the worker's event loop")
    how = "synchronous" if a.window == 1 else f"pipelined ({a.window} in flight)"
    with tempfile.TemporaryDirectory() as d:
        if a.path == "broker":
            few = {"broker": broker_instructions(a.few, f"{d}/few.out", a.window)}
            many = {"broker": broker_instructions(a.many, f"{d}/many.out", a.window)}
        else:
            few = path_instructions(a.path, a.few, f"{d}/few.out", a.window, a.inline, a.aio)
            many = path_instructions(a.path, a.many, f"{d}/many.out", a.window, a.inline, a.aio)
    total = 0.0
    for name in sorted(few):
        per = (many[name] - few[name]) / (a.many - a.few)
        total += per
        runs = f"{few[name]:,} for {a.few}, {many[name]:,} for {a.many}"
        print(f"{name}: {per:,.0f} instructions per {how} request ({runs})")
    if len(few) > 1:
        print(f"{a.path} path, all processes: {total:,.0f} instructions per {how} request")


if __name__ == "__main__":
    main()
