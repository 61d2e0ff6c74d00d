"""What a key's roles allow it to send to a broker. Pure.

Roles come from the allow-lists a key is in (``clients``, ``workers``, ``brokers``); services
limit a key to named services (``*`` for any). A broker asks :func:`refusal` about every message
of a secured connection, with the rights the connection was admitted with.
"""

from __future__ import annotations

from typing import Final

from zmqdist import protocol as p

_CLIENT: Final = (p.Request, p.Hello, p.Heartbeat, p.Bye, p.Cancel, p.Ack)
_WORKER: Final = (p.Hello, p.Heartbeat, p.Result, p.Credit, p.Bye, p.Part, p.Progress)
_BROKER: Final = (p.Hello, p.Heartbeat, p.Request, p.Reply, p.Advert, p.Bye, p.Cancel, p.Ack, p.Part, p.Progress)
_HELLO_ROLE: Final = {p.ROLE_CLIENT: "clients", p.ROLE_WORKER: "workers", p.ROLE_BROKER: "brokers"}


# The rights of a CURVE connection that no ZAP handler checked (libzmq admits any peer that knows
# the server key while none runs): empty, and every message of it is refused with this.
UNCHECKED: Final = (
    "this connection was not checked against the allow-lists (the broker's ZAP handler was not running "
    "when it connected): connect again"
)


def pair_peer(roles: str | None) -> bool:
    """May a connection with ``roles`` speak on a pair link? Only a broker key (None: no CURVE)."""
    return roles is None or "brokers" in roles.split(",")


def refusal(roles: str, services: str, msg: p.Message) -> str | None:
    """Return why ``msg`` is refused for a peer with ``roles`` and ``services`` (comma-separated,
    as the ZAP handler put them in the connection's metadata), or None if it is allowed."""
    if not roles:  # every key of an allow-list has a role: none means no ZAP handler saw it
        return UNCHECKED
    have = roles.split(",")
    t = type(msg)
    if isinstance(msg, (p.Hello, p.Heartbeat)):
        need = _HELLO_ROLE.get(msg.role, "")
        # A broker key may also come as a client: the passive proxy of a pair asks its upstream
        # so (its witness, docs/ha.md); as a proxy it may send any request already.
        if need not in have and not (need == "clients" and "brokers" in have):
            return f"a key in the {'/'.join(have) or 'no'} allow-list cannot act as {need or 'that role'}"
        if isinstance(msg, p.Hello) and need == "workers":
            return _services_refusal(services, msg.services)
        return None
    allowed = (
        ("clients" in have and t in _CLIENT)
        or ("workers" in have and t in _WORKER)
        or ("brokers" in have and t in _BROKER)
    )
    if not allowed:
        return f"{t.__name__} is not allowed to a key in the {'/'.join(have) or 'no'} allow-list"
    if isinstance(msg, p.Request) and "brokers" not in have:
        service = msg.service
        if not p.internal(service):
            return _services_refusal(services, (service,))
    return None


def _services_refusal(services: str, wanted: tuple[str, ...]) -> str | None:
    if services == "*":
        return None
    allowed = set(services.split(",")) if services else set()
    denied = [s for s in wanted if s not in allowed]
    return f"this key is not allowed service(s) {', '.join(denied)}" if denied else None
