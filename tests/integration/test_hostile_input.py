"""Garbage, mutated and hostile messages never stop a broker serving others."""

import asyncio
import os
import random
import socket
import time

import msgpack
import pytest
import zmq

from tests.integration.helpers import wait_for
from zmqdist import AsyncClient, Broker, Busy, Client, RemoteError, Worker
from zmqdist import protocol as p

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path):
    broker = Broker(
        bind=[f"ipc://{tmp_path}/b.sock", "tcp://127.0.0.1:*"], name="fuzz", max_message_size=1 << 20
    ).start()
    w = Worker([broker.endpoints[0]], concurrency=4, name="real")

    @w.service("echo")
    def echo(x):
        return x

    @w.service("fail")
    def fail(x):
        raise KeyError(x)

    @w.service("fail_on")
    def fail_on(x):
        if x < 0:
            raise KeyError(x)
        return x

    @w.service("aecho")
    async def aecho(x):
        await asyncio.sleep(0.001)
        return x

    w.start()
    wait_for(lambda: broker.status()["workers"], 10, "worker registered")
    yield broker
    w.stop(drain=False)
    broker.stop()


def _random_value(rng, depth=0):
    kind = rng.randrange(8 if depth < 2 else 5)
    if kind == 0:
        return rng.randrange(-(2**40), 2**40)
    if kind == 1:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 20)))
    if kind == 2:
        return os.urandom(rng.randrange(0, 20))
    if kind == 3:
        return rng.choice([None, True, False, 0.5])
    if kind == 4:
        return rng.randrange(0, 300)
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 7))]
    if kind == 6:
        return {str(i): _random_value(rng, depth + 1) for i in range(rng.randrange(0, 3))}
    return tuple(_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 7)))


VALID = [
    p.Hello(p.ROLE_WORKER, "fz", ("fuzzsvc",), 2, 250),
    p.Hello(p.ROLE_CLIENT, "fz", (), 0, 250),
    p.Request(1, "echo", 100, (), b"\xc0"),
    p.Result(1, p.RS_OK, b"\xc0"),
    p.Heartbeat(p.ROLE_WORKER, "", 3, (1, 2)),
    p.Credit(3),
    p.Bye("x"),
    p.Task(1, "echo", 100, 1, "k", 1, (), b""),
    p.Reply(1, 0, "", b""),
]


def fuzz_frames(rng):
    """One message's frames: random, mutated valid, or valid-looking with random fields."""
    mode = rng.randrange(4)
    if mode == 0:
        return [os.urandom(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 5))]
    head, payload = p.encode(rng.choice(VALID))
    if mode == 1:  # flip, truncate or extend bytes of a valid message
        b = bytearray(head)
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            if op == 0 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op == 1:
                del b[rng.randrange(len(b) + 1) :]
            else:
                b += os.urandom(rng.randrange(1, 8))
        return [bytes(b), payload]
    if mode == 2:  # right tag and command, random header fields
        cmd = rng.choice(list(p.TYPE_OF))
        return [p.PREFIX + bytes([cmd]) + msgpack.packb(_random_value(rng)), os.urandom(rng.randrange(0, 8))]
    frames = [head, payload]  # valid message with a wrong frame count
    return frames[: rng.randrange(1, 2)] if rng.random() < 0.5 else [*frames, b"extra"]


@pytest.mark.timeout(120)
def test_thousands_of_random_and_mutated_messages_then_normal_calls_work(stack):
    broker = stack
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    ctx = zmq.Context.instance()
    socks = []
    for i in range(8):  # several peers, some posing as workers, some as clients
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.setsockopt(zmq.ROUTING_ID, f"fuzz{i}".encode())
        s.sndhwm = 0
        s.connect(broker.endpoints[0])
        socks.append(s)
    sent = 0
    with Client([broker.endpoints[0]], timeout=10) as c:
        for round_ in range(10):
            for _ in range(1000):
                rng.choice(socks).send_multipart(fuzz_frames(rng))
                sent += 1
            # normal calls keep succeeding during the campaign
            assert c.call("echo", round_) == round_, f"seed {seed}"
        # drain the answers the broker sent back (they must not block it)
        for s in socks:
            while s.poll(0):
                s.recv_multipart()
        assert list(c.map("echo", range(500))) == list(range(500)), f"seed {seed}"
        st = c.call("zmqdist.status")
    for s in socks:
        s.close(0)
    assert sent == 10_000
    assert st["counters"]["bad_input"] > 2000, st["counters"]
    assert st["counters"]["replies_ok"] >= 510


@pytest.mark.timeout(60)
def test_raw_tcp_garbage_and_oversized_messages_are_refused_without_harm(stack):
    broker = stack
    tcp = broker.endpoints[1]
    host, port = tcp.rsplit("/", 1)[1].rsplit(":", 1)
    for blob in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(5000), b"\xff" + b"\x00" * 8 + b"\x7f" + os.urandom(100)):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(blob)
                s.settimeout(0.5)
                s.recv(100)
            except OSError:
                pass
    with Client([tcp], timeout=10) as c:
        big = b"x" * (2 << 20)  # over the broker's 1 MiB MAXMSGSIZE: the connection is dropped
        fut = c.submit("echo", big, timeout=1.5)
        with Client([tcp], timeout=10) as other:
            assert other.call("echo", "still fine") == "still fine"
        with pytest.raises(Exception):
            fut.result(10)
        # the client reconnects by itself: normal-sized calls work again
        assert wait_for(lambda: _try(c), 15, "client recovered") == "ok"


def _try(c):
    try:
        return c.call("echo", "ok", timeout=1.0)
    except Exception:
        return None


@pytest.mark.timeout(60)
def test_flood_gets_busy_at_once_and_memory_stays_bounded(tmp_path):
    broker = Broker(bind=[f"ipc://{tmp_path}/b.sock"], max_queue=100).start()
    try:
        with Client(broker.endpoints, timeout=30) as c:
            futs = [c.submit("nobody", i) for i in range(2000)]
            t0 = time.monotonic()
            busy = [f for f in futs[100:] if isinstance(f.exception(10), Busy)]
            assert len(busy) == 1900 and time.monotonic() - t0 < 10
            assert "busy" in str(busy[0].exception())
            st = broker.status()
            assert st["queued"] == 100 and st["counters"]["busy"] == 1900
    finally:
        broker.stop()


@pytest.mark.timeout(60)
def test_remote_error_and_async_paths(stack):
    broker = stack

    async def main():
        async with AsyncClient(broker.endpoints[:1], timeout=10) as ac:
            assert await ac.call("aecho", {"a": [1, 2]}) == {"a": [1, 2]}
            assert await ac.gather("echo", range(50)) == list(range(50))
            with pytest.raises(RemoteError) as ei:
                await ac.call("fail", "k")
            return ei.value

    err = asyncio.run(main())
    assert err.remote_type == "KeyError" and "'k'" in err.remote_message and "raise KeyError" in err.remote_traceback
    with Client(broker.endpoints[:1], timeout=10) as c:
        assert c.call("echo", b"\x00raw") == b"\x00raw"
        assert c.call("aecho", 5) == 5


@pytest.mark.timeout(30)
def test_client_close_fails_pending_and_later_submissions_instead_of_hanging(tmp_path):
    from zmqdist import ClosedError

    c = Client([f"ipc://{tmp_path}/nobody.sock"], timeout=30)
    fut = c.submit("echo", 1)
    c.close()
    with pytest.raises(ClosedError):
        fut.result(5)
    with pytest.raises(ClosedError):
        c.submit("echo", 2)


@pytest.mark.timeout(60)
def test_map_yields_in_order_and_raises_at_the_failing_item(stack):
    broker = stack
    with Client(broker.endpoints[:1], timeout=10) as c:
        assert list(c.map("aecho", range(300), window=7)) == list(range(300))
        got = []
        with pytest.raises(RemoteError, match="KeyError"):
            for x in c.map("fail_on", [1, 2, 3, -1, 5], window=3):
                got.append(x)
        assert got == [1, 2, 3]


MDP_VALID = [
    [b"", b"MDPC01", b"echo", b"x"],
    [b"MDPC02", b"\x01", b"echo", b"x"],
    [b"MDPW02", b"\x01", b"fuzzsvc"],
    [b"", b"MDPW01", b"\x01", b"fuzzsvc"],
    [b"MDPW02", b"\x05"],
    [b"MDPW02", b"\x04", b"\0" * 8, b"", b"r"],
]
BROKER_VALID = [
    p.Hello(p.ROLE_BROKER, "fuzzproxy", (), 0, 250),
    p.Advert((("fuzzsvc", 3),)),
    p.Request(7, "echo", 100, ("fuzzproxy",), b"\xc0"),
]


def fuzz_any_role(rng):
    """Frames posing as any role: native clients and workers, proxies, Majordomo peers."""
    r = rng.random()
    if r < 0.25:
        frames = [bytes(f) for f in rng.choice(MDP_VALID)]
        if rng.random() < 0.6:  # mutate one frame, drop or add one
            i = rng.randrange(len(frames))
            op = rng.randrange(3)
            if op == 0:
                frames[i] = os.urandom(rng.randrange(0, 12))
            elif op == 1 and len(frames) > 1:
                del frames[i]
            else:
                frames.insert(i, os.urandom(rng.randrange(0, 8)))
        return frames
    if r < 0.35:
        head, payload = p.encode(rng.choice(BROKER_VALID))
        return [head, payload]
    return fuzz_frames(rng)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


@pytest.mark.timeout(240)
def test_hundred_thousand_messages_from_every_role_with_bounded_memory(procs, tmp_path):
    """The fuzz campaign of issue 5: 100,000 random and mutated messages from 12 peers posing as
    clients, workers, proxies and Majordomo peers. The broker (a real process) never crashes,
    normal calls succeed during and after, and its memory grows by less than 32 MiB."""
    ep = f"ipc://{tmp_path}/f.sock"
    broker = procs.spawn("broker", "--bind", ep, "--name", "fuzz", "--max-message-size", str(1 << 20))
    procs.spawn("worker", "testworkers:echo_fn", "--service", "echo", "--connect", ep, "--concurrency", "8")
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    ctx = zmq.Context.instance()
    socks = []
    for i in range(12):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.setsockopt(zmq.ROUTING_ID, f"fz{i}".encode())
        s.sndhwm = 0
        s.connect(ep)
        socks.append(s)

    def drain():
        for s in socks:
            while s.poll(0):
                s.recv_multipart()

    sent = 0
    rss = []
    try:
        with Client([ep], timeout=20) as c:
            wait_for(lambda: "echo" in c.call("zmqdist.status")["services"], 20, "worker registered")
            for round_ in range(100):
                for _ in range(1000):
                    rng.choice(socks).send_multipart(fuzz_any_role(rng))
                    sent += 1
                drain()
                assert c.call("echo", round_) == round_, f"seed {seed}"  # served during the campaign
                if round_ == 9:
                    rss.append(rss_kib(broker.pid))
            drain()
            assert list(c.map("echo", range(500))) == list(range(500)), f"seed {seed}"
            wait_for(lambda: sum(c.call("zmqdist.status")["counters"].values()) > 0, 5, "status")
            st = c.call("zmqdist.status")
            handled = st["counters"]["bad_input"] + st["counters"]["requests"] + st["counters"]["workers_registered"]
            assert handled > 80_000, f"the broker has not worked through the campaign: {st['counters']}"
            rss.append(rss_kib(broker.pid))
    finally:
        for s in socks:
            s.close(0)
    assert broker.poll() is None, "the broker died"
    assert sent == 100_000
    grown = rss[1] - rss[0]
    print(f"fuzz seed {seed}: {sent} messages, bad_input {st['counters']['bad_input']}, "
          f"rss {rss[0]} -> {rss[1]} KiB (+{grown}), counters {st['counters']}")  # fmt: skip
    assert grown < 32 * 1024, f"broker memory grew by {grown} KiB over 90,000 messages (seed {seed})"
    assert st["counters"]["bad_input"] > 20_000


@pytest.mark.timeout(60)
def test_an_older_workers_result_over_the_limit_fails_its_request_at_once(tmp_path):
    """A worker that does not check its results against WELCOME's max_message itself (one from
    before it did, or one written elsewhere) sends a RESULT over --max-message-size: the broker
    refused it as bad input and the caller waited out the deadline. The broker reads the head,
    ends the task as a ResultTooLarge failure and frees the slot; a stream's PART so too, its run
    cancelled."""
    broker = Broker(bind=[f"ipc://{tmp_path}/b.sock"], name="lim", max_message_size=20_000).start()
    old = zmq.Context.instance().socket(zmq.DEALER)
    old.setsockopt(zmq.LINGER, 0)
    old.connect(broker.endpoints[0])

    def send(msg):
        old.send_multipart(list(p.encode(msg)))

    def next_of(kind):
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if old.poll(100):
                msg = p.decode(*old.recv_multipart())
                if type(msg) is kind:
                    return msg
            send(p.Heartbeat(p.ROLE_WORKER, "", 0, ()))
        raise AssertionError(f"no {kind.__name__} in 10 s")

    try:
        send(p.Hello(p.ROLE_WORKER, "old", ("big",), 1, 250))
        next_of(p.Welcome)
        with Client(broker.endpoints, timeout=20) as c:
            fut = c.submit("big", 1)
            task = next_of(p.Task)
            send(p.Result(task.ticket, p.RS_OK, b"x" * 30_000))
            started = time.monotonic()
            with pytest.raises(RemoteError, match=r"the result from its worker: a message of 30\d+ bytes is over"):
                fut.result(10)
            assert time.monotonic() - started < 5.0  # at once, not at the deadline (20 s)
            stream = c.stream("big", 2)
            task = next_of(p.Task)  # the one slot is free again
            send(p.Part(task.ticket, 0, p.pack_value("a")))
            send(p.Part(task.ticket, 1, b"x" * 30_000))
            got = []
            with pytest.raises(RemoteError, match=r"part 2 of the stream from its worker"):
                got.extend(stream)
            assert got == ["a"] and next_of(p.Cancel).id == task.ticket
            assert broker.status()["counters"]["bad_input"] == 2
    finally:
        old.close(0)
        broker.stop()
