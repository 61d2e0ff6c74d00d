"""CURVE security: certificates, allow-lists per role, and the ZAP handler that enforces them.

A broker started with a secret key encrypts every link it owns (CurveZMQ, RFC 26) and asks its ZAP
handler (RFC 27) about each peer at handshake: the peer's public key must be in one of the broker's
allow-lists (a directory of public certificates per role: clients, workers, brokers). The handler
answers with the key's name as User-Id and the key's roles and services as connection metadata;
libzmq attaches those to every message of that connection, so the broker checks each message
against the rights it had when it connected. Reloading the allow-lists (SIGHUP) therefore keeps
connected peers and refuses a revoked key from its next connection.

Certificates are the files ``zmq.auth.create_certificates`` writes (``NAME.key`` public,
``NAME.key_secret`` secret). Metadata ``services = a,b`` in a public certificate limits the key to
those services (as a client: the services it may call; as a worker: the ones it may serve).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.auth
from zmq.utils import z85

from zmqdist.errors import ConfigError
from zmqdist.transport.mailbox import Mailbox

log = logging.getLogger(__name__)

# Typed here: pyzmq 25 (which install_requires accepts) ships z85 without annotations.
z85_encode: Final[Callable[[bytes], bytes]] = z85.encode

ROLES = ("clients", "workers", "brokers")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ALL_SERVICES = "*"


@dataclass(frozen=True, slots=True)
class KeyRights:
    """What one public key may do: its name, roles, and services (None: any)."""

    name: str
    roles: frozenset[str]
    services: frozenset[str] | None


def read_metadata(path: Path) -> dict[str, str]:
    """Return the ``metadata`` section of a ZPL certificate file (``zmq.auth`` format)."""
    meta: dict[str, str] = {}
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        if section == "metadata" and "=" in line:
            k, _, v = line.strip().partition("=")
            meta[k.strip()] = v.strip().strip('"')
    return meta


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """Return (public, secret) keys (z85) from a secret certificate file, or raise ConfigError."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc}") from exc
    if not secret:
        raise ConfigError(f"{path} holds no secret key (use the NAME.key_secret file)")
    return public, secret


def load_public(path: str | Path) -> bytes:
    """Return the public key (z85) from a certificate file, or raise ConfigError."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc}") from exc
    return public


class KeyRing:
    """The allow-lists of one broker: public key (z85) -> rights, read from one directory per role."""

    def __init__(self, dirs: Mapping[str, str | Path | None]) -> None:
        self.dirs = {role: Path(d) for role, d in dirs.items() if d is not None}
        for role, d in self.dirs.items():
            if role not in ROLES:
                raise ConfigError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
            if not d.is_dir():
                raise ConfigError(f"allow-list for {role}: {d} is not a directory")
        self.keys: dict[bytes, KeyRights] = {}
        self.load()

    def load(self) -> None:
        """(Re)read every allow-list; the new table replaces the old one at once.

        A directory that cannot be listed (gone, or not readable) leaves the whole old table in
        place, with an ERROR: a directory replaced by a deployment, or a mistyped permission, must
        not refuse every peer of that role at its next connection. (To revoke every key of a role,
        empty its directory.)"""
        names: dict[bytes, str] = {}
        roles: dict[bytes, set[str]] = {}
        services: dict[bytes, set[str] | None] = {}
        listed_dirs: dict[str, list[Path]] = {}
        for role, d in self.dirs.items():
            try:
                listed_dirs[role] = sorted(p for p in d.iterdir() if p.name.endswith(".key"))
            except OSError as exc:
                log.error(
                    "allow-list %s: cannot read %s (%s): the allow-lists were not reloaded, the %d keys "
                    "loaded before still apply",
                    role,
                    d,
                    exc.strerror or exc,
                    len(self.keys),
                )
                return
        for role, paths in listed_dirs.items():
            for path in paths:
                try:
                    public = load_public(path)
                    meta = read_metadata(path)
                except (ConfigError, OSError, UnicodeDecodeError) as exc:
                    log.warning("allow-list %s: skipping %s: %s", role, path.name, exc)
                    continue
                names[public] = path.name[: -len(".key")]
                roles.setdefault(public, set()).add(role)
                listed = meta.get("services")
                if listed is None or listed.strip() == ALL_SERVICES:
                    services[public] = None
                elif services.get(public, set()) is not None:
                    mine = services.setdefault(public, set())
                    assert mine is not None
                    mine.update(s.strip() for s in listed.split(",") if s.strip())
        self.keys = {k: KeyRights(names[k], frozenset(roles[k]), _frozen(services[k])) for k in names}
        log.info(
            "allow-lists loaded: %d keys (%s)", len(self.keys), ", ".join(f"{r} from {d}" for r, d in self.dirs.items())
        )


def _frozen(services: set[str] | None) -> frozenset[str] | None:
    return None if services is None else frozenset(services)


def _metadata(props: dict[str, str]) -> bytes:
    """ZMTP metadata encoding (RFC 23): name length (1 byte), name, value length (4 bytes), value."""
    out = b""
    for k, v in props.items():
        kb, vb = k.encode(), v.encode()
        out += bytes([len(kb)]) + kb + len(vb).to_bytes(4, "big") + vb
    return out


class ZapHandler:
    """The ZAP handler of one zmq context: one thread that owns the ZAP socket and answers for every
    broker of the context, each under its own ZAP domain. It stops (closing its socket, so the
    context can terminate) when the last broker unregisters. Use :func:`zap_register`."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self._ctx = ctx
        self._rings: dict[str, KeyRing] = {}
        self._lock = threading.Lock()  # guards _rings between the thread and add/remove
        self._mailbox = Mailbox()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.refused = 0
        self.accepted = 0
        self._thread = threading.Thread(target=self._main, name="zmqdist-zap", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def add(self, domain: str, ring: KeyRing) -> None:
        with self._lock:
            self._rings[domain] = ring

    def remove(self, domain: str) -> None:
        with self._lock:
            self._rings.pop(domain, None)

    @property
    def domains(self) -> int:
        with self._lock:
            return len(self._rings)

    def reload(self, domain: str) -> None:
        """Re-read the allow-lists of ``domain`` (safe from a signal handler: done in the thread)."""
        self._mailbox.post(("reload", domain))

    def stop(self) -> None:
        self._mailbox.post(("stop", ""))
        self._thread.join(5)

    def _main(self) -> None:
        try:
            sock = self._ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._mailbox.fileno(), zmq.POLLIN)
        stopped = False
        try:
            while not stopped:
                events = dict(poller.poll())
                if self._mailbox.fileno() in events:
                    stopped = self._commands()
                if sock in events:
                    request = sock.recv_multipart()
                    sock.send_multipart(self._safe_answer(request))  # (REP: a request is always answered)
        except zmq.ContextTerminated:
            pass  # the context is ending: so is every broker of it
        except BaseException:
            # Without this thread libzmq admits every CURVE peer that knows the server key: the
            # brokers refuse such a peer's messages (no rights), and restart this handler (zap_check).
            log.critical("the ZAP handler stopped: CURVE peers are not checked until it restarts", exc_info=True)
            raise
        finally:
            sock.close(0)
            self._mailbox.close()

    def _commands(self) -> bool:
        """Apply what was posted; return True on stop. A reload that fails keeps the old table."""
        for cmd in self._mailbox.drain():
            if cmd[0] == "stop":
                return True
            with self._lock:
                ring = self._rings.get(cmd[1])
            if ring is not None:
                try:
                    ring.load()
                except Exception:
                    log.exception("the allow-lists were not reloaded: the ones loaded before still apply")
        return False

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _safe_answer(self, frames: list[bytes]) -> list[bytes]:
        """The answer to one ZAP request; a refusal (500) if working it out failed."""
        try:
            return self._answer(frames)
        except Exception:
            log.exception("ZAP request failed: the peer is refused")
            return [frames[0] if frames else b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"error", b"", b""]

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        creds = frames[6:]

        def no(why: str) -> list[bytes]:
            self.refused += 1
            log.warning(
                "refused %s peer from %s: %s", mechanism.decode(errors="replace"), address.decode(errors="replace"), why
            )
            return [version, request_id, b"400", why.encode(), b"", b""]

        with self._lock:
            ring = self._rings.get(domain.decode(errors="replace"))
        if ring is None:
            return no(f"unknown ZAP domain {domain[:40]!r}")
        if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            return no("CURVE is required")
        key = z85_encode(creds[0])
        rights = ring.keys.get(key)
        if rights is None:
            return no(f"key {key.decode()} is in no allow-list")
        self.accepted += 1
        meta = {"X-Roles": ",".join(sorted(rights.roles))}
        meta["X-Services"] = ALL_SERVICES if rights.services is None else ",".join(sorted(rights.services))
        return [version, request_id, b"200", b"OK", rights.name.encode(), _metadata(meta)]


_handlers: dict[int, ZapHandler] = {}
_handlers_lock = threading.Lock()


def zap_register(ctx: zmq.Context[Any], domain: str, ring: KeyRing) -> None:
    """Have the ZAP handler of ``ctx`` (started on first use) admit peers of ``domain`` by ``ring``."""
    with _handlers_lock:
        h = _handlers.get(id(ctx))
        if h is None:
            h = _handlers[id(ctx)] = ZapHandler(ctx)
        h.add(domain, ring)


def zap_check(ctx: zmq.Context[Any]) -> bool:
    """Restart the ZAP handler of ``ctx`` if its thread has ended (with every domain it served);
    return False if it had. A broker asks this at its ticks: without the handler, libzmq admits
    every CURVE peer that knows the server key."""
    with _handlers_lock:
        h = _handlers.get(id(ctx))
        if h is None or h.alive:
            return True
        with h._lock:
            rings = dict(h._rings)
        log.error("the ZAP handler had stopped: restarting it (%d broker(s) of this process)", len(rings))
        try:
            new = ZapHandler(ctx)
        except Exception:
            log.exception("the ZAP handler cannot restart: CURVE peers stay refused (no rights)")
            return False
        for domain, ring in rings.items():
            new.add(domain, ring)
        _handlers[id(ctx)] = new
        return False


def zap_unregister(ctx: zmq.Context[Any], domain: str) -> None:
    """Forget ``domain``; stop the context's ZAP handler when it served the last one."""
    with _handlers_lock:
        h = _handlers.get(id(ctx))
        if h is None:
            return
        h.remove(domain)
        if not h.domains:
            del _handlers[id(ctx)]
            h.stop()


def zap_reload(ctx: zmq.Context[Any], domain: str) -> None:
    """Re-read the allow-lists of ``domain`` in the ZAP handler's thread (signal-handler safe)."""
    h = _handlers.get(id(ctx))
    if h is not None:
        h.reload(domain)


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """CURVE settings of a DEALER toward a broker: the broker's public key, our key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: object, key: object, what: str) -> ClientKeys | None:
        """Read the certificate files (both or neither; paths, as strings or ``Path``s), or raise
        ConfigError."""
        if server_key is None and key is None:
            return None
        if server_key is None or key is None:
            raise ConfigError(f"{what}: CURVE needs both server_key (the broker's .key) and key (our .key_secret)")
        if not isinstance(server_key, (str, Path)) or not isinstance(key, (str, Path)):
            raise ConfigError(
                f"{what}: server_key and key are the paths of certificate files, got {server_key!r} and {key!r}"
            )
        public, secret = load_secret(key)
        return cls(load_public(server_key), public, secret)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def generate(name: str, directory: str | Path, services: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` and ``DIR/NAME.key_secret``; return their paths."""
    d = Path(directory)
    if "/" in name and Path(name).name and not Path(name).name.startswith("."):
        where = Path(name)
        raise ConfigError(
            f"{name!r} is a path: give the name alone, and the directory with --dir "
            f"(zmqdist keys generate {where.name} --dir {where.parent})"
        )
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{name!r} is not a usable key name (a file name, not starting with '.')")
    d.mkdir(parents=True, exist_ok=True)
    if (d / f"{name}.key").exists() or (d / f"{name}.key_secret").exists():
        raise ConfigError(f"{d / name}.key already exists: remove it first, or choose another name")
    meta = {"services": ",".join(services)} if services else None
    public, secret = zmq.auth.create_certificates(str(d), name, metadata=meta)
    Path(secret).chmod(0o600)
    if meta:
        # zmq.auth writes metadata into the secret file only; allow-lists hold the public one
        pub = Path(public)
        text = pub.read_text(encoding="utf-8")
        lines = "".join(f"    {k} = {v}\n" for k, v in meta.items())
        pub.write_text(text.replace("\nmetadata\n", f"\nmetadata\n{lines}", 1), encoding="utf-8")
    return Path(public), Path(secret)
