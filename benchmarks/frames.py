"""One frame or two per message: what a peer would save if head and payload went as one frame.

Issue 19 asked for a single-frame variant of the protocol "if it measures better". This measures
the part of the cost that changes, in one process so both variants run side by side: writing and
reading one message over a DEALER -> ROUTER pair (tcp loopback), as two frames (head, payload:
today) or as one frame that the reader splits (a 2-byte head length, then head, then payload).
Run: ``python benchmarks/frames.py [messages] [payload bytes]``.
"""

from __future__ import annotations

import statistics
import struct
import sys
import time

import zmq

HEAD = b"ZD\x01\x03" + bytes(range(20))  # the size of a REQUEST head with a trace


def run(n: int, payload: bytes, one: bool) -> float:
    """Seconds of CPU per message, writer and reader together (both in this thread)."""
    ctx = zmq.Context.instance()
    r = ctx.socket(zmq.ROUTER)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    d = ctx.socket(zmq.DEALER)
    d.connect(f"tcp://127.0.0.1:{port}")
    d.send(b"hi")
    r.recv_multipart()
    size = struct.Struct(">H")
    lengths = size.pack(len(HEAD))
    send, recv = d.send, r.recv
    t0 = time.process_time()
    k = 0
    while k < n:
        m = min(100, n - k)  # 100 in flight, as the bench's pipelined runs
        for _ in range(m):
            if one:
                send(lengths + HEAD + payload)
            else:
                send(HEAD, zmq.SNDMORE)
                send(payload)
        for _ in range(m):
            recv()  # the peer's routing id
            if one:
                frame = recv()
                h = size.unpack_from(frame)[0]
                head, body = frame[2 : 2 + h], frame[2 + h :]
            else:
                head, body = recv(), recv()
            assert head == HEAD and len(body) == len(payload)
        k += m
    took = time.process_time() - t0
    d.close(0)
    r.close(0)
    return took / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    payload = b"x" * size
    two, one = [], []
    for _ in range(5):  # alternating: the machine's drift hits both alike
        two.append(run(n, payload, False))
        one.append(run(n, payload, True))
    a, b = statistics.median(two), statistics.median(one)
    print(f"{n:,} messages of {size} B, median of 5 alternating runs, CPU per message (write + read):")
    print(f"  two frames (today)   {a * 1e6:6.2f} us")
    print(f"  one frame, split     {b * 1e6:6.2f} us   saves {(a - b) * 1e6:5.2f} us ({(a - b) / a:.0%})")


if __name__ == "__main__":
    main()
