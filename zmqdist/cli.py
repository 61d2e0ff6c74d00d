"""The ``zmqdist`` command line: parse options, load config, call a runtime. No socket code here.

Every option can come from the command line, a ``ZMQDIST_<COMMAND>_<OPTION>`` environment
variable, a TOML file (``--config``, one table per command), or its default, in that order.
"""

from __future__ import annotations

import base64
import functools
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from zmqdist import logs
from zmqdist.broker import Broker
from zmqdist.client import Client
from zmqdist.config import BrokerSettings, cli_flag, did_you_mean, load_toml
from zmqdist.errors import ConfigError, RequestError, ZmqdistError
from zmqdist.transport import fds
from zmqdist.worker import Worker

HELP_HB = "heartbeat interval in seconds"
HELP_LIVE = "missed heartbeats before a peer is declared dead"
SUPERVISOR_ENV = "ZMQDIST_SUPERVISOR"  # set by `zmqdist up` for its processes: its pid
LONG_RUNNING = ("broker", "worker", "demo", "up", "load")  # these log at INFO by default; the rest only warn


class Setting(click.Option):
    """An option whose bad value names where it came from: an environment variable or the file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("show_envvar", True)
        super().__init__(*args, **kwargs)

    def consume_value(self, ctx: click.Context, opts: Any) -> tuple[Any, ParameterSource]:
        value, source = super().consume_value(ctx, opts)
        self._source = source  # where the value came from (process_value needs it for its errors)
        return value, source

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        if self.multiple and isinstance(value, str) and getattr(self, "_source", None) is ParameterSource.DEFAULT_MAP:
            value = (value,)  # `bind = "tcp://..."` in a config file: one, as `--bind tcp://...` is
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as exc:
            source = getattr(self, "_source", None)
            if source is ParameterSource.ENVIRONMENT:
                var = self.envvar or f"{ctx.auto_envvar_prefix}_{(self.name or '').upper()}"
                raise click.BadParameter(f"{exc.message} (from the environment variable {var})", ctx, self) from exc
            if source is ParameterSource.DEFAULT_MAP:
                raise click.BadParameter(f"{exc.message} (from the --config file)", ctx, self) from exc
            raise


option = functools.partial(click.option, cls=Setting)


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if not value:
        return
    try:
        data = load_toml(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc
    group = ctx.command
    assert isinstance(group, click.Group)
    commands = {name: cmd for name, cmd in group.commands.items() if not isinstance(cmd, click.Group)}
    default_map: dict[str, dict[str, Any]] = {}
    for table, opts in data.items():
        if table not in commands:
            near = did_you_mean(table, list(commands))
            raise click.BadParameter(f"[{table}] is not a command{near} (tables: {', '.join(commands)})")
        if not isinstance(opts, dict):
            raise click.BadParameter(f"{table} must be a table ([{table}] with its options), got {opts!r}")
        params = [p.name for p in commands[table].params if p.name and isinstance(p, click.Option)]
        default_map[table] = {}
        for key, v in opts.items():
            name = key.replace("-", "_")
            if name not in params:
                dashed = [x.replace("_", "-") for x in params]
                raise click.BadParameter(
                    f"[{table}] has no option {key!r}{did_you_mean(key.replace('_', '-'), dashed)}"
                )
            default_map[table][name] = v
    ctx.default_map = default_map


def _setup_logging(verbose: int, quiet: int, fmt: str = "text", base: int = logging.INFO) -> None:
    level = base - 10 * verbose + 10 * quiet
    logs.setup(max(logging.DEBUG, min(logging.CRITICAL, level)), fmt)


def _more_logging(ctx: click.Context, param: click.Parameter, value: int) -> None:
    """-v/-q given after the command: add to what the group was given."""
    if value:
        meta = ctx.find_root().meta
        meta[f"zmqdist.{param.name}"] = meta.get(f"zmqdist.{param.name}", 0) + value
        _setup_logging(
            meta.get("zmqdist.verbose", 0), meta.get("zmqdist.quiet", 0), meta["zmqdist.format"], meta["zmqdist.base"]
        )


def _logging_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("-q", "--quiet", count=True, callback=_more_logging, expose_value=False, help="less logging")(fn)
    return click.option("-v", "--verbose", count=True, callback=_more_logging, expose_value=False, help="more logging")(
        fn
    )


@click.group(
    context_settings={"auto_envvar_prefix": "ZMQDIST", "show_default": True, "help_option_names": ["-h", "--help"]}
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, exists=True),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML file with one table per command, e.g. [broker]; unknown tables and keys are refused.",
)
@click.option("-v", "--verbose", count=True, help="more logging (repeatable; also after the command)")
@click.option("-q", "--quiet", count=True, help="less logging (repeatable; also after the command)")
@option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="json: one object per line (trace and worker ids as fields), for log shippers",
)
@click.version_option(package_name="zmqdist")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int, log_format: str) -> None:
    """zmqdist: share request/reply work among processes and machines over ZeroMQ.

    Long-running commands (broker, worker, demo) log at INFO; one-shot commands only warn."""
    _die_with_supervisor()
    base = logging.INFO if ctx.invoked_subcommand in LONG_RUNNING else logging.WARNING
    ctx.meta.update({"zmqdist.verbose": verbose, "zmqdist.quiet": quiet, "zmqdist.format": log_format})
    ctx.meta["zmqdist.base"] = base
    _setup_logging(verbose, quiet, log_format, base)


def _die_with_supervisor() -> None:
    """Started by ``zmqdist up`` (it sets ZMQDIST_SUPERVISOR to its pid): be sent SIGTERM if it
    dies without stopping us (SIGKILL), so that a topology never outlives its supervisor (Linux).

    The variable is taken out of our environment, so that only ``up``'s own children read it:
    a parent other than the pid it names then means the supervisor died while we were starting
    (before the death signal was set), and we end as if it had been sent."""
    want = os.environ.pop(SUPERVISOR_ENV, None)
    if not want:
        return
    if str(os.getppid()) == want:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
    if str(os.getppid()) != want:  # it died before, or before that took effect
        click.echo(f"zmqdist: ending: the zmqdist up that started this process (pid {want}) has ended", err=True)
        os.kill(os.getpid(), signal.SIGTERM)


def _run_until_signal(start: Callable[[], None], stop: Callable[[], None]) -> None:
    """Run ``start`` (blocking) with SIGINT/SIGTERM calling ``stop``."""
    old = {s: signal.signal(s, lambda *_: stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        start()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


KEY_FILE = click.Path(exists=True, dir_okay=False)
SECONDS = click.FloatRange(min=0, min_open=True)


def _key_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--server-key and --key: CURVE toward a broker that has keys (docs/security.md)."""
    fn = option("--key", type=KEY_FILE, default=None, help="our secret certificate (NAME.key_secret) for CURVE")(fn)
    return option(
        "--server-key", type=KEY_FILE, default=None, help="the broker's public certificate (NAME.key) for CURVE"
    )(fn)


def _connect_option(help: str = "broker endpoint (repeatable, failover order)") -> Callable[..., Any]:
    return option("--connect", multiple=True, default=["tcp://127.0.0.1:5555"], help=help)


def _fail(exc: BaseException) -> None:
    raise click.ClickException(str(exc)) from exc


def _setting_option(f: Field[Any]) -> tuple[str, Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """The click option for one settings field (its flag, type, range, default and help), and the
    name of the parameter it fills."""
    meta = f.metadata
    flag = cli_flag(f)
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
    elif kind == "bool":
        flag = f"{flag}/--no-{flag[2:]}"
        kw.update(default=default)
    else:
        kw.update(default=default)
    if default is None or default == "":
        kw["show_default"] = False
    return param, option(flag, param, **kw)


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


@main.command(short_help="Run a broker (a proxy with --upstream, one of a pair with --ha).")
@_broker_options
@_logging_options
def broker(**params: Any) -> None:
    """Run a broker (a proxy with --upstream) until SIGINT or SIGTERM.

    Every endpoint also accepts Majordomo (MDP 0.1 and 0.2) clients and workers. With --key, every
    link is encrypted (CURVE) and peers must be in an allow-list; SIGHUP re-reads the lists. With
    --ha, it is one broker of a backup pair: the passive one takes over when the active one dies
    (docs/ha.md); SIGTERM of the active one hands over at once."""
    try:
        fds.raise_limit()  # every peer's connection is a descriptor (see transport/fds.py)
        b = Broker(**{name: params[param] for param, name, _ in BROKER_OPTIONS})
        old_hup = signal.signal(signal.SIGHUP, lambda *_: b.reload_allow_lists())
        try:
            _run_until_signal(b.run, b.request_stop)
        finally:
            signal.signal(signal.SIGHUP, old_hup)
    except ZmqdistError as exc:
        _fail(exc)


@main.command(short_help="Serve MODULE:OBJECT (a Worker, or a function) to a broker.")
@click.argument("target")
@option("--connect", multiple=True, help="broker endpoint (repeatable, failover order) [default: the Worker's]")
@option(
    "--concurrency",
    type=click.IntRange(1, 65535),
    default=None,
    help="requests served at once [default: the Worker's, or 4]",
)
@option("--service", default=None, help="service name for a plain function [default: its name]")
@option(
    "--inline",
    is_flag=True,
    default=False,
    help="a plain function that is trivially fast: run it on the socket thread (see docs/worker.md)",
)
@option("--name", default=None, help="worker name shown in status [default: the Worker's, or HOST-PID-RANDOM]")
@option(
    "--isolation",
    type=click.Choice(["thread", "process"]),
    default=None,
    help="run handlers in threads or child processes [default: the Worker's, or thread]",
)
@option("--heartbeat", type=click.FloatRange(0.001, 3600), default=None, help=HELP_HB + " [default: 0.25]")
@option("--liveness", type=click.IntRange(1, 1000), default=None, help=HELP_LIVE + " [default: 4]")
@_key_options
@_logging_options
def worker(
    target: str,
    connect: tuple[str, ...],
    concurrency: int | None,
    service: str | None,
    inline: bool,
    name: str | None,
    isolation: str | None,
    heartbeat: float | None,
    liveness: int | None,
    server_key: str | None,
    key: str | None,
) -> None:
    """Serve TARGET until SIGINT/SIGTERM (drains first).

    TARGET is MODULE:OBJECT: a Worker (its services and settings are used as they are; each flag
    given here overrides one) or a plain function (served as --service, --connect required)."""
    try:
        obj = load_object(target)
        overrides: dict[str, Any] = {
            "endpoints": list(connect) or None,
            "concurrency": concurrency,
            "name": name,
            "heartbeat_s": heartbeat,
            "liveness": liveness,
            "isolation": isolation,
            "server_key": server_key,
            "key": key,
        }
        if isinstance(obj, Worker):
            if inline:
                raise ConfigError("--inline is for a plain function; a Worker says it per service (inline=True)")
            w = obj.configure(**overrides)
        elif isinstance(obj, type):
            raise ConfigError(
                f"{target} is a class ({obj.__name__}): give a Worker instance (w = Worker(...)) or a function"
            )
        elif callable(obj):
            if not connect:
                raise ConfigError("--connect is required when TARGET is a function")
            w = Worker(list(connect))
            w.configure(**{**overrides, "concurrency": concurrency or 4, "isolation": isolation or "thread"})
            w.add_service(service or str(getattr(obj, "__name__", "service")), obj, inline=inline)
        else:
            raise ConfigError(f"{target} is a {type(obj).__name__}, not a Worker or a function")
        w.run()
    except ZmqdistError as exc:
        _fail(exc)


def load_object(spec: str) -> Any:
    """Return the object named by ``MODULE:OBJECT`` (the current directory is importable).

    Raises :class:`ConfigError` telling a missing module from an error raised while importing it."""
    if ":" not in spec:
        raise ConfigError(f"{spec!r} is not MODULE:OBJECT (for example myapp.workers:worker)")
    mod_name, _, attr = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"cannot import module {mod_name!r}: no such module (sys.path has the current directory: "
                f"run from the directory that holds it, or set PYTHONPATH)"
            ) from exc
        raise ConfigError(f"importing module {mod_name!r} failed inside it: {_where(exc)}") from exc
    except Exception as exc:  # the user's module raised while being imported
        raise ConfigError(f"importing module {mod_name!r} failed inside it: {_where(exc)}") from exc
    obj: Any = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(f"module {mod_name!r} has no attribute {attr!r}") from exc
    return obj


def _where(exc: BaseException) -> str:
    """``Type: message (file:line)`` of where an exception was raised."""
    tb = traceback.extract_tb(exc.__traceback__)
    at = f" ({tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{at}"


def to_json(value: Any) -> str:
    """Return ``value`` as JSON; bytes become {"$bytes": base64}."""

    def default(o: Any) -> Any:
        if isinstance(o, bytes):
            return {"$bytes": base64.b64encode(o).decode()}
        return repr(o)

    return json.dumps(value, default=default, sort_keys=False)


@main.command(short_help="Call SERVICE with a JSON VALUE; print the reply as JSON.")
@click.argument("service")
@click.argument("value", required=False, default=None)
@_connect_option()
@option("--timeout", type=SECONDS, default=5.0, help="seconds before giving up")
@_key_options
@_logging_options
def call(
    service: str, value: str | None, connect: tuple[str, ...], timeout: float, server_key: str | None, key: str | None
) -> None:
    """Call SERVICE with VALUE (JSON, default null) and print the reply as JSON."""
    try:
        arg = None if value is None else json.loads(value)
    except json.JSONDecodeError as exc:
        hint = ""
        if value and value[:1] not in '[{"' and not value[:1].isdigit():
            hint = f"; a string is quoted in JSON, and the quotes kept from the shell: '\"{value}\"'"
        raise click.BadParameter(f"not valid JSON: {exc}{hint}", param_hint="VALUE") from exc
    try:
        with Client(list(connect), timeout=timeout, server_key=server_key, key=key) as c:
            result = c.call(service, arg)
    except RequestError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    except ZmqdistError as exc:
        _fail(exc)
    click.echo(to_json(result))


def _fit(text: str, width: int) -> str:
    """``text`` in ``width`` columns, cut with an ellipsis (so a cut shows) when longer."""
    return text if len(text) <= width else text[: width - 1] + "…"


def format_status(st: dict[str, Any]) -> str:
    """Return a broker status snapshot as a human-readable table (``--json`` has every field whole)."""
    lines = [
        f"broker {st['broker']} (run {st['incarnation']}) up {st['uptime_s']:.0f}s  "
        f"heartbeat {st['heartbeat_s']}s x {st['liveness']}  queued {st['queued']}  open {st['requests_open']}"
        + (f"  ({st['build']})" if st.get("build") else ""),
        "",
        f"{'SERVICE':24} {'WORKERS':>7} {'CAPACITY':>8} {'INFLIGHT':>8} {'QUEUED':>7}",
    ]
    for name, s in st["services"].items():
        lines.append(f"{_fit(name, 24):24} {s['workers']:>7} {s['capacity']:>8} {s['inflight']:>8} {s['queued']:>7}")
    lines += ["", f"{'WORKER':28} {'SERVICES':20} {'CAP':>4} {'BUSY':>5} {'SERVED':>8} {'FAILED':>7} {'SILENT':>7}"]
    for w in st["workers"]:
        lines.append(
            f"{_fit(w['name'], 28):28} {_fit(','.join(w['services']), 20):20} {w['capacity']:>4} "
            f"{w['inflight']:>5} {w['served']:>8} {w.get('failed', 0):>7} {w['silent_s']:>6.2f}s"
        )
    if st.get("brokers"):
        lines += ["", f"{'PROXY BELOW':28} {'SPARE':28} {'BUSY':>5} {'SERVED':>8} {'SILENT':>7}"]
        for b in st["brokers"]:
            spare = ",".join(f"{k}:{v}" for k, v in b["spare"].items()) or "-"
            lines.append(
                f"{_fit(b['name'], 28):28} {_fit(spare, 28):28} {b['inflight']:>5} {b['served']:>8} "
                f"{b['silent_s']:>6.2f}s"
            )
    up = st.get("upstream")
    if up:
        state = f"registered with {up['broker']}" if up["registered"] else "NOT registered"
        lines += [
            "",
            f"upstream {up['endpoint']}: {state}; {up['forwarded']} forwarded and {up['held']} handed down "
            f"in flight; {up['losses']} losses" + (f"; round trip {up['rtt_ms']:.2f} ms" if up.get("rtt_ms") else ""),
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
    kept = st.get("remembered")
    if kept:
        lines += ["", "remembered: " + "  ".join(f"{k}={v}" for k, v in kept.items())]
    fd = st.get("fds")
    if fd:
        limit = "no limit" if fd["limit"] < 0 else f"of {fd['limit']}"
        lines += ["", f"file descriptors: {fd['open']} open {limit}"]
    lines += ["", "counters: " + "  ".join(f"{k}={v}" for k, v in st["counters"].items() if v)]
    return "\n".join(lines)


@main.command(short_help="Show a broker's workers, services, queues and counters.")
@_connect_option()
@option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@option("--tree", is_flag=True, help="the whole tree below the broker: its proxies, theirs, their workers")
@option("--timeout", type=SECONDS, default=3.0, help="seconds before giving up")
@_key_options
@_logging_options
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


@main.command(short_help="Ask the active broker of a pair to hand over (failback).")
@_connect_option("the active broker's endpoint")
@option("--timeout", type=SECONDS, default=3.0, help="seconds before giving up")
@_key_options
@_logging_options
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


@main.command(short_help="Show a broker's load live: rates, utilisation, failures.")
@_connect_option()
@option("--interval", type=SECONDS, default=1.0, help="seconds between refreshes")
@option("--count", type=click.IntRange(min=0), default=0, help="stop after this many refreshes (0: until Ctrl-C)")
@_key_options
@_logging_options
def top(connect: tuple[str, ...], interval: float, count: int, server_key: str | None, key: str | None) -> None:
    """Show a broker's load live: request rates, per-worker utilisation, failures."""
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


@main.group(short_help="Manage CURVE certificates.")
def keys() -> None:
    """Manage CURVE certificates (the files zmq.auth reads)."""


@keys.command("generate", short_help="Write a certificate pair NAME.key / NAME.key_secret.")
@click.argument("name")
@option("--dir", "directory", type=click.Path(file_okay=False), default=".", help="where to write the two files")
@option("--services", default=None, help="comma-separated services this key is limited to")
@_logging_options
def keys_generate(name: str, directory: str, services: str | None) -> None:
    """Write DIR/NAME.key (public, for allow-lists) and DIR/NAME.key_secret (keep it private)."""
    from zmqdist.transport.security import generate

    try:
        public, secret = generate(name, directory, [s.strip() for s in services.split(",")] if services else None)
    except ZmqdistError as exc:
        _fail(exc)
    click.echo(f"public: {public}\nsecret: {secret}")


@main.command(short_help="Measure throughput, latency and CPU against zmq.proxy and direct sockets.")
@option("--duration", type=SECONDS, default=2.0, help="seconds per measured run")
@option("--rounds", type=click.IntRange(min=1), default=2, help="alternating rounds of every setup")
@option(
    "--only",
    multiple=True,
    type=click.Choice(["sync", "pipelined", "api", "scale", "tiers", "slow"]),
    help="run only these parts (tiers: one and two proxy hops; slow: a slow consumer's batches; "
    "neither in the default run)",
)
@option("--payload", type=click.IntRange(min=1), default=100, help="payload bytes")
@_logging_options
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


@main.command(short_help="A broker, three workers and a client load, shown live (--geo: regions).")
@option("--duration", type=SECONDS, default=None, help="seconds of load before the summary [default: 6; --geo: 20]")
@option("--kill/--no-kill", default=True, help="SIGKILL one worker halfway to show requeue (--geo: a proxy)")
@option("--geo", is_flag=True, help="run examples/geo: a master pair and two regions, each a proxy pair")
@_logging_options
def demo(duration: float | None, kill: bool, geo: bool) -> None:
    """Start a broker, three workers of different speeds and a client load; show how work is shared.

    With --geo: the topology of examples/geo (a master pair, two regions of a proxy pair, workers
    and a client load each); shows per region what was served locally, what overflowed and where
    it was served, and (with --kill) the takeover when the active proxy of one region dies."""
    from zmqdist import demo as demo_mod

    if geo:
        sys.exit(demo_mod.run_geo(duration=duration or 20.0, kill=kill))
    sys.exit(demo_mod.run(duration=duration or 6.0, kill=kill))


@main.command(short_help="Start every process of a topology file; show them live; stop them all.")
@click.argument("topology", type=click.Path(exists=True, dir_okay=False))
@option("--check", is_flag=True, help="check the file and show what would start; start nothing")
@option("--only", default=None, metavar="NAME[,NAME]", help="start only these processes (this host's share)")
@option("--interval", type=SECONDS, default=2.0, help="seconds between refreshes of the table")
@option("--log-dir", type=click.Path(file_okay=False), default=None, help="where each process's output goes")
@_logging_options
def up(topology: str, check: bool, only: str | None, interval: float, log_dir: str | None) -> None:
    """Start the brokers, workers and client loads of TOPOLOGY (a TOML file: docs/tiers.md), show
    them live, restart those the file says to, and stop them all on Ctrl-C/SIGTERM (brokers last)."""
    from zmqdist import topology as topo_mod
    from zmqdist.up import Supervisor

    try:
        topo = topo_mod.load(topology)
        procs = topo.select(only)
    except ZmqdistError as exc:
        _fail(exc)
    for w in topo.warnings:
        click.echo(f"warning: {w}", err=True)
    if not click.get_current_context().meta.get("zmqdist.verbose"):
        # The table shows what the status clients see; their reconnects to passive brokers are noise.
        logging.getLogger("zmqdist.client").setLevel(logging.WARNING)
    if check:
        kinds = {k: sum(1 for p in procs if p.kind == k) for k in ("broker", "worker", "load")}
        counts = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in kinds.items())
        click.echo(f"{topology}: valid; {counts}")
        for p in procs:
            click.echo(f"  {p.name:20} zmqdist {' '.join(p.args)}" + ("  (restart)" if p.restart else ""))
        return
    sup = Supervisor(topo, procs, sys.stdout, interval=interval, log_dir=log_dir)
    sup.run()
    sys.exit(1 if sup.failed else 0)


@main.command(short_help="Send a steady load to SERVICE; report each second (JSON lines).")
@click.argument("service")
@_connect_option()
@option("--rate", type=click.FloatRange(0, 1_000_000, min_open=True), default=10.0, help="requests a second")
@option("--value", default="null", help="the request's value, as JSON")
@option("--timeout", type=SECONDS, default=10.0, help="seconds before a request gives up")
@option("--inflight", type=click.IntRange(1), default=1000, help="open requests at most (the rest are held)")
@option("--duration", type=SECONDS, default=None, help="stop after this many seconds [default: at SIGTERM]")
@option("--name", default=None, help="client name shown in the broker's logs")
@_key_options
@_logging_options
def load(
    service: str,
    connect: tuple[str, ...],
    rate: float,
    value: str,
    timeout: float,
    inflight: int,
    duration: float | None,
    name: str | None,
    server_key: str | None,
    key: str | None,
) -> None:
    """Send RATE requests a second of VALUE to SERVICE until SIGINT/SIGTERM (or --duration)."""
    from zmqdist.loadgen import Load

    try:
        arg = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--value") from exc
    if not connect:
        raise click.UsageError("--connect is required (broker endpoints, failover order)")
    try:
        with Client(list(connect), timeout=timeout, name=name, server_key=server_key, key=key) as c:
            gen = Load(c, service, rate, arg, timeout, inflight)
            if duration is not None:
                threading.Timer(duration, gen.stop).start()
            _run_until_signal(lambda: gen.run(sys.stdout), gen.stop)
    except ZmqdistError as exc:
        _fail(exc)
