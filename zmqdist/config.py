"""Settings objects (frozen, validated) and TOML loading. A leaf: imports nothing of zmqdist's but errors.

Durations are float seconds (``*_s``); they become milliseconds only on the wire and at poll calls.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zmqdist.errors import ConfigError

DEFAULT_HEARTBEAT_S = 0.25
DEFAULT_LIVENESS = 4  # a silent peer is declared dead after liveness * heartbeat = 1 s by default


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be greater than 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    """How often peers heartbeat and how many missed beats declare a peer dead."""

    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    liveness: int = DEFAULT_LIVENESS

    def __post_init__(self) -> None:
        if not 0.001 <= self.heartbeat_s <= 3600:
            raise ConfigError(f"heartbeat must be between 0.001 and 3600 seconds, got {self.heartbeat_s!r}")
        if not 1 <= self.liveness <= 1000:
            raise ConfigError(f"liveness must be between 1 and 1000 heartbeats, got {self.liveness!r}")

    @property
    def ttl_s(self) -> float:
        """Seconds of silence after which a peer is declared dead."""
        return self.heartbeat_s * self.liveness


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """What a broker's core needs to know; see ``zmqdist broker --help`` for each."""

    name: str = "broker"
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)
    max_queue: int = 10_000
    max_queue_bytes: int = 256 * 1024 * 1024
    max_attempts: int = 3
    max_client_inflight: int = 2500  # open requests per client before Busy: a quarter of the queue (proxies exempt)
    upstream: tuple[str, ...] = ()  # a proxy's upstream broker endpoints, in failover order
    advert_interval_s: float = 0.005  # a proxy tells its upstream about capacity changes at most this often
    backoff_s: float = 0.25  # first jittered pause before re-registering upstream; doubles per failure
    backoff_max_s: float = 4.0
    ha: str = ""  # "primary" or "backup": one broker of a backup pair; "" for a broker alone
    failback: str = "manual"  # "auto": a backup hands the work back to its primary once it is in sync

    def __post_init__(self) -> None:
        if self.ha not in ("", "primary", "backup"):
            raise ConfigError(f"ha must be 'primary' or 'backup' (or empty for no pair), got {self.ha!r}")
        if self.failback not in ("manual", "auto"):
            raise ConfigError(f"failback must be 'manual' or 'auto', got {self.failback!r}")
        if not self.name or len(self.name) > 255:
            raise ConfigError("broker name must be 1 to 255 characters")
        if not all(isinstance(e, str) and e for e in self.upstream):
            raise ConfigError(f"upstream must be a list of endpoints, got {self.upstream!r}")
        if not 0 <= self.advert_interval_s <= 60:
            raise ConfigError(f"advert_interval_s must be between 0 and 60 seconds, got {self.advert_interval_s!r}")
        if not 0 <= self.backoff_s <= self.backoff_max_s <= 3600:
            raise ConfigError(
                f"need 0 <= backoff_s <= backoff_max_s <= 3600, got {self.backoff_s!r} and {self.backoff_max_s!r}"
            )
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {self.max_queue!r}")
        if self.max_queue_bytes < 1:
            raise ConfigError(f"max_queue_bytes must be at least 1, got {self.max_queue_bytes!r}")
        if self.max_client_inflight < 1:
            raise ConfigError(f"max_client_inflight must be at least 1, got {self.max_client_inflight!r}")
        if not 1 <= self.max_attempts <= 100:
            raise ConfigError(f"max_attempts must be between 1 and 100, got {self.max_attempts!r}")


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


def check_endpoints(endpoints: list[str] | tuple[str, ...] | str, what: str) -> tuple[str, ...]:
    """Return ``endpoints`` as a tuple after checking each looks like a ZeroMQ endpoint."""
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    eps = tuple(endpoints)
    if not eps:
        raise ConfigError(f"{what}: at least one endpoint is required")
    for ep in eps:
        if not isinstance(ep, str) or "://" not in ep:
            raise ConfigError(f"{what}: {ep!r} is not an endpoint like tcp://127.0.0.1:5555")
        scheme = ep.split("://", 1)[0]
        if scheme not in ("tcp", "ipc", "inproc"):
            raise ConfigError(f"{what}: unsupported transport {scheme!r} in {ep!r} (tcp, ipc, inproc)")
    return eps
