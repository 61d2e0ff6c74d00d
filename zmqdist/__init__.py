"""zmqdist: share request/reply work among many processes and machines over ZeroMQ."""

from zmqdist.broker import Broker
from zmqdist.client import AsyncClient, Client
from zmqdist.context import RequestContext, current_request
from zmqdist.errors import (
    Busy,
    ClosedError,
    ConfigError,
    InvalidRequest,
    LocalProtocolError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    RequestError,
    RequestTimeout,
    TransportError,
    WorkerLost,
    ZmqdistError,
)
from zmqdist.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Broker",
    "Busy",
    "Client",
    "ClosedError",
    "ConfigError",
    "InvalidRequest",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "RequestContext",
    "RequestError",
    "RequestTimeout",
    "TransportError",
    "Worker",
    "WorkerLost",
    "ZmqdistError",
    "__version__",
    "current_request",
]
