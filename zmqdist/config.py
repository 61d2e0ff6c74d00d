"""Settings objects (frozen, validated) and TOML loading. A leaf: imports nothing of zmqdist's but errors.

Every option of a broker is written once, as a field of :class:`BrokerSettings` with its help text,
its flag and its range in the field's metadata: the ``zmqdist broker`` options, the TOML/environment
layer and :class:`zmqdist.Broker` are all made from it. Durations are float seconds (``*_s``); they
become milliseconds only on the wire and at poll calls.
"""

from __future__ import annotations

import difflib
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from zmqdist.errors import ConfigError

DEFAULT_HEARTBEAT_S = 0.25
DEFAULT_LIVENESS = 4  # a silent peer is declared dead after liveness * heartbeat = 1 s by default
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be greater than 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    """How often peers heartbeat and how many missed beats declare a peer dead."""

    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    liveness: int = DEFAULT_LIVENESS

    def __post_init__(self) -> None:
        hb, live = self.heartbeat_s, self.liveness
        if isinstance(hb, bool) or not isinstance(hb, (int, float)) or not 0.001 <= hb <= 3600:
            raise ConfigError(f"heartbeat must be between 0.001 and 3600 seconds, got {hb!r}")
        if isinstance(live, bool) or not isinstance(live, int) or not 1 <= live <= 1000:
            raise ConfigError(f"liveness must be between 1 and 1000 heartbeats, got {live!r}")

    @classmethod
    def of(cls, heartbeat_s: object, liveness: object) -> HeartbeatSettings:
        """Settings from a caller's values of any type: checked here (this module is not
        compiled, so the dataclass takes them as they are and ``__post_init__`` refuses them)."""
        return cls(heartbeat_s, liveness)  # type: ignore[arg-type]

    @property
    def ttl_s(self) -> float:
        """Seconds of silence after which a peer is declared dead."""
        return self.heartbeat_s * self.liveness


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    path: str = "",
    multiple: bool = False,
    cli: bool = True,
    cli_default: Any = ...,
) -> Any:
    """A settings field with what the command line needs to offer it (flag, range, choices;
    ``path`` "file" or "dir": an existing file or directory).

    ``cli_default``: the command line's own default where it differs (None: the runtime chooses)."""
    meta = {
        "help": help,
        "flag": flag,
        "lo": lo,
        "hi": hi,
        "choices": choices,
        "path": path,
        "multiple": multiple,
        "cli": cli,
        "cli_default": default if cli_default is ... else cli_default,  # what --help shows
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Every option of a broker (``zmqdist broker --help`` lists them, generated from this class)."""

    bind: tuple[str, ...] = option(
        ("tcp://127.0.0.1:5555",),
        "endpoint to bind (repeatable); beyond loopback, turn CURVE on (--key): see docs/security.md",
        multiple=True,
    )
    name: str = option(
        "broker",
        "broker name shown in status and errors; unique in a topology [default: HOST-PID-RANDOM]",
        cli_default=None,
    )
    upstream: tuple[str, ...] = option(
        (), "run as a proxy of this upstream broker (repeatable, failover order)", multiple=True
    )
    heartbeat_s: float = option(
        DEFAULT_HEARTBEAT_S, "heartbeat interval in seconds", flag="--heartbeat", lo=0.001, hi=3600
    )
    liveness: int = option(DEFAULT_LIVENESS, "missed heartbeats before a peer is declared dead", lo=1, hi=1000)
    max_queue: int = option(10_000, "queued requests before new ones get Busy", lo=1)
    max_queue_bytes: int = option(256 * 1024 * 1024, "queued payload bytes before Busy", lo=1)
    max_attempts: int = option(
        3, "runs of one request cut by a worker's death before WorkerLost (retry-policy runs not counted)", lo=1, hi=100
    )
    join_same_key: bool = option(
        False, "a request with the same caller key and service as an open one joins it: one run, a reply to each"
    )
    max_client_inflight: int = option(
        2500, "open requests per client (a zmqdist client keeps the rest; others get Busy; proxies exempt)", lo=1
    )
    max_message_size: int = option(
        DEFAULT_MAX_MESSAGE,
        "a larger message is refused with its reason and logged (zmqdist clients refuse it before "
        "sending); libzmq drops one over twice this with its connection",
        lo=1,
    )
    mdp_heartbeat_s: float = option(
        2.5, "seconds between heartbeats of Majordomo workers", flag="--mdp-heartbeat", lo=0.001, hi=3600
    )
    mdp_liveness: int = option(3, "missed heartbeats that expire a Majordomo worker", lo=1, hi=1000)
    mdp_timeout_s: float = option(
        60.0, "deadline in seconds of Majordomo client requests", flag="--mdp-timeout", lo=0.001, hi=7 * 24 * 3600
    )
    key: str | None = option(None, "the broker's secret certificate: CURVE on every link it owns", path="file")
    allow_clients: str | None = option(None, "directory of public certificates of allowed clients", path="dir")
    allow_workers: str | None = option(None, "directory of public certificates of allowed workers", path="dir")
    allow_brokers: str | None = option(None, "directory of public certificates of allowed proxies", path="dir")
    upstream_server_key: str | None = option(None, "the upstream broker's public certificate (proxies)", path="file")
    ha: str = option(
        "", "run as one broker of a backup pair (needs --peer and --ha-bind)", choices=("primary", "backup")
    )
    peer: str = option("", "the other broker's --ha-bind endpoint (backup pairs)")
    ha_bind: tuple[str, ...] = option(
        (), "endpoint the other broker of the pair connects to (repeatable)", multiple=True
    )
    failback: str = option(
        "manual",
        "auto: an active backup hands back to its primary once the primary is back and in sync",
        choices=("manual", "auto"),
    )
    peer_server_key: str | None = option(None, "the other broker's public certificate (pairs with --key)", path="file")
    tcp_keepalive_s: int = option(
        60,
        "seconds of silence on a peer's tcp connection before the kernel probes the peer: one whose host "
        "vanished (no FIN, no reset) is cut after about twice this, idle or with data unacknowledged "
        "(0: the system's settings, keepalives off by default)",
        flag="--tcp-keepalive",
        lo=0,
        hi=7200,
    )
    metrics_port: int | None = option(None, "serve Prometheus metrics on this port (0: any free one)", lo=0, hi=65535)
    metrics_addr: str = option("127.0.0.1", "address of the metrics endpoint")
    advert_interval_s: float = option(
        0.005, "a proxy tells its upstream about capacity changes at most this often (seconds)", lo=0, hi=60
    )
    overflow: str = option(
        "latency",
        "latency: work goes to another broker only when its expected wait for a slot here exceeds "
        "the link's round trip plus the service time there (docs/tiers.md); credit: whenever "
        "no slot here is free and the other broker has credit",
        choices=("latency", "credit"),
    )
    overflow_bias_ms: float = option(
        0.0, "with --overflow latency: a cost added to going to another broker (ms; > 0 keeps more local)", lo=0
    )
    backoff_s: float = option(0.25, "first jittered pause before a proxy registers upstream again (seconds)", lo=0)
    backoff_max_s: float = option(4.0, "longest pause before a proxy registers upstream again (seconds)", lo=0, hi=3600)
    forget_service_s: float = option(
        60.0,
        "seconds a service with no worker and nothing queued stays listed (in status and metrics)",
        flag="--forget-service",
        lo=0,
    )
    heartbeat: HeartbeatSettings = field(init=False, repr=False, compare=False, metadata={"cli": False})

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.init:
                _check_field(f, getattr(self, f.name))
        object.__setattr__(self, "heartbeat", HeartbeatSettings(self.heartbeat_s, self.liveness))
        if not self.name or len(self.name) > 255:
            raise ConfigError("broker name must be 1 to 255 characters")
        if not self.ha and (self.peer or self.ha_bind):
            raise ConfigError("peer and ha_bind are for a broker of a pair: set ha to 'primary' or 'backup'")
        if not self.backoff_s <= self.backoff_max_s:
            raise ConfigError(f"need backoff_s <= backoff_max_s, got {self.backoff_s!r} and {self.backoff_max_s!r}")
        if self.key is None and (self.allow_clients or self.allow_workers or self.allow_brokers):
            raise ConfigError("allow-lists need the broker's own secret key (key=... / --key)")
        if self.ha and self.key is not None and self.peer_server_key is None:
            raise ConfigError("with CURVE on, a broker of a pair needs peer_server_key (the peer's public certificate)")

    @property
    def mdp_heartbeat(self) -> HeartbeatSettings:
        """Majordomo workers' heartbeat settings (they heartbeat at their own pace)."""
        return HeartbeatSettings(self.mdp_heartbeat_s, self.mdp_liveness)

    @classmethod
    def from_options(cls, **options: Any) -> BrokerSettings:
        """Return settings from keyword options as a caller gives them: lists for the repeatable
        ones (or one string), None for "not set". Unknown ones are refused with the nearest name."""
        spec = {f.name: f for f in fields(cls) if f.init}
        given: dict[str, Any] = {}
        for k, v in options.items():
            f = spec.get(k)
            if f is None:
                raise ConfigError(f"unknown broker option {k!r}{did_you_mean(k, list(spec))}")
            if v is None and not str(f.type).endswith("| None"):
                continue  # not set: the default
            if str(f.type) == "tuple[str, ...]" and isinstance(v, (str, list)):
                given[k] = (v,) if isinstance(v, str) else tuple(v)
            else:
                given[k] = v
        return cls(**given)


def cli_flag(f: Field[Any]) -> str:
    """The command-line flag of a settings field (``--max-queue``, or the one it names)."""
    return str(f.metadata["flag"] or "--" + f.name.replace("_", "-"))


def option_names(cls: type) -> list[str]:
    """The names of the options of a settings class (the fields set at construction)."""
    return [f.name for f in fields(cls) if f.init]


def take_options(given: Mapping[str, object], defaults: Mapping[str, object], what: str) -> dict[str, object]:
    """``defaults`` overlaid with ``given``, the keyword options of a public call; a name not in
    ``defaults`` is a ConfigError naming the nearest one. The public API takes its options this way
    (``**options: Unpack[...]``: precise types for a type checker, none checked by a compiled
    install at the call), so that each is checked where it is used, as a ConfigError naming it,
    compiled or not."""
    for k in given:
        if k not in defaults:
            raise ConfigError(f"{what} takes no option {k!r}{did_you_mean(k, list(defaults))}")
    return {**defaults, **given}


def check_seconds(value: object, what: str) -> float:
    """``value`` as float seconds (a wait's bound: 0 or more), or a ConfigError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ConfigError(f"{what} must be a number of seconds of at least 0, got {value!r}")
    return float(value)


def check_flag(value: object, what: str) -> bool:
    """``value`` if it is True or False, else a ConfigError naming ``what`` (``"no"`` is true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be True or False, got {value!r}")
    return value


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """``"; did you mean 'x'?"`` for the nearest of ``choices``, or ``""``."""
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""


def _check_field(f: Field[Any], v: Any) -> None:
    """Check one option's type and range against its field (a clear error naming the option)."""
    kind = str(f.type)
    name = f.name
    if v is None and kind.endswith("| None"):
        return
    kind = kind.removesuffix(" | None")
    meta = f.metadata
    if kind == "tuple[str, ...]":
        if not isinstance(v, tuple) or not all(isinstance(e, str) and e for e in v):
            raise ConfigError(f"{name} must be a list of non-empty strings, got {v!r}")
    elif kind == "str":
        if not isinstance(v, str):
            raise ConfigError(f"{name} must be a string, got {v!r}")
        choices = meta.get("choices")
        if choices and v and v not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    elif kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, got {v!r}")
    elif kind in ("int", "float"):
        whole = kind == "int"
        if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)):
            raise ConfigError(f"{name} must be {'a whole number' if whole else 'a number'}, got {v!r}")
        lo, hi = meta.get("lo"), meta.get("hi")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if lo is not None and hi is not None:
                rng = f"from {lo:g} to {hi:g}"
            else:
                rng = f"at least {lo:g}" if lo is not None else f"at most {hi:g}"
            raise ConfigError(f"{name} must be {rng}, got {v!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Return the TOML file at ``path`` as a dict. Raises :class:`ConfigError` with the reason."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {p} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    return data


SCHEMES = ("tcp", "ipc", "inproc")
# The longest ipc path a socket address holds (sockaddr_un.sun_path less its NUL): 107 bytes on
# Linux, 103 on macOS and the BSDs. libzmq refuses a longer one only at bind or connect, where a
# client or worker learns of it on its socket thread, after its constructor returned.
IPC_PATH_MAX = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107


# What libzmq takes for a host to connect to (it refuses the rest with EINVAL at connect, on the
# socket thread of a client or worker, which then fails whole: check it where it is given).
CONNECT_HOST = re.compile(r"[A-Za-z0-9\[:][A-Za-z0-9.\-:%;\[\]_]*\Z")


def check_endpoint(ep: object, what: str, connect: bool = False) -> str:
    """Return ``ep`` after checking it is a complete ZeroMQ endpoint (scheme, host and port, or a
    path); raise :class:`ConfigError` naming ``what`` and the problem. ``connect``: an endpoint to
    connect to, where a wildcard (``*``) that only a bind takes is refused."""
    example = "tcp://127.0.0.1:5555"
    if not isinstance(ep, str) or "://" not in ep:
        raise ConfigError(f"{what}: {ep!r} is not an endpoint like {example}")
    scheme, _, rest = ep.partition("://")
    if scheme not in SCHEMES:
        raise ConfigError(f"{what}: unsupported transport {scheme!r} in {ep!r} (tcp, ipc, inproc)")
    if scheme != "tcp":
        if not rest:
            raise ConfigError(f"{what}: {ep!r} names no {scheme} path")
        if scheme == "ipc" and (size := len(rest.encode())) > IPC_PATH_MAX:
            raise ConfigError(
                f"{what}: the ipc path of {ep!r} is {size} bytes, longer than the"
                f" {IPC_PATH_MAX} a socket address holds here: use a shorter path (under /tmp or /run, say)"
            )
        if connect and rest == "*":
            raise ConfigError(f"{what}: {ep!r} binds a new path and cannot be connected to: name the path")
        return ep
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: {ep!r} has no port (like {example})")
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(f"{what}: {ep!r} has an unclosed IPv6 bracket")
    if connect and "*" in (host, port):
        raise ConfigError(
            f"{what}: {ep!r} is a bind address (* is any interface or port): to connect, name the"
            f" broker's host and port, like {example}"
        )
    if port != "*" and not (port.isdigit() and 0 < int(port) <= 65535):
        raise ConfigError(f"{what}: port {port!r} of {ep!r} must be 1 to 65535 (or * to bind any free one)")
    if connect and not CONNECT_HOST.match(host):
        raise ConfigError(f"{what}: host {host!r} of {ep!r} is not a host name or address")
    return ep


LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1", "lo")


def exposed(ep: str) -> bool:
    """Is ``ep`` (a bind endpoint) reachable from other hosts? tcp on any interface but loopback."""
    scheme, _, rest = ep.partition("://")
    if scheme != "tcp":
        return False  # ipc and inproc stay on this host
    host = rest.rpartition(":")[0]
    return not host.startswith(LOOPBACK_HOSTS)


def check_endpoints(endpoints: object, what: str, connect: bool = False) -> tuple[str, ...]:
    """Return ``endpoints`` (one string, or a list, tuple or other sequence of them) as a tuple
    after checking each is a complete ZeroMQ endpoint (to connect to, with ``connect``)."""
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if isinstance(endpoints, (bytes, bytearray)) or not isinstance(endpoints, Sequence):
        raise ConfigError(
            f"{what}: endpoints must be a string or a list of them like ['tcp://127.0.0.1:5555'], got {endpoints!r}"
        )
    eps = tuple(endpoints)
    if not eps:
        raise ConfigError(f"{what}: at least one endpoint is required")
    for ep in eps:
        check_endpoint(ep, what, connect)
    return eps


def broker_endpoints(s: BrokerSettings) -> tuple[tuple[str, ...], str | None, tuple[str, ...]]:
    """Check a broker's own endpoints as it will bind and connect them; return its binds, its
    pair peer (None outside a pair) and its pair binds. The broker and ``zmqdist up --check``
    both ask here, so a file that checks valid starts."""
    bind = check_endpoints(s.bind, "broker bind")
    if twice := [b for i, b in enumerate(bind) if b in bind[:i]]:
        raise ConfigError(f"broker bind {twice[0]} is given twice")
    if s.upstream:
        check_endpoints(s.upstream, "broker upstream", connect=True)
        if mine := [u for u in s.upstream if u in bind]:
            raise ConfigError(f"broker upstream {mine[0]} is this broker's own bind: give the master's endpoint")
    if s.ha and (not s.peer or not s.ha_bind):
        raise ConfigError(f"a {s.ha} broker of a pair needs both peer (the other's ha_bind) and ha_bind")
    peer = check_endpoints(s.peer, "broker peer", connect=True)[0] if s.ha else None
    ha_bind = check_endpoints(s.ha_bind, "broker ha_bind") if s.ha else ()
    if peer is not None and (peer in ha_bind or peer in bind):
        own = "ha_bind" if peer in ha_bind else "bind"
        raise ConfigError(f"broker peer {peer} is this broker's own {own}: give the other broker's ha_bind")
    return bind, peer, ha_bind
