"""The zmqdist wire protocol, version 1: message types, encode/decode, validation. Pure.

Rules of this module:
1. It never imports zmq, time, threading, socket or os; it turns frames into messages and back.
2. Every message is exactly two frames after any routing identity: a *head* and a *payload*.
   head = b"ZD" + version byte + command byte + msgpack array of the header fields;
   payload = opaque bytes that brokers never decode (empty for control messages).
3. msgpack is called from this module only (and from :mod:`zmqdist.codec`, the application's
   values: that one is left uncompiled, so that a codec pickles for handler processes).
4. Decoding validates every field and raises :class:`RemoteProtocolError` with an error code (and the
   request id when one could be read), so a broker can answer instead of crashing. Trailing header
   fields it does not know are ignored: a newer minor revision may append fields.

Messages are ``NamedTuple``s: immutable and slotted like frozen dataclasses, but 2-4x cheaper to
build, which matters on the broker's per-request path (measured: 0.25 us against 0.58 us).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple, Protocol, TypeAlias, TypeGuard, TypeVar

import msgpack

from zmqdist.errors import LocalProtocolError, RemoteProtocolError

MAGIC: Final = b"ZD"
VERSION: Final = 1
PREFIX: Final = MAGIC + bytes([VERSION])

# An int that compiled code keeps as its Python object. Compiled, an ``int`` is held unboxed and
# boxed again (a large one allocated anew) each time it becomes a dict key, a heap or queue entry
# or a message field: a request's ticket was boxed about a dozen times through the broker. A union
# is held as the object, so a ticket or request id typed ``Boxed`` is boxed once. Only ints (never
# a bool) go in: to the type checker it is an int. Where mypy simplifies the union it is an int
# again: a NamedTuple's field (a message's id is read as ``fields[i]`` of the message seen as
# ``tuple[Any, ...]``) and a local inferred from a call (``t: Boxed = queue.first()`` is annotated).
Boxed: TypeAlias = int | bool

# Roles a peer announces in HELLO and HEARTBEAT.
ROLE_BROKER: Final = 0
ROLE_CLIENT: Final = 1
ROLE_WORKER: Final = 2
ROLES: Final = (ROLE_BROKER, ROLE_CLIENT, ROLE_WORKER)

# REPLY statuses (broker -> client).
ST_OK: Final = 0
ST_FAILED: Final = 1  # the handler raised; payload = pack_error(...)
ST_BUSY: Final = 2
ST_TIMEOUT: Final = 3
ST_LOST: Final = 4
ST_INVALID: Final = 5
ST_CANCELLED: Final = 6  # the request was cancelled (a broker's answer for work a broker above handed it)
ST_INTERRUPTED: Final = 7  # a stream's run was cut after some of its parts had gone out
REPLY_STATUSES: Final = (ST_OK, ST_FAILED, ST_BUSY, ST_TIMEOUT, ST_LOST, ST_INVALID, ST_CANCELLED, ST_INTERRUPTED)
# The payload of a BUSY the caller's per-client quota caused: a client that paces itself to the quota
# sends the request again (its count and the broker's disagree) rather than failing it.
OVER_QUOTA: Final = b"quota"

# RESULT statuses (worker -> broker).
RS_OK: Final = 0
RS_FAILED: Final = 1
RS_REFUSED: Final = 2  # the worker did not run it (draining or full): requeue, no attempt spent
RS_CANCELLED: Final = 3  # the worker stopped it: it was cancelled, or its deadline passed
RS_RETRY: Final = 4  # the handler raised what its retry policy retries: run it again after delay_ms
RESULT_STATUSES: Final = (RS_OK, RS_FAILED, RS_REFUSED, RS_CANCELLED, RS_RETRY)

# ERROR codes (broker -> any peer, when no request id could be read).
E_FRAMES: Final = 1
E_VERSION: Final = 2
E_COMMAND: Final = 3
E_HEADER: Final = 4
E_ROLE: Final = 5

MAX_NAME: Final = 255
MAX_BUDGET_MS: Final = 7 * 24 * 3600 * 1000
MAX_CAPACITY: Final = 65535
MAX_HOPS: Final = 32
MAX_SERVICES: Final = 4096
MAX_ID: Final = 2**63 - 1
_SHORT_MAX: Final = 2**62 - 1  # the largest int compiled code holds unboxed (see _is_id)
MAX_WINDOW: Final = 65535  # parts a stream may have unacknowledged
MAX_RETRY_NAMES: Final = 32  # exception names one retry policy lists
RESERVED_PREFIX: Final = "zmqdist."
MMI_PREFIX: Final = "mmi."  # Majordomo's service discovery namespace (RFC 8/MMI), answered by brokers
INTERNAL_PREFIXES: Final = (RESERVED_PREFIX, MMI_PREFIX)


def internal(service: str) -> bool:
    """``service`` is a broker's own (answered by brokers, never dispatched). Two calls rather than
    ``startswith(INTERNAL_PREFIXES)``: compiled, that tuple is built anew at each call."""
    return service.startswith(RESERVED_PREFIX) or service.startswith(MMI_PREFIX)


class Hello(NamedTuple):
    """Peer -> broker: register (workers name services and capacity; clients send none)."""

    role: int
    name: str
    services: tuple[str, ...]
    capacity: int
    heartbeat_ms: int
    epoch: int = 0  # optional trailing field: the highest pair epoch this peer has seen (fencing)
    batch: int = 0  # optional trailing field: the peer reads BATCH frames of up to this many (0: none)
    seq: int = 0  # optional trailing field: its number (0: not said), a client's per connection, a worker's per life


class Welcome(NamedTuple):
    """Broker -> peer: registration accepted; the heartbeat settings to use from now on.

    A broker of a backup pair adds its ``epoch`` (term, grown at every takeover) and the name of
    the other broker of its pair, so that peers can refuse a broker whose epoch is stale. Every
    broker tells a client the open requests it allows it (``quota``: the client keeps the rest
    itself) and the largest message it accepts (``max_message``: larger calls fail at once).
    """

    broker: str
    incarnation: str
    heartbeat_ms: int
    liveness: int
    epoch: int = 0  # optional trailing field: 0 for a broker that is not part of a pair
    peer: str = ""  # optional trailing field: the other broker of the pair
    quota: int = 0  # optional trailing field: open requests per client (0: not said)
    max_message: int = 0  # optional trailing field: largest message in bytes (0: not said)
    batch: int = 0  # optional trailing field: the broker reads BATCH frames of up to this many (0: none)
    hello: int = 0  # optional trailing field: the ``seq`` of the HELLO this answers (0: not said)


# A retry policy on the wire: (attempts, backoff_ms, max_backoff_ms, exception names); () for none.
RetrySpec = tuple[()] | tuple[int, int, int, tuple[str, ...]]


class Request(NamedTuple):
    """Client -> broker: a call. ``budget_ms`` is the time left, not an absolute deadline.

    Optional trailing fields: ``trace`` travels with the request through every tier; ``key`` is
    the caller's idempotency key (empty: the broker makes one); ``window`` > 0 asks for a stream
    (PART messages, at most ``window`` unacknowledged); ``retry`` is the caller's retry policy.
    """

    rid: int
    service: str
    budget_ms: int
    hops: tuple[str, ...]
    payload: bytes
    trace: str = ""
    key: str = ""
    window: int = 0
    retry: RetrySpec = ()


class Task(NamedTuple):
    """Broker -> worker (or downstream broker): run this. ``key`` is the idempotency key (stable
    across retries); ``seq`` numbers the tasks sent to this peer, so lost ones can be found (see
    Heartbeat); ``hops`` names the brokers the request has passed (a broker never sends it to one
    of them; workers ignore it)."""

    ticket: int
    service: str
    budget_ms: int
    attempt: int
    key: str
    seq: int
    hops: tuple[str, ...]
    payload: bytes
    trace: str = ""  # optional trailing header fields (see Request)
    window: int = 0
    retry: RetrySpec = ()


class Result(NamedTuple):
    """Worker -> broker: the outcome of a task; frees one slot of the worker's capacity.

    ``delay_ms``: for RS_RETRY, how long to wait before the next run; ``parts``: for a streamed
    task, how many PART messages went before this, the end of the stream (a gap shows)."""

    ticket: int
    status: int
    payload: bytes
    delay_ms: int = 0
    parts: int = 0


class Reply(NamedTuple):
    """Broker -> client: the one answer to a request (for a stream: its end, with ``parts``)."""

    rid: int
    status: int
    message: str
    payload: bytes
    parts: int = 0


class Cancel(NamedTuple):
    """Client -> broker (``id`` = its request id), broker -> worker or downstream broker (``id``
    = the ticket): stop this request. Nothing answers a cancel itself; a broker that handed the
    request down is answered CANCELLED once the holder let go, so the slot frees then."""

    id: int


class Part(NamedTuple):
    """One value of a streamed reply, numbered from 0: worker -> broker (``id`` = ticket),
    broker -> client (``id`` = request id), relayed the same way between tiers."""

    id: int
    seq: int
    payload: bytes


class Ack(NamedTuple):
    """The consumer of a stream has taken ``seq`` parts (all those numbered below it): client ->
    broker -> worker. The producer sends part ``n`` only while ``n < seq + window``."""

    id: int
    seq: int


class Progress(NamedTuple):
    """A handler's latest progress report (worker -> broker -> client), for one request."""

    id: int
    payload: bytes


class Heartbeat(NamedTuple):
    """Both ways. Peers send one every interval; the broker answers each with its own.

    Broker -> worker: ``seq`` is the last task seq sent to it. Worker -> broker: ``seq`` is the
    highest seq it has seen and ``held`` the tickets it holds; a ticket sent at or below ``seq``
    that the worker does not hold was lost in transit, and the broker requeues it.
    """

    role: int
    incarnation: str
    seq: int
    held: tuple[int, ...]
    epoch: int = 0  # optional trailing field: a paired broker's epoch (peers send 0)
    rtt_us: int = 0  # optional trailing field: a proxy's measured round trip to its upstream (us)


class Credit(NamedTuple):
    """Worker -> broker: set my capacity (0 while draining)."""

    capacity: int


class Advert(NamedTuple):
    """Between brokers, both ways: the capacity one offers the other, per service.

    ``offer`` = tasks (or requests) the sender can take now + those of the receiver's it holds
    now, so the receiver's credit is ``offer`` less what it has in flight there, kept exact by
    every answer without a new advert (like a worker's capacity). Valid for one ttl.
    """

    offer: tuple[tuple[str, int], ...]


class PairState(NamedTuple):
    """Between the two brokers of a backup pair, every heartbeat, on the pair link.

    ``state`` is PAIR_PENDING (just started, role not known yet), PAIR_ACTIVE or PAIR_PASSIVE;
    ``synced`` is the last replication seq a passive broker applied (-1: it needs a snapshot);
    ``votes`` counts the peers that came to it recently while it was not active; ``warm`` is 1
    for an active broker that took over with a synced copy of the pair's table (0: it started
    cold), so that two active brokers know which one carries the pair's work on; ``max_message``
    is the sender's --max-message-size, which the REPLICATEs it is sent keep within;
    ``heartbeat_ms`` is the sender's interval, by which its peer judges its silence.
    """

    name: str
    primary: int
    state: int
    epoch: int
    incarnation: str
    synced: int
    votes: int
    warm: int = 0  # optional trailing field
    max_message: int = 0  # optional trailing field: 0 for a broker that does not say
    heartbeat_ms: int = 0  # optional trailing field: 0 for a broker that does not say


class Replicate(NamedTuple):
    """Active -> passive broker of a pair: changes to the request table (``snapshot``: the whole
    table, replacing what the passive held). ``ops`` is msgpack (see :func:`pack_ops`)."""

    epoch: int
    seq: int
    snapshot: int
    ops: bytes


class Handover(NamedTuple):
    """Active -> passive broker of a pair: take over now (failback); the sender steps down."""

    epoch: int


class Reconnect(NamedTuple):
    """Broker -> peer: I do not know you; send HELLO again."""

    reason: str


class Bye(NamedTuple):
    """Either way: I am leaving (a worker deregisters; a broker shuts down or sends a peer away).

    A broker of a pair names itself (``broker``) and, when it sends a peer to the other broker of
    its pair, that one (``active``): the peer goes there, not to the next endpoint of its list.
    """

    reason: str
    broker: str = ""  # optional trailing field: the sender, a broker
    active: str = ""  # optional trailing field: the broker of the sender's pair to go to


class Error(NamedTuple):
    """Broker -> peer: your message was refused and no request id could be read."""

    code: int
    message: str


Message = (
    Hello
    | Welcome
    | Request
    | Task
    | Result
    | Reply
    | Heartbeat
    | Credit
    | Reconnect
    | Bye
    | Error
    | Advert
    | PairState
    | Replicate
    | Handover
    | Cancel
    | Part
    | Ack
    | Progress
)

# The classes of the per-request messages under Final names: compiled code reads a Final from a C
# static, but a class by its name from the module's dict (about 100 instructions; about 330
# through the module's getattr from another module). The per-request paths name them so.
REQUEST_CLS: Final = Request
TASK_CLS: Final = Task
RESULT_CLS: Final = Result
REPLY_CLS: Final = Reply
PART_CLS: Final = Part
HEARTBEAT_CLS: Final = Heartbeat
WELCOME_CLS: Final = Welcome

# Backup pair states (PairState.state).
PAIR_PENDING: Final = 0
PAIR_ACTIVE: Final = 1
PAIR_PASSIVE: Final = 2
PAIR_STATES: Final = (PAIR_PENDING, PAIR_ACTIVE, PAIR_PASSIVE)

CMD_OF: Final[dict[type, int]] = {
    Hello: 1,
    Welcome: 2,
    Request: 3,
    Task: 4,
    Result: 5,
    Reply: 6,
    Heartbeat: 7,
    Credit: 8,
    Reconnect: 9,
    Bye: 10,
    Error: 11,
    Advert: 12,
    PairState: 13,
    Replicate: 14,
    Handover: 15,
    Cancel: 16,
    Part: 17,
    Ack: 18,
    Progress: 19,
}
TYPE_OF: Final[dict[int, type]] = {v: k for k, v in CMD_OF.items()}
# Field names and defaults of every message type (NamedTuple class attributes mypy does not type).
_FIELDS: Final[dict[type, tuple[str, ...]]] = {t: getattr(t, "_fields") for t in CMD_OF}  # noqa: B009
_DEFAULTS: Final[dict[type, dict[str, Any]]] = {t: getattr(t, "_field_defaults") for t in CMD_OF}  # noqa: B009
HEAD_PREFIX: Final[dict[type, bytes]] = {t: PREFIX + bytes([c]) for t, c in CMD_OF.items()}
# The message classes: a runtime sends an output of one of these as it is (one set lookup, where a
# match on each of its own action classes first cost a global lookup and an isinstance apiece).
MESSAGE_TYPES: Final[frozenset[type]] = frozenset(CMD_OF)
# A BATCH frame pair carries several messages to one peer: its head is BATCH_HEAD, its payload a
# msgpack array of their frames [head, payload, head, payload, ...]. It is framing, not a message:
# sent only to a peer that said in HELLO or WELCOME that it reads them (``batch``), never nested.
CMD_BATCH: Final = 20
BATCH_HEAD: Final = PREFIX + bytes([CMD_BATCH])
MAX_BATCH: Final = 1024  # messages in one batch (a writer closes a batch at this count...)
BATCH_BYTES: Final = 256 * 1024  # ... or before it would pass this many bytes (or the reader's limit)
BATCH_OVERHEAD: Final = 5  # msgpack's most for an array's or a bin's header in a BATCH payload
CMD_REQUEST: Final = 3  # CMD_OF[Request], as a constant for the per-request path
CMD_TASK: Final = 4  # CMD_OF[Task]
CMD_RESULT: Final = 5  # CMD_OF[Result]
CMD_REPLY: Final = 6  # CMD_OF[Reply]
# Types with a field that travels in the payload frame (the field after the required header fields;
# optional header fields follow it in the tuple and are sent after the required ones).
_WITH_PAYLOAD: Final = frozenset({Request, Task, Result, Reply, Replicate, Part, Progress})


def _is_name(v: object) -> bool:
    return type(v) is str and 0 < len(v) <= MAX_NAME


def _is_int(v: object, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _names(v: object, limit: int) -> bool:
    return type(v) is tuple and len(v) <= limit and all(_is_name(s) for s in v)


def _check_hello(f: tuple[Any, ...]) -> str | None:
    if f[0] not in ROLES or type(f[0]) is not int:
        return "role must be 0 (broker), 1 (client) or 2 (worker)"
    if type(f[1]) is not str or len(f[1]) > MAX_NAME:
        return "name must be a string of at most 255 characters"
    if not _names(f[2], MAX_SERVICES):
        return "services must be a list of non-empty names of at most 255 characters"
    if not _is_int(f[3], 0, MAX_CAPACITY):
        return f"capacity must be an integer from 0 to {MAX_CAPACITY}"
    if not _is_int(f[4], 1, 3_600_000):
        return "heartbeat_ms must be an integer from 1 to 3600000"
    return None


def _check_welcome(f: tuple[Any, ...]) -> str | None:
    if type(f[0]) is not str or type(f[1]) is not str:
        return "broker and incarnation must be strings"
    if not _is_int(f[2], 1, 3_600_000) or not _is_int(f[3], 1, 1000):
        return "heartbeat_ms and liveness must be positive integers"
    return None


def _check_request(f: tuple[Any, ...]) -> str | None:
    if not _is_name(f[1]):
        return "service must be a non-empty string of at most 255 characters"
    if not _is_int(f[2], 0, MAX_BUDGET_MS):
        return f"budget_ms must be an integer from 0 to {MAX_BUDGET_MS}"
    if f[3] != () and not _names(f[3], MAX_HOPS):
        return f"hops must be a list of at most {MAX_HOPS} broker names"
    return None


def _check_task(f: tuple[Any, ...]) -> str | None:
    if not _is_name(f[1]):
        return "service must be a non-empty string"
    if not _is_int(f[2], 0, MAX_BUDGET_MS) or not _is_int(f[3], 1, 1000):
        return "budget_ms and attempt out of range"
    if type(f[4]) is not str:
        return "key must be a string"
    if not _is_int(f[5], 0, MAX_ID):
        return "seq must be a non-negative integer"
    if f[6] != () and not _names(f[6], MAX_HOPS):
        return f"hops must be a list of at most {MAX_HOPS} broker names"
    return None


def _check_result(f: tuple[Any, ...]) -> str | None:
    return None if f[1] in RESULT_STATUSES and type(f[1]) is int else "unknown result status"


def _check_reply(f: tuple[Any, ...]) -> str | None:
    if f[1] not in REPLY_STATUSES or type(f[1]) is not int:
        return "unknown reply status"
    return None if type(f[2]) is str else "message must be a string"


def _check_heartbeat(f: tuple[Any, ...]) -> str | None:
    if f[0] not in ROLES or type(f[0]) is not int or type(f[1]) is not str:
        return "heartbeat must be [role, incarnation, seq, held]"
    if not _is_int(f[2], 0, MAX_ID):
        return "seq must be a non-negative integer"
    h = f[3]
    if type(h) is not tuple or len(h) > MAX_CAPACITY or not all(_is_int(t, 0, MAX_ID) for t in h):
        return "held must be a list of at most 65535 tickets"
    return None


def _check_credit(f: tuple[Any, ...]) -> str | None:
    return None if _is_int(f[0], 0, MAX_CAPACITY) else "capacity out of range"


def _check_advert(f: tuple[Any, ...]) -> str | None:
    s = f[0]
    if type(s) is not tuple or len(s) > MAX_SERVICES:
        return f"offer must be a list of at most {MAX_SERVICES} [service, count] pairs"
    for e in s:
        if type(e) is not tuple or len(e) != 2 or not _is_name(e[0]) or not _is_int(e[1], 0, MAX_CAPACITY):
            return f"offer entries must be [service name, count from 0 to {MAX_CAPACITY}]"
    return None


def _check_pair_state(f: tuple[Any, ...]) -> str | None:
    if type(f[0]) is not str or len(f[0]) > MAX_NAME or type(f[4]) is not str or len(f[4]) > MAX_NAME:
        return "name and incarnation must be strings of at most 255 characters"
    if f[1] not in (0, 1) or type(f[1]) is not int or f[2] not in PAIR_STATES or type(f[2]) is not int:
        return "primary must be 0 or 1 and state 0, 1 or 2"
    if not _is_int(f[3], 0, MAX_ID) or not _is_int(f[5], -1, MAX_ID) or not _is_int(f[6], 0, MAX_ID):
        return "epoch, synced and votes out of range"
    return None


def _check_replicate(f: tuple[Any, ...]) -> str | None:
    if not _is_int(f[0], 0, MAX_ID) or not _is_int(f[1], 0, MAX_ID) or f[2] not in (0, 1) or type(f[2]) is not int:
        return "epoch and seq must be non-negative integers and snapshot 0 or 1"
    return None


def _check_epoch(f: tuple[Any, ...]) -> str | None:
    return None if _is_int(f[0], 0, MAX_ID) else "epoch must be a non-negative integer"


def _check_text(f: tuple[Any, ...]) -> str | None:
    return None if type(f[0]) is str else "reason must be a string"


def _check_seq(f: tuple[Any, ...]) -> str | None:
    return None if _is_int(f[1], 0, MAX_ID) else "seq must be a non-negative integer"


def _check_error(f: tuple[Any, ...]) -> str | None:
    return None if type(f[0]) is int and type(f[1]) is str else "error must be [code, message]"


# Per type: number of header fields (payload excluded), whether field 0 is an id, validator.
_SPEC: Final[dict[type, tuple[int, bool, Any]]] = {
    Hello: (5, False, _check_hello),
    Welcome: (4, False, _check_welcome),
    Request: (4, True, _check_request),
    Task: (7, True, _check_task),
    Result: (2, True, _check_result),
    Reply: (3, True, _check_reply),
    Heartbeat: (4, False, _check_heartbeat),
    Credit: (1, False, _check_credit),
    Reconnect: (1, False, _check_text),
    Bye: (1, False, _check_text),
    Error: (2, False, _check_error),
    Advert: (1, False, _check_advert),
    PairState: (7, False, _check_pair_state),
    Replicate: (3, False, _check_replicate),
    Handover: (1, False, _check_epoch),
    Cancel: (1, True, lambda f: None),
    Part: (2, True, _check_seq),
    Ack: (2, True, _check_seq),
    Progress: (1, True, lambda f: None),
}


# Optional trailing header fields: per type, a check for each (the default is the field's own).
def _is_short(v: object) -> bool:
    return type(v) is str and len(v) <= MAX_NAME


def _is_retry(v: object) -> bool:
    """A retry policy on the wire: () or (attempts, backoff_ms, max_backoff_ms, names)."""
    if v == () and type(v) is tuple:
        return True
    return (
        type(v) is tuple
        and len(v) == 4
        and _is_int(v[0], 1, 1000)
        and _is_int(v[1], 0, MAX_BUDGET_MS)
        and _is_int(v[2], 0, MAX_BUDGET_MS)
        and type(v[3]) is tuple
        and 0 < len(v[3]) <= MAX_RETRY_NAMES
        and all(_is_name(n) for n in v[3])
    )


def _is_window(v: object) -> bool:
    return _is_int(v, 0, MAX_WINDOW)


def _is_count(v: object) -> bool:
    return _is_int(v, 0, MAX_ID)


_OPTIONAL: Final[dict[type, tuple[Any, ...]]] = {
    Hello: (_is_count, _is_count, _is_count),
    Welcome: (_is_count, _is_short, _is_count, _is_count, _is_count, _is_count),
    Heartbeat: (_is_count, _is_count),
    Bye: (_is_short, _is_short),
    PairState: (lambda v: v in (0, 1) and type(v) is int, _is_count, _is_count),
    Request: (_is_short, _is_short, _is_window, _is_retry),
    Task: (_is_short, _is_window, _is_retry),
    Result: (lambda v: _is_int(v, 0, MAX_BUDGET_MS), _is_count),
    Reply: (_is_count,),
}
_SPEC_BY_CMD: Final = {CMD_OF[t]: (t, *s) for t, s in _SPEC.items()}
_P0: Final = PREFIX[0]
_P1: Final = PREFIX[1]
_P2: Final = PREFIX[2]
_HEAD_REQUEST: Final = HEAD_PREFIX[Request]
_HEAD_RESULT: Final = HEAD_PREFIX[Result]
_HEAD_REPLY: Final = HEAD_PREFIX[Reply]
_HEAD_TASK: Final = HEAD_PREFIX[Task]
_unpackb: Final = msgpack.unpackb
_packb: Final = msgpack.packb


def _head_fields(head: bytes) -> tuple[Any, ...] | None:
    """The header fields of ``head`` (after its 4-byte prefix), or None if they are not an array."""
    read = _codec.read
    if read is not None:
        fields = read(head, 4)
        if fields is not None:
            return fields
    try:
        f = _unpackb(head[4:], use_list=False)
    except Exception:  # msgpack raises several unrelated types for bad input
        return None
    return f if type(f) is tuple else None


def _trace_after(f: tuple[Any, ...], n: int) -> str | None:
    """The trace after the ``n`` required fields of ``f`` ("" when absent), or None if ``f`` is not
    those fields and at most a valid trace."""
    k = len(f)
    if k == n:
        return ""
    if k == n + 1:
        t = f[n]
        if type(t) is str and len(t) <= MAX_NAME:
            return t
    return None


def request_rid(head: bytes) -> int | None:
    """The rid of a valid REQUEST head (any hops, fields and payload), else None."""
    if command_of(head) != CMD_REQUEST:
        return None
    try:
        msg = decode(head, b"")
    except RemoteProtocolError:
        return None
    return msg.rid if type(msg) is Request else None


def _is_id(v: object) -> TypeGuard[int]:
    """``v`` is an id: an int (not a bool) from 0 to MAX_ID. Compiled, ``v`` is compared as a
    machine int, against a bound that fits one first (MAX_ID does not: that compare is a call).
    (Not isinstance first: compiled code narrowed by it turns a bool into an int.)"""
    return type(v) is int and v >= 0 and (v <= _SHORT_MAX or v <= MAX_ID)


# What plain_request and plain_result return for a head they do not take: no service, no status.
NOT_PLAIN_REQUEST: Final[tuple[Boxed, str, Boxed, str]] = (0, "", 0, "")
NOT_PLAIN_RESULT: Final[tuple[Boxed, int]] = (0, -1)


def plain_request(head: bytes) -> tuple[Boxed, str, Boxed, str]:
    """Return (rid, service, budget_ms, trace) of a valid REQUEST head without hops, else
    NOT_PLAIN_REQUEST (its service is "": a valid one never is). Not None: compiled, a tuple that
    is never None is returned as a C struct, where an optional one is a tuple object made and freed.

    The broker's per-request path reads the common case with this; anything else (hops, extra
    fields, any invalid field) goes through :func:`decode`, which names the problem.
    """
    if command_of(head) != CMD_REQUEST:
        return NOT_PLAIN_REQUEST
    f = _head_fields(head)
    trace = _trace_after(f, 4) if f is not None else None
    if f is None or trace is None:
        return NOT_PLAIN_REQUEST
    rid: object = f[0]
    service: object = f[1]
    budget: object = f[2]
    hops: object = f[3]
    if (
        _is_id(rid)
        and type(service) is str
        and 0 < len(service) <= MAX_NAME
        and type(budget) is int
        and 0 <= budget <= MAX_BUDGET_MS
        and type(hops) is tuple
        and not hops
    ):
        return f[0], service, f[2], trace  # the objects read, not the narrowed ints boxed again
    return NOT_PLAIN_REQUEST


def plain_result(head: bytes) -> tuple[Boxed, int]:
    """Return (ticket, status) of a valid RESULT head, else NOT_PLAIN_RESULT (its status is -1:
    a valid one never is; see :func:`plain_request`)."""
    if command_of(head) != CMD_RESULT:
        return NOT_PLAIN_RESULT
    f = _head_fields(head)
    if f is not None and len(f) == 2:
        ticket: object = f[0]
        status: object = f[1]
        if _is_id(ticket) and type(status) is int and status in RESULT_STATUSES:
            return f[0], status  # (see plain_request)
    return NOT_PLAIN_RESULT


def plain_reply(head: bytes, payload: bytes) -> Reply | None:
    """The Reply of a valid REPLY head without optional fields, else None (a client reads every
    reply with this; see :func:`plain_request`). ``head`` is a REPLY's."""
    f = _head_fields(head)
    if f is not None and len(f) == 3:
        rid: object = f[0]
        status: object = f[1]
        text: object = f[2]
        if _is_id(rid) and type(status) is int and status in REPLY_STATUSES and type(text) is str:
            return message(REPLY_CLS, (f[0], status, text, payload, 0))  # (see plain_request)
    return None


def plain_task(head: bytes, payload: bytes) -> Task | None:
    """The Task of a valid TASK head without hops or lifecycle fields, else None (a worker reads
    every task with this). ``head`` is a TASK's."""
    f = _head_fields(head)
    trace = _trace_after(f, 7) if f is not None else None
    if f is None or trace is None:
        return None
    ticket: object = f[0]
    service: object = f[1]
    budget: object = f[2]
    attempt: object = f[3]
    key: object = f[4]
    seq: object = f[5]
    hops: object = f[6]
    if (
        _is_id(ticket)
        and type(service) is str
        and 0 < len(service) <= MAX_NAME
        and type(budget) is int
        and 0 <= budget <= MAX_BUDGET_MS
        and type(attempt) is int
        and 1 <= attempt <= 1000
        and type(key) is str
        and _is_id(seq)
        and type(hops) is tuple
        and not hops
    ):  # the objects read, not the narrowed ints boxed again (see plain_request)
        return message(TASK_CLS, (f[0], service, f[2], f[3], key, f[5], (), payload, trace, 0, ()))
    return None


def pack_batch(frames: list[bytes]) -> bytes:
    """The payload of a BATCH: ``frames`` is [head, payload, head, payload, ...] of 2+ messages.
    Packed by the head packer when there is one (msgpack.packb makes a Packer at every call)."""
    fast = _codec.pack
    if fast is not None:
        packed = fast(b"", frames, -1)
        if packed is not None:
            return packed
    slow: bytes = _packb(frames)
    return slow


def batch_spans(frames: list[bytes], limit: int = MAX_BATCH, max_bytes: int = BATCH_BYTES) -> list[tuple[int, int]]:
    """How a writer cuts ``frames`` ([head, payload, ...] of messages to one peer) into BATCHes:
    [start, end) spans of messages, at most ``limit`` each and, packed, at most ``max_bytes`` (the
    reader's message limit: a BATCH over it is refused whole); a span of one message goes as itself
    (the writer already keeps each message within the limit)."""
    spans: list[tuple[int, int]] = []
    n = len(frames) // 2
    start = 0
    size = BATCH_OVERHEAD
    for i in range(n):
        m = len(frames[2 * i]) + len(frames[2 * i + 1]) + 2 * BATCH_OVERHEAD
        if i > start and size + m > max_bytes:  # it would not fit: the batch ends before it
            spans.append((start, i))
            start, size = i, BATCH_OVERHEAD
        size += m
        if i + 1 - start >= limit:
            spans.append((start, i + 1))
            start, size = i + 1, BATCH_OVERHEAD
    if start < n:
        spans.append((start, n))
    return spans


def unpack_batch(payload: bytes, limit: int = MAX_BATCH) -> list[bytes]:
    """The frames [head, payload, ...] of the messages in a BATCH payload. Raises
    :class:`RemoteProtocolError` unless it is an array of an even number (at most 2 x ``limit``)
    of byte strings, none of them a BATCH head (batches do not nest)."""
    try:
        frames = _unpackb(payload)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError("BATCH: payload is not valid msgpack", E_FRAMES) from exc
    if type(frames) is not list or len(frames) % 2 or not 0 < len(frames) <= 2 * limit:
        raise RemoteProtocolError(f"BATCH: payload must be an array of 2 to {2 * limit} frames, in pairs", E_FRAMES)
    for i, f in enumerate(frames):
        if type(f) is not bytes or (not i % 2 and command_of(f) == CMD_BATCH):
            raise RemoteProtocolError("BATCH: frames must be byte strings, heads not BATCH", E_FRAMES)
    return frames


def frames_of(head: bytes, payload: bytes) -> list[tuple[bytes, bytes]]:
    """The (head, payload) of each message a frame pair carries: itself, or a BATCH's messages
    (raises :class:`RemoteProtocolError` for a bad BATCH, see :func:`unpack_batch`)."""
    if command_of(head) != CMD_BATCH:
        return [(head, payload)]
    frames = unpack_batch(payload)
    return [(frames[i], frames[i + 1]) for i in range(0, len(frames), 2)]


def decode(head: bytes, payload: bytes) -> Message:
    """Return the message carried by ``head`` and ``payload``.

    Raises :class:`RemoteProtocolError` (with ``code`` and, where readable, ``rid``) for a wrong
    magic or version, an unknown command, or a header that is not valid for its command.
    """
    # Fast paths for the two commands on every request (same checks, fewer calls); anything
    # unusual falls through to the general path, which names the problem.
    cmd = command_of(head)
    if cmd == CMD_REQUEST:
        r = plain_request(head)
        if r[1]:
            return message(REQUEST_CLS, (r[0], r[1], r[2], (), payload, r[3], "", 0, ()))
    elif cmd == CMD_RESULT:
        t = plain_result(head)
        if t[1] >= 0:
            return message(RESULT_CLS, (t[0], t[1], payload, 0, 0))
    elif cmd == CMD_REPLY:
        y = plain_reply(head, payload)
        if y is not None:
            return y
    elif cmd == CMD_TASK:
        k = plain_task(head, payload)
        if k is not None:
            return k
    return _decode_general(head, payload)


def _decode_general(head: bytes, payload: bytes) -> Message:
    """The validated decoder for every command (``decode`` adds fast paths in front of it)."""
    if head[:3] != PREFIX:
        if head[:2] == MAGIC and len(head) >= 3:
            raise RemoteProtocolError(
                f"unsupported protocol version {head[2]} (this broker speaks ZD version {VERSION})",
                E_VERSION,
            )
        raise RemoteProtocolError("not a zmqdist message (bad protocol tag)", E_VERSION)
    spec = _SPEC_BY_CMD.get(head[3]) if len(head) > 3 else None
    if spec is None:
        raise RemoteProtocolError(f"unknown command {head[3:4]!r}", E_COMMAND)
    cls, nfields, has_id, check = spec
    try:
        fields = msgpack.unpackb(head[4:], use_list=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(f"{cls.__name__}: header is not valid msgpack", E_HEADER) from exc
    if type(fields) is not tuple or len(fields) < nfields:
        raise RemoteProtocolError(f"{cls.__name__}: header must be an array of {nfields} fields", E_HEADER)
    extra = fields[nfields:]
    if extra:
        fields = fields[:nfields]
    rid = fields[0] if has_id and _is_int(fields[0], 0, MAX_ID) else None
    if has_id and rid is None:
        raise RemoteProtocolError(f"{cls.__name__}: id must be an integer from 0 to 2**63-1", E_HEADER)
    problem = check(fields)
    if problem is not None:
        raise RemoteProtocolError(f"{cls.__name__}: {problem}", E_HEADER, rid)
    with_payload = cls in _WITH_PAYLOAD
    if payload and not with_payload:
        raise RemoteProtocolError(f"{cls.__name__}: unexpected payload", E_HEADER)
    optional = _OPTIONAL.get(cls)
    if optional is not None:
        extra = extra[: len(optional)]  # fields a newer revision appended are ignored
        for i, (v, ok) in enumerate(zip(extra, optional, strict=False)):
            if not ok(v):
                field = _FIELDS[cls][nfields + with_payload + i]
                raise RemoteProtocolError(f"{cls.__name__}: optional field {field} is invalid", E_HEADER, rid)
        tail = (*extra, *_TAIL_DEFAULTS[cls][len(extra) :])
        if with_payload:
            return tuple.__new__(cls, (*fields, payload, *tail))
        return tuple.__new__(cls, (*fields, *tail))
    if with_payload:
        return tuple.__new__(cls, (*fields, payload))
    return tuple.__new__(cls, fields)


HeadPacker = Callable[[bytes, "tuple[Any, ...] | list[Any]", int], "bytes | None"]
HeadReader = Callable[[bytes, int], "tuple[Any, ...] | None"]
Maker = Callable[[Any, tuple[Any, ...]], Any]
KeyMaker = Callable[[bytes, int], str]


class _Codec:
    """The head codec in use (:func:`use_head_codec`). One Final instance: compiled code reads a
    Final from a C static, a plain global from the module's dict at every use."""

    __slots__ = ("key", "make", "pack", "read")

    def __init__(self) -> None:
        self.pack: HeadPacker | None = None
        self.read: HeadReader | None = None
        self.make: Maker = tuple.__new__
        self.key: KeyMaker | None = None


_codec: Final = _Codec()

M = TypeVar("M", bound=tuple[Any, ...])


def message(cls: type[M], fields: tuple[Any, ...]) -> M:
    """A ``cls`` message (a NamedTuple) of ``fields``, as ``tuple.__new__(cls, fields)`` makes it:
    for the messages made on every request (a NamedTuple's own ``__new__`` runs as interpreted
    code, and ``tuple.__new__`` is a method lookup and a wrapper call from compiled code)."""
    made: M = _codec.make(cls, fields)
    return made


def use_head_codec(
    pack: HeadPacker | None, read: HeadReader | None, make: Maker | None, key: KeyMaker | None = None
) -> None:
    """Pack heads with ``pack(prefix, fields, n)`` (the first ``n`` of a tuple; -1: all) in
    Encoders made from now on, read the fields of the heads of every request with ``read(head,
    4)``, make messages with ``make(cls, fields)`` (as ``tuple.__new__``) and default keys with
    ``key(client, rid)`` (as :func:`default_key`). ``pack`` and ``read`` return what msgpack
    would, or None to leave the head to msgpack: zmqdist._heads, set by a compiled install, does
    each in one C call (docs/performance.md). None: msgpack alone, ``tuple.__new__``, and
    Python's own hex and decimal."""
    _codec.pack, _codec.read, _codec.key = pack, read, key
    _codec.make = tuple.__new__ if make is None else make


def default_key(client: bytes, rid: Boxed) -> str:
    """A request's key when its caller gave none: ``"<client identity in hex>:<rid>"``, the same
    at every broker and on every attempt (``b""`` for a request from no peer: ``":<rid>"``)."""
    key = _codec.key
    if key is not None:
        made: str = key(client, rid)
        return made
    return client.hex() + ":" + str(rid)


class Encoder:
    """Encodes messages to (head, payload). Holds a msgpack Packer: one Encoder per thread."""

    __slots__ = ("_fast", "_pack")

    def __init__(self) -> None:
        self._pack = msgpack.Packer().pack
        self._fast = _codec.pack

    def _head(self, prefix: bytes, fields: tuple[Any, ...], n: int) -> bytes:
        """``prefix`` and the first ``n`` of ``fields`` packed (the head packer takes the count:
        no tuple of them is made and freed)."""
        fast = self._fast
        if fast is not None:
            head = fast(prefix, fields, n)
            if head is not None:
                return head
        packed: bytes = self._pack(fields[:n] if n < len(fields) else fields)
        return prefix + packed

    def encode(self, msg: Message) -> tuple[bytes, bytes]:
        """Return the two frames of ``msg``. Raises :class:`LocalProtocolError` for a non-message."""
        cls = type(msg)
        fields: tuple[Any, ...] = msg  # a NamedTuple is a tuple: no copy
        # The commands of every request first: their heads are their leading fields (a field that
        # would follow the payload's place is packed from a tuple made of them).
        if cls is REPLY_CLS and not fields[4]:
            return self._head(_HEAD_REPLY, fields, 3), fields[3]
        # Fields picked one by one: slicing and star-unpacking a tuple cost more in compiled code.
        if cls is TASK_CLS and not fields[9] and not fields[10]:
            f = fields
            if f[8]:
                return self._head(_HEAD_TASK, (f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[8]), 8), f[7]
            return self._head(_HEAD_TASK, f, 7), f[7]
        if cls is RESULT_CLS and not fields[3] and not fields[4]:
            return self._head(_HEAD_RESULT, fields, 2), fields[2]
        if cls is REQUEST_CLS and not fields[6] and not fields[7] and not fields[8]:
            f = fields
            if f[5]:
                return self._head(_HEAD_REQUEST, (f[0], f[1], f[2], f[3], f[5]), 5), f[4]
            return self._head(_HEAD_REQUEST, f, 4), f[4]
        prefix = HEAD_PREFIX.get(cls)
        if prefix is None:
            raise LocalProtocolError(f"not a zmqdist message: {msg!r}")
        n = _SPEC[cls][0]
        if cls in _WITH_PAYLOAD:
            head, payload, tail = fields[:n], fields[n], fields[n + 1 :]
        else:
            head, payload, tail = fields[:n], b"", fields[n:]
        if tail:
            defaults = _TAIL_DEFAULTS[cls]
            k = len(tail)
            while k and tail[k - 1] == defaults[k - 1]:
                k -= 1  # trailing optional fields at their defaults are not sent
            if k:
                head = (*head, *tail[:k])
        return self._head(prefix, head, len(head)), payload


# The defaults of the optional trailing fields, in order (decode fills in the ones not sent).
_TAIL_DEFAULTS: Final[dict[type, tuple[Any, ...]]] = {
    t: tuple(_DEFAULTS[t][n] for n in _FIELDS[t][_SPEC[t][0] + (t in _WITH_PAYLOAD) :]) for t in _OPTIONAL
}


# --- replication ops (the active broker of a pair -> the passive one, inside REPLICATE) ----------


class OpAccepted(NamedTuple):
    """A request entered the table. ``deadline`` is in the sender's clock (see :func:`pack_ops`)."""

    ticket: int
    client: bytes
    rid: int
    service: str
    deadline: float
    hops: tuple[str, ...]
    trace: str
    key: str
    attempt: int
    payload: bytes
    window: int = 0  # a stream's window (see Request)
    retry: RetrySpec = ()  # the caller's retry policy


class OpSent(NamedTuple):
    """A request was dispatched to ``member`` (its ``attempt``-th dispatch)."""

    ticket: int
    member: bytes
    attempt: int


class OpRequeued(NamedTuple):
    """A dispatched request went back to the queue."""

    ticket: int


class OpEnded(NamedTuple):
    """A request ended (answered, or forgotten)."""

    ticket: int


ReplicationOp = OpAccepted | OpSent | OpRequeued | OpEnded
# On the wire each op is a list: its kind letter, then its fields in order.
_OP_KIND: Final[dict[type, str]] = {OpAccepted: "a", OpSent: "s", OpRequeued: "q", OpEnded: "e"}
_OP_OF_KIND: Final[dict[str, type]] = {k: t for t, k in _OP_KIND.items()}
_FIELDS.update({t: getattr(t, "_fields") for t in _OP_KIND})  # noqa: B009


def _op(raw: Any) -> ReplicationOp | None:
    """The op a wire list carries, or None if it is malformed."""
    if type(raw) is not list or not raw or type(raw[0]) is not str:
        return None
    cls = _OP_OF_KIND.get(raw[0])
    f = raw[1:]
    if cls is OpAccepted and len(f) == 12:  # with a stream window and a retry policy
        w, r = f[10], f[11]
        spec = (r[0], r[1], r[2], tuple(r[3])) if type(r) is list and len(r) == 4 and type(r[3]) is list else ()
        if not _is_window(w) or (r != [] and not _is_retry(spec)):
            return None
        a = _op(["a", *f[:10]])
        return a._replace(window=w, retry=spec) if type(a) is OpAccepted else None
    if cls is None or len(f) != len(_FIELDS[cls]) - (cls is OpAccepted) * 2 or not _is_id(f[0]):
        return None
    if cls is OpAccepted:
        ok = (
            type(f[1]) is bytes
            and _is_id(f[2])
            and type(f[3]) is str
            and type(f[4]) in (int, float)
            and type(f[5]) is list
            and all(type(h) is str for h in f[5])
            and type(f[6]) is str
            and type(f[7]) is str
            and _is_id(f[8])
            and type(f[9]) is bytes
        )
        return OpAccepted(f[0], f[1], f[2], f[3], float(f[4]), tuple(f[5]), f[6], f[7], f[8], f[9]) if ok else None
    if cls is OpSent:
        return OpSent(f[0], f[1], f[2]) if type(f[1]) is bytes and _is_id(f[2]) else None
    return OpRequeued(f[0]) if cls is OpRequeued else OpEnded(f[0])


def pack_ops(sent_at: float, ops: list[ReplicationOp]) -> bytes:
    """Return replication ops as msgpack: ``[sent_at, [kind, *fields], ...]``. ``sent_at`` is the
    sender's clock, so that the receiver can move deadlines into its own."""
    wire: list[Any] = [sent_at]
    for op in ops:
        if type(op) is OpAccepted and not op.window and not op.retry:
            wire.append(["a", *op[:10]])  # no stream, no retry policy: the short form
        else:
            wire.append([_OP_KIND[type(op)], *op])
    data: bytes = msgpack.packb(wire, use_bin_type=True)
    return data


def unpack_ops(data: bytes) -> tuple[float, list[ReplicationOp]]:
    """Return (the sender's time, the ops) packed by :func:`pack_ops`.

    Raises :class:`RemoteProtocolError` for garbage or any malformed op (naming it)."""
    try:
        wire = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:
        raise RemoteProtocolError(f"Replicate: ops are not valid msgpack: {exc}", E_HEADER) from exc
    if type(wire) is not list or not wire or type(wire[0]) not in (int, float):
        raise RemoteProtocolError("Replicate: ops must be a list that starts with the sender's time", E_HEADER)
    ops: list[ReplicationOp] = []
    for raw in wire[1:]:
        op = _op(raw)
        if op is None:
            raise RemoteProtocolError(f"Replicate: bad op {raw!r:.100}", E_HEADER)
        ops.append(op)
    return float(wire[0]), ops


# --- time budgets: the one conversion between a wire budget and a local deadline --------------


def deadline_at(now: float, budget_ms: int) -> float:
    """The local deadline of a budget received at ``now``."""
    return now + budget_ms / 1000.0


def budget_ms_left(deadline: float, now: float, margin_ms: int = 0, floor: int = 1) -> int:
    """The budget to send at ``now`` for ``deadline``: whole milliseconds left (truncated, never
    rounded up), less ``margin_ms`` (a hop's transit), and at least ``floor``."""
    return max(floor, int((deadline - now) * 1000) - margin_ms)


def command_of(head: bytes) -> int:
    """The command number of a native head of this version, or 0 (another protocol or version).
    Byte by byte: compiled, an index is a machine int where a slice is a new bytes object."""
    if len(head) > 3 and head[0] == _P0 and head[1] == _P1 and head[2] == _P2:
        return head[3]
    return 0


def encode(msg: Message) -> tuple[bytes, bytes]:
    """Return the two frames of ``msg`` (thread-safe, slower than a per-thread :class:`Encoder`)."""
    return Encoder().encode(msg)


# --- payload values (what client and worker APIs put in the opaque payload frame) -------------


class ValueCodec(Protocol):
    """What turns application values into payloads and back (:class:`zmqdist.codec.Codec`)."""

    def pack(self, value: Any) -> bytes: ...

    def unpack(self, data: bytes) -> Any: ...


_Packer: Final = msgpack.Packer  # its defaults are packb's with use_bin_type=True


# msgpack's bin 8 heads, by length: one is picked, not made (bytes((0xC4, n)) built a tuple and
# two ints each time).
_BIN8: Final[tuple[bytes, ...]] = tuple(bytes((0xC4, n)) for n in range(0x100))


def pack_value(value: Any, codec: ValueCodec | None = None) -> bytes:
    """Return ``value`` as msgpack bytes (through ``codec`` if given). Raises :class:`TypeError`
    if it cannot be encoded."""
    if codec is not None:
        return codec.pack(value)
    if type(value) is bytes:  # msgpack's bin format, as the Packer writes it, without making one
        n = len(value)
        if n < 0x100:
            return _BIN8[n] + value
        if n < 0x10000:
            return bytes((0xC5, n >> 8, n & 0xFF)) + value
        if n < 0x100000000:
            return b"\xc6" + n.to_bytes(4, "big") + value
    try:
        # A Packer made here, not msgpack.packb: that is a Python function taking **kwargs (2.7x
        # slower per call, measured). One Packer shared by threads would need a lock.
        data: bytes = _Packer().pack(value)
        return data
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"value of type {type(value).__name__} is not msgpack-serialisable: {exc}") from exc


def unpack_value(data: bytes, codec: ValueCodec | None = None) -> Any:
    """Return the value packed in ``data`` (through ``codec`` if given). Raises :class:`ValueError`
    for bad msgpack."""
    if codec is not None:
        return codec.unpack(data)
    n = len(data)
    if n >= 2 and data[0] == 0xC4 and data[1] == n - 2:  # bin 8: a byte string, read as msgpack does
        return data[2:]
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"payload is not valid msgpack: {exc}") from exc


def pack_error(type_name: str, message: str, traceback_text: str) -> bytes:
    """Return the payload of a failed result: the remote exception's type, message, traceback."""
    data: bytes = msgpack.packb((type_name, message, traceback_text))
    return data


RESULT_TOO_LARGE: Final = "ResultTooLarge"  # the type of a failure that stands for a result over a limit


def result_too_large(why: str) -> bytes:
    """The payload of a failed result that stands for one over a broker's message limit."""
    return pack_error(RESULT_TOO_LARGE, why, "")


def too_large(ticket: int, why: str, parts: int = 0) -> Result:
    """The failed RESULT of task ``ticket`` that stands for one over a broker's message limit
    (``parts``: of a stream, those that went before it)."""
    return Result(ticket, RS_FAILED, result_too_large(why), 0, parts)


def fit_error(data: bytes, limit: int) -> bytes | None:
    """A failed result's payload ``data`` cut to at most ``limit`` bytes, keeping the type: the
    traceback's end and the message's start, each marked if cut; None if even the type cannot."""
    if len(data) <= limit:
        return data
    kind, message, tb = unpack_error(data)
    mark = " [cut to the broker's message limit]"
    room = limit - len(kind.encode()) - 2 * len(mark) - 16  # msgpack's headers: 16 at most
    if room < 0:
        return None
    mb, tbb = message.encode(), tb.encode()
    keep_m = mb[:room]
    n_tb = room - len(keep_m)  # what is left for the traceback's end
    keep_tb = tbb[max(0, len(tbb) - n_tb) :] if n_tb > 0 else b""
    cut_m = keep_m.decode(errors="ignore") + (mark if len(keep_m) < len(mb) else "")
    cut_tb = (mark if len(keep_tb) < len(tbb) and tbb else "") + keep_tb.decode(errors="ignore")
    out = pack_error(kind, cut_m, cut_tb)
    return out if len(out) <= limit else None


def unpack_error(data: bytes) -> tuple[str, str, str]:
    """Return (type, message, traceback) from a failed result's payload, tolerating garbage."""
    try:
        t, m, tb = msgpack.unpackb(data, raw=False)
        return str(t), str(m), str(tb)
    except Exception:
        return "UnknownError", repr(data[:200]), ""
