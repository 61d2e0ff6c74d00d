"""Run by test_link_abort.py, in a process of its own: libzmq aborts the process it fails in.

    python linkabort.py reader IPC_ENDPOINT IMMEDIATE(0|1)  -> prints the number of messages read
    python linkabort.py router IPC_ENDPOINT                 -> sends its burst to the first peer, dies

The router answers the reader's first message with 301 messages (150 of two frames, one of three,
150 of two: whichever call of recv libzmq counts from, one of its every-100th command checks falls
between two frames of a message), then SIGKILLs itself. The reader waits until its socket has seen
the connection drop, and only then reads: the news of the drop waits in its socket's command
queue, to be processed by the 100th recv.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import zmq

from zmqdist.transport.sockets import DealerLink

BOUND_S = 20.0


def router(ep: str) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(ep)
    if not sock.poll(int(BOUND_S * 1000)):
        sys.exit("router: nobody connected")
    peer = sock.recv_multipart()[0]
    for i in range(301):
        frames = [b"head-%d" % i, b"payload-%d" % i] + ([b"extra"] if i == 150 else [])
        sock.send_multipart([peer, *frames])
    time.sleep(0.2)  # let libzmq's I/O thread write the burst out before the kill
    os.kill(os.getpid(), signal.SIGKILL)


def reader(ep: str, immediate: bool) -> None:
    ctx = zmq.Context.instance()
    link = DealerLink(ctx, b"reader", logging.getLogger("linkabort"), immediate=immediate)
    sock = link.connect(ep)  # the socket exactly as zmqdist configures it
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    child = subprocess.Popen([sys.executable, __file__, "router", ep])
    end = time.monotonic() + BOUND_S
    while True:  # IMMEDIATE refuses sends until the connection is made
        try:
            sock.send(b"hello", zmq.NOBLOCK)
            break
        except zmq.Again:
            if time.monotonic() > end:
                sys.exit("reader: never connected")
            time.sleep(0.01)
    child.wait(BOUND_S)
    if not monitor.poll(int(BOUND_S * 1000)):
        sys.exit("reader: the drop was never seen")
    time.sleep(0.2)  # the I/O thread queues its news right after the event: leave it the time
    n = 0
    while True:
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        while sock.getsockopt(zmq.RCVMORE):
            frame = sock.recv()
        assert frame.startswith((b"payload-", b"extra")), frame
        n += 1
    print(n)


if __name__ == "__main__":
    if sys.argv[1] == "router":
        router(sys.argv[2])
    else:
        reader(sys.argv[2], sys.argv[3] == "1")
