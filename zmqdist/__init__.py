"""zmqdist: share request/reply work among many processes and machines over ZeroMQ."""

from zmqdist import _native

_native.install()  # compiled or pure-Python hot modules: chosen before any of them is imported

from zmqdist import protocol as _protocol  # noqa: E402
from zmqdist.broker import Broker  # noqa: E402
from zmqdist.client import (  # noqa: E402
    AsyncCallOptions,
    AsyncClient,
    AsyncStream,
    Client,
    ClientOptions,
    MapOptions,
    RequestFuture,
    RequestOptions,
    Stream,
    StreamOptions,
    TimeoutOption,
)
from zmqdist.codec import Codec  # noqa: E402
from zmqdist.context import RequestContext, current_request  # noqa: E402
from zmqdist.errors import (  # noqa: E402
    Busy,
    ClosedError,
    ConfigError,
    InvalidRequest,
    LocalProtocolError,
    NoBroker,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    RequestError,
    RequestTimeout,
    StreamInterrupted,
    TransportError,
    WorkerLost,
    ZmqdistError,
)
from zmqdist.policy import Retry  # noqa: E402
from zmqdist.worker import ServiceOptions, Worker, WorkerOptions, WorkerSettings  # noqa: E402

_native.confirm(_protocol)
if _native.STATE == "compiled":  # heads packed and read in one C call (not built on Windows: msgpack)
    try:
        from zmqdist import _heads
    except ImportError:
        pass
    else:
        _protocol.use_head_codec(_heads.pack, _heads.fields, _heads.message, _heads.key)

__version__ = "0.1.0"

__all__ = [
    "AsyncCallOptions",
    "AsyncClient",
    "AsyncStream",
    "Broker",
    "Busy",
    "Client",
    "ClientOptions",
    "ClosedError",
    "Codec",
    "ConfigError",
    "InvalidRequest",
    "LocalProtocolError",
    "MapOptions",
    "NoBroker",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "RequestContext",
    "RequestError",
    "RequestFuture",
    "RequestOptions",
    "RequestTimeout",
    "Retry",
    "ServiceOptions",
    "Stream",
    "StreamInterrupted",
    "StreamOptions",
    "TimeoutOption",
    "TransportError",
    "Worker",
    "WorkerLost",
    "WorkerOptions",
    "WorkerSettings",
    "ZmqdistError",
    "__version__",
    "current_request",
]
