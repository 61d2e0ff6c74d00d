"""``zmqdist bench`` (or ``python3 benchmarks/bench.py``): throughput, latency and broker CPU
against baselines in the same run. It lives beside the package, not in it: a benchmark lab, run from
a source checkout.

Every setup runs in separate processes on 127.0.0.1 with 100-byte payloads and 2 workers:

* ``direct``  - minimal DEALER client straight to 2 minimal ROUTER echo workers (no broker);
* ``device``  - the same loops through the C-level ``zmq.proxy`` ROUTER/DEALER device;
* ``zmqdist`` - minimal loops speaking the zmqdist protocol through a ``zmqdist broker``
  (least-loaded dispatch, heartbeats, request tracking all on);
* ``batched`` - minimal loops that batch as the protocol allows (BATCH frames: every reply waiting
  is answered by its replacement requests in one message; a worker's results go together);
* ``api``     - the public ``Client`` / ``Worker`` (concurrency 16) APIs through a ``zmqdist broker``
  (they batch by themselves: what one mailbox drain or one read made goes out together);
* ``api-inline`` - the same with the handler declared inline (run on the worker's socket thread).

Loads: ``sync`` (one call at a time) and ``pipelined`` (100 requests in flight). Rounds alternate
the setups so drift on a shared machine hits them alike. CPU per request is read from /proc for the
broker (or device) process over the measured window. ``scale`` shows the broker's CPU per request
with 10, 100 and 1,000 connected workers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PIPELINE = 100
TICK = os.sysconf("SC_CLK_TCK")
PATH_KEYS = ("path_user_us", "path_kernel_us", "path_wakeups")  # every process of a path, per request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _times(pid: int) -> tuple[float, float]:
    """User and kernel CPU seconds of process ``pid`` (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of process ``pid`` (from /proc)."""
    return sum(_times(pid))


def usage(pid: int) -> tuple[float, float, int]:
    """User and kernel CPU seconds of process ``pid``, and the voluntary context switches of its
    threads alive now (each one a thread that slept and was woken: a wake-up), from /proc. A
    bench's processes keep their threads through a run, so the difference of two is the run's."""
    user, kernel = _times(pid)
    wakeups = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        wakeups += int(line.split(":")[1])
                        break
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            pass
    return user, kernel, wakeups


# --- roles (each runs in its own process: python benchmarks/lab.py ROLE ARGS) ------------------


# Every loop below is as cheap as pyzmq allows, the baselines' as much as zmqdist's: plain recv()
# on a fixed number of frames, libzmq's send without pyzmq's Python wrapper (fast_send), flags as
# plain ints. A baseline loop left heavier (recv_multipart / send_multipart cost 2.5 + 1.7 us) would
# make the device look slower than it is and every ratio to it better than it is.
SNDMORE = 2  # zmq.SNDMORE as a plain int


def role_rawworker(ep: str, bind: str) -> None:
    """Minimal echo worker: a ROUTER bound (``direct``: frames client-id, payload) or connected to
    the device's DEALER (frames device-id, client-id, payload)."""
    import zmq

    from zmqdist.transport.wire import fast_send

    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    s.linger = 0
    s.bind(ep) if bind == "bind" else s.connect(ep)
    recv, send = s.recv, fast_send(s)
    if bind == "bind":
        while True:
            client = recv()
            send(client, SNDMORE)
            send(recv(), 0)
    while True:
        dev = recv()
        client = recv()
        send(dev, SNDMORE)
        send(client, SNDMORE)
        send(recv(), 0)


def role_rawworkers(ep: str, count: str) -> None:
    """``count`` minimal echo workers (ROUTER sockets) in one process, for the device's scale runs."""
    import zmq

    from zmqdist.transport.wire import fast_send

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    poller = zmq.Poller()
    for _ in range(int(count)):
        s = ctx.socket(zmq.ROUTER)
        s.linger = 0
        s.connect(ep)
        poller.register(s, zmq.POLLIN)
    while True:
        for s, _ in poller.poll(100):
            send = fast_send(s)
            for _ in range(1000):
                try:
                    dev = s.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                client = s.recv()
                send(dev, SNDMORE)
                send(client, SNDMORE)
                send(s.recv(), 0)


def core_cost(workers: int, capacity: int, n: int = 30_000) -> float:
    """The broker's dispatch logic alone: sans-IO core and codec, microseconds per request.

    ``workers`` registered with ``capacity`` each, 100 requests in flight, the oldest task answered
    before each new request, every output encoded: what the loop thread does minus the sockets.
    """
    from collections import deque

    from zmqdist import protocol as p
    from zmqdist.config import BrokerSettings
    from zmqdist.core.broker import BrokerCore

    enc = p.Encoder()
    core = BrokerCore(BrokerSettings(name="bench"), "bench", 0.0)
    for i in range(workers):
        core.receive(b"w%d" % i, p.Hello(p.ROLE_WORKER, "bench", ("echo",), capacity, 250), 0.0)
    reqs = [enc.encode(p.Request(i, "echo", 30_000, (), b"x" * 100)) for i in range(n + PIPELINE)]
    tasks: deque[tuple[bytes, int]] = deque()
    out: list[Any] = []

    def feed(peer: bytes, head: bytes, body: bytes) -> None:
        out.clear()
        core.receive_frames(peer, head, body, 1.0, out)  # the door the runtime uses
        for to, msg in out:
            enc.encode(msg)
            if type(msg) is p.Task:
                tasks.append((to, msg.ticket))

    for i in range(PIPELINE):
        feed(b"client", *reqs[i])
    first = tasks[0][1]  # tickets are numbered in order of arrival: the workers' answers, made ahead
    results = {t: enc.encode(p.Result(t, p.RS_OK, b"x" * 100)) for t in range(first, first + n + PIPELINE)}
    t0 = time.perf_counter()
    for i in range(PIPELINE, n + PIPELINE):
        peer, ticket = tasks.popleft()
        feed(peer, *results[ticket])
        feed(b"client", *reqs[i])
    return (time.perf_counter() - t0) / n * 1e6


def role_device(front: str, back: str) -> None:
    import zmq

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    f = ctx.socket(zmq.ROUTER)
    b = ctx.socket(zmq.DEALER)
    f.bind(front)
    b.bind(back)
    zmq.proxy(f, b)


def role_zdworker(ep: str, capacity: str, count: str = "1") -> None:
    """Minimal zmqdist workers: ``count`` DEALER sockets, each registered with ``capacity``."""
    import zmq

    from zmqdist import protocol as p
    from zmqdist.transport.wire import fast_send

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    enc = p.Encoder()
    socks = []
    for _ in range(int(count)):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(ep)
        socks.append(s)
    hello = enc.encode(p.Hello(p.ROLE_WORKER, "bench", ("echo",), int(capacity), 250))
    for s in socks:
        s.send_multipart(hello)
    hb = enc.encode(p.Heartbeat(p.ROLE_WORKER, "", 0, ()))
    next_hb = time.monotonic() + 0.2

    def answer(s: Any, send: Any, head: bytes, payload: bytes) -> None:
        msg = p.decode(head, payload)
        if type(msg) is p.Task:
            h, pl = enc.encode(p.Result(msg.ticket, p.RS_OK, msg.payload))
            send(h, SNDMORE)
            send(pl, 0)
        elif type(msg) is p.Reconnect:
            s.send_multipart(hello)

    if len(socks) == 1:
        # One socket: block in recv() like the raw workers (no poll, no zmq.Again per wake-up);
        # a receive timeout brings the loop round for its heartbeats when no task comes.
        s = socks[0]
        s.rcvtimeo = 100
        recv, send = s.recv, fast_send(s)
        while True:
            try:
                head = recv()
            except zmq.Again:
                head = b""
            if head:
                answer(s, send, head, recv())
            now = time.monotonic()
            if now >= next_hb:
                next_hb = now + 0.2
                s.send_multipart(hb)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    while True:
        for s, _ in poller.poll(100):
            send = fast_send(s)
            for _ in range(1000):
                try:
                    head = s.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                answer(s, send, head, s.recv())
        now = time.monotonic()
        if now >= next_hb:
            next_hb = now + 0.2
            for s in socks:
                s.send_multipart(hb)


def send_batched(s: Any, frames: list[bytes]) -> None:
    """Send ``frames`` ([head, payload, ...]) as the batching loops do: BATCHes within the
    protocol's bounds (protocol.batch_spans), a message alone as itself."""
    from zmqdist import protocol as p

    for a, b in p.batch_spans(frames):
        part = frames[2 * a : 2 * b]
        s.send_multipart(part if b - a == 1 else [p.BATCH_HEAD, p.pack_batch(part)])


def role_zdbatchworker(ep: str, capacity: str) -> None:
    """A minimal zmqdist worker that batches as the protocol allows: it says in HELLO that it reads
    BATCH frames, reads every task waiting, and answers them together (one BATCH)."""
    import zmq

    from zmqdist import protocol as p

    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(ep)
    enc = p.Encoder()
    hello = enc.encode(p.Hello(p.ROLE_WORKER, "bench", ("echo",), int(capacity), 250, 0, p.MAX_BATCH))
    s.send_multipart(hello)
    hb = enc.encode(p.Heartbeat(p.ROLE_WORKER, "", 0, ()))
    next_hb = time.monotonic() + 0.2
    s.rcvtimeo = 100
    recv = s.recv
    results: list[bytes] = []

    def answer(head: bytes, payload: bytes) -> None:
        for frames in p.frames_of(head, payload):
            msg = p.decode(*frames)
            if type(msg) is p.Task:
                results.extend(enc.encode(p.Result(msg.ticket, p.RS_OK, msg.payload)))
            elif type(msg) is p.Reconnect:
                s.send_multipart(hello)

    while True:
        try:
            answer(recv(), recv())
            while True:  # what else is there already: no waiting for more
                answer(recv(zmq.NOBLOCK), recv())
        except zmq.Again:
            pass
        send_batched(s, results)
        results.clear()
        now = time.monotonic()
        if now >= next_hb:
            next_hb = now + 0.2
            s.send_multipart(hb)


def role_zdbatchclient(ep: str, mode: str, duration: str, payload: str, window_s: str = "", slow_ms: str = "0") -> None:
    """A minimal zmqdist client that batches: it reads every reply waiting and sends the requests
    that replace them together (one BATCH). Its HELLO says it reads BATCH frames. ``window_s``
    requests in flight (default: the bench's); ``slow_ms``: it sleeps that long after each read, a
    slow consumer whose replies pile up at the broker (it reports the largest BATCH it got)."""
    import zmq

    from zmqdist import protocol as p

    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(ep)
    enc = p.Encoder()
    s.send_multipart(enc.encode(p.Hello(p.ROLE_CLIENT, "bench", (), 0, 250, 0, p.MAX_BATCH)))
    unpack = struct.Struct("Q").unpack_from
    pad = b"x" * max(0, int(payload) - 8)
    window = 1 if mode == "sync" else int(window_s or PIPELINE)
    slow = float(slow_ms) / 1000
    t0s: dict[int, float] = {}
    lat: list[float] = []
    pc = time.perf_counter
    seq = 0
    got: list[int] = []
    largest = [1, 0]  # messages and bytes of the largest BATCH read

    def send(n: int) -> None:
        nonlocal seq
        frames: list[bytes] = []
        now = pc()
        for _ in range(n):
            seq += 1
            t0s[seq] = now
            frames.extend(enc.encode(p.Request(seq, "echo", 30_000, (), struct.pack("Q", seq) + pad)))
        send_batched(s, frames)

    def take(head: bytes, body: bytes) -> None:
        if head[:4] == p.BATCH_HEAD:
            largest[0] = max(largest[0], len(p.unpack_batch(body)) // 2)
            largest[1] = max(largest[1], len(body))
        for frames in p.frames_of(head, body):
            msg = p.decode(*frames)
            if type(msg) is p.Reply:
                if msg.status != p.ST_OK:
                    raise SystemExit(f"bench request failed: {msg}")
                got.append(int(unpack(msg.payload)[0]))

    send(window)
    warm_end = pc() + min(0.5, float(duration) / 4)
    counting = False
    start = end = 0.0
    n = 0
    while True:
        take(s.recv(), s.recv())
        try:
            while True:
                take(s.recv(zmq.NOBLOCK), s.recv())
        except zmq.Again:
            pass
        if slow:
            time.sleep(slow)
        now = pc()
        k = len(got)
        for r in got:
            t0 = t0s.pop(r)
            if counting:
                n += 1
                lat.append(now - t0)
        got.clear()
        if counting and now >= end:
            break
        if not counting and now >= warm_end:
            counting = True
            start = now
            end = now + float(duration)
            print("GO", flush=True)
        send(k)
    elapsed = pc() - start
    lat.sort()
    res = {"rps": n / elapsed, "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}
    res.update(max_batch=largest[0], max_batch_bytes=largest[1])
    print(json.dumps({**res, "n": n, "elapsed": elapsed}), flush=True)


def api_echo(x: Any) -> Any:
    return x


async def api_aecho(x: Any) -> Any:
    return x


def _client_loop(send: Any, recv: Any, mode: str, duration: float, payload_size: int) -> dict[str, Any]:
    """Drive ``send(seq, payload)`` / ``recv() -> seq`` for ``duration``; return figures."""
    pad = b"x" * max(0, payload_size - 8)
    window = 1 if mode == "sync" else PIPELINE
    t0s: dict[int, float] = {}
    lat: list[float] = []
    seq = 0
    pc = time.perf_counter
    warm_end = pc() + min(0.5, duration / 4)
    for _ in range(window):
        seq += 1
        t0s[seq] = pc()
        send(seq, struct.pack("Q", seq) + pad)
    counting = False
    start = end = 0.0
    n = 0
    while True:
        got = recv()
        now = pc()
        t0 = t0s.pop(got)
        if counting:
            n += 1
            lat.append(now - t0)
            if now >= end:
                break
        elif now >= warm_end:
            counting = True
            start = now
            end = now + duration
            print("GO", flush=True)  # the parent starts its CPU window here
        seq += 1
        t0s[seq] = pc()
        send(seq, struct.pack("Q", seq) + pad)
    elapsed = pc() - start
    lat.sort()
    return {
        "rps": n / elapsed,
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
        "n": n,
        "elapsed": elapsed,
    }


def role_rawclient(eps: str, mode: str, duration: str, payload: str) -> None:
    import zmq

    from zmqdist.transport.wire import fast_send

    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    for ep in eps.split(","):
        s.connect(ep)
    time.sleep(0.3)  # let both connections finish so round-robin covers both workers
    unpack = struct.Struct("Q").unpack_from
    fsend = fast_send(s)

    def send(seq: int, pl: bytes) -> None:
        fsend(pl, 0)

    def recv() -> int:
        return int(unpack(s.recv())[0])

    print(json.dumps(_client_loop(send, recv, mode, float(duration), int(payload))), flush=True)


def role_scraper(url: str, seconds: str) -> None:
    """Scrape ``url`` once a second for ``seconds`` (a Prometheus server scrapes every 15 s or so)."""
    import urllib.request

    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read()
        time.sleep(1.0)


def role_zdclient(ep: str, mode: str, duration: str, payload: str) -> None:
    import zmq

    from zmqdist import protocol as p
    from zmqdist.transport.wire import fast_send

    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(ep)
    enc = p.Encoder()
    fsend = fast_send(s)
    unpack = struct.Struct("Q").unpack_from

    def send(seq: int, pl: bytes) -> None:
        h, b = enc.encode(p.Request(seq, "echo", 30_000, (), pl))
        fsend(h, SNDMORE)
        fsend(b, 0)

    def recv() -> int:
        while True:
            head = s.recv()
            body = s.recv()
            msg = p.decode(head, body)
            if type(msg) is p.Reply:
                if msg.status != p.ST_OK:
                    raise SystemExit(f"bench request failed: {msg}")
                return int(unpack(msg.payload)[0])

    print(json.dumps(_client_loop(send, recv, mode, float(duration), int(payload))), flush=True)


def role_apiclient(ep: str, mode: str, duration: str, payload: str) -> None:
    from zmqdist import Client

    pad = b"x" * int(payload)
    with Client([ep], timeout=30) as c:
        c.call("echo", pad)
        pc = time.perf_counter
        warm = pc() + 0.5
        while pc() < warm:
            if mode == "sync":
                c.call("echo", pad)
            else:
                list(c.map("echo", [pad] * 200, window=PIPELINE))
        print("GO", flush=True)
        lat: list[float] = []
        n = 0
        start = pc()
        end = start + float(duration)
        if mode == "sync":
            while pc() < end:
                t0 = pc()
                c.call("echo", pad)
                lat.append(pc() - t0)
                n += 1
        else:
            sent: list[float] = []

            def values() -> Any:
                while pc() < end:
                    sent.append(pc())
                    yield pad

            for k, _ in enumerate(c.map("echo", values(), window=PIPELINE)):
                lat.append(pc() - sent[k])
                n += 1
        elapsed = pc() - start
        lat.sort()
        print(
            json.dumps(
                {
                    "rps": n / elapsed,
                    "p50_us": lat[len(lat) // 2] * 1e6,
                    "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
                    "n": n,
                    "elapsed": elapsed,
                }
            ),
            flush=True,
        )


# --- orchestration ----------------------------------------------------------------------------


HERE = Path(__file__).resolve().parent
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "lab.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _spawn_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "zmqdist", "-q", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_ENV,  # api workers serve lab:api_echo
    )


def _loop_cpu(ep: str) -> tuple[float, dict[str, int]]:
    """The broker's loop thread CPU seconds so far, and its counters."""
    from zmqdist import Client

    with Client([ep], timeout=10) as c:
        st = c.call("zmqdist.status")
        return float(st["loop_cpu_s"]), st["counters"]


def _measure(
    client: subprocess.Popen[str],
    busy_pid: int | None,
    idle_cpu_per_s: float = 0.0,
    broker_ep: str | None = None,
    others: dict[str, int] | None = None,
    path: list[int] | None = None,
    duration: float = 0.0,
) -> dict[str, Any]:
    """Read the client's result; add the CPU per request of ``busy_pid`` (and of ``others``, by
    name, as ``cpu_of``) over the measured run, and of every process of ``path`` together, split
    into user and kernel time, with their wake-ups per request. Those over the middle 80% of the
    run's ``duration``, at its mean rate: a thread's count of wake-ups leaves /proc when the thread
    ends, and the client's threads end as it reports."""
    assert client.stdout is not None
    line = _readline(client, 60.0)
    if line.strip() != "GO":
        err = client.stderr.read() if client.stderr and client.poll() is not None else ""
        raise RuntimeError(f"bench client failed: {line} {err}")
    c0 = cpu_seconds(busy_pid) if busy_pid else 0.0
    o0 = {k: cpu_seconds(pid) for k, pid in (others or {}).items()}
    l0, k0 = _loop_cpu(broker_ep) if broker_ep else (0.0, {})
    u0, u1, span = [], [], 0.0
    if path:
        time.sleep(0.1 * duration)
        t0 = time.monotonic()
        u0 = [usage(pid) for pid in path]
        time.sleep(0.8 * duration)
        u1 = [usage(pid) for pid in path]
        span = time.monotonic() - t0
    result: dict[str, Any] = json.loads(_readline(client, 120.0) or "null") or {}
    if "n" not in result:
        raise RuntimeError("bench client gave no result: a process of its setup died or hung")
    c1 = cpu_seconds(busy_pid) if busy_pid else 0.0
    o1 = {k: cpu_seconds(pid) for k, pid in (others or {}).items()}
    l1, k1 = _loop_cpu(broker_ep) if broker_ep else (0.0, {})
    client.wait(30)
    n = max(result["n"], 1)
    if path:
        served = max(result["rps"] * span, 1.0)  # the requests of the window, at the run's mean rate
        result["path_user_us"] = sum(b[0] - a[0] for a, b in zip(u0, u1, strict=True)) / served * 1e6
        result["path_kernel_us"] = sum(b[1] - a[1] for a, b in zip(u0, u1, strict=True)) / served * 1e6
        result["path_wakeups"] = sum(b[2] - a[2] for a, b in zip(u0, u1, strict=True)) / served
    if others:
        result["cpu_of"] = {k: (o1[k] - o0[k]) / n * 1e6 for k in o0}
    if busy_pid:
        result["cpu_us"] = (c1 - c0) / n * 1e6
        result["idle_us"] = idle_cpu_per_s * result["elapsed"] / n * 1e6
    if broker_ep:
        result["loop_us"] = (l1 - l0) / n * 1e6
        # messages per BATCH the broker sent (replies and tasks), and share of its sends batched
        d = {k: k1.get(k, 0) - k0.get(k, 0) for k in ("batches_in", "batched_in", "batches_out", "batched_out")}
        result["batch_out"] = d["batched_out"] / d["batches_out"] if d["batches_out"] else 1.0
        result["batches_in"] = d["batches_in"] / n
        # messages on the wire per request, both ways (every request is two in and two out, a
        # request and a result, a task and a reply; heartbeats left out): a BATCH is one message
        wire = 4 * n - d["batched_in"] + d["batches_in"] - d["batched_out"] + d["batches_out"]
        result["msgs_per_req"] = wire / n
    return result


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """A line of ``proc``'s output, or "" if none comes within ``timeout`` s (the process is then
    killed): a setup whose device or broker died must fail the round, not hang the bench."""
    assert proc.stdout is not None
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():  # (a thread, not select: the pipe's reader may hold a line in its buffer)
        proc.kill()
        reader.join(10)
    return got[0] if got else ""


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


def run_setup(
    setup: str, mode: str, duration: float, payload: int, workers: int = 2, capacity: int = 50, idle: bool = False
) -> dict[str, Any]:
    """Start one setup's processes, measure one load, stop everything; return the figures."""
    procs: list[subprocess.Popen[str]] = []
    try:
        busy: int | None = None
        idle_cpu = 0.0
        if setup == "direct":
            eps = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
            procs += [_spawn("rawworker", ep, "bind") for ep in eps]
            time.sleep(0.3)
            client = _spawn("rawclient", ",".join(eps), mode, str(duration), str(payload))
        elif setup == "device":
            front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            dev = _spawn("device", front, back)
            procs.append(dev)
            busy = dev.pid
            time.sleep(0.3)
            if workers > 2:  # the scale runs: this many worker sockets in 2 processes
                procs += [_spawn("rawworkers", back, str(workers // 2)) for _ in range(2)]
                time.sleep(0.5 + workers / 500)
            else:
                procs += [_spawn("rawworker", back, "connect") for _ in range(2)]
            time.sleep(0.3)
            client = _spawn("rawclient", front, mode, str(duration), str(payload))
            if workers <= 2:  # the whole path's CPU and wake-ups, beside the API's
                procs.append(client)
                return _measure(client, busy, 0.0, None, None, [p.pid for p in procs], duration)
        elif setup in TIERS:
            # client -> proxy A; workers at A (local), at the master (1 hop up) or at proxy B
            # below the master (funnelled: A -> master -> B and back)
            m_ep, a_ep, b_ep = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
            master = _spawn_cli("broker", "--bind", m_ep, "--name", "m")
            procs.append(master)
            others = {"master": master.pid}
            a = _spawn_cli("broker", "--bind", a_ep, "--name", "a", "--upstream", m_ep)
            procs.append(a)
            busy = a.pid
            worker_ep = {"tier-local": a_ep, "tier-up": m_ep, "tier-funnel": b_ep}[setup]
            if setup == "tier-funnel":
                b = _spawn_cli("broker", "--bind", b_ep, "--name", "b", "--upstream", m_ep)
                procs.append(b)
                others["proxy b"] = b.pid
            procs += [_spawn("zdworker", worker_ep, str(capacity), "1") for _ in range(2)]
            from zmqdist import Client

            with Client([a_ep], timeout=20) as c:  # ready: A registered upstream (and its workers in)
                end = time.monotonic() + 20
                while time.monotonic() < end:
                    st = c.call("zmqdist.status")
                    if (st["upstream"] or {}).get("registered") and (setup != "tier-local" or len(st["workers"]) == 2):
                        break
                    time.sleep(0.1)
            time.sleep(1.0)
            client = _spawn("zdclient", a_ep, mode, str(duration), str(payload))
            procs.append(client)
            return _measure(client, busy, 0.0, a_ep, others)
        else:
            ep = f"tcp://127.0.0.1:{free_port()}"
            metrics = ["--metrics-port", str(free_port())] if setup == "metrics" else []
            pair: list[str] = []
            if setup == "ha":  # the active broker of a pair, replicating to a passive backup
                ha = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
                pair = ["--ha", "primary", "--ha-bind", ha[0], "--peer", ha[1]]
                backup = ["--ha", "backup", "--ha-bind", ha[1], "--peer", ha[0]]
                procs.append(_spawn_cli("broker", "--bind", f"tcp://127.0.0.1:{free_port()}", "--name", "bk", *backup))
            b = _spawn_cli("broker", "--bind", ep, "--name", "bench", *metrics, *pair)
            procs.append(b)
            busy = b.pid
            time.sleep(1.2 if pair else 0.4)  # a pair: the primary is active once it has heard the backup
            if metrics:  # histograms on, and scraped once a second through the run
                procs.append(_spawn("scraper", f"http://127.0.0.1:{metrics[1]}/metrics", str(duration + 2)))
            if setup in ("batched", "slow"):  # minimal loops that batch as the protocol allows
                procs += [_spawn("zdbatchworker", ep, str(capacity)) for _ in range(2)]
                time.sleep(0.5)
                # slow: a consumer that sleeps SLOW_MS after each read, SLOW_WINDOW in flight
                more = [str(SLOW_WINDOW), str(SLOW_MS)] if setup == "slow" else []
                client = _spawn("zdbatchclient", ep, mode, str(duration), str(payload), *more)
            elif setup in ("api", "api-inline", "api-async"):
                inline = ["--inline"] if setup == "api-inline" else []
                fn = "lab:api_aecho" if setup == "api-async" else "lab:api_echo"
                procs += [
                    _spawn_cli("worker", fn, "--service", "echo", "--connect", ep, "--concurrency", "16", *inline)
                    for _ in range(workers)
                ]
                time.sleep(1.0)
                client = _spawn("apiclient", ep, mode, str(duration), str(payload))
            else:
                per_proc = max(1, workers // 2)
                n_procs = max(1, min(2, workers))
                procs += [_spawn("zdworker", ep, str(capacity), str(per_proc)) for _ in range(n_procs)]
                time.sleep(0.5 + workers / 500)
                if idle:  # the broker's background cost (heartbeats of every connected worker)
                    c0 = cpu_seconds(b.pid)
                    time.sleep(2.0)
                    idle_cpu = (cpu_seconds(b.pid) - c0) / 2.0
                client = _spawn("zdclient", ep, mode, str(duration), str(payload))
        procs.append(client)
        if setup in ("zmqdist", "batched", "api", "api-inline", "api-async") and workers <= 2:
            # every process's CPU per request: the client, and the workers together
            others = {"client": client.pid, **{f"worker {i}": w.pid for i, w in enumerate(procs[1:-1])}}
            return _measure(client, busy, idle_cpu, ep, others, [p.pid for p in procs], duration)
        return _measure(client, busy, idle_cpu, None if setup in ("direct", "device") else ep)
    finally:
        _stop(procs)


SLOW_WINDOW = 2000  # the slow consumer's requests in flight (under the broker's 2,500 per client)
SLOW_MS = 2.0  # and its sleep after every read


def slow_consumer(duration: float, rounds: int) -> None:
    """A client that reads slowly while 2,000 of its requests are in flight: replies pile up at
    the broker, and its BATCHes stay within the protocol's bounds (count and bytes)."""
    from zmqdist import protocol as p

    print(f"slow consumer ({SLOW_WINDOW} in flight, {SLOW_MS:.0f} ms asleep after every read; batching loops)")
    for payload in (100, 4096):
        runs = [run_setup("slow", "pipelined", duration, payload, capacity=1000) for _ in range(rounds)]
        r = _mean(runs)
        most = max(x["max_batch"] for x in runs)
        most_bytes = max(x["max_batch_bytes"] for x in runs)
        print(
            f"  {payload:5d} B  {_fmt(r)}\n{'':10}largest BATCH read: {most} messages, {most_bytes:,} bytes "
            f"(bounds: {p.MAX_BATCH} messages, about {p.BATCH_BYTES:,} bytes)",
            flush=True,
        )
    print()


def alternate(setups: list[str], rounds: int, mode: str, duration: float, payload: int) -> dict[str, dict[str, Any]]:
    """Run every setup once per round, alternating (the machine's drift hits all alike); the means."""
    res: dict[str, list[dict[str, Any]]] = {s: [] for s in setups}
    for _ in range(rounds):
        for s in setups:
            try:
                res[s].append(run_setup(s, mode, duration, payload))
            except RuntimeError as exc:  # a port taken between free_port() and the bind, say: once more
                print(f"  ({s} failed, run again: {str(exc).strip()[:200]})", flush=True)
                res[s].append(run_setup(s, mode, duration, payload))
    return {s: _mean(v) for s, v in res.items()}


TIERS = ("tier-local", "tier-up", "tier-funnel")
API = ("api", "api-inline", "api-async")  # the public Client.map / Worker: threads, inline, asyncio
HOPS = {"zmqdist": 1, "tier-local": 1, "tier-up": 2, "tier-funnel": 3}  # brokers a request passes


def tiers(duration: float, rounds: int, payload: int) -> None:
    """Tiers beside a single broker, same run: throughput and latency through one and two proxy
    hops, served in the region and funnelled, with the ratios the targets are stated in."""
    for mode in ("sync", "pipelined"):
        setups = ["direct", "device", "zmqdist", *TIERS]
        m = alternate(setups, rounds, mode, duration, payload)
        print(f"tiers, {mode} ({'1 call at a time' if mode == 'sync' else f'{PIPELINE} in flight'})")
        one = m["zmqdist"]
        broker_adds = one["p50_us"] - m["direct"]["p50_us"]
        for s in setups:
            line = f"  {s:11} {_fmt(m[s])}"
            if s in HOPS:
                line += f"   x{m[s]['rps'] / one['rps']:.2f} one broker's throughput"
                if s in ("tier-up", "tier-funnel"):
                    per_hop = (m[s]["p50_us"] - one["p50_us"]) / (HOPS[s] - 1)
                    line += f", +{per_hop:.0f} us p50 per extra broker"
            print(line, flush=True)
            if "cpu_of" in m[s] and mode == "pipelined":
                cpus = {"proxy a": m[s]["cpu_us"], **m[s]["cpu_of"]}
                worst = max(cpus.values())
                each = ", ".join(f"{k} {v:.1f}" for k, v in cpus.items())
                print(f"{'':15}broker CPU us/req: {each}; a core per broker carries {1e6 / worst:,.0f} req/s")
        print(f"  (one broker adds {broker_adds:.0f} us p50 over direct sockets)\n")


def _fmt(r: dict[str, Any], base: dict[str, Any] | None = None, key: str = "rps") -> str:
    s = f"{r['rps']:>9,.0f} req/s  p50 {r['p50_us']:>7.0f} us  p99 {r['p99_us']:>7.0f} us"
    if "cpu_us" in r:
        s += f"  cpu {r['cpu_us']:5.2f} us/req"
        if r.get("msgs_per_req"):
            s += f", {r['cpu_us'] / r['msgs_per_req']:5.2f} us/msg"
    if "loop_us" in r:
        s += f" (loop thread {r['loop_us']:5.2f})"
    if r.get("batches_in", 0.0) > 0.001:  # (the bench's own status calls make a few batches)
        per_in = 1 / r["batches_in"] if r["batches_in"] else 0.0
        s += f"  batches: {r['batch_out']:.1f} msgs out, 1 in per {per_in:.1f} req"
    return s


def _cpu_line(r: dict[str, Any]) -> str:
    """The client's and the workers' CPU per request beside the broker's, and the whole path's
    kernel share and wake-ups, when measured."""
    parts = []
    of = r.get("cpu_of")
    if of and "client" in of:
        workers = sum(v for k, v in of.items() if k.startswith("worker"))
        total = r.get("cpu_us", 0.0) + of["client"] + workers
        parts.append(f"CPU us/req: client {of['client']:.1f}, workers {workers:.1f}, all with the broker {total:.1f}")
    if "path_wakeups" in r:
        user, kernel = r["path_user_us"], r["path_kernel_us"]
        share = kernel / (user + kernel) if user + kernel > 0 else 0.0
        parts.append(
            f"all processes: user {user:.1f} + kernel {kernel:.1f} us/req ({share:.0%} kernel), "
            f"{r['path_wakeups']:.2f} wake-ups/req"
        )
    return "\n".join(f"{'':13}{part}" for part in parts)


def _mean(rs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: statistics.fmean(r[k] for r in rs) for k in ("rps", "p50_us", "p99_us")}
    for k in ("cpu_us", "idle_us", "loop_us", "batch_out", "batches_in", "msgs_per_req", *PATH_KEYS):
        if all(k in r for r in rs):
            out[k] = statistics.fmean(r[k] for r in rs)
    if all("cpu_of" in r for r in rs):
        out["cpu_of"] = {k: statistics.fmean(r["cpu_of"][k] for r in rs) for k in rs[0]["cpu_of"]}
    return out


def main(duration: float = 2.0, rounds: int = 2, only: set[str] | None = None, payload: int = 100) -> None:
    """Run the benchmark and print figures with ratios to the baselines of the same run."""
    only = only or {"sync", "pipelined", "api", "scale"}
    logging.getLogger("zmqdist").setLevel(logging.WARNING)  # the status probes' connect lines
    from zmqdist import _native

    print(f"zmqdist bench: {os.cpu_count()} cores, python {sys.version.split()[0]}, payload {payload} B,")
    print(f"  2 workers, tcp 127.0.0.1, {rounds} alternating rounds of {duration:.1f} s; figures are means")
    print(f"  zmqdist's per-request path: {_native.STATE}\n")
    for mode in ("sync", "pipelined"):
        if mode not in only and "api" not in only:
            continue
        setups = [
            s
            for s in ("direct", "device", "zmqdist", "batched", "metrics", "ha", *API)
            if (s not in (*API, "metrics", "ha", "batched") and mode in only)
            or (s == "batched" and mode == "pipelined" and mode in only)
            or (s in API and "api" in only)
            or (s in ("metrics", "ha") and mode == "pipelined" and mode in only)
        ]
        if "api" in only and mode not in only:
            setups = ["device", *API]
        m = alternate(setups, rounds, mode, duration, payload)
        print(f"{mode} ({'1 call at a time' if mode == 'sync' else f'{PIPELINE} in flight'})")
        dev = m.get("device")
        for s in setups:
            line = f"  {s:8} {_fmt(m[s])}"
            if s == "metrics" and "zmqdist" in m:
                line += f"   x{m[s]['rps'] / m['zmqdist']['rps']:.3f} zmqdist throughput (histograms on, scraped 1/s)"
            elif s == "ha" and "zmqdist" in m:
                line += f"   x{m[s]['rps'] / m['zmqdist']['rps']:.3f} zmqdist throughput (pair: active, replicating)"
            elif dev and s != "device":
                ratio = m[s]["rps"] / dev["rps"]
                line += f"   x{ratio:.2f} device throughput, x{m[s]['p50_us'] / dev['p50_us']:.2f} device p50"
            print(line, flush=True)
            if cpu := _cpu_line(m[s]):
                print(cpu, flush=True)
        print()
    if "slow" in only:
        slow_consumer(duration, rounds)
    if "tiers" in only:
        tiers(duration, rounds, payload)
    if "scale" in only:
        print("scale: 10, 100 and 1,000 workers connected, pipelined (100 in flight). Per request:")
        print("  dispatch  the broker's dispatch logic alone (sans-IO core + codec, measured in this process)")
        print("  zmqdist   broker process CPU net of the heartbeats of every connected worker (measured idle")
        print("            beforehand), and its loop thread alone (libzmq's I/O thread excluded)")
        print("  device    the zmq.proxy device's CPU with as many echo workers connected: what libzmq itself")
        print("            pays for spreading the same load over more connections")
        base: dict[str, float] = {}
        for n in (10, 100, 1000):
            cap = max(1, 200 // n)
            core = min(core_cost(n, cap) for _ in range(3))
            dev_runs, zd_runs = [], []
            for _ in range(rounds):
                dev_runs.append(run_setup("device", "pipelined", duration, payload, workers=n))
                zd_runs.append(run_setup("zmqdist", "pipelined", duration, payload, workers=n, capacity=cap, idle=True))
            d, r = _mean(dev_runs), _mean(zd_runs)
            net = r["cpu_us"] - r["idle_us"]
            now = {"dispatch": core, "loop": r["loop_us"], "net": net, "device": d["cpu_us"]}
            base = base or now
            x = {k: v / base[k] for k, v in now.items()}
            print(f"  {n:5d} workers (capacity {cap:3d} each)")
            print(f"    dispatch {core:5.2f} us/req  x{x['dispatch']:.2f} the 10-worker cost")
            print(f"    zmqdist  {_fmt(r)}  net {net:5.2f}  x{x['net']:.2f}, loop x{x['loop']:.2f}", flush=True)
            print(f"    device   {_fmt(d)}  x{x['device']:.2f}", flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    globals()[f"role_{role}"](*sys.argv[2:])
