"""A client that floods a broker with raw REQUESTs at RATE per second for SECONDS (0: as fast as it
can), reading replies as they come; prints the count of each reply status as JSON.
Run: python flooder.py ENDPOINT SECONDS [RATE]"""

import json
import sys
import time
from collections import Counter

import zmq

from zmqdist import protocol as p


def main(ep: str, seconds: float, rate: float = 0.0) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(ep)
    enc = p.Encoder()
    got: Counter[int] = Counter()
    rid = 0
    start = time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        if rate and rid > (now - start) * rate:
            time.sleep(0.001)  # ahead of the rate
        else:
            for _ in range(50):
                rid += 1
                sock.send_multipart(enc.encode(p.Request(rid, "echo", 5000, (), p.pack_value(rid))))
        while sock.poll(0):
            m = p.decode(*sock.recv_multipart())
            if type(m) is p.Reply:
                got[m.status] += 1
    deadline = time.monotonic() + 5
    while sum(got.values()) < rid and time.monotonic() < deadline:
        if sock.poll(100):
            m = p.decode(*sock.recv_multipart())
            if type(m) is p.Reply:
                got[m.status] += 1
    print(json.dumps({"sent": rid, **{str(k): v for k, v in got.items()}}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
