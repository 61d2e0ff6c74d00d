"""Socket setup, frame I/O and zmq error translation for the runtimes.

Every message is two frames (head, payload) after a ROUTER's identity frame. A loop reads and writes
each message whole, in one call (:mod:`zmqdist.transport.wire`); writes never block, so a slow peer
never blocks a loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Final

import zmq

from zmqdist import protocol as p
from zmqdist.errors import ConfigError, RemoteProtocolError, TransportError
from zmqdist.transport.wire import Port, port

LINGER_MS: Final = 200
MAX_POLL_MS: Final = 1000
KEEPALIVE_PROBES: Final = 5  # unanswered keepalive probes before the kernel closes a connection


@contextlib.contextmanager
def map_zmq_errors(what: str) -> Iterator[None]:
    """Translate ``zmq.ZMQError`` raised inside into :class:`TransportError` naming ``what``."""
    try:
        yield
    except zmq.ZMQError as exc:
        raise TransportError(f"{what}: {exc.strerror} (errno {exc.errno})") from exc


def context_of(context: object, what: str) -> zmq.Context[Any]:
    """``context`` (the process's shared one for None) if it is a ZeroMQ context, else a
    ConfigError naming ``what``: a wrong one found only by the socket thread would stop it."""
    if context is None:
        return zmq.Context.instance()
    if not isinstance(context, zmq.Context):
        raise ConfigError(f"{what}: context must be a zmq.Context, got {context!r}")
    return context


def poll_timeout_ms(deadline: float | None, now: float) -> int:
    """Milliseconds to wait for ``deadline`` (rounded up, so the wake-up is never early)."""
    if deadline is None:
        return MAX_POLL_MS
    return max(0, min(MAX_POLL_MS, math.ceil((deadline - now) * 1000)))


class RateLimitedLog:
    """Logs at most ``burst`` messages per ``period_s`` per key; counts and reports the rest. An
    empty key is a rare event, always logged (a core's ``Problem`` without a key)."""

    def __init__(self, logger: logging.Logger, period_s: float = 10.0, burst: int = 5) -> None:
        self._log = logger
        self._period = period_s
        self._burst = burst
        self._windows: dict[str, list[float]] = {}

    def warning(self, key: str, now: float, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, key, now, msg, *args)

    def log(self, level: int, key: str, now: float, msg: str, *args: Any) -> None:
        """Log at ``level``, within the key's rate (its suppressed count at the same level)."""
        if not key:
            self._log.log(level, msg, *args)
            return
        w = self._windows.get(key)
        if w is None or now - w[0] >= self._period:
            if w is not None and w[2] > 0:
                self._log.log(level, "%d more %r messages suppressed in the last %.0fs", int(w[2]), key, self._period)
            if len(self._windows) > 1000:
                self._windows.clear()
            w = self._windows[key] = [now, 0, 0]
        if w[1] < self._burst:
            w[1] += 1
            self._log.log(level, msg, *args)
        else:
            w[2] += 1


IPC_BUSY_CHECKS: Final = 4  # looks at an ipc path that accepts connections (a stopping broker frees it soon)
IPC_BUSY_PAUSE_S: Final = 0.25


def ipv6_literal(endpoint: str) -> bool:
    """Whether ``endpoint`` is tcp to or from an IPv6 address in brackets (``tcp://[::1]:5555``):
    libzmq takes one only on a socket with IPV6 on (and says "No such device" otherwise). It is
    turned on for those alone: on, a host name such as localhost may resolve to its IPv6 address
    first, where the broker listens on IPv4 (the default, 127.0.0.1)."""
    scheme, _, rest = endpoint.partition("://")
    return scheme == "tcp" and "[" in rest


def ipc_in_use(endpoint: str) -> bool:
    """True if some process accepts connections at the file of ipc ``endpoint``. libzmq's bind
    removes that file and takes the path, silently: a second broker started on a first one's
    ipc path would cut the first off from every new peer. A stale file (its process died) is not
    in use; nor is an abstract (``ipc://@name``) or wildcard path, whose bind fails by itself."""
    path = endpoint[len("ipc://") :]
    if not endpoint.startswith("ipc://") or not path or path[0] == "@" or path == "*":
        return False
    for check in range(IPC_BUSY_CHECKS):
        if check:
            time.sleep(IPC_BUSY_PAUSE_S)
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                return False
        except OSError:
            return False
        if not _accepts(path):
            return False
    return True


def _accepts(path: str) -> bool:
    """Whether a unix socket at ``path`` takes a connection (a full backlog, say of a stopped
    listener, times out: there all the same); refused means nobody listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except TimeoutError:
            return True
        except OSError:
            return False
    return True


def bind_router(
    ctx: zmq.Context[Any],
    endpoints: tuple[str, ...],
    max_message_size: int,
    curve_secret: bytes | None = None,
    zap_domain: str = "",
    keepalive_s: int = 0,
) -> tuple[zmq.Socket[Any], list[str]]:
    """Return a ROUTER bound to ``endpoints`` and the endpoints actually bound (wildcards resolved).

    ROUTER_MANDATORY makes unroutable sends fail loudly instead of vanishing; ROUTER_HANDOVER lets a
    peer that reconnects with its fixed identity take its place; MAXMSGSIZE drops oversized frames in
    libzmq before Python sees them. With ``curve_secret`` every connection is a CURVE server whose
    peers are checked by the ZAP handler of ``zap_domain``. With ``keepalive_s`` the kernel probes a
    tcp peer silent that long (every ``keepalive_s // 6`` s, at least 1, KEEPALIVE_PROBES times) and
    closes the connection of one that does not answer, or that leaves data unacknowledged as long:
    a peer whose host vanished (no FIN, no reset) otherwise kept its connection, and a file
    descriptor of the broker, for good (or 15 minutes, with data in flight).
    """
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if keepalive_s > 0:  # (libzmq applies them to every connection its listeners accept)
            interval = max(1, keepalive_s // 6)
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, keepalive_s)
            sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, interval)
            sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)
            # Keepalives probe an idle connection only: one with data unacknowledged (a reply, a
            # heartbeat's answer sent as the peer vanished) retransmits instead, for 15 minutes
            # by Linux's default. TCP_USER_TIMEOUT bounds that to the same time.
            sock.setsockopt(zmq.TCP_MAXRT, 1000 * (keepalive_s + KEEPALIVE_PROBES * interval))
        if curve_secret is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve_secret)
            sock.setsockopt_string(zmq.ZAP_DOMAIN, zap_domain)
        bound = []
        for ep in endpoints:
            # per bind (a listener keeps the socket's options of its bind): an IPv4 address bound
            # with IPV6 on would listen on its IPv4-mapped IPv6 address, and say so in the endpoint
            sock.setsockopt(zmq.IPV6, 1 if ipv6_literal(ep) else 0)
            if ipc_in_use(ep):
                raise TransportError(
                    f"cannot bind {ep}: Address already in use (another process listens on that path: "
                    f"a broker already running there?) (errno {errno.EADDRINUSE})"
                )
            with map_zmq_errors(f"cannot bind {ep}"):
                sock.bind(ep)
            bound.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    except BaseException:
        sock.close(0)
        raise
    return sock, bound


class Corked:
    """The ``with`` block of :meth:`DealerLink.corked`: cork on entry, uncork on exit."""

    __slots__ = ("link",)

    def __init__(self, link: DealerLink) -> None:
        self.link = link

    def __enter__(self) -> None:
        self.link.cork()

    def __exit__(self, *exc: object) -> None:
        self.link.uncork()


class DealerLink:
    """The DEALER socket of a worker, client or broker toward a broker, owned by its I/O thread.

    Sends that cannot go out at once (the queue is at SNDHWM, or no connection yet on an
    ``immediate`` link) wait in a small backlog and are retried on every wake-up, so a result is
    never dropped; heartbeats are not kept (a fresh one follows). ``connect`` makes a new socket:
    a failover leaves nothing queued on the old connection.

    Not IMMEDIATE by default, though DESIGN.md asks for it. With IMMEDIATE, libzmq 4.3.5 (in
    socket_base_t::hiccuped) cuts the pipe of a connection that dropped as soon as the socket
    processes that news, and recv processes news every 100th call, also between two frames of a
    message: the next frame is then gone and libzmq aborts the whole process ("Assertion failed:
    !_more (src/fq.cpp:80)"). A client reading a burst of replies while its proxy was killed
    died so (tests/integration/test_link_abort.py shows it). Without IMMEDIATE the pipe outlives
    a reconnect: what arrived is read whole, and what was sent while the peer was away goes out
    when it is back. Only the pair link keeps ``immediate`` (its states must not pile up while
    the peer is down): it reads one message a heartbeat, and every read of a link ends when none
    waits (libzmq's EAGAIN), which restarts libzmq's count, so only a burst of 50 messages could
    meet the bug.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        identity: bytes,
        logger: logging.Logger,
        curve: Any = None,
        keep: bool = True,
        immediate: bool = False,
        first_raises: bool = True,
    ) -> None:
        self._ctx = ctx
        self._keep = keep  # keep unsendable messages for later (False: drop them, as heartbeats)
        self._immediate = immediate  # see the class docstring for why this is off by default
        self._curve = curve  # security.ClientKeys or None
        self.identity = identity
        self.sock: zmq.Socket[Any] | None = None
        self._port: Port | None = None  # the socket's messages read and written whole (wire)
        self._enc = p.Encoder()
        self._backlog: deque[tuple[bytes, bytes]] = deque()
        self._log = RateLimitedLog(logger)
        self.bad_input = 0
        self.endpoint = ""
        self.more = False  # the last recv_batch stopped at its limit: messages are still waiting
        self.batch = 0  # the broker reads BATCH frames of up to this many (its WELCOME said so)
        self.batch_bytes = p.BATCH_BYTES  # ... and of at most this many bytes (its message limit)
        self._corked: list[tuple[bytes, bytes, bool]] | None = None  # held by cork() until uncork()
        self._opened = not first_raises  # a socket was made once, or need not be (see connect)

    def connect(self, endpoint: str) -> zmq.Socket[Any] | None:
        """Close the current socket (if any) and return a new one connected to ``endpoint``. What
        was held by :meth:`cork` goes to the old connection first, as it would have uncorked.

        A process out of file descriptors, or a context out of sockets, cannot make one. The first
        connect raises then (a start that cannot work says so at once), unless ``first_raises`` is
        False (a probe's link, first connected while its owner runs). A later one, a failover,
        logs it and returns None: the link stays without a socket, holds what is sent, and its
        owner's failover tries again after a ttl of silence, as after any lost broker; the
        owner's loop must not die of it (a proxy that did lost every client below it)."""
        if self._corked:
            self.uncork()
            self._corked = []
        self.close()
        self.endpoint = endpoint
        self._backlog.clear()  # a failover leaves nothing queued for the old connection
        self.batch = 0  # until this broker's WELCOME says it reads batches
        self.batch_bytes = p.BATCH_BYTES
        try:
            sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        except zmq.ZMQError as exc:
            if not self._opened:
                raise
            self._log.warning(
                "no-socket",
                time.monotonic(),
                "cannot open a socket to %s: %s; it is tried again at the next failover (the process is out of "
                "file descriptors, ulimit -n, or its ZeroMQ context out of sockets, 1023 by default)",
                endpoint,
                exc.strerror,
            )
            return None
        self._opened = True
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1 if self._immediate else 0)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self._curve is not None:
            self._curve.apply(sock)
        if ipv6_literal(endpoint):
            sock.setsockopt(zmq.IPV6, 1)
        try:
            with map_zmq_errors(f"cannot connect to {endpoint}"):
                sock.connect(endpoint)
        except BaseException:
            sock.close(0)  # (it was the caller's to close: a start that failed so left it open)
            raise
        self.sock = sock
        self._port = port(sock)
        return sock

    def cork(self) -> None:
        """Hold what is sent from now until :meth:`uncork`, which sends it together."""
        if self._corked is None:
            self._corked = []

    def corked(self) -> Corked:
        """``with link.corked():``: what is sent inside goes out together at its end."""
        return Corked(self)

    def uncork(self) -> None:
        """Send what was held since :meth:`cork`: several messages as BATCH frames when the broker
        reads them (natural batching: nothing waits for more), else one by one."""
        held = self._corked
        self._corked = None
        if not held:
            return
        if len(held) == 1 or self.batch < 2 or self._backlog or self._port is None:
            for head, payload, keep in held:
                self._put(head, payload, keep)
            return
        frames = [f for head, payload, _ in held for f in (head, payload)]
        for a, b in p.batch_spans(frames, min(self.batch, p.MAX_BATCH), self.batch_bytes):
            if b - a == 1 or self._backlog:  # alone, or behind messages still waiting: in order
                for head, payload, keep in held[a:b]:
                    self._put(head, payload, keep)
            elif not self._send(p.BATCH_HEAD, p.pack_batch(frames[2 * a : 2 * b])):
                self._backlog.extend((head, payload) for head, payload, keep in held[a:b] if keep)

    def send(self, msg: p.Message) -> None:
        """Send ``msg`` now, or keep it for :meth:`flush` if the connection is not ready (held
        until :meth:`uncork` while corked)."""
        head, payload = self._enc.encode(msg)
        keep = self._keep and type(msg) is not p.HEARTBEAT_CLS
        if self._corked is not None:
            self._corked.append((head, payload, keep))
            return
        self._put(head, payload, keep)

    def _put(self, head: bytes, payload: bytes, keep: bool) -> None:
        if self._backlog:
            if keep:
                self._backlog.append((head, payload))
            self.flush()
            return
        if not self._send(head, payload) and keep:
            self._backlog.append((head, payload))

    def _send(self, head: bytes, payload: bytes) -> bool:
        port = self._port
        if port is None:
            return False
        # The second frame can fail too: when the pipe the head went into closes between the two
        # (the peer died), libzmq drops the whole message and says EAGAIN. Nothing of it went out,
        # so it is kept and retried like one that could not start.
        rc = port.send(head, payload)
        if rc == 0:
            return True
        if rc == errno.EAGAIN:
            return False
        raise zmq.ZMQError(rc)

    def flush(self) -> bool:
        """Retry the backlog; return True when it is empty."""
        b = self._backlog
        while b:
            if not self._send(*b[0]):
                return False
            b.popleft()
        return True

    def stuck(self) -> bool:
        """Retry the backlog; return True if messages still wait for the connection."""
        return bool(self._backlog) and not self.flush()

    def recv_batch(self, now: float, limit: int = 1000) -> list[p.Message]:
        """Return up to ``limit`` decoded messages waiting on the socket (bad ones counted, logged)."""
        port = self._port
        msgs: list[p.Message] = []
        self.more = False
        if port is None:
            return msgs
        # A read ends when none waits (None: no exception, see transport.wire), which also restarts
        # libzmq's count to its next every-100th-recv look at news, so that look never falls
        # between the two frames of a message (the class docstring says why that matters).
        for _ in range(limit):
            got = port.recv(2)
            if got is None:
                return msgs
            if len(got) != 2:  # every message is a head and a payload: the one frame-count check
                self._bad(now, "message has 1 frame, expected 2" if len(got) == 1 else "message has more than 2 frames")
                continue
            hb = got[0]
            if hb[:4] != p.BATCH_HEAD:
                self._decode(hb, got[1], msgs, now)
                continue
            try:
                frames = p.unpack_batch(got[1])
            except RemoteProtocolError as exc:
                self._bad(now, str(exc))
                continue
            for j in range(0, len(frames), 2):
                self._decode(frames[j], frames[j + 1], msgs, now)
        self.more = True
        return msgs

    def _decode(self, head: bytes, payload: bytes, msgs: list[p.Message], now: float) -> None:
        try:
            msg = p.decode(head, payload)
        except RemoteProtocolError as exc:
            self._bad(now, str(exc))
            return
        if type(msg) is p.WELCOME_CLS:
            self.batch = msg.batch
            # A BATCH over the broker's --max-message-size is refused whole (each message fits).
            self.batch_bytes = min(p.BATCH_BYTES, msg.max_message) if msg.max_message > 0 else p.BATCH_BYTES
        msgs.append(msg)

    def _bad(self, now: float, what: str) -> None:
        self.bad_input += 1
        self._log.warning("bad-input", now, "dropped bad message from broker at %s: %s", self.endpoint, what)

    def close(self, linger_ms: int = 0) -> None:
        if self._port is not None:
            self._port.detach()
            self._port = None
        if self.sock is not None:
            self.sock.close(linger_ms)
            self.sock = None
