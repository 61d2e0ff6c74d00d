"""Peers whose ZeroMQ routing id is one byte or 255 bytes long (both legal) are answered like any
other: a broker routes by the destination's type, never by the length of an identity."""

import pytest
import zmq

from tests.integration.helpers import status, wait_for
from zmqdist import Client
from zmqdist import protocol as p

pytestmark = pytest.mark.integration

IDS = [b"A", b"Z" * 255]


def dealer(ctx, ep, ident):
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.setsockopt(zmq.ROUTING_ID, ident)
    s.connect(ep)
    return s


def recv(sock, timeout_s=10.0):
    assert sock.poll(int(timeout_s * 1000)), "no answer: the broker sent it elsewhere, or dropped it"
    return sock.recv_multipart()


def serve_one(worker):
    """The raw worker heartbeats (so the broker keeps it), then echoes the next task."""
    worker.send_multipart(p.encode(p.Heartbeat(p.ROLE_WORKER, "", 0, ())))
    msg = p.decode(*recv(worker))
    while type(msg) is not p.Task:
        msg = p.decode(*recv(worker))
    worker.send_multipart(p.encode(p.Result(msg.ticket, p.RS_OK, msg.payload)))


@pytest.mark.timeout(60)
def test_native_and_majordomo_peers_with_short_and_long_routing_ids(procs, tmp_path):
    ep = f"ipc://{tmp_path}/b.sock"
    procs.spawn("broker", "--bind", ep)
    ctx = zmq.Context.instance()
    # A worker whose routing id is one byte: it must get its WELCOME and its tasks.
    worker = dealer(ctx, ep, b"W")
    worker.send_multipart(p.encode(p.Hello(p.ROLE_WORKER, "short-id", ("echo",), 4, 250)))
    assert type(p.decode(*recv(worker))) is p.Welcome
    with Client([ep], timeout=10) as c:
        wait_for(lambda: "echo" in status(c)["services"], 20, "the raw worker registered")
    try:
        for ident in IDS:
            native = dealer(ctx, ep, ident)
            native.send_multipart(p.encode(p.Request(7, "echo", 5000, (), p.pack_value("hi"))))
            serve_one(worker)
            reply = p.decode(*recv(native))
            assert reply == p.Reply(7, p.ST_OK, "", p.pack_value("hi")), len(ident)
            native.close()

            mdp = dealer(ctx, ep, ident)
            mdp.send_multipart([b"", b"MDPC01", b"echo", b"body"])  # MDP 0.1 client, REQ envelope
            serve_one(worker)
            assert recv(mdp) == [b"", b"MDPC01", b"echo", b"body"], len(ident)
            mdp.close()
    finally:
        worker.close()
