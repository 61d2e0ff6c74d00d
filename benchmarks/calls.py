"""Per-call costs of pyzmq and msgpack on this machine, beside the figures issue 2 quotes.

``python3 benchmarks/calls.py`` times each call in a tight loop over an inproc PAIR (best of
several repeats) and prints it next to the reference figure. It tells whether a machine is "of the
kind" the issue's targets were measured on: the same calls costing the same means the same Python,
pyzmq and libzmq speed, so a gap left in a broker's figures is not the machine's.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable

import msgpack
import zmq

N = 1000  # messages per timed batch


def _best(fn: Callable[[], float], repeats: int = 30) -> float:
    return min(fn() for _ in range(repeats))


def main() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.sndhwm = b.rcvhwm = 0
    a.bind("inproc://calls")
    b.connect("inproc://calls")
    payload, head, ident = b"p" * 100, b"h" * 20, b"i" * 5

    def timed(fill: Callable[[], None], body: Callable[[], None], drain: Callable[[], None]) -> float:
        """Microseconds per message of ``body``; ``fill`` and ``drain`` are not timed."""
        fill()
        t0 = time.perf_counter()
        body()
        t = (time.perf_counter() - t0) / N * 1e6
        drain()
        return t

    def nothing() -> None:
        pass

    def fill_plain() -> None:
        for _ in range(N):
            a.send(payload)

    def fill_three() -> None:
        for _ in range(N):
            a.send_multipart([ident, head, payload])

    def recv_plain() -> None:
        for _ in range(N):
            b.recv()

    def recv_two() -> None:
        for _ in range(2 * N):
            b.recv()

    def recv_multi() -> None:
        for _ in range(N):
            b.recv_multipart()

    def send_plain() -> None:
        for _ in range(N):
            a.send(payload, 0)

    def send_multi() -> None:
        for _ in range(N):
            a.send_multipart([head, payload])

    rows = [
        ("recv() of one frame", _best(lambda: timed(fill_plain, recv_plain, nothing)), "0.1-0.3"),
        ("send() of one frame", _best(lambda: timed(nothing, send_plain, recv_plain)), "0.1-0.3"),
        ("recv_multipart() of 3 frames", _best(lambda: timed(fill_three, recv_multi, nothing)), "2.5"),
        ("send_multipart() of 2 frames", _best(lambda: timed(nothing, send_multi, recv_two)), "1.7"),
    ]

    def again() -> None:
        try:
            b.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass

    poller = zmq.Poller()
    poller.register(b, zmq.POLLIN)
    pack = msgpack.Packer().pack
    header = (12345, "echo", 30000, ())
    for name, fn, ref in (
        ("a raised zmq.Again", again, "2.4"),
        ("Poller.poll(0)", lambda: poller.poll(0), "1.5"),
        ("IntFlag arithmetic (NOBLOCK | SNDMORE)", lambda: zmq.NOBLOCK | zmq.SNDMORE, "0.45"),
        ("msgpack encode + decode of a small header", lambda: msgpack.unpackb(pack(header)), "0.35-0.6"),
    ):
        rows.append((name, min(timeit.repeat(fn, number=20_000, repeat=5)) / 20_000 * 1e6, ref))
    print(f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}, msgpack {msgpack.version}")
    print(f"  {'call':42} {'here':>8}  reference (issue 2)")
    for name, us, ref in rows:
        print(f"  {name:42} {us:6.2f} us  {ref} us")
    a.close(0)
    b.close(0)
    ctx.term()


if __name__ == "__main__":
    main()
