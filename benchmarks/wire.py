"""A message read and written whole in one C call (zmqdist.transport.wire) against pyzmq's calls.

The runtimes' loops used to read a message a frame at a time through pyzmq: the routing id, then
the head and the payload as ``zmq.Frame`` objects (for their ``more`` flag, the frame-count check),
then ``.bytes`` of each; and write it as three calls of pyzmq's backend send. This measures, in one
process over tcp loopback (100,000 messages of [routing id, 24-byte head, 100-byte payload],
median of alternating rounds, wall time per message):

* ``frames``: that old way;
* ``pyport``: ``wire.PyPort``, the fallback of a pure-Python install;
* ``c``: the C ``Port`` a compiled install uses.

Run: ``python benchmarks/wire.py [messages] [rounds]`` (needs a compiled install for the C row).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from zmqdist.transport import wire

HEAD = b"ZD\x01\x03" + bytes(range(20))
PAYLOAD = b"x" * 100


def _pair() -> tuple[Any, Any]:
    ctx = zmq.Context.instance()
    r = ctx.socket(zmq.ROUTER)
    r.rcvhwm = r.sndhwm = 0
    port = r.bind_to_random_port("tcp://127.0.0.1")
    d = ctx.socket(zmq.DEALER)
    d.rcvhwm = d.sndhwm = 0
    d.routing_id = b"D1"
    d.connect(f"tcp://127.0.0.1:{port}")
    return r, d


def read_frames(r: Any, n: int) -> bytes:
    recv, nb, got, ident = r.recv, zmq.NOBLOCK, 0, b""
    while got < n:
        try:
            ident = recv(nb)
        except zmq.Again:
            r.poll(5000)
            continue
        head = recv(0, copy=False)
        if not head.more:
            raise SystemExit("1 frame")
        payload = recv(0, copy=False)
        if payload.more:
            raise SystemExit("more than 2 frames")
        _ = head.bytes, payload.bytes
        got += 1
    return ident


def write_frames(r: Any, ident: bytes, n: int) -> None:
    send = wire.fast_send(r)
    more, nb = int(zmq.SNDMORE) | int(zmq.NOBLOCK), int(zmq.NOBLOCK)
    for _ in range(n):
        send(ident, more)
        send(HEAD, more)
        send(PAYLOAD, nb)


def read_port(port: Any, r: Any, n: int) -> bytes:
    got, ident = 0, b""
    while got < n:
        frames = port.recv(3)
        if frames is None:
            r.poll(5000)
            continue
        if len(frames) != 3:
            raise SystemExit("wrong frame count")
        ident = frames[0]
        got += 1
    return ident


def write_port(port: Any, ident: bytes, n: int) -> None:
    send = port.send
    for _ in range(n):
        if send(ident, HEAD, PAYLOAD):
            raise SystemExit("send failed")


def one_round(kind: str, n: int) -> tuple[float, float]:
    """(read, write) seconds per message for ``kind``."""
    r, d = _pair()
    for _ in range(n):
        d.send(HEAD, zmq.SNDMORE)
        d.send(PAYLOAD)
    time.sleep(0.5)  # let them all arrive: the read is then the loop's cost, not the network's
    port: Any = None
    if kind == "pyport":
        port = wire.PyPort(r)
    elif kind == "c":
        assert wire.NativePort is not None
        port = wire.NativePort(r)
    t0 = time.perf_counter()
    ident = read_frames(r, n) if port is None else read_port(port, r, n)
    t1 = time.perf_counter()
    if port is None:
        write_frames(r, ident, n)
    else:
        write_port(port, ident, n)
    t2 = time.perf_counter()
    for _ in range(n):
        d.recv_multipart()
    if port is not None:
        port.detach()
    r.close(0)
    d.close(0)
    return (t1 - t0) / n, (t2 - t1) / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    kinds = ["frames", "pyport"] + (["c"] if wire.NativePort is not None else [])
    if wire.NativePort is None:
        print(f"(no C Port here: {wire.WHY_NOT})")
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(rounds):  # alternating: the machine's drift hits every kind alike
        for k in kinds:
            got[k].append(one_round(k, n))
    med: Callable[[str, int], float] = lambda k, i: statistics.median(x[i] for x in got[k])  # noqa: E731
    print(f"{n:,} messages of 3 frames (tcp loopback), median of {rounds} alternating rounds, us per message:")
    for k in kinds:
        print(
            f"  {k:7} read {med(k, 0) * 1e6:5.2f}  write {med(k, 1) * 1e6:5.2f}"
            f"   (x{med(k, 0) / med('frames', 0):.2f} / x{med(k, 1) / med('frames', 1):.2f} the frames way)"
        )


if __name__ == "__main__":
    main()
