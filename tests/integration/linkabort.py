"""Run by test_link_abort.py, in a process of its own: libzmq aborts the process it fails in.

    python linkabort.py reader IPC_ENDPOINT IMMEDIATE(0|1)  -> prints the number of messages read
    python linkabort.py router IPC_ENDPOINT                 -> sends its burst to the first peer, dies
    python linkabort.py paced IPC_ENDPOINT IMMEDIATE(0|1)   -> prints the number of messages read
    python linkabort.py pacer IPC_ENDPOINT                  -> one message per ask; dies at the last

burst: the router answers the reader's first message with 301 messages (150 of two frames, one of
three, 150 of two: whichever call of recv libzmq counts from, one of its every-100th looks at news
falls between two frames of a message), then SIGKILLs itself. The reader waits until its socket has
seen the connection drop, and only then reads: the news of the drop waits in its socket's command
queue, to be taken by the 100th recv.

paced (the pair link's way: one message per read): the reader asks 49 times for one message and
reads each with DealerLink.recv_batch (98 calls of recv if nothing restarts libzmq's count); the
50th is sent by a pacer that then dies; the reader sees it arrive (a poll), then the drop, and only
then reads it: its second frame is the 100th recv unless the link's reads restart the count.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time

import zmq

from zmqdist import protocol as p
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
    time.sleep(0.5)  # let libzmq's I/O thread write the burst out before the kill (a loaded machine too)
    os.kill(os.getpid(), signal.SIGKILL)


def pacer(ep: str) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(ep)
    enc = p.Encoder()
    for i in itertools.count():
        if not sock.poll(int(BOUND_S * 1000)):
            sys.exit("pacer: nobody asked")
        peer, ask = sock.recv_multipart()
        sock.send_multipart([peer, *enc.encode(p.Error(p.E_COMMAND, f"message {i}"))])
        if ask == b"last":
            time.sleep(0.5)  # let libzmq's I/O thread write it out before the kill (a loaded machine too)
            os.kill(os.getpid(), signal.SIGKILL)


def paced(ep: str, immediate: bool) -> None:
    ctx = zmq.Context.instance()
    link = DealerLink(ctx, b"paced", logging.getLogger("linkabort"), immediate=immediate)
    sock = link.connect(ep)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    child = subprocess.Popen([sys.executable, __file__, "pacer", ep])
    n = 0
    for k in range(50):
        ask = b"last" if k == 49 else b"next"
        _send(sock, ask)
        if not sock.poll(int(BOUND_S * 1000)):  # waits without reading (libzmq counts recv calls)
            sys.exit(f"paced: no answer to ask {k}")
        if ask == b"last":  # the answer is there (the poll took its news); now the drop
            child.wait(BOUND_S)
            if not monitor.poll(int(BOUND_S * 1000)):
                sys.exit("paced: the drop was never seen")
            time.sleep(0.2)  # as in reader(): the news is queued right after the event
        got = link.recv_batch(time.monotonic())
        n += len(got)
    print(n)


def _send(sock: zmq.Socket, data: bytes) -> None:
    end = time.monotonic() + BOUND_S
    while True:  # IMMEDIATE refuses sends until the connection is made
        try:
            sock.send(data, zmq.NOBLOCK)
            return
        except zmq.Again:
            if time.monotonic() > end:
                sys.exit("never connected")
            time.sleep(0.01)


def reader(ep: str, immediate: bool) -> None:
    ctx = zmq.Context.instance()
    link = DealerLink(ctx, b"reader", logging.getLogger("linkabort"), immediate=immediate)
    sock = link.connect(ep)  # the socket exactly as zmqdist configures it
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    child = subprocess.Popen([sys.executable, __file__, "router", ep])
    _send(sock, b"hello")
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
    role = sys.argv[1]
    if role in ("router", "pacer"):
        {"router": router, "pacer": pacer}[role](sys.argv[2])
    else:
        {"reader": reader, "paced": paced}[role](sys.argv[2], sys.argv[3] == "1")
