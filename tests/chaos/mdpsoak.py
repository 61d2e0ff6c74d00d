"""The soak's Majordomo worker (MDP/0.2, RFC 18) on a raw DEALER socket, not zmqdist's code.

    python -m mdpsoak SERVICE HEARTBEAT_S LIVENESS [--key SECRET --server-key PUBLIC] ENDPOINT...

MDP has no failover list, so it does what an MDP worker in front of a broker pair must: it serves
at one broker at a time and moves to the next endpoint when that broker tells it DISCONNECT (the
passive one of a pair does) or falls silent for HEARTBEAT_S x LIVENESS. A request's body is one
frame, the request's number; the reply is two frames, the number and its answer. Every execution
is written (the number, one line, flushed before the reply) to ``$SOAK_LOG_DIR/exec-PID.log``, as
the native soak worker does, so the soak counts runs of MDP requests too.
"""

from __future__ import annotations

import os
import sys
import time

import zmq
import zmq.auth
from soakworker import answer

W2 = b"MDPW02"
READY, REQUEST, FINAL, HEARTBEAT, DISCONNECT = b"\x01", b"\x02", b"\x04", b"\x05", b"\x06"


def secure(sock: zmq.Socket[bytes], secret: str, server: str) -> None:
    """CURVE on ``sock``: our key pair from ``secret``, the broker's public key from ``server``."""
    public, secret_key = zmq.auth.load_certificate(secret)
    sock.curve_publickey, sock.curve_secretkey = public, secret_key
    sock.curve_serverkey = zmq.auth.load_certificate(server)[0]


def serve(sock: zmq.Socket[bytes], service: bytes, hb: float, liveness: int, log: object) -> str:
    """Serve at one broker until it sends us away or falls silent; return which."""
    sock.send_multipart([W2, READY, service])
    heard = sent = time.monotonic()
    while True:
        if sock.poll(int(hb * 500)):
            msg = sock.recv_multipart()
            heard = time.monotonic()
            if len(msg) >= 2 and msg[0] == W2:
                if msg[1] == REQUEST and len(msg) >= 5:
                    client, body = msg[2], msg[4:]
                    i = int(body[0])
                    log.write(f"{i}\n")  # type: ignore[attr-defined]
                    sock.send_multipart([W2, FINAL, client, b"", body[0], b"%d" % answer(i)])
                    sent = time.monotonic()
                elif msg[1] == DISCONNECT:
                    return "told DISCONNECT"
        now = time.monotonic()
        if now - sent >= hb:
            sock.send_multipart([W2, HEARTBEAT])
            sent = now
        if now - heard > hb * liveness:
            return "silent"


def main(argv: list[str]) -> None:
    service, hb, liveness, rest = argv[0].encode(), float(argv[1]), int(argv[2]), argv[3:]
    keys: tuple[str, str] | None = None
    if rest[:1] == ["--key"]:
        keys, rest = (rest[1], rest[3]), rest[4:]
    log = open(os.path.join(os.environ.get("SOAK_LOG_DIR", "."), f"exec-{os.getpid()}.log"), "a", buffering=1)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    k = 0
    while True:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if keys:
            secure(sock, *keys)
        sock.connect(rest[k])
        why = serve(sock, service, hb, liveness, log)
        sock.close()
        print(f"{time.strftime('%H:%M:%S')} mdpsoak: left {rest[k]}: {why}", flush=True)
        k = (k + 1) % len(rest)
        time.sleep(0.1)


if __name__ == "__main__":
    main(sys.argv[1:])
