"""The one exception tree of zmqdist, rooted at :class:`ZmqdistError`.

Errors that a client sees for a request carry a message a person can act on. Protocol errors are
split the h11 way: :class:`LocalProtocolError` (this process did something illegal) and
:class:`RemoteProtocolError` (a peer sent something illegal).
"""

from __future__ import annotations


class ZmqdistError(Exception):
    """Raised for every failure zmqdist reports; catch this to catch them all."""


class ConfigError(ZmqdistError, ValueError):
    """Raised when a setting, option or configuration file is invalid."""


class ProtocolError(ZmqdistError):
    """Raised when a message breaks the wire protocol."""

    def __init__(self, message: str, code: int = 0, rid: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.rid = rid


class LocalProtocolError(ProtocolError):
    """Raised when this process tries to send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """Raised when a peer sent a malformed, unknown or wrong-version message."""


class TransportError(ZmqdistError, OSError):
    """Raised when a socket operation fails (translated from ``zmq.ZMQError`` at one boundary)."""


class ClosedError(ZmqdistError, RuntimeError):
    """Raised when a client, worker or broker is used after it was stopped."""


class RequestError(ZmqdistError):
    """Raised at a client when a request ends without a successful reply."""

    def __init__(self, message: str, rid: int | None = None, service: str | None = None) -> None:
        super().__init__(message)
        self.rid = rid
        self.service = service


class RequestTimeout(RequestError, TimeoutError):
    """Raised when a request's deadline passed before a reply arrived."""


class NoBroker(RequestTimeout):
    """Raised when a request's deadline passed and no broker answered on any endpoint since it was
    submitted: none runs there, the address is wrong, (CURVE) the keys do not match, or the broker
    cannot accept more connections (out of file descriptors)."""

    def __init__(
        self, message: str, rid: int | None = None, service: str | None = None, endpoints: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message, rid=rid, service=service)
        self.endpoints = endpoints  # where the client looked for a broker


class RemoteError(RequestError):
    """Raised when the handler raised; carries the remote type, message and traceback text."""

    def __init__(
        self,
        message: str,
        *,
        remote_type: str,
        remote_message: str,
        remote_traceback: str,
        rid: int | None = None,
        service: str | None = None,
        trace: str = "",
    ) -> None:
        super().__init__(message, rid=rid, service=service)
        self.trace = trace  # the request's trace id: find it in the logs of every process it passed
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class StreamInterrupted(RequestError):
    """Raised by a stream whose run was cut after some of its parts had arrived (its worker or
    broker was lost, or a part went missing): the parts already yielded are all there were, in
    order, and none is repeated; the rest will not come."""


class Busy(RequestError):
    """Raised when the broker refused a request at once because its queue is full."""


class WorkerLost(RequestError):
    """Raised when the workers holding a request died more often than the attempt cap."""


class InvalidRequest(RequestError, ValueError):
    """Raised when the broker refused a request as malformed (bad service name, budget...)."""
