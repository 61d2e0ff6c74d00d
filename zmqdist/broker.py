"""The broker runtime: one thread owns the broker's sockets and drives its machine.

Every message read from the ROUTER goes through the machine's one door (``receive_frames`` for
native messages, ``receive_mdp`` for Majordomo ones); what the machine returns is sent with NOBLOCK
to the destination its type names: a peer's identity, the upstream link, the pair link, or the log.
A send that fails (peer gone: EHOSTUNREACH with ROUTER_MANDATORY; its queue full: EAGAIN) is
reported to the machine, which requeues a task that did not leave. Nothing here decides where a
request goes.

A proxy (``upstream`` set) also owns a DEALER to its upstream broker, in the same thread. A broker
of a backup pair (``ha`` set) owns the pair link too: a ROUTER bound at ``ha_bind`` that receives
the peer's messages and a DEALER connected to the peer's (never kept for later: the pair protocol
resends state). A PairState also goes back on the connection the peer made to us: after the peer
restarts, our DEALER reconnects only after libzmq's backoff (up to a second), and the peer must
hear us before its grace ends.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Final, SupportsFloat

import zmq
from zmq.utils.monitor import recv_monitor_message

from zmqdist import _native
from zmqdist import protocol as p
from zmqdist.clock import Clock, checked, thread_cpu_time
from zmqdist.config import BrokerSettings, broker_endpoints, check_seconds, exposed
from zmqdist.core.broker import BrokerMachine
from zmqdist.core.failover import make_broker
from zmqdist.core.link import Connect, Problem
from zmqdist.core.mdp import MAX_FRAMES, starts_mdp
from zmqdist.core.records import LOG, PAIR, UPSTREAM, Channel, Out
from zmqdist.core.rights import pair_peer
from zmqdist.errors import ClosedError, ConfigError, RemoteProtocolError, TransportError, ZmqdistError
from zmqdist.transport import DealerLink, Loop, Mailbox, RateLimitedLog, bind_router, context_of, fds, map_zmq_errors
from zmqdist.transport.loop import DebugCheck
from zmqdist.transport.security import (
    ClientKeys,
    KeyRing,
    load_secret,
    zap_check,
    zap_register,
    zap_reload,
    zap_unregister,
)
from zmqdist.transport.wire import NB, Port, port, prop

# What a failed CURVE handshake's protocol error means, for the log (the others by number).
HANDSHAKE_FAILURES: Final[dict[int, str]] = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "a plaintext peer (no CURVE keys)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "a wrong server key (the peer lacks this broker's public key)",
}

log: Final = logging.getLogger(__name__)

BATCH: Final = 2000
# File descriptors (every connection is one; see transport/fds.py): counted every FDS_S while few
# are open (FDS_CHEAP: counting them takes under a millisecond) or half the limit or more, else
# every FDS_IDLE_S; a warning from FDS_WARN of the limit on, again every FDS_REPEAT_S while it
# stays there, and a word when it falls below FDS_CLEAR.
FDS_S: Final = 1.0
FDS_IDLE_S: Final = 10.0
# How often the loop makes sure of what it cannot be told of: its ZAP handler runs (CURVE), and
# the files of its ipc endpoints are still there.
WATCH_S: Final = 1.0
IPC_REPEAT_S: Final = 30.0  # an ipc endpoint that cannot be bound again is logged this often
FDS_CHEAP: Final = 2048
FDS_WARN: Final = 0.9
FDS_CLEAR: Final = 0.8
FDS_REPEAT_S: Final = 30.0
FLUSH: Final = 64
# A message read keeps at most this many frames: the routing id and an MDP message's most (a longer
# one is refused whole by the core; a native message has 3)
MAX_READ: Final = MAX_FRAMES + 10
RIGHTS: Final = ("X-Roles", "X-Services")  # what the ZAP handler sets on every CURVE connection
# After its last messages (BYE to every peer, a pair's HANDOVER) a stopping broker keeps its sockets
# open this long: closed at once, a connection loses what was just sent to it about half the time
# (measured: 5 of 10 BYEs arrived when closed at once, even with a linger; 10 of 10 after 0.3 s).
STOP_GRACE_S: Final = 0.3
# The heads of the messages only the other broker of a pair sends on the pair link.
PAIR_HEADS: Final = frozenset(p.HEAD_PREFIX[t] for t in (p.PairState, p.Replicate, p.Handover))


def default_name() -> str:
    """A broker name unique per process: HOST-PID-RANDOM (names are hop ids in tiers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Broker:
    """A broker embeddable in any process: ``Broker(bind=[...]).start()`` ... ``.stop()``.

    Options are the fields of :class:`~zmqdist.config.BrokerSettings` (the same as the
    ``zmqdist broker`` flags; ``--help`` explains each), given as keywords or as ``settings``. In
    short: ``name`` is the hop id in tiers (unique in a topology; default HOST-PID-RANDOM);
    ``upstream`` makes a proxy (endpoints in failover order); ``mdp_*`` are the Majordomo peers'
    settings; ``key`` (our secret certificate) with ``allow_clients``/``allow_workers``/
    ``allow_brokers`` (directories of public certificates) turn CURVE on, and
    ``upstream_server_key`` secures a proxy's upstream link. ``ha`` ("primary" or "backup") makes
    one broker of a backup pair: ``ha_bind`` is where the peer's pair link connects, ``peer`` the
    peer's ``ha_bind``, ``failback`` "manual" or "auto", and ``peer_server_key`` the peer's public
    certificate when CURVE is on (docs/ha.md). An unknown option is refused with the nearest name.
    """

    def __init__(
        self,
        bind: str | Sequence[str] | None = None,
        *,
        settings: BrokerSettings | None = None,
        clock: Clock | None = None,
        context: zmq.Context[Any] | None = None,
        **options: Any,
    ) -> None:
        if settings is None:
            if bind is not None:
                options["bind"] = bind
            if not options.get("name"):
                options["name"] = default_name()
            settings = BrokerSettings.from_options(**options)
        elif bind is not None or options:
            raise ConfigError("give the broker's options either as keywords or as settings, not both")
        self.settings = s = settings
        self._bind, self._peer, self._ha_bind = broker_endpoints(s)
        # CURVE: with a secret key every link this broker owns is encrypted and every peer's key
        # must be in an allow-list (docs/security.md).
        self._secret: bytes | None = None
        self._ring: KeyRing | None = None
        if s.key is not None:
            _, self._secret = load_secret(s.key)
            self._ring = KeyRing({"clients": s.allow_clients, "workers": s.allow_workers, "brokers": s.allow_brokers})
        self._up_keys = ClientKeys.load(
            s.upstream_server_key, s.key if s.upstream_server_key else None, "broker upstream"
        )
        self._peer_keys = ClientKeys.load(s.peer_server_key, s.key if s.peer_server_key else None, "broker peer")
        self._zap_domain = f"zmqdist-{secrets.token_hex(8)}"
        self._metrics_server: Any = None
        self.metrics_port: int | None = None  # the bound port once started
        self._clock = checked(clock, "broker")
        self._ctx = context_of(context, "broker")
        self._mailbox = Mailbox()
        self._runner: threading.Thread | None = None
        self._stop_asked = False  # stop() came (before start: start and run refuse, not serve nothing)
        self._ready = threading.Event()
        self._done = threading.Event()
        self._startup_error: BaseException | None = None
        self.endpoints: list[str] = []
        self.incarnation = secrets.token_hex(8)
        self._ratelog = RateLimitedLog(log)
        self._enc = p.Encoder()  # used by the loop thread only
        self._port: Port | None = None  # the ROUTER's messages read and written whole, set by the loop thread
        self._debug = DebugCheck(log)  # traces of every message at DEBUG
        self._up: DealerLink | None = None  # a proxy's link to its upstream, owned by the loop thread
        self._pair_in: zmq.Socket[Any] | None = None  # the pair link: the peer's messages come here
        self._pair_out: DealerLink | None = None  # ... and ours go out here
        self._pair_back: bytes | None = None  # the identity of the peer's connection to our ROUTER
        self._redial_logged = -60.0  # when a new connection to a silent peer was last logged at INFO
        self.ha_endpoints: list[str] = []
        self._monitor: zmq.Socket[Any] | None = None  # handshake failures of a secured ROUTER
        self._fds_due = 0.0  # when the loop counts its file descriptors next
        self._watch_due = 0.0  # when the loop looks at its ZAP handler and ipc paths next
        self._ipc: list[tuple[zmq.Socket[Any], str, str]] = []  # (socket, endpoint, path) bound on files
        self._ipc_log = RateLimitedLog(log, IPC_REPEAT_S, 1)  # a lost ipc path that fails to bind again
        self._fds_warned = -1.0  # when it last warned that few are left (-1: not since they were plenty)
        self._max_payload = s.max_message_size
        self._loop: Loop | None = None

    # --- public ---------------------------------------------------------------------------------

    def start(self, timeout: SupportsFloat = 10.0) -> Broker:
        """Run the broker in a background thread; return once it is bound (or raise why not)."""
        timeout = check_seconds(timeout, "start's timeout")
        if self._runner is not None:
            if not self._runner.is_alive():
                raise ZmqdistError("broker has stopped: a Broker runs once, make a new one to start again")
            raise ZmqdistError("broker already started")
        self._refuse_if_stopped()
        self._runner = threading.Thread(target=self._main, name=f"zmqdist-broker-{self.settings.name}", daemon=True)
        self._runner.start()
        if not self._ready.wait(timeout):
            raise ZmqdistError(f"broker did not start within {timeout}s")
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def run(self) -> None:
        """Run the broker in this thread until :meth:`stop` is called (e.g. from a signal handler)."""
        if self._runner is not None:
            raise ZmqdistError("broker already started")
        self._refuse_if_stopped()
        self._runner = threading.current_thread()
        self._main()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self, timeout: SupportsFloat = 5.0) -> None:
        """Stop serving: tell workers BYE, close the socket, end the thread. Safe to call twice."""
        timeout = check_seconds(timeout, "stop's timeout")
        self._stop_asked = True
        self._mailbox.post(("stop",))  # (a start racing this stops too)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        t = self._runner
        if t is not None and t is not threading.current_thread() and t.is_alive():
            t.join(timeout)

    def _refuse_if_stopped(self) -> None:
        if self._stop_asked:
            raise ZmqdistError("broker was stopped before it started: a Broker runs once, make a new one to start")

    def request_stop(self) -> None:
        """Ask the loop to stop, without waiting (safe in a signal handler)."""
        self._mailbox.post(("stop",))

    def reload_allow_lists(self) -> None:
        """Re-read the allow-lists (SIGHUP): connected peers stay, a removed key is refused from its
        next connection. Safe to call from a signal handler."""
        if self._ring is not None:
            zap_reload(self._ctx, self._zap_domain)

    def status(self, timeout: SupportsFloat = 5.0) -> dict[str, Any]:
        """Return the broker's status snapshot (workers, services, queues, counters)."""
        timeout = check_seconds(timeout, "status's timeout")
        if self._done.is_set() or self._runner is None:
            raise ClosedError("broker is not running")
        if self._runner is threading.current_thread():
            raise ZmqdistError("status() waits for the broker's loop: call it from another thread")
        fut: Future[dict[str, Any]] = Future()
        self._mailbox.post(("status", fut))
        return fut.result(timeout)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the loop -------------------------------------------------------------------------------

    def _start_metrics(self) -> None:
        port, addr = self.settings.metrics_port, self.settings.metrics_addr
        if port is None or self._metrics_server is not None:
            return
        from zmqdist.metrics import serve_metrics  # prometheus_client only when asked for

        try:
            self._metrics_server, self.metrics_port = serve_metrics(self.status, port, addr)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
        log.info("broker %s: metrics on http://%s:%d/metrics", self.settings.name, addr, self.metrics_port)

    def _open(self) -> zmq.Socket[Any]:
        """Bind the ROUTER (and the pair link's); on failure close what was opened and raise."""
        s = self.settings
        if self._ring is not None:
            zap_register(self._ctx, self._zap_domain, self._ring)  # before the first handshake
        try:
            # libzmq drops a message over its limit with the connection and says nothing: up to twice the
            # advertised limit the broker reads it itself, to answer and log it (core.oversized)
            hard = 2 * s.max_message_size
            keepalive = s.tcp_keepalive_s
            sock, self.endpoints = bind_router(self._ctx, self._bind, hard, self._secret, self._zap_domain, keepalive)
            if self._ha_bind:
                try:
                    # a REPLICATE holds one request at least (Pair._replicates), which takes twice the limit
                    self._pair_in, self.ha_endpoints = bind_router(
                        self._ctx, self._ha_bind, hard, self._secret, self._zap_domain, keepalive
                    )
                except BaseException:
                    sock.close(0)
                    raise
            self._ipc = [
                (on, ep, ep[len("ipc://") :])
                for on, eps in ((sock, self.endpoints), (self._pair_in, self.ha_endpoints))
                if on is not None
                for ep in eps
                if ep.startswith("ipc://") and not ep.startswith(("ipc://@", "ipc://*"))
            ]
            try:
                self._start_metrics()  # its scrapes wait for this loop, through the mailbox
            except BaseException:
                sock.close(0)
                self._close_pair()
                raise
        except BaseException:
            if self._ring is not None:
                zap_unregister(self._ctx, self._zap_domain)
            raise
        return sock

    def _main(self) -> None:
        try:
            sock = self._open()
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            self._done.set()
            return
        self._port = port(sock)
        clock = self._clock
        core = make_broker(
            self.settings, self.incarnation, clock.now(), rng=random.random, epoch_floor=int(time.time() * 1000)
        )
        if self.settings.metrics_port is not None:
            core.enable_histograms()
        # CPU of this loop thread alone (libzmq's I/O threads excluded), for benchmarks and operators
        # (and which implementation of the per-request path runs: compiled or pure Python)
        core.add_status_part(
            lambda now: {
                "loop_cpu_s": thread_cpu_time(),
                "mdp": dict(core.mdp.counters),
                "build": _native.STATE,
                "remembered": core.remembered(),
                "fds": self._fds(),
            }
        )
        loop = self._loop = Loop(clock, self._mailbox)
        # The pair link is watched first: a wake-up that finds the peer's HANDOVER and a peer's HELLO
        # (sent on the peer's BYE) applies the HANDOVER first, or the HELLO would meet a passive
        # broker that sends it back to the broker leaving, and it would return only after a ttl.
        pair_in = self._pair_in
        if pair_in is not None:
            self._pair_out = DealerLink(
                self._ctx, b"P" + secrets.token_bytes(8), log, self._peer_keys, keep=False, immediate=True
            )
            assert self._peer is not None
            pair_out = self._pair_out
            pair_out.connect(self._peer)
            loop.watch(lambda: pair_in, lambda now: self._drain_pair(pair_in, core))
            loop.watch(lambda: pair_out.sock, lambda now: self._read_pair_out(pair_out, core, now))
        loop.watch(lambda: sock, lambda now: self._drain(core, now))
        if self._ring is not None:
            # Peers that fail the CURVE handshake (plaintext, wrong server key) never reach ZAP:
            # the socket's monitor is how they are seen and logged. Not NO_DETAIL: that is a peer
            # that closed or reset its connection mid-handshake (a client moving on at a failover,
            # a port scan), nothing a key or an option would change.
            failed = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            monitor = self._monitor = sock.get_monitor_socket(failed)
            loop.watch(lambda: monitor, lambda now: self._handshake_failures(core, monitor, now))
        up = None
        if self.settings.upstream:
            up = self._up = DealerLink(self._ctx, b"B" + secrets.token_bytes(8), log, self._up_keys)
            loop.watch(lambda: up.sock, lambda now: self._read_upstream(up, core, now))
        log.info("broker %s (%s) serving on %s", self.settings.name, self.incarnation, ", ".join(self.endpoints))
        self._warn_if_exposed()
        self._ready.set()
        try:
            self._send(core, core.start(clock.now()), clock.now())
            loop.run(
                tick=lambda now: self._tick(core, now),
                mail=lambda items, now: self._commands(core, items, now),
                stuck=up.stuck if up is not None else None,
                after=(lambda now: self._send(core, core.flush(now), now)) if pair_in is not None else None,
                paused=lambda seconds, now: self._paused(core, seconds, now),
            )
        except Exception:
            log.exception("broker %s loop failed", self.settings.name)
            raise
        finally:
            try:
                last = core.shutdown()
                self._send(core, last, clock.now())
                if last:
                    time.sleep(STOP_GRACE_S)  # the peers read them and leave (see STOP_GRACE_S)
            finally:
                if self._port is not None:
                    self._port.detach()
                if self._monitor is not None:
                    sock.disable_monitor()
                    self._monitor.close(0)
                sock.close(100)
                if self._ring is not None:
                    zap_unregister(self._ctx, self._zap_domain)
                if up is not None:
                    up.close()
                self._close_pair()
                self._mailbox.close()
                self._done.set()
                log.info("broker %s stopped", self.settings.name)

    def _warn_if_exposed(self) -> None:
        """A broker hands requests to code: beyond loopback without CURVE, say what is open."""
        if self.settings.key is not None:
            return
        for what, eps in (("serves", self._bind), ("takes its pair's state and tables on", self._ha_bind)):
            open_eps = [ep for ep in eps if exposed(ep)]
            if open_eps:
                log.warning(
                    "broker %s %s %s beyond loopback with no authentication: anyone who can reach it "
                    "can register workers, send them requests, or (on a pair link) hand it a table. "
                    "Bind 127.0.0.1, or turn CURVE on (--key with allow-lists: docs/security.md)",
                    self.settings.name,
                    what,
                    ", ".join(open_eps),
                )

    def _tick(self, core: BrokerMachine, now: float) -> float | None:
        out = core.tick(now)
        if out:
            self._send(core, out, now)
        if now >= self._fds_due:  # (the loop wakes at least once a second)
            self._check_fds(now)
        if now >= self._watch_due:
            self._watch_due = now + WATCH_S
            if self._ring is not None:
                zap_check(self._ctx)  # without it libzmq would admit any peer that knows the server key
            if self._ipc:
                self._check_ipc(now)
        return core.next_deadline()

    def _paused(self, core: BrokerMachine, seconds: float, now: float) -> None:
        """The loop found this broker did not run for ``seconds``: tell the machine (its peers'
        silence then is not counted against them) and say so, for an operator to see a host that
        stalls (a peer's failover would otherwise be the only sign)."""
        core.resumed(seconds, now)
        msg = (
            "broker %s did not run for %.2fs (stopped, a stalled host or VM, or starved of CPU): "
            "its peers' silence then is not counted against them"
        )
        self._ratelog.log(logging.WARNING, "paused", now, msg, self.settings.name, seconds)

    def _check_ipc(self, now: float) -> None:
        """Bind again an ipc endpoint whose file was removed (a cleaner of /tmp, a careless rm):
        the socket still listens on the unlinked file, where no new peer can reach it. A second
        listener on the path, not an unbind (which would drop the peers connected before)."""
        for sock, ep, path in self._ipc:
            if os.path.exists(path):
                continue
            try:
                with map_zmq_errors(f"cannot bind {ep} again"):
                    sock.bind(ep)
            except TransportError as exc:
                msg = "broker %s: the file of %s was removed, and %s: new peers cannot connect there"
                self._ipc_log.log(logging.ERROR, ep, now, msg, self.settings.name, ep, exc)
                continue
            log.warning(
                "broker %s: the file of %s was removed (a cleaner of /tmp?): bound it again, for new peers (those "
                "connected before were not affected). Keep ipc endpoints where no cleaner goes (/run/zmqdist/...)",
                self.settings.name,
                ep,
            )

    @staticmethod
    def _fds() -> dict[str, int] | None:
        """The file descriptors this process has open and may open (-1: no limit), for the status."""
        use = fds.usage()
        return None if use is None else {"open": use[0], "limit": use[1]}

    def _check_fds(self, now: float) -> None:
        """Warn when few file descriptors are left. At the limit the broker cannot accept a
        connection, and nothing else would say so: libzmq retries the accept at once (a core's
        CPU), tells only a socket monitor, and blocks its I/O thread on that monitor's queue when
        it is full (so no monitor is kept for it); the peers see no broker at all."""
        use = fds.usage()
        if use is None or use[1] <= 0:
            self._fds_due = now + FDS_IDLE_S
            return
        n, limit = use
        self._fds_due = now + (FDS_S if n < FDS_CHEAP or 2 * n >= limit else FDS_IDLE_S)
        name = self.settings.name
        if n >= FDS_WARN * limit:
            if self._fds_warned < 0 or now - self._fds_warned >= FDS_REPEAT_S:
                self._fds_warned = now
                held = f"all {limit}" if n >= limit else f"{n} of the {limit}"
                log.warning(
                    "broker %s has %s file descriptors it may open in use: at the limit it cannot accept "
                    "connections (peers beyond it see no broker, and libzmq retries at once, at a core's CPU, "
                    "until one frees). Raise the limit (ulimit -n, LimitNOFILE= in a systemd unit; `zmqdist "
                    "broker` raises its soft limit to the hard one at start) or spread the peers over more brokers",
                    name,
                    held,
                )
        elif self._fds_warned >= 0 and n < FDS_CLEAR * limit:
            self._fds_warned = -1.0
            log.info(
                "broker %s: %d of the %d file descriptors it may open in use, below %.0f%% again",
                name,
                n,
                limit,
                100 * FDS_CLEAR,
            )

    def _close_pair(self) -> None:
        if self._pair_out is not None:
            self._pair_out.close(linger_ms=200)  # a HANDOVER sent at stop must get out
        if self._pair_in is not None:
            self._pair_in.close(0)
            self._pair_in = None

    def _drain_pair(self, sock: zmq.Socket[Any], core: BrokerMachine) -> bool:
        """Read the peer's messages from the pair link (bounded batch) and feed them to the core."""
        secure = self._ring is not None
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(NB, copy=False)
            except zmq.Again:
                return False
            now = self._clock.now()
            last: Any = frames[-1]  # (Any: pyzmq 25, which install_requires accepts, types Frame.get for ints only)
            roles = prop(last, "X-Roles") if secure else None  # ("": no rights, refused)
            rest = [f.bytes for f in frames[1:]]
            head = rest[0][:4] if rest else b""
            if head in PAIR_HEADS:
                if pair_peer(roles):
                    # The connection our state answers go back on: the peer's, never a stray one's.
                    self._pair_back = frames[0].bytes
            elif head[:3] == p.PREFIX:  # a zmqdist peer, not a broker of this pair
                self._not_the_pair_link(sock, frames[0].bytes)
            out = core.receive_pair_frames(rest, now, roles)
            if out:
                self._send(core, out, now)
        return True

    def _not_the_pair_link(self, sock: zmq.Socket[Any], ident: bytes) -> None:
        """A client or worker that connected to ``--ha-bind`` by mistake: tell it where it is (it
        logs the broker's ERROR) instead of leaving it to time out in silence."""
        why = (
            f"this is the pair link of broker {self.settings.name} (its --ha-bind), for the other broker of its "
            "pair only: clients and workers connect to the broker's --bind endpoints"
        )
        head, payload = self._enc.encode(p.Error(p.E_COMMAND, why))
        try:
            sock.send_multipart([ident, head, payload], NB)
        except zmq.ZMQError:
            pass  # gone already

    def _read_pair_out(self, link: DealerLink, core: BrokerMachine, now: float) -> bool:
        """What the peer answered on our own connection to it (a PairState sent back)."""
        out: list[Out] = []
        for msg in link.recv_batch(now):
            out += core.pair_receive(msg, now)
        if out:
            self._send(core, out, now)
        return link.more

    def _read_upstream(self, up: DealerLink, core: BrokerMachine, now: float) -> bool:
        out: list[Out] = []
        for msg in up.recv_batch(now):
            out += core.upstream_receive(msg, now)
        if out:
            self._send(core, out, now)
        return up.more

    def _handshake_failures(self, core: BrokerMachine, monitor: zmq.Socket[Any], now: float) -> bool:
        while monitor.poll(0):
            ev = recv_monitor_message(monitor)
            endpoint = ev["endpoint"].decode(errors="replace") if isinstance(ev["endpoint"], bytes) else ev["endpoint"]
            value = int(ev["value"])
            if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = f"its key was refused (ZAP status {value}: the refusal above names the key)"
            else:
                why = HANDSHAKE_FAILURES.get(value) or f"protocol error {value:#x}"
            self._send(core, core.handshake_failed(str(endpoint), why), now)
        return False

    def _commands(self, core: BrokerMachine, items: list[Any], now: float) -> None:
        for cmd in items:
            if cmd[0] == "stop":
                assert self._loop is not None
                self._loop.stop()
            elif cmd[0] == "status":
                cmd[1].set_result(core.status(now))

    def _drain(self, core: BrokerMachine, now: float) -> bool:
        """Read up to BATCH messages; return True if more are waiting. The hot path.

        Each message is read whole, in one call (transport.wire). Outputs are sent every FLUSH
        messages rather than per message: one loop over many sends.
        """
        # core.receive_frames is called by name, not through a local alias: compiled (mypyc), a
        # direct call is native, an alias goes through Python's call.
        port = self._port
        assert port is not None
        pending: list[Out] = []
        # the rights the ZAP handler gave the connection: it sets both on every CURVE peer
        props = RIGHTS if self._ring is not None else None
        rights: tuple[str, str] | None = None
        more = True
        for i in range(BATCH):
            got = port.recv(MAX_READ, props)  # None when none waits: no exception, no poll first
            if got is None:
                more = False
                break
            if props is None:
                frames = got
            else:
                frames, values = got
                rights = (values[0], values[1])
            ident = frames[0]
            hb = frames[1]
            n = len(frames)
            if starts_mdp(hb):
                core.receive_mdp(ident, frames[1:], now, pending, rights)
            elif n != 3:
                why = "message has 1 frame, expected 2" if n == 2 else "message has more than 2 frames"
                core.bad_input(ident, RemoteProtocolError(why, p.E_FRAMES), b"", pending)
            elif len(frames[2]) > self._max_payload:
                core.oversized(ident, hb, len(frames[2]), now, pending, rights)
            else:
                core.receive_frames(ident, hb, frames[2], now, pending, rights)
            # The first message of a wake-up goes out before looking for more: alone (the
            # synchronous case) it must not wait for that check; in a batch it is one more send call.
            if (i == 0 or i % FLUSH == FLUSH - 1) and pending:
                self._send(core, pending, now)
                pending = []
        if pending:
            self._send(core, pending, now)
        return more

    def _send(self, core: BrokerMachine, out: list[Out], now: float) -> None:
        """Send what the machine produced: to peers that read BATCH frames, what is there for
        each as one message (natural batching: nothing waits for more); the rest one by one."""
        debug = self._debug.at(now)
        work = out
        if core.batching and len(out) > 1:
            batches, work = core.group(out)
            for ident, msgs in batches:
                work += self._send_batch(core, ident, msgs, now, debug)
        up = self._up
        if up is None:
            self._send_each(core, work, now, debug)
            return
        with up.corked():  # what goes upstream in this step goes together (a batch, if it reads them)
            self._send_each(core, work, now, debug)

    def _send_each(self, core: BrokerMachine, work: list[Out], now: float, debug: bool) -> None:
        port = self._port
        assert port is not None
        enc = self._enc  # enc.encode(...): a native call when compiled (see _drain)
        mdp = core.mdp.peers
        while work:
            failed: list[Out] = []
            for peer, msg in work:
                if isinstance(peer, Channel):
                    self._to_channel(peer, msg, now)
                    continue
                # What goes to a peer is a protocol message (Connect and Problem go to channels): the
                # three ignores below spare this path a per-message type check.
                if debug:
                    self._trace(peer, msg)
                if mdp and peer in mdp:
                    failed += self._send_mdp(core, peer, msg, now)  # type: ignore[arg-type]
                    continue
                head, payload = enc.encode(msg)  # type: ignore[arg-type]
                rc = port.send(peer, head, payload)
                if rc:  # EHOSTUNREACH (peer gone) or EAGAIN (its queue is full): never block the loop
                    farewell = type(msg) is p.Bye or type(msg) is p.Reconnect
                    self._unsent(zmq.ZMQError(rc), now, type(msg).__name__, peer, farewell)
                    failed += core.send_failed(peer, msg, now)  # type: ignore[arg-type]
            work = failed

    def _unsent(self, exc: zmq.ZMQError, now: float, what: str, peer: bytes, farewell: bool = False) -> None:
        """Log a send the socket refused. A peer that is gone (it left, died or moved on: routine
        at every failover, and counted as a send_failed drop) at INFO, a goodbye to it at DEBUG; a
        full queue (a peer that does not read) at WARNING. All rate-limited."""
        who, why = peer.hex(), exc.strerror
        if farewell:
            log.debug("%s to %s not sent: %s", what, who, why)
        elif exc.errno == zmq.EHOSTUNREACH:
            self._ratelog.log(logging.INFO, "send-gone", now, "cannot send %s to %s: %s", what, who, why)
        else:
            self._ratelog.warning("send", now, "cannot send %s to %s: %s", what, who, why)

    def _send_batch(
        self, core: BrokerMachine, peer: bytes, msgs: list[p.Message], now: float, debug: bool
    ) -> list[Out]:
        """Send ``msgs`` to ``peer`` as BATCH frames (cut by :func:`protocol.batch_spans`); return
        what the machine does about those that could not go (as for single messages)."""
        port = self._port
        assert port is not None
        enc = self._enc  # enc.encode(...): a native call, its two frames not made a tuple (see _drain)
        failed: list[Out] = []
        frames: list[bytes] = []
        for msg in msgs:
            if debug:
                self._trace(peer, msg)
            head, payload = enc.encode(msg)
            frames.append(head)
            frames.append(payload)
        for a, b in p.batch_spans(frames):
            if b - a == 1:
                rc = port.send(peer, frames[2 * a], frames[2 * a + 1])
            else:
                rc = port.send(peer, p.BATCH_HEAD, p.pack_batch(frames[2 * a : 2 * b]))
            if rc:
                self._unsent(zmq.ZMQError(rc), now, f"{b - a} messages", peer)
                for m in msgs[a:b]:
                    failed += core.send_failed(peer, m, now)
        return failed

    def _to_channel(self, dest: Channel, msg: p.Message | Connect | Problem, now: float) -> None:
        """Send or log what the machine addressed to a channel (upstream, pair link, log)."""
        name = self.settings.name
        match msg:
            case Problem():
                if dest is LOG and msg.key:
                    self._ratelog.warning(msg.key, now, "broker %s: %s", name, msg.message)
                elif dest is UPSTREAM:
                    self._ratelog.warning("upstream", now, "broker %s: %s", name, msg.message)
                else:
                    log.warning("broker %s: %s", name, msg.message)  # role changes and resyncs
            case Connect():
                if dest is UPSTREAM and self._up is not None:
                    log.info("broker %s: connecting upstream to %s (%s)", name, msg.endpoint, msg.reason)
                    self._up.connect(msg.endpoint)
                elif dest is PAIR and self._pair_out is not None:  # a silent peer: a new connection
                    level = logging.DEBUG
                    if now - self._redial_logged >= 60:  # at INFO once a minute
                        level, self._redial_logged = logging.INFO, now
                    log.log(level, "broker %s: connecting anew to its peer at %s (%s)", name, msg.endpoint, msg.reason)
                    self._pair_out.connect(msg.endpoint)
            case _:
                link = self._up if dest is UPSTREAM else self._pair_out if dest is PAIR else None
                if link is not None:
                    if dest is UPSTREAM and type(msg) is p.Request and self._debug.at(now):
                        log.debug(
                            "broker %s: %s forwarded upstream (trace %s)",
                            name,
                            msg.service,
                            msg.trace,
                            extra={"trace": msg.trace},
                        )
                    link.send(msg)
                if dest is PAIR and type(msg) is p.PairState:
                    self._pair_answer(msg)

    def _pair_answer(self, msg: p.PairState) -> None:
        """Send our state back on the connection the peer made to us (see the module docstring);
        duplicates of a PairState are harmless. Nothing is kept if the peer is not there."""
        back, sock = self._pair_back, self._pair_in
        if back is None or sock is None:
            return
        head, payload = self._enc.encode(msg)
        try:
            sock.send_multipart([back, head, payload], NB)
        except zmq.ZMQError:
            pass  # the peer's connection is gone (EHOSTUNREACH): our own link will reach it

    def _trace(self, peer: bytes, msg: Any) -> None:
        if type(msg) is p.Task:
            log.debug(
                "broker %s: %s to %s (trace %s)",
                self.settings.name,
                msg.service,
                peer.hex(),
                msg.trace,
                extra={"trace": msg.trace, "worker": peer.hex()},
            )

    def _send_mdp(self, core: BrokerMachine, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        messages, more = core.mdp_outbound(peer, msg, now)
        port = self._port
        assert port is not None
        for frames in messages:
            rc = port.send(peer, *frames)
            if rc:
                self._unsent(zmq.ZMQError(rc), now, f"MDP {type(msg).__name__}", peer)
                return core.send_failed(peer, msg, now)
        return more
