"""Majordomo peers (RFC 7/MDP 0.1 and RFC 18/MDP 0.2) on a zmqdist broker endpoint. Sans-IO.

Rules of this module:
1. An MDP message is told from a native one by its first frame after the routing identity: ``ZD...``
   is zmqdist; an MDP header (``MDPC0x``/``MDPW0x``) or an empty frame (the REQ envelope delimiter
   MDP 0.1 peers, and some 0.2 libraries, put first) is Majordomo. Each peer is answered in its own
   dialect: with or without that empty frame, and with the client codes that match its REQUEST
   code (RFC 18: REQUEST 0x01, PARTIAL 0x02, FINAL 0x03; some libraries, majortomo among them,
   number client commands like worker ones: REQUEST 0x02, PARTIAL 0x03, FINAL 0x04).
2. The bridge turns MDP frames into the native messages :class:`~zmqdist.core.broker.BrokerCore`
   understands, and the core's messages to an MDP peer back into MDP frames. The core does not know
   which peers speak MDP: MDP workers are workers of capacity 1, MDP clients are clients.
3. Bodies. MDP bodies are frames; zmqdist payloads are msgpack values. One body frame travels as a
   msgpack bytes value, several as a list of bytes, so a native handler receives ``bytes`` (or a
   list of them) and an MDP peer receives the frames that were sent. A native value goes to an MDP
   peer as its frames when it is bytes, a string (UTF-8) or a list of those, else as one frame
   holding its msgpack encoding.
4. MDP has no error replies. A request that ends without a result (the handler raised, deadline,
   busy, lost, invalid) is answered with the body ``[b"zmqdist.error", STATUS, message]``. MDP has
   no redirect either: when the broker sends a client away (a passive broker of a pair, a broker
   stepping down or stopping), each request the client has open there ends so, with BUSY; and
   when a passive broker that held the client's request takes over, with BUSY "send it again".
5. Streams. An MDP 0.2 client's request asks for a stream (``MDP_WINDOW``): each part a handler
   yields reaches it as a PARTIAL, the last one as its FINAL (the bridge holds one part back to
   know which is last; a plain handler's value is a FINAL). MDP clients do not acknowledge: the
   broker acknowledges each part as it goes out (:meth:`~zmqdist.core.broker.BrokerMachine.
   mdp_outbound`), so a fast handler can fill the client's socket (its high-water mark bounds it).
   An MDP 0.2 worker's PARTIALs are parts of a stream when the request is one (its FINAL is the
   last part), else they are collected and delivered with its FINAL as one reply. MDP 0.1 clients
   get one reply. MDP has no cancel: an MDP worker runs a cancelled request to its end.
6. The broker's message limit (``--max-message-size``) holds for a body's total, as for a native
   payload: libzmq checks each frame alone, so several frames under it could carry any amount. A
   request over it is refused (INVALID); a reply over it, or PARTIALs collected past it, fail their
   request (``ResultTooLarge``) and the rest of that reply is dropped as it comes: the worker,
   not at fault for the broker's limit, keeps serving.
7. Numbers. MDP numbers nothing; the bridge numbers each client's requests from ``FIRST_RID``, a
   range native callers do not reach (they count from 1), around any number the core holds for
   that identity (a client forgotten with a request open). A request so numbered is an MDP
   client's wherever its copy goes: a pair's other broker does not take it over (the client
   cannot send it again by its number, so the copy would run for nobody, and its answer reach the
   client out of turn, or as native frames; it sends a new request after its own timeout).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from zmqdist import protocol as p
from zmqdist.errors import RemoteProtocolError

MDPC01: Final = b"MDPC01"
MDPC02: Final = b"MDPC02"
MDPW01: Final = b"MDPW01"
MDPW02: Final = b"MDPW02"

# Worker commands: MDP 0.1 and 0.2 number them differently after REQUEST.
READY: Final = b"\x01"
REQUEST: Final = b"\x02"
W1_REPLY: Final = b"\x03"
W1_HEARTBEAT: Final = b"\x04"
W1_DISCONNECT: Final = b"\x05"
W2_PARTIAL: Final = b"\x03"
W2_FINAL: Final = b"\x04"
W2_HEARTBEAT: Final = b"\x05"
W2_DISCONNECT: Final = b"\x06"
C2_REQUEST: Final = b"\x01"  # RFC 18
C2_PARTIAL: Final = b"\x02"
C2_FINAL: Final = b"\x03"
C2_REQUEST_ALT: Final = b"\x02"  # the worker numbering some libraries use for clients too
C2_PARTIAL_ALT: Final = b"\x03"
C2_FINAL_ALT: Final = b"\x04"
PARTIAL_FOR: Final = {C2_FINAL: C2_PARTIAL, C2_FINAL_ALT: C2_PARTIAL_ALT}  # a client dialect's PARTIAL
MDP_HEADERS: Final = frozenset((MDPC01, MDPC02, MDPW01, MDPW02))

ERROR_TAG: Final = b"zmqdist.error"
STATUS_NAMES: Final = {
    p.ST_FAILED: b"FAILED",
    p.ST_BUSY: b"BUSY",
    p.ST_TIMEOUT: b"TIMEOUT",
    p.ST_LOST: b"LOST",
    p.ST_INVALID: b"INVALID",
}
FIRST_RID: Final = 1 << 62  # MDP clients' requests are numbered from here (rule 7)
MAX_FRAMES: Final = 10_000  # body frames of one message, partial replies included
MDP_WINDOW: Final = 16  # parts of a stream to an MDP 0.2 client in flight (rule 5)
MAX_PEERS: Final = 100_000  # MDP peers remembered at once (clients are forgotten when idle)
# What the bridge counts (the broker status's "mdp"; zmqdist_mdp_messages_total in the metrics)
COUNTERS: Final = ("mdp_requests", "mdp_replies", "mdp_workers", "mdp_partials", "mdp_too_large")


def starts_mdp(first: bytes) -> bool:
    """Is ``first`` (the frame after the routing identity) the start of a Majordomo message: an
    empty delimiter or an MDP header? (A native head starts with ``ZD``.)"""
    return not first or first[:3] == b"MDP"


def pack_body(frames: list[bytes]) -> bytes:
    """Return the zmqdist payload for MDP body ``frames`` (rule 3)."""
    return p.pack_value(frames[0] if len(frames) == 1 else list(frames))


def _frame(v: Any) -> bytes | None:
    if type(v) is bytes:
        return v
    if type(v) is str:
        return v.encode()
    return None


def unpack_body(payload: bytes) -> list[bytes]:
    """Return the MDP body frames for a zmqdist payload (rule 3)."""
    try:
        v = p.unpack_value(payload)
    except ValueError:
        return [payload]
    f = _frame(v)
    if f is not None:
        return [f]
    if isinstance(v, list) and v:
        frames = [f for x in v if (f := _frame(x)) is not None]
        if len(frames) == len(v):
            return frames
    return [payload]


def error_body(status: int, message: str, payload: bytes) -> list[bytes]:
    """The body that tells an MDP client its request ended without a result (rule 4)."""
    if status == p.ST_FAILED:
        kind, text, _ = p.unpack_error(payload)
        message = f"{kind}: {text}"
    return [ERROR_TAG, STATUS_NAMES.get(status, b"ERROR"), message.encode()]


def ticket_frame(ticket: int) -> bytes:
    """The 'client address' frame of a REQUEST to an MDP worker: the broker's ticket."""
    return ticket.to_bytes(8, "big")


class _Client:
    __slots__ = ("delim", "final", "header", "held", "next_rid", "pending")

    def __init__(self, header: bytes) -> None:
        self.header = header
        self.delim = True  # answer with the empty frame first
        self.final = C2_FINAL
        self.next_rid = FIRST_RID
        self.pending: dict[int, bytes] = {}  # rid -> service name (the reply repeats it)
        self.held: dict[int, bytes] = {}  # rid -> the last part of its stream, not sent yet (rule 5)


class _Worker:
    __slots__ = ("delim", "dropping", "header", "partial", "partial_bytes", "partial_n", "service", "streams")

    def __init__(self, header: bytes, service: bytes, delim: bool) -> None:
        self.header = header
        self.delim = delim
        self.service = service
        self.partial: dict[int, list[bytes]] = {}  # ticket -> body frames of PARTIAL replies so far
        self.partial_n = 0
        self.partial_bytes: dict[int, int] = {}  # ticket -> bytes of its PARTIAL frames so far
        self.streams: dict[int, int] = {}  # ticket -> parts so far, for tasks that are streams
        self.dropping: set[int] = set()  # tickets failed over the limit: the rest of the reply is dropped


class MdpBridge:
    """Translates between MDP peers and the broker core (see the module rules).

    ``timeout_s`` is the budget given to MDP client requests (MDP carries none); ``max_bytes``
    the broker's message limit, held by a body's total (rule 6; 0: none).
    """

    def __init__(self, timeout_s: float, heartbeat_ms: int, max_peers: int = MAX_PEERS, max_bytes: int = 0) -> None:
        self.max_peers = max_peers
        self.max_bytes = max_bytes
        self.budget_ms = max(1, min(p.MAX_BUDGET_MS, round(timeout_s * 1000)))
        self.heartbeat_ms = heartbeat_ms
        self.peers: dict[bytes, _Client | _Worker] = {}
        self.counters = dict.fromkeys(COUNTERS, 0)

    # --- MDP -> native ----------------------------------------------------------------------------

    def inbound(
        self, ident: bytes, frames: list[bytes], taken: Callable[[bytes, int], bool] | None = None
    ) -> list[p.Message]:
        """Return the native messages for one MDP message (``frames`` after the identity, with or
        without the empty delimiter first). ``taken(ident, rid)``: whether the core holds that
        request already (a client's requests are numbered around those). Raises
        :class:`RemoteProtocolError` for a message that breaks the RFCs."""
        delim = bool(frames) and not frames[0]
        if delim:
            frames = frames[1:]
        if len(frames) < 2:
            raise RemoteProtocolError("MDP: a message needs a protocol header and a command", p.E_FRAMES)
        header = frames[0]
        if header == MDPC01:
            return [self._request(ident, header, delim, C2_FINAL, frames[1], frames[2:], taken)]
        if header == MDPC02:
            cmd = frames[1]
            if cmd not in (C2_REQUEST, C2_REQUEST_ALT) or len(frames) < 3:
                raise RemoteProtocolError("MDP/0.2: a client sends REQUEST, service, body", p.E_COMMAND)
            final = C2_FINAL if cmd == C2_REQUEST else C2_FINAL_ALT
            return [self._request(ident, header, delim, final, frames[2], frames[3:], taken)]
        if header in (MDPW01, MDPW02):
            return self._from_worker(ident, header, delim, frames[1], frames[2:])
        raise RemoteProtocolError(f"MDP: unknown protocol header {header[:16]!r}", p.E_VERSION)

    def _request(
        self,
        ident: bytes,
        header: bytes,
        delim: bool,
        final: bytes,
        service: bytes,
        body: list[bytes],
        taken: Callable[[bytes, int], bool] | None,
    ) -> p.Request:
        name = _service_name(service)
        if len(body) > MAX_FRAMES:
            raise RemoteProtocolError(f"MDP: more than {MAX_FRAMES} body frames", p.E_FRAMES)
        c = self.peers.get(ident)
        if not isinstance(c, _Client):
            self._make_room()
            c = self.peers[ident] = _Client(header)
        c.header = header
        c.delim = delim
        c.final = final
        rid = c.next_rid
        if taken is not None:
            # Numbered afresh for a client the bridge did not know (rule 7): a number the core
            # holds for it still (it was forgotten with a request open) would make this request
            # that one's duplicate, and that one's answer this one's.
            while taken(ident, rid):
                rid += 1
        c.next_rid = rid + 1
        c.pending[rid] = service
        self.counters["mdp_requests"] += 1
        window = MDP_WINDOW if header == MDPC02 else 0
        payload = pack_body(body)
        if self.max_bytes and len(payload) > self.max_bytes:  # answered INVALID by its rid (rule 6)
            raise RemoteProtocolError(f"MDP: a request body {self._over(len(payload))}", p.E_FRAMES, rid)
        return p.Request(rid, name, self.budget_ms, (), payload, "", "", window)

    def _from_worker(self, ident: bytes, header: bytes, delim: bool, cmd: bytes, rest: list[bytes]) -> list[p.Message]:
        v2 = header == MDPW02
        w = self.peers.get(ident)
        known = isinstance(w, _Worker)
        if cmd == READY:
            if len(rest) != 1:
                raise RemoteProtocolError("MDP: READY carries exactly one service name", p.E_FRAMES)
            name = _service_name(rest[0])
            self._make_room()
            self.peers[ident] = _Worker(header, rest[0], delim)
            self.counters["mdp_workers"] += 1
            return [p.Hello(p.ROLE_WORKER, f"mdp-{ident.hex()}", (name,), 1, self.heartbeat_ms)]
        if not known:
            # Anything but READY from a worker we do not know: the core answers RECONNECT, which
            # becomes DISCONNECT (the RFCs' rule); remember the header to say it in.
            self._make_room()
            self.peers[ident] = _Worker(header, b"", delim)
        if cmd == (W2_HEARTBEAT if v2 else W1_HEARTBEAT):
            return [p.Heartbeat(p.ROLE_WORKER, "", 0, ())]
        if cmd == (W2_DISCONNECT if v2 else W1_DISCONNECT):
            self.peers.pop(ident, None)
            return [p.Bye("MDP worker disconnected")]
        final = cmd == (W2_FINAL if v2 else W1_REPLY)
        if final or (v2 and cmd == W2_PARTIAL):
            if len(rest) < 2 or rest[1] or len(rest[0]) != 8:
                raise RemoteProtocolError(
                    "MDP: a reply needs the client address frame, an empty frame, body", p.E_FRAMES
                )
            ticket = int.from_bytes(rest[0], "big")
            body = rest[2:]
            wk = self.peers[ident]
            assert isinstance(wk, _Worker)
            if ticket in wk.dropping:  # failed over the limit: the rest of its reply goes nowhere
                if final:
                    wk.dropping.discard(ticket)
                return []
            seq = wk.streams.get(ticket)
            if seq is not None:  # a stream: each PARTIAL is a part, the FINAL the last one
                payload = pack_body(body)
                if self.max_bytes and len(payload) > self.max_bytes:
                    del wk.streams[ticket]
                    return [self._too_large(wk, ticket, final, f"part {seq + 1} of the stream", len(payload), seq)]
                part = p.Part(ticket, seq, payload)
                if not final:
                    self.counters["mdp_partials"] += 1
                    wk.streams[ticket] = seq + 1
                    return [part]
                del wk.streams[ticket]
                return [part, p.Result(ticket, p.RS_OK, p.pack_value(None), 0, seq + 1)]
            parts = wk.partial.get(ticket)
            if not final:
                self.counters["mdp_partials"] += 1
                size = wk.partial_bytes.get(ticket, 0) + sum(len(f) for f in body)
                if wk.partial_n + len(body) > MAX_FRAMES:
                    raise RemoteProtocolError(f"MDP: more than {MAX_FRAMES} partial reply frames held", p.E_FRAMES)
                if self.max_bytes and size > self.max_bytes:  # collected past the limit: fail it now
                    self._forget_partial(wk, ticket)
                    return [self._too_large(wk, ticket, final, "the reply's PARTIALs", size, 0)]
                wk.partial.setdefault(ticket, []).extend(body)
                wk.partial_n += len(body)
                wk.partial_bytes[ticket] = size
                return []
            if parts is not None:
                self._forget_partial(wk, ticket)
                body = parts + body
            payload = pack_body(body)
            if self.max_bytes and len(payload) > self.max_bytes:
                return [self._too_large(wk, ticket, final, "the reply", len(payload), 0)]
            return [p.Result(ticket, p.RS_OK, payload)]
        raise RemoteProtocolError(f"MDP: unknown worker command {cmd[:4]!r}", p.E_COMMAND)

    def _forget_partial(self, wk: _Worker, ticket: int) -> None:
        wk.partial_n -= len(wk.partial.pop(ticket, ()))
        wk.partial_bytes.pop(ticket, None)

    def _too_large(self, wk: _Worker, ticket: int, final: bool, what: str, size: int, parts: int) -> p.Result:
        """The failed RESULT standing for a reply over the limit (rule 6); unless this was its
        FINAL, the rest of the reply is dropped as it comes."""
        self.counters["mdp_too_large"] += 1
        if not final:
            wk.dropping.add(ticket)
        why = f"{what} from an MDP worker {self._over(size)}"
        return p.too_large(ticket, why, parts)

    def _over(self, size: int) -> str:
        return f"({size} bytes) is over this broker's limit of {self.max_bytes} bytes (--max-message-size)"

    def forget_workers(self, members: dict[bytes, Any]) -> None:
        """Forget the MDP workers the core no longer has (``members``: its table). One that died
        without DISCONNECT was kept until the table held ``max_peers``; then the oldest peer went
        to make room, a live worker too, whose tasks then went untranslated."""
        peers = self.peers
        for ident in [i for i, x in peers.items() if type(x) is _Worker and i not in members]:
            del peers[ident]

    def keep_only(self, held: set[bytes]) -> None:
        """Forget every peer but those in ``held``: a passive broker of a pair translates only for
        the peers it holds for an answer at a takeover (the rest it sent to the active broker)."""
        peers = self.peers
        for ident in [i for i in peers if i not in held]:
            del peers[ident]

    def _make_room(self) -> None:
        if len(self.peers) >= self.max_peers:
            # Forget idle clients first (nothing is lost: they have no pending request).
            for ident in [i for i, x in self.peers.items() if isinstance(x, _Client) and not x.pending]:
                del self.peers[ident]
            if len(self.peers) >= self.max_peers:
                del self.peers[next(iter(self.peers))]

    # --- native -> MDP ----------------------------------------------------------------------------

    def outbound(self, ident: bytes, msg: p.Message) -> list[bytes] | None:
        """Return the MDP frames (identity excluded) carrying ``msg`` to MDP peer ``ident``, or
        None when MDP has nothing to say for it (WELCOME, or a reply to a forgotten request)."""
        peer = self.peers.get(ident)
        if isinstance(peer, _Client):
            if type(msg) is p.Part:
                if msg.id not in peer.pending:
                    return None
                before = peer.held.get(msg.id)
                peer.held[msg.id] = msg.payload
                if before is None:
                    return None  # held back until the next part (or the end) says it is not the last
                return self._client_frames(peer, peer.pending[msg.id], PARTIAL_FOR[peer.final], unpack_body(before))
            if type(msg) is not p.Reply:
                return None
            last = peer.held.pop(msg.rid, None)
            service = peer.pending.pop(msg.rid, None)
            if not peer.pending:
                del self.peers[ident]  # re-learned on the next request
            if service is None:
                return None
            st = msg.status
            if st == p.ST_OK:
                body = unpack_body(last if last is not None else msg.payload)
            else:
                body = error_body(st, msg.message, msg.payload)
            self.counters["mdp_replies"] += 1
            return self._client_frames(peer, service, peer.final, body)
        if isinstance(peer, _Worker):
            v2 = peer.header == MDPW02
            first = [b""] if peer.delim else []
            t = type(msg)
            if isinstance(msg, p.Task):
                if msg.window:
                    peer.streams[msg.ticket] = 0
                return [*first, peer.header, REQUEST, ticket_frame(msg.ticket), b"", *unpack_body(msg.payload)]
            if t is p.Heartbeat:
                return [*first, peer.header, W2_HEARTBEAT if v2 else W1_HEARTBEAT]
            if t is p.Reconnect or t is p.Bye or t is p.Error:
                del self.peers[ident]
                return [*first, peer.header, W2_DISCONNECT if v2 else W1_DISCONNECT]
            return None
        return None

    def outbound_many(self, ident: bytes, msg: p.Message) -> list[list[bytes]]:
        """The MDP messages carrying ``msg`` to ``ident``: usually one (see :meth:`outbound`); a
        stream that fails after a part was held back sends that part before the error; a BYE to a
        client ends each request it has open here."""
        peer = self.peers.get(ident)
        if (type(msg) is p.Bye or type(msg) is p.Reconnect) and isinstance(peer, _Client):
            # MDP has no redirect: what the client has open here ends now, saying why and where the
            # active broker is (BUSY: try again), not at the client's own timeout (rule 4). Told to
            # register again (the passive broker it voted at took over), it is to send them again.
            if type(msg) is p.Bye:
                why = f"broker {msg.broker or 'here'} sent this client away: {msg.reason}"
            else:
                why = f"send it again: {msg.reason}"
            body = error_body(p.ST_BUSY, why, b"")
            ends = [self._client_frames(peer, service, peer.final, body) for service in peer.pending.values()]
            self.counters["mdp_replies"] += len(ends)
            del self.peers[ident]
            return ends
        if type(msg) is p.Reply and msg.status != p.ST_OK and isinstance(peer, _Client):
            last = peer.held.pop(msg.rid, None)
            service = peer.pending.get(msg.rid)
            if last is not None and service is not None:
                part = self._client_frames(peer, service, PARTIAL_FOR[peer.final], unpack_body(last))
                end = self.outbound(ident, msg)
                return [part] if end is None else [part, end]
        frames = self.outbound(ident, msg)
        return [] if frames is None else [frames]

    def _client_frames(self, peer: _Client, service: bytes, cmd: bytes, body: list[bytes]) -> list[bytes]:
        first = [b""] if peer.delim else []
        if peer.header == MDPC01:
            return [*first, MDPC01, service, *body]
        return [*first, MDPC02, cmd, service, *body]

    def is_client(self, ident: bytes) -> bool:
        """True if ``ident`` is an MDP client (it does not acknowledge stream parts)."""
        return isinstance(self.peers.get(ident), _Client)

    def speaks_mdp(self, ident: bytes) -> bool:
        """True if ``ident`` is an MDP peer the bridge is translating for."""
        return ident in self.peers


def _service_name(raw: bytes) -> str:
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError("MDP: a service name must be UTF-8", p.E_HEADER) from None
    if not 0 < len(name) <= p.MAX_NAME:
        raise RemoteProtocolError("MDP: a service name must be 1 to 255 characters", p.E_HEADER)
    return name
