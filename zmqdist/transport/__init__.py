"""Sockets, poll loops, cross-thread mailboxes and zmq error translation.

The only package (with the runtimes above it) that touches zmq. ``zmq.ZMQError`` becomes
:class:`zmqdist.errors.TransportError` at one boundary, :func:`map_zmq_errors`.
"""

from zmqdist.transport.loop import Loop
from zmqdist.transport.mailbox import Mailbox
from zmqdist.transport.sockets import (
    LINGER_MS,
    DealerLink,
    RateLimitedLog,
    bind_router,
    context_of,
    map_zmq_errors,
    poll_timeout_ms,
)

__all__ = [
    "LINGER_MS",
    "DealerLink",
    "Loop",
    "Mailbox",
    "RateLimitedLog",
    "bind_router",
    "context_of",
    "map_zmq_errors",
    "poll_timeout_ms",
]
