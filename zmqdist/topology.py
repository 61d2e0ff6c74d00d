"""A topology file: every broker, worker and client load of a deployment, in one TOML file.

``zmqdist up FILE`` starts it (:mod:`zmqdist.up`); this module reads and checks it, with errors that
name the file, the line and the field. The format (docs/tiers.md has a whole example)::

    [settings]                  # optional; defaults for every process
    restart = false             # start a process again when it dies
    stop_timeout = 10           # seconds a process has to stop after SIGTERM (then SIGKILL)
    pythonpath = ["."]          # added to every process's PYTHONPATH (relative to the file)
    status_key = "admin.key_secret"  # CURVE: a client certificate brokers allow, for the table

    [[broker]]                  # any option of `zmqdist broker` (dashes or underscores)
    name = "master"
    bind = ["tcp://127.0.0.1:7100"]

    [[worker]]
    name = "central"
    target = "workers:central"  # MODULE:OBJECT, as `zmqdist worker` takes it
    connect = ["tcp://127.0.0.1:7100"]
    count = 2                   # processes central-1 and central-2

    [[load]]                    # a client sending a steady load (`zmqdist load`)
    name = "users"
    connect = ["tcp://127.0.0.1:7100"]
    service = "work"
    rate = 100                  # requests a second

Processes are named by ``name`` (``NAME-1`` ... ``NAME-count`` for counted workers); names are
unique across the file, so ``--only NAME`` picks processes on each host of a deployment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from zmqdist.config import BrokerSettings, broker_endpoints, check_endpoints, cli_flag, did_you_mean, load_toml
from zmqdist.errors import ConfigError

KINDS = ("broker", "worker", "load")
SETTINGS = {"restart": bool, "stop_timeout": float, "pythonpath": list, "status_key": str}
COMMON = {"name": str, "restart": bool}
WORKER = {
    **COMMON,
    "target": str,
    "connect": list,
    "concurrency": int,
    "count": int,
    "isolation": str,
    "heartbeat": float,
    "liveness": int,
    "server_key": str,
    "key": str,
}
LOAD = {
    **COMMON,
    "connect": list,
    "service": str,
    "rate": float,
    "value": object,
    "timeout": float,
    "inflight": int,
    "server_key": str,
    "key": str,
}
_PATHS = {f.name for f in fields(BrokerSettings) if f.init and f.metadata.get("path")}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class Process:
    """One process of a topology: its name, kind, command-line arguments (after ``zmqdist``),
    whether it is restarted, its start order (brokers nearest the root first) and what the
    supervisor needs to ask it for status."""

    name: str
    kind: str
    args: tuple[str, ...]
    restart: bool
    order: int
    entry: str  # the entry's name (counted workers share it)
    endpoints: tuple[str, ...] = ()  # a broker's bind endpoints (for status)
    key: str | None = None  # a broker's own certificate (CURVE on): its public half is the server key


@dataclass
class Topology:
    """A checked topology file."""

    path: Path
    processes: list[Process]
    stop_timeout: float = 10.0
    pythonpath: tuple[str, ...] = ()
    status_key: str | None = None  # the supervisor's client certificate for brokers with CURVE on
    warnings: list[str] = field(default_factory=list)

    def select(self, only: str | None) -> list[Process]:
        """The processes named in ``only`` (comma-separated process or entry names), or all."""
        if not only:
            return list(self.processes)
        names = [n.strip() for n in only.split(",") if n.strip()]
        known = {p.name for p in self.processes} | {p.entry for p in self.processes}
        for n in names:
            if n not in known:
                raise ConfigError(f"--only: {self.path} has no process {n!r}{did_you_mean(n, sorted(known))}")
        return [p for p in self.processes if p.name in names or p.entry in names]


class _Lines:
    """Where each key of each entry is written in the file (tomllib gives no positions)."""

    def __init__(self, text: str) -> None:
        self.at: dict[tuple[str, int, str], int] = {}
        count: dict[str, int] = {}
        section = ("", -1)
        for no, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if m := re.match(r"^\[\[\s*([\w-]+)\s*\]\]", s):
                kind = m.group(1)
                count[kind] = count.get(kind, -1) + 1
                section = (kind, count[kind])
                self.at.setdefault((*section, ""), no)
            elif m := re.match(r"^\[\s*([\w-]+)\s*\]", s):
                section = (m.group(1), 0)
                self.at.setdefault((*section, ""), no)
            elif m := re.match(r"^([\w-]+)\s*=", s):
                self.at.setdefault((*section, m.group(1).replace("-", "_")), no)

    def line(self, kind: str, index: int, key: str = "") -> int | None:
        return self.at.get((kind, index, key)) or self.at.get((kind, index, ""))


def load(path: str | Path) -> Topology:
    """Read and check the topology file at ``path``. Raises ConfigError naming the line and field."""
    path = Path(path)
    data = load_toml(path)
    lines = _Lines(path.read_text(encoding="utf-8"))

    def fail(kind: str, index: int, key: str, what: str) -> ConfigError:
        no = lines.line(kind, index, key)
        return ConfigError(f"{path}{f':{no}' if no else ''}: {what}")

    for top in data:
        if top not in (*KINDS, "settings"):
            raise fail(top, 0, "", f"unknown table [{top}]{did_you_mean(top, [*KINDS, 'settings'])}")
    settings = _table(data.get("settings", {}), SETTINGS, "settings", 0, fail, "settings")
    restart_default = settings.get("restart", False)
    stop_timeout = float(settings.get("stop_timeout", 10.0))
    if not 0 < stop_timeout <= 600:
        raise fail("settings", 0, "stop_timeout", f"stop_timeout must be from 0 to 600 seconds, got {stop_timeout!r}")
    pythonpath = []
    for entry in settings.get("pythonpath", []):
        if not isinstance(entry, str):
            raise fail("settings", 0, "pythonpath", f"pythonpath must be a list of paths, got {entry!r}")
        pythonpath.append(str((path.parent / entry).resolve()))
    status_key = None
    if "status_key" in settings:
        f = (path.parent / settings["status_key"]).resolve()
        if not f.is_file():
            raise fail("settings", 0, "status_key", f"status_key {settings['status_key']!r}: no such file ({f})")
        status_key = str(f)
    entries: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        tables = data.get(kind, [])
        if not isinstance(tables, list):
            raise fail(kind, 0, "", f"{kind} entries are written [[{kind}]] (an array of tables)")
        entries[kind] = tables
    if not any(entries.values()):
        raise ConfigError(f"{path}: no [[broker]], [[worker]] or [[load]] entry: nothing to start")
    procs: list[Process] = []
    binds: dict[str, str] = {}
    brokers = []
    for i, t in enumerate(entries["broker"]):
        name = _name(t, "broker", i, fail)
        options = {k.replace("-", "_"): v for k, v in t.items() if k not in ("restart",)}
        for k, v in options.items():
            if k in _PATHS and isinstance(v, str):
                options[k] = str((path.parent / v).resolve())  # relative to the file
        restart = _bool(t.get("restart", restart_default), "broker", i, "restart", fail)
        try:
            s = BrokerSettings.from_options(**options)
        except ConfigError as exc:
            key = _key_in(str(exc), options)
            raise fail("broker", i, key, f"broker {name!r}: {exc}") from None
        for ep in s.bind:
            if ep in binds:
                raise fail("broker", i, "bind", f"broker {name!r} binds {ep}, as broker {binds[ep]!r} does")
            binds[ep] = name
        try:  # as the broker checks them when it starts (a bind address as its upstream, say)
            broker_endpoints(s)
        except ConfigError as exc:
            why = str(exc).removeprefix("broker ")  # "broker 'p': upstream: ...", not "broker 'p': broker ..."
            raise fail("broker", i, _key_in(why, options), f"broker {name!r}: {why}") from None
        brokers.append((i, name, s, restart))
    depth = _depths(brokers, binds)
    for _, name, s, restart in brokers:
        procs.append(Process(name, "broker", tuple(_broker_args(s)), restart, depth[name], name, s.bind, s.key))
    for i, t in enumerate(entries["worker"]):
        w = _table(t, WORKER, "worker", i, fail, f"worker {t.get('name', i + 1)!r}")
        name = _name(t, "worker", i, fail)
        if not _TARGET.match(w.get("target", "")):
            raise fail("worker", i, "target", f"worker {name!r}: target must be MODULE:OBJECT, got {w.get('target')!r}")
        args = ["worker", w["target"], "--name", name]
        args += _connect(w, "worker", i, name, fail)
        count = w.get("count", 1)
        if not 1 <= count <= 1000:
            raise fail("worker", i, "count", f"worker {name!r}: count must be from 1 to 1000, got {count!r}")
        if "concurrency" in w:
            if not 1 <= w["concurrency"] <= 65535:
                raise fail("worker", i, "concurrency", f"worker {name!r}: concurrency must be from 1 to 65535")
            args += ["--concurrency", str(w["concurrency"])]
        if "isolation" in w:
            if w["isolation"] not in ("thread", "process"):
                raise fail("worker", i, "isolation", f"worker {name!r}: isolation must be 'thread' or 'process'")
            args += ["--isolation", w["isolation"]]
        for opt in ("heartbeat", "liveness"):
            if opt in w:
                args += [f"--{opt}", str(w[opt])]
        args += _keys(w, "worker", i, name, fail, path)
        restart = _bool(w.get("restart", restart_default), "worker", i, "restart", fail)
        for n in range(1, count + 1):
            pname = name if count == 1 else f"{name}-{n}"
            a = list(args)
            a[a.index("--name") + 1] = pname
            procs.append(Process(pname, "worker", tuple(a), restart, 0, name))
    for i, t in enumerate(entries["load"]):
        ld = _table(t, LOAD, "load", i, fail, f"load {t.get('name', i + 1)!r}")
        name = _name(t, "load", i, fail)
        if not isinstance(ld.get("service"), str) or not ld["service"]:
            raise fail("load", i, "service", f"load {name!r}: service is required (a service name)")
        rate = ld.get("rate", 10.0)
        if not 0 < rate <= 1_000_000:
            raise fail("load", i, "rate", f"load {name!r}: rate must be from 0 to 1,000,000 a second, got {rate!r}")
        args = ["load", ld["service"], "--name", name, "--rate", str(rate)]
        args += _connect(ld, "load", i, name, fail)
        if "value" in ld:
            args += ["--value", json.dumps(ld["value"])]
        if "timeout" in ld:
            args += ["--timeout", str(ld["timeout"])]
        if "inflight" in ld:
            args += ["--inflight", str(ld["inflight"])]
        args += _keys(ld, "load", i, name, fail, path)
        restart = _bool(ld.get("restart", restart_default), "load", i, "restart", fail)
        procs.append(Process(name, "load", tuple(args), restart, 0, name))
    firsts: dict[object, tuple[str, int]] = {}
    for kind in KINDS:
        for i, t in enumerate(entries[kind]):
            ename = t.get("name")
            if ename in firsts:
                k0, i0 = firsts[ename]
                raise fail(kind, i, "name", f"{kind} {ename!r}: {k0} #{i0 + 1} has that name too: names must be unique")
            firsts[ename] = (kind, i)
    named: set[str] = set()
    for p in procs:
        if p.name in named:
            raise ConfigError(f"{path}: two processes are named {p.name!r}: names must be unique in a topology")
        named.add(p.name)
    topo = Topology(path, procs, stop_timeout, tuple(pythonpath), status_key)
    topo.warnings = _warnings(entries, binds) + _unimportable(procs, pythonpath)
    return topo


def _table(t: Any, spec: dict[str, type], kind: str, i: int, fail: Any, who: str) -> dict[str, Any]:
    if not isinstance(t, dict):
        raise fail(kind, i, "", f"[{kind}] must be a table")
    out: dict[str, Any] = {}
    for k, v in t.items():
        key = k.replace("-", "_")
        want = spec.get(key)
        if want is None:
            raise fail(kind, i, key, f"{who}: unknown field {k!r}{did_you_mean(key, list(spec))}")
        ok = (
            want is object
            or (want is float and isinstance(v, (int, float)) and not isinstance(v, bool))
            or (want is int and isinstance(v, int) and not isinstance(v, bool))
            or (want not in (int, float) and isinstance(v, want))
        )
        if not ok:
            kinds = {str: "a string", bool: "true or false", int: "a whole number", float: "a number", list: "a list"}
            raise fail(kind, i, key, f"{who}: {key} must be {kinds[want]}, got {v!r}")
        out[key] = v
    return out


def _name(t: dict[str, Any], kind: str, i: int, fail: Any) -> str:
    name = t.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail(
            kind,
            i,
            "name",
            f"{kind} #{i + 1}: name is required: 1 to 64 letters, digits, '_', '.' or '-', got {name!r}",
        )
    return name


def _bool(v: Any, kind: str, i: int, key: str, fail: Any) -> bool:
    if not isinstance(v, bool):
        raise fail(kind, i, key, f"{key} must be true or false, got {v!r}")
    return v


def _key_in(message: str, options: dict[str, Any]) -> str:
    """The option a settings error names first (for its line), or ''."""
    at = {}
    for k in options:
        if m := re.search(rf"\b{re.escape(k)}\b|{re.escape(k.replace('_', '-'))}", message):
            at[k] = m.start()
    return min(at, key=at.__getitem__) if at else ""


def _connect(t: dict[str, Any], kind: str, i: int, name: str, fail: Any) -> list[str]:
    eps = t.get("connect")
    if not eps:
        raise fail(kind, i, "connect", f"{kind} {name!r}: connect is required (broker endpoints, failover order)")
    try:
        check_endpoints([str(e) for e in eps], f"{kind} {name!r} connect", connect=True)
    except ConfigError as exc:
        raise fail(kind, i, "connect", str(exc)) from None
    args: list[str] = []
    for e in eps:
        args += ["--connect", str(e)]
    return args


def _keys(t: dict[str, Any], kind: str, i: int, name: str, fail: Any, path: Path) -> list[str]:
    args: list[str] = []
    for opt in ("server_key", "key"):
        if opt in t:
            f = (path.parent / t[opt]).resolve()
            if not f.is_file():
                raise fail(kind, i, opt, f"{kind} {name!r}: {opt} {t[opt]!r}: no such file ({f})")
            args += [f"--{opt.replace('_', '-')}", str(f)]
    return args


def _broker_args(s: BrokerSettings) -> list[str]:
    """``zmqdist broker`` arguments that give exactly the settings ``s`` (non-defaults only)."""
    args = ["broker"]
    base = BrokerSettings()
    for f in fields(BrokerSettings):
        if not f.init or not f.metadata.get("cli", True):
            continue
        v = getattr(s, f.name)
        if v == getattr(base, f.name) and f.name != "name":
            continue
        flag = cli_flag(f)
        if isinstance(v, bool):
            args.append(flag if v else f"--no-{flag[2:]}")
        elif isinstance(v, tuple):
            for e in v:
                args += [flag, str(e)]
        elif v is not None:
            args += [flag, str(v)]
    return args


def _depths(brokers: list[tuple[int, str, BrokerSettings, bool]], binds: dict[str, str]) -> dict[str, int]:
    """Each broker's distance from the root of the tree (0: no upstream in this file); a pair's
    two brokers are at the same depth. Used to start roots first and stop them last."""
    by_name = {name: s for _, name, s, _ in brokers}
    depth: dict[str, int] = {}

    def of(name: str, seen: tuple[str, ...] = ()) -> int:
        if name in depth:
            return depth[name]
        if name in seen:
            return 0  # a loop of upstreams: the brokers' own loop prevention handles it
        ups = [binds[e] for e in by_name[name].upstream if e in binds]
        depth[name] = d = 1 + max((of(u, (*seen, name)) for u in ups), default=-1)
        return d

    for name in by_name:
        of(name)
    return depth


def _unimportable(procs: list[Process], pythonpath: list[str]) -> list[str]:
    """Worker targets whose module is not found here (fine for another host's share; often a
    missing ``pythonpath``)."""
    out = []
    seen = set()
    old = list(sys.path)
    sys.path[:0] = [*pythonpath, os.getcwd()]
    try:
        for p in procs:
            module = p.args[1].split(":")[0] if p.kind == "worker" else ""
            if module and module not in seen:
                seen.add(module)
                try:  # the top package only: finding a submodule would run the package's code
                    found = importlib.util.find_spec(module.split(".")[0]) is not None
                except (ImportError, ValueError):
                    found = False
                if not found:
                    out.append(f"worker {p.entry!r}: module {module!r} is not found here (pythonpath?)")
    finally:
        sys.path[:] = old
    return out


def _warnings(entries: dict[str, list[dict[str, Any]]], binds: dict[str, str]) -> list[str]:
    """Endpoints no broker of the file binds (fine for a broker elsewhere; often a typo)."""
    out = []
    for kind in ("worker", "load"):
        for t in entries[kind]:
            for e in t.get("connect", []):
                if e not in binds:
                    out.append(f"{kind} {t.get('name')!r} connects to {e}, which no broker of this file binds")
    return out
