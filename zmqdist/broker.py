"""The broker runtime: one thread owns the ROUTER socket and drives :class:`BrokerCore`.

The loop: wait for the socket, the mailbox or the core's next deadline; drain up to a batch of
messages with plain ``recv``; feed the core; send what it returns with NOBLOCK; tick. A send that
fails (peer gone: EHOSTUNREACH with ROUTER_MANDATORY; its queue full: EAGAIN) is reported to the
core, which requeues a task that did not leave. Nothing here decides where a request goes.

Majordomo (MDP 0.1/0.2) peers share the ROUTER: their messages start with an empty frame or an MDP
header, and :class:`~zmqdist.core.mdp.MdpBridge` translates them (docs/mdp.md).

A proxy (``upstream`` set) also owns a DEALER to its upstream broker, in the same thread: the core
addresses it as peer ``UPSTREAM`` and asks for (re)connections with ``Connect``.

A broker of a backup pair (``ha`` set) owns the pair link too, in the same thread: a ROUTER bound
at ``ha_bind`` that receives the peer's messages and a DEALER connected to the peer's, on which
the core's messages to ``PAIR`` go (never kept for later: the pair protocol resends state).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from concurrent.futures import Future
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zmqdist import _native
from zmqdist import protocol as p
from zmqdist.clock import Clock, MonotonicClock, thread_cpu_time
from zmqdist.config import BrokerSettings, HeartbeatSettings, check_endpoints
from zmqdist.core.broker import UPSTREAM, BrokerCore, Out
from zmqdist.core.link import Connect, Problem
from zmqdist.core.mdp import MAX_FRAMES, MdpBridge
from zmqdist.core.rights import refusal
from zmqdist.errors import ClosedError, ConfigError, RemoteProtocolError, ZmqdistError
from zmqdist.transport import DealerLink, Mailbox, RateLimitedLog, bind_router, poll_timeout_ms
from zmqdist.transport.security import ClientKeys, KeyRing, load_secret, zap_register, zap_reload, zap_unregister
from zmqdist.transport.sockets import EVENTS, NB, POLLIN, SNDMORE_NB, fast_send

log = logging.getLogger(__name__)

BATCH = 2000
FLUSH = 64
# After its last messages (BYE to every peer, a pair's HANDOVER) a stopping broker keeps its sockets
# open this long: closed at once, a connection loses what was just sent to it about half the time
# (measured: 5 of 10 BYEs arrived when closed at once, even with a linger; 10 of 10 after 0.3 s).
STOP_GRACE_S = 0.3
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


class Broker:
    """A broker embeddable in any process: ``Broker(bind=[...]).start()`` ... ``.stop()``.

    Every option matches a ``zmqdist broker`` flag (``--help`` explains each). In short: ``name``
    is the hop id in tiers (unique in a topology; default HOST-PID-RANDOM); ``upstream`` makes a
    proxy (endpoints in failover order); ``mdp_*`` are the Majordomo peers' settings; ``key`` (our
    secret certificate) with ``allow_clients``/``allow_workers``/``allow_brokers`` (directories of
    public certificates) turn CURVE on, and ``upstream_server_key`` secures a proxy's upstream link.
    ``ha`` ("primary" or "backup") makes one broker of a backup pair: ``ha_bind`` is where the
    peer's pair link connects, ``peer`` the peer's ``ha_bind``, ``failback`` "manual" or "auto",
    and ``peer_server_key`` the peer's public certificate when CURVE is on (docs/ha.md).
    """

    def __init__(
        self,
        bind: list[str] | tuple[str, ...] | str,
        *,
        name: str | None = None,
        upstream: list[str] | tuple[str, ...] | str = (),
        heartbeat_s: float = 0.25,
        liveness: int = 4,
        max_queue: int = 10_000,
        max_queue_bytes: int = 256 * 1024 * 1024,
        max_attempts: int = 3,
        max_client_inflight: int = 2500,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
        mdp_heartbeat_s: float = 2.5,
        mdp_liveness: int = 3,
        mdp_timeout_s: float = 60.0,
        key: str | None = None,
        allow_clients: str | None = None,
        allow_workers: str | None = None,
        allow_brokers: str | None = None,
        upstream_server_key: str | None = None,
        ha: str | None = None,
        peer: str | None = None,
        ha_bind: list[str] | tuple[str, ...] | str = (),
        failback: str = "manual",
        peer_server_key: str | None = None,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        clock: Clock | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.settings = BrokerSettings(
            # Names are hop ids in tiers: the default is unique per process.
            name=name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}",
            upstream=check_endpoints(upstream, "broker upstream") if upstream else (),
            heartbeat=HeartbeatSettings(heartbeat_s, liveness),
            max_queue=max_queue,
            max_queue_bytes=max_queue_bytes,
            max_attempts=max_attempts,
            max_client_inflight=max_client_inflight,
            ha=ha or "",
            failback=failback,
        )
        self._bind = check_endpoints(bind, "broker bind")
        if ha:
            if not peer or not ha_bind:
                raise ConfigError(f"a {ha} broker of a pair needs both peer (the other's ha_bind) and ha_bind")
            self._peer: str | None = check_endpoints(peer, "broker peer")[0]
            self._ha_bind = check_endpoints(ha_bind, "broker ha_bind")
        elif peer or ha_bind:
            raise ConfigError("peer and ha_bind are for a broker of a pair: set ha to 'primary' or 'backup'")
        else:
            self._peer, self._ha_bind = None, ()
        # MDP workers heartbeat at their own pace (the RFCs suggest 2.5 s, liveness 3 to 5).
        mdp_hb = HeartbeatSettings(mdp_heartbeat_s, mdp_liveness)
        if not 0 < mdp_timeout_s <= p.MAX_BUDGET_MS / 1000:
            raise ConfigError(f"mdp_timeout_s must be positive and at most 7 days, got {mdp_timeout_s!r}")
        self._mdp_ttl = mdp_hb.ttl_s
        self._mdp = MdpBridge(mdp_timeout_s, round(mdp_hb.heartbeat_s * 1000))
        # CURVE: with a secret key every link this broker owns is encrypted and every peer's key
        # must be in an allow-list (docs/security.md).
        self._secret: bytes | None = None
        self._ring: KeyRing | None = None
        if key is not None:
            _, self._secret = load_secret(key)
            self._ring = KeyRing({"clients": allow_clients, "workers": allow_workers, "brokers": allow_brokers})
        elif allow_clients or allow_workers or allow_brokers:
            raise ConfigError("allow-lists need the broker's own secret key (key=... / --key)")
        self._up_keys = ClientKeys.load(upstream_server_key, key if upstream_server_key else None, "broker upstream")
        if ha and key is not None and peer_server_key is None:
            raise ConfigError("with CURVE on, a broker of a pair needs peer_server_key (the peer's public certificate)")
        self._peer_keys = ClientKeys.load(peer_server_key, key if peer_server_key else None, "broker peer")
        self._zap_domain = f"zmqdist-{secrets.token_hex(8)}"
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be from 0 to 65535, got {metrics_port!r}")
        self._metrics_at = (metrics_port, metrics_addr)
        self._metrics_server: Any = None
        self.metrics_port: int | None = None  # the bound port once started
        self._max_message = max_message_size
        self._clock = clock or MonotonicClock()
        self._ctx = context or zmq.Context.instance()
        self._mailbox = Mailbox()
        self._runner: threading.Thread | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._startup_error: BaseException | None = None
        self.endpoints: list[str] = []
        self.incarnation = secrets.token_hex(8)
        self._ratelog = RateLimitedLog(log)
        self._enc = p.Encoder()  # used by the loop thread only
        self._fsend: Any = None  # backend send of the ROUTER, set by the loop thread
        self._up: DealerLink | None = None  # a proxy's link to its upstream, owned by the loop thread
        self._pair_in: zmq.Socket[Any] | None = None  # the pair link: the peer's messages come here
        self._pair_out: DealerLink | None = None  # ... and ours go out here
        self.ha_endpoints: list[str] = []
        self._poller: zmq.Poller | None = None
        self._monitor: zmq.Socket[Any] | None = None  # handshake failures of a secured ROUTER

    # --- public ---------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Broker:
        """Run the broker in a background thread; return once it is bound (or raise why not)."""
        if self._runner is not None:
            raise ZmqdistError("broker already started")
        self._runner = threading.Thread(target=self._main, name=f"zmqdist-broker-{self.settings.name}", daemon=True)
        self._runner.start()
        if not self._ready.wait(timeout):
            raise ZmqdistError(f"broker did not start within {timeout}s")
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def _start_metrics(self) -> None:
        port, addr = self._metrics_at
        if port is None or self._metrics_server is not None:
            return
        from zmqdist.metrics import serve_metrics  # prometheus_client only when asked for

        try:
            self._metrics_server, self.metrics_port = serve_metrics(self, port, addr)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
        log.info("broker %s: metrics on http://%s:%d/metrics", self.settings.name, addr, self.metrics_port)

    def run(self) -> None:
        """Run the broker in this thread until :meth:`stop` is called (e.g. from a signal handler)."""
        if self._runner is not None:
            raise ZmqdistError("broker already started")
        self._runner = threading.current_thread()
        self._main()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: tell workers BYE, close the socket, end the thread. Safe to call twice."""
        self._mailbox.post(("stop",))
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        t = self._runner
        if t is not None and t is not threading.current_thread() and t.is_alive():
            t.join(timeout)

    def request_stop(self) -> None:
        """Ask the loop to stop, without waiting (safe in a signal handler)."""
        self._mailbox.post(("stop",))

    def reload_allow_lists(self) -> None:
        """Re-read the allow-lists (SIGHUP): connected peers stay, a removed key is refused from its
        next connection. Safe to call from a signal handler."""
        if self._ring is not None:
            zap_reload(self._ctx, self._zap_domain)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """Return the broker's status snapshot (workers, services, queues, counters)."""
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

    def _main(self) -> None:
        try:
            if self._ring is not None:
                zap_register(self._ctx, self._zap_domain, self._ring)  # before the first handshake
            sock, self.endpoints = bind_router(self._ctx, self._bind, self._max_message, self._secret, self._zap_domain)
            if self._ha_bind:
                try:
                    self._pair_in, self.ha_endpoints = bind_router(
                        self._ctx, self._ha_bind, self._max_message, self._secret, self._zap_domain
                    )
                except BaseException:
                    sock.close(0)
                    raise
        except BaseException as exc:
            if self._ring is not None:
                zap_unregister(self._ctx, self._zap_domain)
            self._startup_error = exc
            self._ready.set()
            self._done.set()
            return
        self._fsend = fast_send(sock)
        clock = self._clock
        core = BrokerCore(
            self.settings, self.incarnation, clock.now(), rng=random.random, epoch_floor=int(time.time() * 1000)
        )
        if self._metrics_at[0] is not None:
            core.enable_histograms()
        if self._ring is not None:
            # Peers that fail the CURVE handshake (plaintext, wrong server key) never reach ZAP:
            # the socket's monitor is how they are seen and logged.
            failed = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            self._monitor = sock.get_monitor_socket(failed | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        if self.settings.upstream:
            self._up = DealerLink(self._ctx, b"B" + secrets.token_bytes(8), log, self._up_keys)
        if self._peer is not None:
            self._pair_out = DealerLink(self._ctx, b"P" + secrets.token_bytes(8), log, self._peer_keys, keep=False)
            self._pair_out.connect(self._peer)
        # CPU of this loop thread alone (libzmq's I/O threads excluded), for benchmarks and operators
        # (and which implementation of the per-request path runs: compiled or pure Python)
        core.status_hook = lambda: {
            "loop_cpu_s": thread_cpu_time(),
            "mdp": dict(self._mdp.counters),
            "build": _native.STATE,
        }
        log.info("broker %s (%s) serving on %s", self.settings.name, self.incarnation, ", ".join(self.endpoints))
        try:
            self._start_metrics()  # its scrapes wait for this loop, through the mailbox
        except ConfigError as exc:
            self._startup_error = exc
            sock.close(0)
            self._close_pair()
            if self._ring is not None:
                zap_unregister(self._ctx, self._zap_domain)
            self._ready.set()
            self._done.set()
            return
        self._ready.set()
        mailbox_fd = self._mailbox.fileno()
        up = self._up
        try:
            self._send(core, core.start(clock.now()), clock.now())
            backlog = False
            while True:
                now = clock.now()
                if not backlog:
                    # Timers only once every message that has arrived is read: a heartbeat waiting
                    # in the socket must not let a live worker expire after a long batch or a stall.
                    out = core.tick(now)
                    if out:
                        self._send(core, out, now)
                timeout = 0 if backlog else poll_timeout_ms(core.next_deadline(), now)
                if up is not None and not up.flush():
                    timeout = min(timeout, 20)  # retry what waits for the upstream connection
                if self._poller is None:
                    self._poller = self._make_poller(sock, mailbox_fd)
                events = dict(self._poller.poll(timeout))
                backlog = sock in events and self._drain(sock, core)
                if self._pair_in is not None:
                    if self._pair_in in events:
                        self._drain_pair(core)
                    out = core.flush(clock.now())  # replication of what this batch changed
                    if out:
                        self._send(core, out, clock.now())
                if up is not None and up.sock is not None and up.sock in events:
                    now = clock.now()
                    out = []
                    for msg in up.recv_batch(now):
                        out += core.receive(UPSTREAM, msg, now)
                    backlog = backlog or up.more
                    if out:
                        self._send(core, out, now)
                if self._monitor is not None and self._monitor in events:
                    self._handshake_failures(core, now)
                if mailbox_fd in events and self._commands(core):
                    break
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

    def _make_poller(self, sock: zmq.Socket[Any], mailbox_fd: int) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mailbox_fd, zmq.POLLIN)
        if self._up is not None and self._up.sock is not None:
            poller.register(self._up.sock, zmq.POLLIN)
        if self._pair_in is not None:
            poller.register(self._pair_in, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        return poller

    def _close_pair(self) -> None:
        if self._pair_out is not None:
            self._pair_out.close(linger_ms=200)  # a HANDOVER sent at stop must get out
        if self._pair_in is not None:
            self._pair_in.close(0)
            self._pair_in = None

    def _drain_pair(self, core: BrokerCore) -> None:
        """Read the peer's messages from the pair link (bounded batch) and feed them to the core."""
        sock = self._pair_in
        assert sock is not None
        secure = self._ring is not None
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(NB, copy=False)
            except zmq.Again:
                return
            now = self._clock.now()
            if len(frames) != 3:
                core.counters["bad_input"] += 1
                self._ratelog.warning("pair", now, "pair link: dropped a message of %d frames", len(frames))
                continue
            if secure and "brokers" not in str(frames[1].get("X-Roles")).split(","):
                core.counters["refused_by_role"] += 1
                self._ratelog.warning("pair", now, "pair link: refused a peer whose key is not an allowed broker")
                continue
            try:
                msg = p.decode(frames[1].bytes, frames[2].bytes)
            except RemoteProtocolError as exc:
                core.counters["bad_input"] += 1
                self._ratelog.warning("pair", now, "pair link: dropped a bad message: %s", exc)
                continue
            out = core.pair_receive(msg, now)
            if out:
                self._send(core, out, now)

    def _handshake_failures(self, core: BrokerCore, now: float) -> None:
        assert self._monitor is not None
        while self._monitor.poll(0):
            ev = recv_monitor_message(self._monitor)
            core.counters["handshakes_failed"] += 1
            self._ratelog.warning(
                "handshake",
                now,
                "broker %s: a peer failed the CURVE handshake on %s (%s: plaintext, or a wrong server key)",
                self.settings.name,
                ev["endpoint"].decode(errors="replace") if isinstance(ev["endpoint"], bytes) else ev["endpoint"],
                zmq.Event(ev["event"]).name,
            )

    def _commands(self, core: BrokerCore) -> bool:
        stop = False
        for cmd in self._mailbox.drain():
            if cmd[0] == "stop":
                stop = True
            elif cmd[0] == "status":
                cmd[1].set_result(core.status(self._clock.now()))
        return stop

    def _drain(self, sock: zmq.Socket[Any], core: BrokerCore) -> bool:
        """Read up to BATCH messages; return True if more are waiting. The hot path.

        Outputs are sent every FLUSH messages rather than per message: one loop over many sends.
        """
        now = self._clock.now()
        recv = sock.recv
        # core.receive_plain, core.receive and p.decode are called by name, not through local
        # aliases: compiled (mypyc), a direct call is native, an alias goes through Python's call.
        pending: list[Out] = []
        events = sock.get
        secure = self._ring is not None
        more = True
        for i in range(BATCH):
            # poll said readable, so message 0 is there; for the next few ask EVENTS (0.6 us)
            # rather than raise zmq.Again (2-3 us): one message per wake-up is the sync case.
            if 0 < i <= 4 and not int(events(EVENTS)) & POLLIN:
                more = False
                break
            try:
                ident = recv(NB)
            except zmq.Again:
                more = False
                break
            head = recv(0, copy=False)
            hb = head.bytes
            # the rights the ZAP handler gave this connection (it sets both on every CURVE peer)
            rights = (str(head.get("X-Roles")), str(head.get("X-Services"))) if secure else None
            if hb[:2] != b"ZD" and (not hb or hb[:3] == b"MDP"):  # Majordomo: a delimiter or its header
                pending += self._mdp_in(sock, core, ident, hb, head.more, now, rights)
                continue
            if not head.more:
                pending += core.bad_input(
                    ident, RemoteProtocolError("message has 1 frame, expected 2", p.E_FRAMES), b""
                )
                self._bad(ident, now, "a message of 1 frame")
                continue
            payload = recv(0, copy=False)
            if payload.more:
                while recv(0, copy=False).more:
                    pass
                pending += core.bad_input(ident, RemoteProtocolError("message has more than 2 frames", p.E_FRAMES), b"")
                self._bad(ident, now, "a message of more than 2 frames")
                continue
            pb = payload.bytes
            if rights is None and core.receive_plain(ident, hb, pb, now, pending):
                pass  # the common REQUEST or RESULT, handled straight from its frames
            else:
                try:
                    msg = p.decode(hb, pb)
                except RemoteProtocolError as exc:
                    pending += core.bad_input(ident, exc, hb)
                    self._bad(ident, now, str(exc))
                    continue
                if rights is not None and (why := refusal(rights[0], rights[1], msg)) is not None:
                    pending += self._refuse(core, ident, msg, why, now)
                    continue
                pending += core.receive(ident, msg, now)
            # The first message of a wake-up goes out before looking for more: alone (the
            # synchronous case) it must not wait for that check; in a batch it is one more send call.
            if (i == 0 or i % FLUSH == FLUSH - 1) and pending:
                self._send(core, pending, now)
                pending = []
        if pending:
            self._send(core, pending, now)
        return more

    def _refuse(self, core: BrokerCore, ident: bytes, msg: p.Message, why: str, now: float) -> list[Out]:
        """A secured peer sent what its key may not: count, log, answer with the reason."""
        core.counters["refused_by_role"] += 1
        self._ratelog.warning("rights", now, "refused %s from %s: %s", type(msg).__name__, ident.hex(), why)
        if type(msg) is p.Request:
            return [(ident, p.Reply(msg.rid, p.ST_INVALID, f"refused: {why}", b""))]
        return [(ident, p.Error(p.E_ROLE, f"refused: {why}"))]

    def _mdp_in(
        self,
        sock: zmq.Socket[Any],
        core: BrokerCore,
        ident: bytes,
        first: bytes,
        more: bool,
        now: float,
        rights: tuple[str, str] | None = None,
    ) -> list[Out]:
        """Read the rest of an MDP message (its first frame is read) and feed it to the core."""
        frames = [first]
        while more:
            f = sock.recv(0, copy=False)
            more = f.more
            if len(frames) <= MAX_FRAMES + 8:
                frames.append(f.bytes)
        out: list[Out] = []
        try:
            if len(frames) > MAX_FRAMES + 8:
                raise RemoteProtocolError(f"MDP: more than {MAX_FRAMES} frames", p.E_FRAMES)
            msgs = self._mdp.inbound(ident, frames)
        except RemoteProtocolError as exc:
            core.counters["bad_input"] += 1
            self._bad(ident, now, str(exc))
            if self._mdp.speaks_mdp(ident):  # a known MDP worker is told DISCONNECT
                out.append((ident, p.Error(exc.code or p.E_HEADER, str(exc))))
            return out
        for msg in msgs:
            if rights is not None and (why := refusal(rights[0], rights[1], msg)) is not None:
                out += self._refuse(core, ident, msg, why, now)
                continue
            out += core.receive(ident, msg, now)
            if type(msg) is p.Hello:
                core.set_ttl(ident, self._mdp_ttl)
        return out

    def _send(self, core: BrokerCore, out: list[Out], now: float) -> None:
        send = self._fsend
        enc = self._enc  # enc.encode(...): a native call when compiled (see _drain)
        mdp = self._mdp.peers
        debug = log.isEnabledFor(logging.DEBUG)  # per batch: traces are logged only at debug level
        work = out
        while work:
            failed: list[Out] = []
            for peer, msg in work:
                if debug:
                    self._trace(peer, msg)
                if len(peer) < 2:  # b"": the upstream link; PAIR (one byte): the pair link
                    if peer:
                        self._send_pair(msg)
                    else:
                        self._send_up(msg, now)
                    continue
                if mdp and peer in mdp:
                    failed += self._send_mdp(core, peer, msg, now)  # type: ignore[arg-type]
                    continue
                head, payload = enc.encode(msg)  # type: ignore[arg-type]
                try:
                    send(peer, SNDMORE_NB)
                except zmq.ZMQError as exc:
                    # EHOSTUNREACH (peer gone) or EAGAIN (its queue is full): never block the loop.
                    if type(msg) is p.Bye:  # to a peer that left already: nothing to tell it
                        log.debug("BYE to %s not sent: %s", peer.hex(), exc.strerror)
                    else:
                        self._ratelog.warning(
                            "send", now, "cannot send %s to %s: %s", type(msg).__name__, peer.hex(), exc.strerror
                        )
                    failed += core.send_failed(peer, msg, now)  # type: ignore[arg-type]
                    continue
                send(head, SNDMORE_NB)
                send(payload, NB)
            work = failed

    def _trace(self, peer: bytes, msg: Any) -> None:
        t = type(msg)
        if t is p.Task:
            log.debug(
                "broker %s: %s to %s (trace %s)", self.settings.name, msg.service, peer.hex() or "upstream", msg.trace
            )
        elif t is p.Request and not peer:
            log.debug("broker %s: %s forwarded upstream (trace %s)", self.settings.name, msg.service, msg.trace)

    def _send_mdp(self, core: BrokerCore, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        frames = self._mdp.outbound(peer, msg)
        if frames is None:
            return []
        send = self._fsend
        try:
            send(peer, SNDMORE_NB)
        except zmq.ZMQError as exc:
            self._ratelog.warning(
                "send", now, "cannot send MDP %s to %s: %s", type(msg).__name__, peer.hex(), exc.strerror
            )
            return core.send_failed(peer, msg, now)
        last = len(frames) - 1
        for i, f in enumerate(frames):
            send(f, NB if i == last else SNDMORE_NB)
        return []

    def _send_up(self, msg: p.Message | Connect | Problem, now: float) -> None:
        up = self._up
        if up is None:
            return
        if isinstance(msg, Connect):
            log.info("broker %s: connecting upstream to %s (%s)", self.settings.name, msg.endpoint, msg.reason)
            up.connect(msg.endpoint)
            self._poller = None  # the new socket must be polled
        elif isinstance(msg, Problem):
            self._ratelog.warning("upstream", now, "broker %s: %s", self.settings.name, msg.message)
        else:
            up.send(msg)

    def _send_pair(self, msg: p.Message | Connect | Problem) -> None:
        if isinstance(msg, Problem):
            log.warning("broker %s: %s", self.settings.name, msg.message)  # role changes and resyncs
        elif isinstance(msg, Connect):
            pass  # the pair link's endpoint is fixed
        elif self._pair_out is not None:
            self._pair_out.send(msg)

    def _bad(self, ident: bytes, now: float, what: str) -> None:
        self._ratelog.warning("bad-input", now, "bad message from %s: %s", ident.hex(), what)
