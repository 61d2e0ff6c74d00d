"""The floor of a Python broker on this machine: a minimal credit broker beside the zmq.proxy device.

``python3 benchmarks/floor.py [ROUNDS]`` runs, alternating, the C ``zmq.proxy`` device with the
bench's raw loops, a minimal Python credit broker (no request tracking, no deadlines, no heartbeats,
no validation: what the issue's reference "minimal Python credit broker" did) with its own minimal
workers, in two shapes (``minimal``: clients and workers on two ROUTERs; ``single``: one ROUTER, as
zmqdist's), and ``zmqdist broker`` with the bench's zmqdist loops. It prints requests/s and the CPU per
request of every process (broker, workers, client), pipelined with 100 requests in flight.

What it shows: the CPU a Python broker needs per request on this machine before any of zmqdist's
guarantees, and the throughput that leaves. ``benchmarks/calls.py`` checks that the machine's calls
cost what the issue's reference figures say, so a gap to those figures is not the machine's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import lab as b  # benchmarks/lab.py, beside this file

NB = 1  # zmq.NOBLOCK
SNDMORE = 2  # zmq.SNDMORE


def minimal_broker(front: str, back: str) -> None:
    """Clients on ``front`` (ROUTER), workers on ``back`` (ROUTER): the worker with most credit."""
    import zmq

    from zmqdist.transport.wire import fast_send

    ctx = zmq.Context.instance()
    f, w = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    f.bind(front)
    w.bind(back)
    fsend, wsend = fast_send(f), fast_send(w)
    credit: dict[bytes, int] = {}
    poller = zmq.Poller()
    poller.register(w, zmq.POLLIN)
    poller.register(f, zmq.POLLIN)
    while True:
        ready = dict(poller.poll(1000))
        if w in ready:
            for _ in range(1000):
                try:
                    ident = w.recv(NB)
                except zmq.Again:
                    break
                client = w.recv()
                last = w.recv(copy=False)
                if last.more:
                    raise SystemExit("floor: a worker sent more than 3 frames")
                if client == b"READY":
                    credit[ident] = credit.get(ident, 0) + int(last.bytes)
                    continue
                credit[ident] += 1
                fsend(client, SNDMORE)
                fsend(last.bytes, 0)
        if f in ready and credit:
            for _ in range(1000):
                ident = max(credit, key=credit.__getitem__)
                if credit[ident] <= 0:
                    break
                try:
                    client = f.recv(NB)
                except zmq.Again:
                    break
                payload = f.recv(copy=False)
                if payload.more:
                    raise SystemExit("floor: a client sent more than 2 frames")
                credit[ident] -= 1
                wsend(ident, SNDMORE)
                wsend(client, SNDMORE)
                wsend(payload.bytes, 0)


def single_broker(front: str, back: str) -> None:
    """The same credit broker on one ROUTER, as zmqdist's: workers send 3 frames, clients 2.

    ``back`` is not used: the workers connect to ``front`` too.
    """
    import zmq

    from zmqdist.transport.wire import fast_send

    s = zmq.Context.instance().socket(zmq.ROUTER)
    s.bind(front)
    send, recv = fast_send(s), s.recv
    credit: dict[bytes, int] = {}
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    while True:
        poller.poll(1000)
        for _ in range(1000):
            try:
                ident = recv(NB)
            except zmq.Again:
                break
            second = recv(copy=False)
            if second.more:  # a worker: [client, payload] or [READY, capacity]
                last = recv(copy=False)
                if last.more:
                    raise SystemExit("floor: a worker sent more than 3 frames")
                if second.bytes == b"READY":
                    credit[ident] = credit.get(ident, 0) + int(last.bytes)
                    continue
                credit[ident] += 1
                send(second.bytes, SNDMORE)
                send(last.bytes, 0)
            else:  # a client: [payload]; 100 in flight never exceed the workers' 2 x 50 credits
                worker = max(credit, key=credit.__getitem__)
                credit[worker] -= 1
                send(worker, SNDMORE)
                send(ident, SNDMORE)
                send(second.bytes, 0)


def minimal_worker(back: str, capacity: str) -> None:
    import zmq

    from zmqdist.transport.wire import fast_send

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.connect(back)
    s.send(b"READY", SNDMORE)
    s.send(capacity.encode())
    send = fast_send(s)
    while True:
        client = s.recv()
        payload = s.recv()
        send(client, SNDMORE)
        send(payload, 0)


def _here(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run(setup: str, duration: float = 2.0) -> tuple[float, dict[str, float]]:
    procs: list[tuple[str, subprocess.Popen[str]]] = []
    try:
        front, back = f"tcp://127.0.0.1:{b.free_port()}", f"tcp://127.0.0.1:{b.free_port()}"
        if setup == "device":
            procs.append(("broker", b._spawn("device", front, back)))
            time.sleep(0.3)
            procs += [("workers", b._spawn("rawworker", back, "connect")) for _ in range(2)]
        elif setup in ("minimal", "single"):
            procs.append(("broker", _here("broker" if setup == "minimal" else "single", front, back)))
            time.sleep(0.3)
            procs += [("workers", _here("worker", back if setup == "minimal" else front, "50")) for _ in range(2)]
        else:
            procs.append(("broker", b._spawn_cli("broker", "--bind", front, "--name", "floor")))
            time.sleep(0.4)
            procs += [("workers", b._spawn("zdworker", front, "50", "1")) for _ in range(2)]
        time.sleep(0.5)
        role = "zdclient" if setup == "zmqdist" else "rawclient"
        client = b._spawn(role, front, "pipelined", str(duration), "100")
        procs.append(("client", client))
        assert client.stdout is not None
        line = client.stdout.readline()
        if line.strip() != "GO":
            raise SystemExit(f"{setup}: the client failed: {line} {client.stderr.read() if client.stderr else ''}")
        c0 = {p.pid: b.cpu_seconds(p.pid) for _, p in procs}
        res = json.loads(client.stdout.readline())
        c1 = {p.pid: b.cpu_seconds(p.pid) for _, p in procs}
        per: dict[str, float] = {}
        for role_name, p in procs:
            per[role_name] = per.get(role_name, 0.0) + (c1[p.pid] - c0[p.pid]) / res["n"] * 1e6
        return float(res["rps"]), per
    finally:
        b._stop([p for _, p in procs])


def main(rounds: int) -> None:
    print("pipelined, 100 in flight, 2 workers; CPU per request of each process (us)")
    for _ in range(rounds):
        for setup in ("device", "minimal", "single", "zmqdist"):
            rps, per = run(setup)
            cpu = "  ".join(f"{k} {v:5.1f}" for k, v in per.items())
            print(f"  {setup:8} {rps:9,.0f} req/s  {cpu}  all {sum(per.values()):5.1f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "broker":
        minimal_broker(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "single":
        single_broker(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "worker":
        minimal_worker(*sys.argv[2:])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
