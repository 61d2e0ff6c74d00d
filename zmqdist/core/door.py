"""The door of a broker machine: what a runtime drives, and how raw frames come in. Sans-IO.

Rules of this module:
1. One door per machine. :meth:`BrokerMachine.receive_frames` takes a native message's two frames
   (fast path, else decode, else bad input; CURVE rights checked here), :meth:`~BrokerMachine.
   receive_mdp` a Majordomo message's frames, :meth:`~BrokerMachine.oversized` the head of one over
   the message limit. The runtime, the simulation, the bench and the fuzzers all come in through
   it. What to send is returned as :data:`~zmqdist.core.records.Out`: a typed destination (a peer's
   identity, or a channel) and a message.
2. What is behind the door is a machine's own: a broker alone
   (:class:`~zmqdist.core.broker.BrokerCore`) or a pair's broker
   (:class:`~zmqdist.core.failover.PairedBroker`) implement the rest of :class:`BrokerMachine`.
"""

from __future__ import annotations

from typing import Final

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core import batching
from zmqdist.core.link import Problem
from zmqdist.core.mdp import MAX_FRAMES, MdpBridge, starts_mdp
from zmqdist.core.records import LOG, NONE, Counters, Out
from zmqdist.core.rights import UNCHECKED, pair_peer, refusal
from zmqdist.core.services import StatusPart
from zmqdist.core.tiers import Upstream
from zmqdist.errors import RemoteProtocolError

__all__ = ["BrokerMachine", "Rights"]

Rights = tuple[str, str]  # (roles, services) a CURVE peer's key was admitted with


_RESULT_HEADS: Final = frozenset((p.HEAD_PREFIX[p.Result], p.HEAD_PREFIX[p.Part]))
# A native peer on a connection no ZAP handler checked is told BYE (it connects again, and is
# checked if the handler runs again by then), at most once this often: a peer connecting again
# while the handler is still down waits out its ttl before the next try, instead of spinning.
UNCHECKED_BYE_S: Final = 1.0
UNCHECKED_MAX: Final = 10_000  # peers remembered for that; a table this full starts afresh


class BrokerMachine:
    """What a runtime drives: a broker alone (:class:`BrokerCore`) or a pair's broker
    (:class:`~zmqdist.core.failover.PairedBroker`). The door for raw frames is written here, once."""

    def __init__(self, settings: BrokerSettings, counters: Counters) -> None:
        self.settings = settings
        self.counters = counters
        self.incarnation = ""
        # Majordomo peers share the ROUTER: the bridge translates their frames (docs/mdp.md).
        mdp_hb = max(1, round(settings.mdp_heartbeat_s * 1000))
        self.mdp = MdpBridge(settings.mdp_timeout_s, mdp_hb, max_bytes=settings.max_message_size)
        self._mdp_ttl = settings.mdp_heartbeat.ttl_s
        # Peers that said in HELLO that they read BATCH frames, with their limit: the runtime sends
        # each of them what is ready for it in one message (natural batching, docs/protocol.md).
        self.batching: dict[bytes, int] = {}
        self._batching_cap = 4 * settings.max_queue + 1024  # bound: a table this full starts afresh
        self._unchecked: dict[bytes, float] = {}  # peers told BYE for an unchecked connection: when

    # --- the door ---------------------------------------------------------------------------------

    def receive_frames(
        self, peer: bytes, head: bytes, payload: bytes, now: float, out: list[Out], rights: Rights | None = None
    ) -> bool:
        """Handle a native message from ``peer``: the per-request fast path when it applies, else
        decode and :meth:`receive`; bad input is counted, answered and logged. Appends to ``out``;
        returns True when the fast path took it (the simulation counts those)."""
        if rights is None and self.receive_plain(peer, head, payload, now, out):
            return True
        if p.command_of(head) == p.CMD_BATCH:
            self.receive_batch(peer, payload, now, out, rights)
            return False
        try:
            msg = p.decode(head, payload)
        except RemoteProtocolError as exc:
            self.bad_input(peer, exc, head, out)
            return False
        if rights is not None and (why := refusal(rights[0], rights[1], msg)) is not None:
            self._refuse(peer, msg, why, out, now)
            return False
        if type(msg) is p.Hello:
            self.note_batching(peer, msg.batch)
        out += self.receive(peer, msg, now)
        return False

    def receive_batch(
        self, peer: bytes, payload: bytes, now: float, out: list[Out], rights: Rights | None = None
    ) -> None:
        """Handle the messages of a BATCH from ``peer``, each through the door, in order. A BATCH
        that is not well formed is bad input as a whole (none of it is handled)."""
        try:
            frames = p.unpack_batch(payload)
        except RemoteProtocolError as exc:
            self.bad_input(peer, exc, p.BATCH_HEAD, out)
            return
        self.counters.batches_in += 1
        self.counters.batched_in += len(frames) // 2
        for i in range(0, len(frames), 2):
            self.receive_frames(peer, frames[i], frames[i + 1], now, out, rights)

    def group(self, out: list[Out]) -> tuple[list[tuple[bytes, list[p.Message]]], list[Out]]:
        """Split ``out`` into BATCHes for peers that read them and the rest (:func:`batching.group`)."""
        return batching.group(self.batching, out, self.counters)

    def note_batching(self, peer: bytes, limit: int) -> None:
        """``peer`` said in HELLO that it reads BATCH frames of up to ``limit`` messages (0: none)."""
        batching.note(self.batching, peer, limit, self._batching_cap)

    def receive_mdp(
        self, peer: bytes, frames: list[bytes], now: float, out: list[Out], rights: Rights | None = None
    ) -> None:
        """Handle a Majordomo message from ``peer`` (``frames`` after its identity; the runtime
        keeps at most ``MAX_FRAMES + 9`` of a longer one, which is refused here)."""
        try:
            if len(frames) > MAX_FRAMES + 8:
                raise RemoteProtocolError(f"MDP: more than {MAX_FRAMES} frames", p.E_FRAMES)
            msgs = self.mdp.inbound(peer, frames, self.holds)
        except RemoteProtocolError as exc:
            self.counters.bad_input += 1
            out.append((LOG, Problem(f"bad message from {peer.hex()}: {exc}", "bad-input")))
            if exc.rid is not None and self.mdp.is_client(peer):  # a request refused: answered
                self.counters.invalid += 1
                out.append((peer, p.Reply(exc.rid, p.ST_INVALID, str(exc), b"")))
            elif self.mdp.speaks_mdp(peer):  # a known MDP worker is told DISCONNECT
                out.append((peer, p.Error(exc.code or p.E_HEADER, str(exc))))
            return
        for msg in msgs:
            if rights is not None and (why := refusal(rights[0], rights[1], msg)) is not None:
                self._refuse(peer, msg, why, out, now, native=False)
                continue
            out += self.receive(peer, msg, now)
            if type(msg) is p.Hello:
                self.set_ttl(peer, self._mdp_ttl)  # MDP workers heartbeat at their own pace
                # nor do they carry a task from the other broker of a pair (a fixed routing id made
                # the old holder's identity theirs): what the table says they held runs again
                out += self.carries_nothing(peer, now)

    def receive_message(
        self, peer: bytes, frames: list[bytes], now: float, out: list[Out], rights: Rights | None = None
    ) -> None:
        """Handle a whole message of ``frames`` (after the identity): Majordomo, native, or bad.
        The simulation, the fuzzers and the bench come in here; the runtime reads a socket frame by
        frame and makes the same choice as it goes (``Broker._drain``)."""
        if not frames or starts_mdp(frames[0]):
            self.receive_mdp(peer, frames, now, out, rights)
        elif len(frames) != 2:
            n = len(frames)
            why = f"message has {n} frame{'s' if n > 1 else ''}, expected 2"
            self.bad_input(peer, RemoteProtocolError(why, p.E_FRAMES), b"", out)
        else:
            self.receive_frames(peer, frames[0], frames[1], now, out, rights)

    def mdp_outbound(self, peer: bytes, msg: p.Message, now: float) -> tuple[list[list[bytes]], list[Out]]:
        """The MDP messages carrying ``msg`` to MDP peer ``peer``, and what the machine does next:
        a part that goes to an MDP client is acknowledged for it (MDP clients do not)."""
        frames = self.mdp.outbound_many(peer, msg)
        if type(msg) is p.Part and self.mdp.is_client(peer):
            return frames, self.receive(peer, p.Ack(msg.id, msg.seq + 1), now)
        return frames, NONE

    def bad_input(self, peer: bytes, err: RemoteProtocolError, head: bytes, out: list[Out]) -> None:
        """Count a message that could not be read (bad frames, bad header); answer and log it."""
        self.counters.bad_input += 1
        out.append((LOG, Problem(f"bad message from {peer.hex()}: {err}", "bad-input")))
        if err.rid is not None and p.command_of(head) == p.CMD_REQUEST:
            self.counters.invalid += 1
            out.append((peer, p.Reply(err.rid, p.ST_INVALID, str(err), b"")))
        else:
            out.append((peer, p.Error(err.code or p.E_HEADER, str(err))))

    def oversized(
        self, peer: bytes, head: bytes, size: int, now: float, out: list[Out], rights: Rights | None = None
    ) -> None:
        """A native message over --max-message-size (the runtime read its head, not its payload).
        A request is answered INVALID by its rid (hops or not). A worker's RESULT, or a PART of its
        stream, ends the task as a ResultTooLarge failure (a PART's run is cancelled): a worker
        that does not check its results itself (an older one) left its caller waiting out the
        deadline. Anything else is bad input. Counted and logged."""
        limit = self.settings.max_message_size
        why = f"a message of {size} bytes is over this broker's limit of {limit} bytes (--max-message-size)"
        msg: p.Message | None = None
        if head[:4] in _RESULT_HEADS:
            try:
                msg = p.decode(head, b"")
            except RemoteProtocolError:
                msg = None
        if type(msg) is not p.Result and type(msg) is not p.Part:
            self.bad_input(peer, RemoteProtocolError(why, p.E_FRAMES, p.request_rid(head)), head, out)
            return
        self.counters.bad_input += 1
        out.append((LOG, Problem(f"bad message from {peer.hex()}: {why}", "bad-input")))
        if isinstance(msg, p.Result):
            ticket, parts, what = msg.ticket, msg.parts, "the result"
        elif isinstance(msg, p.Part):
            ticket, parts, what = msg.id, msg.seq, f"part {msg.seq + 1} of the stream"
        failed = p.too_large(ticket, f"{what} from its worker: {why}", parts)
        if rights is not None and (refused := refusal(rights[0], rights[1], failed)) is not None:
            self._refuse(peer, failed, refused, out, now)
            return
        if type(msg) is p.Part:
            out.append((peer, p.Cancel(ticket)))  # else its handler goes on yielding parts
        out += self.receive(peer, failed, now)

    def _refuse(self, peer: bytes, msg: p.Message, why: str, out: list[Out], now: float, native: bool = True) -> None:
        """A secured peer sent what its key may not: count, log, answer with the reason. A native
        peer whose connection no ZAP handler checked is told BYE instead, once a second: it
        connects again and says again what it sent, and loses nothing (a Majordomo peer, which
        has no BYE, is refused as any other)."""
        self.counters.refused_by_role += 1
        out.append((LOG, Problem(f"refused {type(msg).__name__} from {peer.hex()}: {why}", "rights")))
        if native and why == UNCHECKED:
            told = self._unchecked
            if now - told.get(peer, -UNCHECKED_BYE_S) >= UNCHECKED_BYE_S:
                if len(told) >= UNCHECKED_MAX:
                    told.clear()
                told[peer] = now
                out.append((peer, p.Bye(UNCHECKED)))
            return
        if type(msg) is p.Request:
            out.append((peer, p.Reply(msg.rid, p.ST_INVALID, f"refused: {why}", b"")))
        else:
            out.append((peer, p.Error(p.E_ROLE, f"refused: {why}")))

    def receive_pair_frames(self, frames: list[bytes], now: float, roles: str | None = None) -> list[Out]:
        """Handle a message on the pair link (``frames`` after the identity); ``roles`` of a CURVE
        peer (only an allowed broker may speak on it)."""
        if not pair_peer(roles):
            self.counters.refused_by_role += 1
            return [(LOG, Problem("pair link: refused a peer whose key is not an allowed broker", "pair"))]
        if len(frames) != 2:
            self.counters.bad_input += 1
            return [(LOG, Problem(f"pair link: dropped a message of {len(frames) + 1} frames", "pair"))]
        try:
            msg = p.decode(frames[0], frames[1])
        except RemoteProtocolError as exc:
            self.counters.bad_input += 1
            return [(LOG, Problem(f"pair link: dropped a bad message: {exc}", "pair"))]
        return self.pair_receive(msg, now)

    def handshake_failed(self, endpoint: str, why: str) -> list[Out]:
        """A peer failed the CURVE handshake (``why``: plaintext, a wrong server key, a refused
        key, as the runtime's socket monitor tells them apart): count and log it."""
        self.counters.handshakes_failed += 1
        return [(LOG, Problem(f"a peer failed the CURVE handshake on {endpoint}: {why}", f"handshake: {why}"))]

    # --- what each machine implements -----------------------------------------------------------

    def receive_plain(self, peer: bytes, head: bytes, payload: bytes, now: float, out: list[Out]) -> bool:
        """The per-request fast path: handle the message and return True, or change nothing."""
        raise NotImplementedError

    def receive(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        """Handle one decoded message from ROUTER peer ``peer``; return what to send."""
        raise NotImplementedError

    def upstream_receive(self, msg: p.Message, now: float) -> list[Out]:
        """Handle one message from the upstream link (a proxy's)."""
        raise NotImplementedError

    def pair_receive(self, msg: p.Message, now: float) -> list[Out]:
        """Handle one message from the other broker of the pair."""
        raise NotImplementedError

    def start(self, now: float) -> list[Out]:
        """What to send at start."""
        raise NotImplementedError

    def tick(self, now: float) -> list[Out]:
        """Run the timers due at ``now``."""
        raise NotImplementedError

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`tick` has something to do, or None."""
        raise NotImplementedError

    def flush(self, now: float) -> list[Out]:
        """Replication for the pair's passive broker, after a batch of input (none when alone)."""
        raise NotImplementedError

    def shutdown(self) -> list[Out]:
        """What to send when the broker stops (BYE to every peer, or a pair's handover)."""
        raise NotImplementedError

    def send_failed(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        """The transport could not send ``msg`` to ``peer`` (gone, or its queue full)."""
        raise NotImplementedError

    def set_ttl(self, peer: bytes, ttl_s: float) -> None:
        """Give member ``peer`` its own liveness ttl (MDP workers heartbeat at their own pace)."""
        raise NotImplementedError

    def status(self, now: float) -> dict[str, object]:
        """A snapshot for ``zmqdist status``."""
        raise NotImplementedError

    def add_status_part(self, part: StatusPart) -> None:
        """Add what ``part(now)`` returns to every status (the runtime's facts: CPU, build)."""
        raise NotImplementedError

    def enable_histograms(self) -> None:
        """Keep latency histograms (queue wait, service time, end to end): about 0.3 us a request."""
        raise NotImplementedError

    def worker_load(self) -> dict[bytes, tuple[int, int]]:
        """``{worker id: (in-flight, capacity)}`` for live workers (not downstream brokers)."""
        raise NotImplementedError

    def members(self) -> set[bytes]:
        """Identities of every live member: workers and downstream brokers."""
        raise NotImplementedError

    def remembered(self) -> dict[str, int]:
        """How many peers each table that outlives them holds (status; gone peers are forgotten
        every FORGET_EVERY_TTLS ttls): the clients heard, and the batch limits and Majordomo peers
        this door reads (a pair's machine shares them)."""
        return {"clients": self.clients_heard(), "batch_limits": len(self.batching), "mdp_peers": len(self.mdp.peers)}

    def clients_heard(self) -> int:
        """How many clients the machine keeps as heard (for a BYE at shutdown)."""
        raise NotImplementedError

    def carries_nothing(self, peer: bytes, now: float) -> list[Out]:
        """Member ``peer`` (a Majordomo worker) runs nothing the pair's table says it held when this
        broker took over: requeue that (no attempt spent)."""
        raise NotImplementedError

    def holds(self, peer: bytes, rid: int) -> bool:
        """True if request ``rid`` of caller ``peer`` is open here (one restored from a pair's
        table too): the Majordomo bridge numbers its clients' requests around those."""
        raise NotImplementedError

    def resumed(self, seconds: float, now: float) -> None:
        """The broker did not run for ``seconds`` until ``now`` (SIGSTOP, a stalled host): its
        peers' silence in that time proves nothing (core/lifecycle.py rule 4)."""
        raise NotImplementedError

    @property
    def standby(self) -> bool:
        """True for a broker of a pair that is not active (it refuses work)."""
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        """Our epoch as the active broker of a pair (0 if never active, or not paired)."""
        raise NotImplementedError

    @property
    def upstream(self) -> Upstream | None:
        """The upstream link's state (None unless this broker is a serving proxy)."""
        raise NotImplementedError

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        raise NotImplementedError

    @property
    def open_requests(self) -> int:
        """Requests accepted and not yet answered."""
        raise NotImplementedError
