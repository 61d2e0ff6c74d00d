"""The ``zmqdist`` command line: parse options, load config, call a runtime. No socket code here.

Every option can come from the command line, a ``ZMQDIST_<COMMAND>_<OPTION>`` environment
variable, a TOML file (``--config``, one table per command), or its default, in that order.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

import click

from zmqdist import logs
from zmqdist.broker import Broker
from zmqdist.client import Client
from zmqdist.config import BrokerSettings, load_toml
from zmqdist.errors import ConfigError, RequestError, ZmqdistError
from zmqdist.worker import Worker

HELP_HB = "heartbeat interval in seconds"
HELP_LIVE = "missed heartbeats before a peer is declared dead"


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if not value:
        return
    try:
        data = load_toml(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise click.BadParameter(f"top-level keys must be tables named after commands ([broker], ...): {bad}")
    ctx.default_map = {cmd: {k.replace("-", "_"): v for k, v in opts.items()} for cmd, opts in data.items()}


def _setup_logging(verbose: int, quiet: int, fmt: str = "text") -> None:
    level = logging.INFO - 10 * verbose + 10 * quiet
    logs.setup(max(logging.DEBUG, min(logging.CRITICAL, level)), fmt)


@click.group(
    context_settings={"auto_envvar_prefix": "ZMQDIST", "show_default": True, "help_option_names": ["-h", "--help"]}
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML file with one table per command, e.g. [broker].",
)
@click.option("-v", "--verbose", count=True, help="more logging (repeatable)")
@click.option("-q", "--quiet", count=True, help="less logging (repeatable)")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="json: one object per line, for log shippers",
)
@click.version_option(package_name="zmqdist")
def main(verbose: int, quiet: int, log_format: str) -> None:
    """zmqdist: share request/reply work among processes and machines over ZeroMQ."""
    _setup_logging(verbose, quiet, log_format)
    if verbose:
        logging.getLogger("zmqdist").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _run_until_signal(start: Callable[[], None], stop: Callable[[], None]) -> None:
    """Run ``start`` (blocking) with SIGINT/SIGTERM calling ``stop``."""
    old = {s: signal.signal(s, lambda *_: stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        start()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _key_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--server-key and --key: CURVE toward a broker that has keys (docs/security.md)."""
    fn = click.option("--key", default=None, help="our secret certificate (NAME.key_secret) for CURVE")(fn)
    return click.option("--server-key", default=None, help="the broker's public certificate (NAME.key) for CURVE")(fn)


def _fail(exc: BaseException) -> None:
    raise click.ClickException(str(exc)) from exc


def _setting_option(f: Field[Any]) -> tuple[str, Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """The click option for one settings field (its flag, type, range, default and help), and the
    name of the parameter it fills."""
    meta = f.metadata
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    param = flag.lstrip("-").replace("-", "_")
    kind = str(f.type).removesuffix(" | None")
    default = meta["cli_default"]
    kw: dict[str, Any] = {"help": meta["help"], "show_envvar": True}
    if meta["multiple"]:
        kw.update(multiple=True, default=list(default))
    elif meta["choices"]:
        kw.update(type=click.Choice(meta["choices"]), default=default or None)
    elif meta["path"]:
        kw.update(type=click.Path(exists=True, dir_okay=meta["path"] == "dir", file_okay=meta["path"] == "file"))
    elif kind == "int":
        kw.update(type=click.IntRange(meta["lo"], meta["hi"]), default=default)
    elif kind == "float":
        kw.update(type=click.FloatRange(meta["lo"], meta["hi"]), default=default)
    else:
        kw.update(default=default)
    if default is None or default == "":
        kw["show_default"] = False
    return param, click.option(flag, param, **kw)


# The broker's options, generated from BrokerSettings: (parameter name, field name, decorator).
BROKER_OPTIONS = [
    (param, f.name, deco)
    for f in fields(BrokerSettings)
    if f.init and f.metadata.get("cli", True)
    for param, deco in [_setting_option(f)]
]


def _broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for _, _, deco in reversed(BROKER_OPTIONS):
        fn = deco(fn)
    return fn


@main.command()
@_broker_options
def broker(**params: Any) -> None:
    """Run a broker (a proxy with --upstream) until SIGINT or SIGTERM.

    Every endpoint also accepts Majordomo (MDP 0.1 and 0.2) clients and workers. With --key, every
    link is encrypted (CURVE) and peers must be in an allow-list; SIGHUP re-reads the lists. With
    --ha, it is one broker of a backup pair: the passive one takes over when the active one dies
    (docs/ha.md); SIGTERM of the active one hands over at once."""
    try:
        b = Broker(**{name: params[param] for param, name, _ in BROKER_OPTIONS})
        old_hup = signal.signal(signal.SIGHUP, lambda *_: b.reload_allow_lists())
        try:
            _run_until_signal(b.run, b.request_stop)
        finally:
            signal.signal(signal.SIGHUP, old_hup)
    except ZmqdistError as exc:
        _fail(exc)


def load_object(spec: str) -> Any:
    """Return the object named by ``MODULE:OBJECT`` (the current directory is importable)."""
    if ":" not in spec:
        raise ConfigError(f"{spec!r} is not MODULE:OBJECT (for example myapp.workers:worker)")
    mod_name, _, attr = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {mod_name!r}: {exc}") from exc
    obj: Any = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(f"module {mod_name!r} has no attribute {attr!r}") from exc
    return obj


@main.command()
@click.argument("target")
@click.option("--connect", multiple=True, help="broker endpoint (repeatable, failover order)")
@click.option("--concurrency", type=int, default=None, help="requests served at once [default: the Worker's, or 4]")
@click.option("--service", default=None, help="service name for a plain function [default: its name]")
@click.option("--name", default=None, help="worker name shown in status")
@click.option(
    "--isolation",
    type=click.Choice(["thread", "process"]),
    default=None,
    help="run handlers in threads or child processes",
)
@click.option("--heartbeat", type=float, default=0.25, help=HELP_HB)
@click.option("--liveness", type=int, default=4, help=HELP_LIVE)
@_key_options
def worker(
    target: str,
    connect: tuple[str, ...],
    concurrency: int | None,
    service: str | None,
    name: str | None,
    isolation: str | None,
    heartbeat: float,
    liveness: int,
    server_key: str | None,
    key: str | None,
) -> None:
    """Serve TARGET (MODULE:OBJECT, a Worker or a plain function) until SIGINT/SIGTERM (drains first)."""
    try:
        obj = load_object(target)
        if isinstance(obj, Worker):
            endpoints = list(connect) or list(obj.endpoints)
            w = Worker(
                endpoints,
                concurrency=concurrency or obj.concurrency,
                name=name or obj.name,
                heartbeat_s=heartbeat,
                liveness=liveness,
                isolation=isolation or obj.isolation,
                server_key=server_key,
                key=key,
            )
            for svc, fn in obj._handlers.items():
                w.add_service(svc, fn)
        elif callable(obj):
            if not connect:
                raise ConfigError("--connect is required when TARGET is a function")
            w = Worker(
                list(connect),
                concurrency=concurrency or 4,
                name=name,
                heartbeat_s=heartbeat,
                liveness=liveness,
                isolation=isolation or "thread",
                server_key=server_key,
                key=key,
            )
            w.add_service(service or str(getattr(obj, "__name__", "service")), obj)
        else:
            raise ConfigError(f"{target} is a {type(obj).__name__}, not a Worker or a function")
        w.run()
    except ZmqdistError as exc:
        _fail(exc)


def to_json(value: Any) -> str:
    """Return ``value`` as JSON; bytes become {"$bytes": base64}."""

    def default(o: Any) -> Any:
        if isinstance(o, bytes):
            return {"$bytes": base64.b64encode(o).decode()}
        return repr(o)

    return json.dumps(value, default=default, sort_keys=False)


@main.command()
@click.argument("service")
@click.argument("value", required=False, default=None)
@click.option("--connect", multiple=True, default=["tcp://127.0.0.1:5555"], help="broker endpoint (repeatable)")
@click.option("--timeout", type=float, default=5.0, help="seconds before giving up")
@_key_options
def call(
    service: str, value: str | None, connect: tuple[str, ...], timeout: float, server_key: str | None, key: str | None
) -> None:
    """Call SERVICE with VALUE (JSON, default null) and print the reply as JSON."""
    try:
        arg = None if value is None else json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="VALUE") from exc
    try:
        with Client(list(connect), timeout=timeout, server_key=server_key, key=key) as c:
            result = c.call(service, arg)
    except RequestError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    except ZmqdistError as exc:
        _fail(exc)
    click.echo(to_json(result))


def format_status(st: dict[str, Any]) -> str:
    """Return a broker status snapshot as a human-readable table."""
    lines = [
        f"broker {st['broker']} (run {st['incarnation']}) up {st['uptime_s']:.0f}s  "
        f"heartbeat {st['heartbeat_s']}s x {st['liveness']}  queued {st['queued']}  open {st['requests_open']}"
        + (f"  ({st['build']})" if st.get("build") else ""),
        "",
        f"{'SERVICE':24} {'WORKERS':>7} {'CAPACITY':>8} {'INFLIGHT':>8} {'QUEUED':>7}",
    ]
    for name, s in st["services"].items():
        lines.append(f"{name:24} {s['workers']:>7} {s['capacity']:>8} {s['inflight']:>8} {s['queued']:>7}")
    lines += ["", f"{'WORKER':28} {'SERVICES':20} {'CAP':>4} {'BUSY':>5} {'SERVED':>8} {'FAILED':>7} {'SILENT':>7}"]
    for w in st["workers"]:
        lines.append(
            f"{w['name'][:28]:28} {','.join(w['services'])[:20]:20} {w['capacity']:>4} "
            f"{w['inflight']:>5} {w['served']:>8} {w.get('failed', 0):>7} {w['silent_s']:>6.2f}s"
        )
    if st.get("brokers"):
        lines += ["", f"{'PROXY BELOW':28} {'SPARE':28} {'BUSY':>5} {'SERVED':>8} {'SILENT':>7}"]
        for b in st["brokers"]:
            spare = ",".join(f"{k}:{v}" for k, v in b["spare"].items()) or "-"
            lines.append(
                f"{b['name'][:28]:28} {spare[:28]:28} {b['inflight']:>5} {b['served']:>8} {b['silent_s']:>6.2f}s"
            )
    up = st.get("upstream")
    if up:
        state = f"registered with {up['broker']}" if up["registered"] else "NOT registered"
        lines += [
            "",
            f"upstream {up['endpoint']}: {state}; {up['forwarded']} forwarded and {up['held']} handed down "
            f"in flight; {up['losses']} losses",
        ]
    ha = st.get("ha")
    if ha:
        peer = ha["peer"]
        lines += [
            "",
            f"pair: {ha['role']} {ha['state'].upper()} epoch {ha['epoch']} (failback {ha['failback']}); "
            f"peer {peer['name'] or '?'} {peer['state']} epoch {peer['epoch']}"
            + (f", silent {peer['silent_s']:.2f}s" if peer["silent_s"] is not None else ", never heard")
            + (f"; {ha['replicated']} requests replicated here" if ha["replicated"] is not None else ""),
        ]
    lines += ["", "counters: " + "  ".join(f"{k}={v}" for k, v in st["counters"].items() if v)]
    return "\n".join(lines)


@main.command()
@click.option("--connect", multiple=True, default=["tcp://127.0.0.1:5555"], help="broker endpoint")
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@click.option("--tree", is_flag=True, help="the whole tree below the broker: its proxies, theirs, their workers")
@click.option("--timeout", type=float, default=3.0, help="seconds before giving up")
@_key_options
def status(
    connect: tuple[str, ...], as_json: bool, tree: bool, timeout: float, server_key: str | None, key: str | None
) -> None:
    """Show a broker's workers, services, queues and counters (--tree: and every broker below it)."""
    try:
        with Client(list(connect), timeout=timeout, server_key=server_key, key=key) as c:
            st = c.call("zmqdist.tree" if tree else "zmqdist.status")
    except RequestError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    except ZmqdistError as exc:
        _fail(exc)
    click.echo(to_json(st) if as_json else format_tree(st) if tree else format_status(st))


@main.command()
@click.option("--connect", multiple=True, default=["tcp://127.0.0.1:5555"], help="the active broker's endpoint")
@click.option("--timeout", type=float, default=3.0, help="seconds before giving up")
@_key_options
def handover(connect: tuple[str, ...], timeout: float, server_key: str | None, key: str | None) -> None:
    """Ask the active broker of a backup pair to hand its work to the passive one (failback)."""
    try:
        with Client(list(connect), timeout=timeout, server_key=server_key, key=key) as c:
            done = c.call("zmqdist.handover")
    except RequestError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except ZmqdistError as exc:
        _fail(exc)
    click.echo(f"handed over to {done['handed_over_to']} (it takes over above epoch {done['epoch']})")


def format_tree(st: dict[str, Any], depth: int = 0) -> str:
    """A tree status: each broker's view, the brokers below it indented under it."""
    pad = "    " * depth
    parts = ["\n".join(pad + line if line else line for line in format_status(st).splitlines())]
    if st.get("unreachable"):
        parts.append(f"{pad}    (no answer from: {', '.join(st['unreachable'])})")
    for sub in st.get("below", []):
        if "error" in sub:
            parts.append(f"{pad}    broker {sub.get('broker', '?')}: {sub['error']}")
        else:
            parts.append(format_tree(sub, depth + 1))
    return "\n\n".join(parts)


def format_top(st: dict[str, Any], prev: dict[str, Any] | None, dt: float) -> str:
    """The status view plus rates (per second, since ``prev``) and per-worker utilisation."""
    c, p0 = st["counters"], (prev or st)["counters"]

    def rate(key: str) -> float:
        return (c.get(key, 0) - p0.get(key, 0)) / dt if prev and dt > 0 else 0.0

    done = sum(rate(k) for k in ("replies_ok", "replies_failed", "timeouts", "lost"))
    head = (
        f"broker {st['broker']}  up {st['uptime_s']:.0f}s  requests {rate('requests'):.0f}/s  "
        f"replies {done:.0f}/s  failed {rate('replies_failed'):.0f}/s  busy {rate('busy'):.0f}/s  "
        f"requeues {rate('requeues'):.0f}/s  queued {st['queued']}"
    )
    lines = [head, "", f"{'WORKER':28} {'UTIL':>5} {'BUSY':>9} {'SERVED/s':>9} {'FAILED':>7} {'MEAN ms':>8}"]
    before = {w["id"]: w for w in (prev or {}).get("workers", [])}
    for w in sorted(st["workers"], key=lambda x: x["name"]):
        old = before.get(w["id"])
        served = (w["served"] - old["served"]) / dt if old and dt > 0 else 0.0
        util = w["inflight"] / w["capacity"] if w["capacity"] else 0.0
        mean = w.get("mean_service_ms")
        lines.append(
            f"{w['name'][:28]:28} {util:>5.0%} {w['inflight']:>4}/{w['capacity']:<4} {served:>9.0f} "
            f"{w.get('failed', 0):>7} {mean if mean is not None else '-':>8}"
        )
    for b in st.get("brokers", []):
        lines.append(f"{'proxy ' + b['name'][:22]:28} {'':>5} {b['inflight']:>9} {'':>9} {'':>7} {'':>8}")
    return "\n".join(lines)


@main.command()
@click.option("--connect", multiple=True, default=["tcp://127.0.0.1:5555"], help="broker endpoint")
@click.option("--interval", type=float, default=1.0, help="seconds between refreshes")
@click.option("--count", type=int, default=0, help="stop after this many refreshes (0: until Ctrl-C)")
@_key_options
def top(connect: tuple[str, ...], interval: float, count: int, server_key: str | None, key: str | None) -> None:
    """Show a broker's load live: request rates, per-worker utilisation, failures."""
    if not interval > 0:
        _fail(ConfigError(f"--interval must be positive, got {interval}"))
    prev: dict[str, Any] | None = None
    t_prev = 0.0
    n = 0
    try:
        with Client(list(connect), timeout=max(3.0, interval), server_key=server_key, key=key) as c:
            while True:
                st = c.call("zmqdist.status")
                now = time.monotonic()
                screen = format_top(st, prev, now - t_prev)
                click.echo(("\x1b[H\x1b[2J" if sys.stdout.isatty() else "") + screen + "\n", nl=False)
                prev, t_prev, n = st, now, n + 1
                if count and n >= count:
                    return
                time.sleep(interval)
    except RequestError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    except ZmqdistError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        return


@main.group()
def keys() -> None:
    """Manage CURVE certificates (the files zmq.auth reads)."""


@keys.command("generate")
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True, help="where to write the two files")
@click.option("--services", default=None, help="comma-separated services this key is limited to")
def keys_generate(name: str, directory: str, services: str | None) -> None:
    """Write DIR/NAME.key (public, for allow-lists) and DIR/NAME.key_secret (keep it private)."""
    from zmqdist.transport.security import generate

    try:
        public, secret = generate(name, directory, [s.strip() for s in services.split(",")] if services else None)
    except ZmqdistError as exc:
        _fail(exc)
    click.echo(f"public: {public}\nsecret: {secret}")


@main.command()
@click.option("--duration", type=float, default=2.0, help="seconds per measured run")
@click.option("--rounds", type=int, default=2, help="alternating rounds of every setup")
@click.option(
    "--only", multiple=True, type=click.Choice(["sync", "pipelined", "api", "scale"]), help="run only these parts"
)
@click.option("--payload", type=int, default=100, help="payload bytes")
def bench(duration: float, rounds: int, only: tuple[str, ...], payload: int) -> None:
    """Measure throughput, latency and broker CPU against zmq.proxy and direct sockets."""
    lab = load_bench_lab()
    lab.main(duration=duration, rounds=rounds, only=set(only), payload=payload)


def load_bench_lab() -> Any:
    """The benchmark lab (benchmarks/lab.py of a source checkout: it is not part of the package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "lab.py"
    if not path.is_file():
        raise click.ClickException(
            f"zmqdist bench runs the benchmarks of a source checkout ({path} is missing): "
            "clone the repository and install it with pip install -e ."
        )
    spec = importlib.util.spec_from_file_location("lab", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lab"] = module  # its roles are also loaded by name (lab:api_echo)
    spec.loader.exec_module(module)
    return module


@main.command()
@click.option("--duration", type=float, default=6.0, help="seconds of load before the summary")
@click.option("--kill/--no-kill", default=True, help="SIGKILL one worker halfway to show requeue")
def demo(duration: float, kill: bool) -> None:
    """Start a broker, three workers of different speeds and a client load; show how work is shared."""
    from zmqdist import demo as demo_mod

    sys.exit(demo_mod.run(duration=duration, kill=kill))
