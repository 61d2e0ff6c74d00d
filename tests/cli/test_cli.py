"""The zmqdist command line: CliRunner for parsing and precedence, one run of real processes."""

import json
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tests.integration.helpers import ROOT, Procs, wait_for
from zmqdist import _native, cli


class FakeBroker:
    seen: dict = {}

    def __init__(self, **kw):
        FakeBroker.seen = kw

    def run(self):
        pass

    def request_stop(self):
        pass


@pytest.fixture
def fake_broker(monkeypatch):
    monkeypatch.setattr(cli, "Broker", FakeBroker)
    FakeBroker.seen = {}
    return FakeBroker


def test_help_lists_every_command():
    r = CliRunner().invoke(cli.main, ["--help"])
    assert r.exit_code == 0
    for cmd in ("broker", "worker", "call", "status", "top", "keys", "bench", "demo", "handover"):
        assert cmd in r.output


def test_precedence_command_line_over_env_over_file_over_default(fake_broker, tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text('[broker]\nname = "from-file"\nliveness = 7\nmax-queue = 11\n')
    run = CliRunner().invoke
    r = run(cli.main, ["broker"])
    assert r.exit_code == 0, r.output
    assert fake_broker.seen["name"] is None and fake_broker.seen["liveness"] == 4 and fake_broker.seen["upstream"] == ()
    r = run(cli.main, ["--config", str(cfg), "broker"])
    assert fake_broker.seen["name"] == "from-file" and fake_broker.seen["max_queue"] == 11
    r = run(cli.main, ["--config", str(cfg), "broker"], env={"ZMQDIST_BROKER_NAME": "from-env"})
    assert fake_broker.seen["name"] == "from-env" and fake_broker.seen["liveness"] == 7
    r = run(cli.main, ["--config", str(cfg), "broker", "--name", "from-cli"], env={"ZMQDIST_BROKER_NAME": "from-env"})
    assert fake_broker.seen["name"] == "from-cli"
    r = run(cli.main, ["broker"], env={"ZMQDIST_BROKER_BIND": "tcp://*:1 tcp://*:2"})
    assert fake_broker.seen["bind"] == ("tcp://*:1", "tcp://*:2")
    r = run(cli.main, ["broker", "--upstream", "tcp://m:1", "--upstream", "tcp://m2:1"])
    assert fake_broker.seen["upstream"] == ("tcp://m:1", "tcp://m2:1")
    cfg.write_text('[broker]\nupstream = ["tcp://from-file:1"]\n')
    r = run(cli.main, ["--config", str(cfg), "broker"])
    assert fake_broker.seen["upstream"] == ("tcp://from-file:1",)
    cfg.write_text('[broker]\nbind = "tcp://*:9"\nupstream = "tcp://one:1"\n')  # one, not a list: taken as one
    r = run(cli.main, ["--config", str(cfg), "broker"])
    assert r.exit_code == 0, r.output  # it said "Value must be an iterable"
    assert fake_broker.seen["bind"] == ("tcp://*:9",) and fake_broker.seen["upstream"] == ("tcp://one:1",)


def test_bad_config_and_bad_options_give_clear_errors(tmp_path):
    run = CliRunner().invoke
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker\n")
    r = run(cli.main, ["--config", str(bad), "broker"])
    assert r.exit_code == 2 and "not valid TOML" in r.output
    r = run(cli.main, ["--config", str(tmp_path / "missing.toml"), "broker"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = run(cli.main, ["broker", "--bind", "nonsense"])
    assert r.exit_code == 1 and "not an endpoint" in r.output
    r = run(cli.main, ["broker", "--liveness", "0"])
    assert r.exit_code == 2 and "--liveness" in r.output and "1<=x<=1000" in r.output
    r = run(cli.main, ["broker", "--ha", "primary", "--ha-bind", "tcp://*:1"])
    assert r.exit_code == 1 and "needs both peer" in r.output
    own = ["broker", "--ha", "primary", "--ha-bind", "tcp://127.0.0.1:7101", "--peer", "tcp://127.0.0.1:7101"]
    r = run(cli.main, own)  # it talked to itself: active, then handed over to itself and stopped
    assert r.exit_code == 1 and "peer tcp://127.0.0.1:7101 is this broker's own ha_bind" in r.output
    r = run(cli.main, ["broker", "--bind", "tcp://127.0.0.1:7102", "--upstream", "tcp://127.0.0.1:7102"])
    assert r.exit_code == 1 and "upstream tcp://127.0.0.1:7102 is this broker's own bind" in r.output
    r = run(cli.main, ["broker", "--bind", "tcp://127.0.0.1:7103", "--bind", "tcp://127.0.0.1:7103"])
    assert r.exit_code == 1 and "bind tcp://127.0.0.1:7103 is given twice" in r.output  # not "in use"
    r = run(cli.main, ["broker", "--peer", "tcp://x:1"])
    assert r.exit_code == 1 and "set ha to 'primary' or 'backup'" in r.output
    toml = tmp_path / "pair.toml"
    toml.write_text('[broker]\nha = "backup"\npeer = "tcp://a:5560"\nfailback = "auto"\n')
    r = run(cli.main, ["--config", str(toml), "broker"])  # the file's pair settings are read
    assert r.exit_code == 1 and "needs both peer" in r.output
    r = run(cli.main, ["broker", "--ha", "leader"])
    assert r.exit_code == 2 and "'primary', 'backup'" in r.output
    r = run(cli.main, ["call", "echo", "{not json"])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    r = run(cli.main, ["worker", "nomodule_xyz:thing", "--connect", "tcp://127.0.0.1:1"])
    assert r.exit_code == 1 and "cannot import module" in r.output
    r = run(cli.main, ["worker", "json", "--connect", "tcp://127.0.0.1:1"])
    assert r.exit_code == 1 and "MODULE:OBJECT" in r.output


def test_call_without_broker_fails_with_one_line_and_nonzero_status():
    r = CliRunner().invoke(cli.main, ["-q", "call", "echo", "1", "--connect", "tcp://127.0.0.1:1", "--timeout", "0.3"])
    assert r.exit_code == 1
    assert r.output.strip().startswith("error: NoBroker") and r.output.strip().count("\n") == 0


def test_status_formatting():
    st = {
        "broker": "b",
        "incarnation": "i",
        "uptime_s": 3.0,
        "heartbeat_s": 0.25,
        "liveness": 4,
        "queued": 0,
        "requests_open": 0,
        "services": {"echo": {"workers": 1, "capacity": 2, "inflight": 1, "queued": 0}},
        "workers": [{"name": "w1", "services": ["echo"], "capacity": 2, "inflight": 1, "served": 9, "silent_s": 0.1}],
        "counters": {"requests": 10, "busy": 0},
    }
    text = cli.format_status(st)
    assert "echo" in text and "w1" in text and "requests=10" in text and "busy=" not in text
    assert "compiled" not in text.splitlines()[0] and "remembered" not in text
    st["remembered"] = {"clients": 3, "batch_limits": 4, "mdp_peers": 0}
    assert "remembered: clients=3  batch_limits=4  mdp_peers=0" in cli.format_status(st)
    assert "file descriptors" not in text
    st["fds"] = {"open": 17, "limit": 1024}
    assert "file descriptors: 17 open of 1024" in cli.format_status(st)
    st["fds"] = {"open": 17, "limit": -1}
    assert "file descriptors: 17 open no limit" in cli.format_status(st)
    st["build"] = "compiled"
    assert cli.format_status(st).splitlines()[0].endswith("open 0  (compiled)")
    assert "PROXY BELOW" not in text and "upstream" not in text
    st["brokers"] = [{"name": "east", "spare": {"echo": 3}, "inflight": 2, "served": 7, "silent_s": 0.05}]
    st["upstream"] = {
        "endpoint": "tcp://m:1",
        "broker": "master",
        "registered": True,
        "forwarded": 4,
        "held": 1,
        "losses": 2,
    }
    st["ha"] = {
        "role": "backup",
        "state": "active",
        "epoch": 7,
        "failback": "manual",
        "peer": {"name": "a", "state": "passive", "epoch": 7, "silent_s": 0.1, "synced": 3},
        "replicated": None,
    }
    text = cli.format_status(st)
    assert "east" in text and "echo:3" in text
    assert "pair: backup ACTIVE epoch 7 (failback manual); peer a passive epoch 7, silent 0.10s" in text
    assert "upstream tcp://m:1: registered with master; 4 forwarded and 1 handed down in flight; 2 losses" in text


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_real_processes_broker_worker_call_status(tmp_path):
    ep = f"ipc://{tmp_path}/b.sock"
    procs = Procs()
    try:
        broker = procs.spawn("broker", "--bind", ep)
        procs.spawn("worker", "testworkers:echo_fn", "--service", "echo2", "--connect", ep)
        env_cmd = [sys.executable, "-m", "zmqdist", "-q"]

        def call():
            r = subprocess.run(
                [*env_cmd, "call", "echo2", '{"a": [1, 2]}', "--connect", ep, "--timeout", "2"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=30,
            )
            return r if r.returncode == 0 else None

        r = wait_for(call, 30, "zmqdist call to succeed", interval=0.2)
        assert json.loads(r.stdout) == {"a": [1, 2]}
        r = subprocess.run(
            [*env_cmd, "status", "--json", "--connect", ep], capture_output=True, text=True, cwd=ROOT, timeout=30
        )
        st = json.loads(r.stdout)
        assert st["services"]["echo2"]["workers"] == 1
        assert st["build"] == _native.STATE  # the broker process runs what this install built
        r = subprocess.run(
            [*env_cmd, "call", "nope", "--connect", ep, "--timeout", "0.5"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        assert r.returncode == 1 and "no worker for service 'nope'" in r.stderr
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(10) == 0
    finally:
        procs.cleanup()


def test_keys_generate_writes_a_zmq_auth_certificate_pair(tmp_path):
    import zmq.auth

    from zmqdist.transport.security import KeyRing

    run = CliRunner().invoke
    r = run(cli.main, ["keys", "generate", "alice", "--dir", str(tmp_path), "--services", "echo, sum"])
    assert r.exit_code == 0, r.output
    public, secret = zmq.auth.load_certificate(str(tmp_path / "alice.key_secret"))
    assert zmq.auth.load_certificate(str(tmp_path / "alice.key"))[0] == public and secret
    assert (tmp_path / "alice.key_secret").stat().st_mode & 0o077 == 0  # private
    ring = KeyRing({"clients": str(tmp_path)})
    assert ring.keys[public].services == frozenset({"echo", "sum"})
    r = run(cli.main, ["keys", "generate", "alice", "--dir", str(tmp_path)])
    assert r.exit_code == 1 and "already exists" in r.output
    r = run(cli.main, ["keys", "generate", str(tmp_path / "sub" / "bob")])  # a path: it said "not a usable key name"
    assert r.exit_code == 1 and f"keys generate bob --dir {tmp_path / 'sub'}" in r.output
    assert not (tmp_path / "sub").exists()  # nothing made for a refused name
    r = run(cli.main, ["keys", "generate", ".hidden", "--dir", str(tmp_path / "sub")])
    assert r.exit_code == 1 and "not a usable key name" in r.output and not (tmp_path / "sub").exists()
    r = run(cli.main, ["broker", "--allow-clients", str(tmp_path)])  # allow-lists need a key
    assert r.exit_code == 1 and "secret key" in r.output


def test_log_format_json_writes_one_object_per_line(tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "zmqdist", "--log-format", "json", "-v", "call", "echo", "1",
         "--connect", f"ipc://{tmp_path}/none.sock", "--timeout", "0.3"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert records, r.stderr
    assert all({"time", "level", "logger", "message"} <= rec.keys() for rec in records)


def test_top_shows_rates_and_per_worker_utilisation():
    def st(requests, ok, served, inflight):
        return {
            "broker": "b",
            "uptime_s": 10.0,
            "queued": 0,
            "counters": {"requests": requests, "replies_ok": ok},
            "workers": [
                {"id": "01", "name": "w1", "capacity": 4, "inflight": inflight, "served": served, "failed": 2,
                 "mean_service_ms": 1.5},
            ],
            "brokers": [],
        }  # fmt: skip

    text = cli.format_top(st(1500, 1400, 1400, 3), st(500, 400, 400, 1), 2.0)
    assert "requests 500/s" in text and "replies 500/s" in text
    row = next(line for line in text.splitlines() if line.startswith("w1"))
    assert "75%" in row and "3/4" in row and " 500 " in row and "1.5" in row


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_top_against_a_real_broker(tmp_path):
    import subprocess
    import sys

    from zmqdist import Broker, Client, Worker

    b = Broker(bind=[f"ipc://{tmp_path}/t.sock"]).start()
    w = Worker(b.endpoints, concurrency=2, name="topw")
    w.add_service("echo", lambda x: x)
    w.start()
    try:
        with Client(b.endpoints, timeout=10) as c:
            futs = [c.submit("echo", i) for i in range(2000)]
            cmd = [sys.executable, "-m", "zmqdist", "top", "--connect", b.endpoints[0], "--count", "2"]
            r = subprocess.run([*cmd, "--interval", "0.3"], capture_output=True, text=True, timeout=30)
            assert [f.result(10) for f in futs] == list(range(2000))
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("broker ") == 2 and "topw" in r.stdout
    finally:
        w.stop(drain=False)
        b.stop()


def test_status_tree_text_indents_each_broker_under_its_upstream():
    def node(name, workers, below=(), unreachable=()):
        return {
            "broker": name, "incarnation": "i", "uptime_s": 1.0, "heartbeat_s": 0.25, "liveness": 4,
            "queued": 0, "requests_open": 0, "services": {},
            "workers": [{"name": w, "services": ["echo"], "capacity": 1, "inflight": 0, "served": 0,
                         "failed": 0, "silent_s": 0.1} for w in workers],
            "counters": {}, "below": list(below), "unreachable": list(unreachable),
        }  # fmt: skip

    t = node("M", ["wm"], [node("R", ["wr"], [node("S", ["ws"])], unreachable=["T"])])
    text = cli.format_tree(t)
    lines = text.splitlines()
    assert next(line for line in lines if "broker M" in line).startswith("broker M")
    assert next(line for line in lines if "broker R" in line).startswith("    broker R")
    assert next(line for line in lines if "broker S" in line).startswith("        broker S")
    assert any(line.startswith("        ws") for line in lines)
    assert "(no answer from: T)" in text


def test_bench_dispatch_cost_runs_for_every_scale_point():
    """The scale section's sans-IO figure: every request of the run answered, at any pool size."""
    _bench = cli.load_bench_lab()

    for workers, capacity in ((10, 20), (1000, 1)):
        assert 0 < _bench.core_cost(workers, capacity, n=300) < 10_000


def test_bench_counts_the_wake_ups_of_every_thread_of_a_process():
    """bench's path figures: a thread that blocks and is woken counts, though it is not the main one.

    The other thread is woken by Events until its own count (its /proc status) has risen by five;
    the process's figure must hold those and the main thread's. (It asked for five blocks of
    five wake-ups: a thread that reaches its wait after the event was set does not block, and a
    loaded machine once gave that four times in five.)"""
    import os
    import threading
    import time

    lab = cli.load_bench_lab()
    ping, pong, end = threading.Event(), threading.Event(), threading.Event()

    def other() -> None:
        while not end.is_set():
            if ping.wait(10):  # blocks until the main thread sets it, mostly: a voluntary switch
                ping.clear()
                pong.set()

    def woken(tid: int) -> int:  # one thread's own wake-ups
        with open(f"/proc/self/task/{tid}/status") as f:
            return next(int(line.split(":")[1]) for line in f if line.startswith("voluntary_ctxt_switches:"))

    t = threading.Thread(target=other)
    t.start()
    try:
        assert t.native_id is not None
        me = threading.get_native_id()
        user0, kernel0, all0 = lab.usage(os.getpid())  # read first, each of ours after: never less
        mine0, other0 = woken(me), woken(t.native_id)
        deadline = time.monotonic() + 10
        while woken(t.native_id) - other0 < 5 and time.monotonic() < deadline:
            pong.clear()
            ping.set()
            assert pong.wait(10)
        mine1, other1 = woken(me), woken(t.native_id)
        all1 = lab.usage(os.getpid())[2]  # read last: never less than ours
    finally:
        end.set()
        ping.set()
        t.join(10)
    assert user0 >= 0 and kernel0 >= 0
    assert other1 - other0 >= 5
    assert all1 - all0 >= (mine1 - mine0) + (other1 - other0)  # the other thread's wake-ups counted


def test_bench_shows_the_whole_paths_kernel_share_and_wake_ups():
    lab = cli.load_bench_lab()
    both = lab._cpu_line(
        {"cpu_us": 10.0, "cpu_of": {"client": 5.0, "worker 0": 3.0, "worker 1": 3.0},
         "path_user_us": 15.0, "path_kernel_us": 5.0, "path_wakeups": 0.81}
    )  # fmt: skip
    first, second = both.splitlines()
    assert "client 5.0, workers 6.0, all with the broker 21.0" in first
    assert "user 15.0 + kernel 5.0 us/req (25% kernel), 0.81 wake-ups/req" in second
    device = lab._cpu_line({"path_user_us": 3.0, "path_kernel_us": 1.0, "path_wakeups": 0.3})
    assert device.strip() == "all processes: user 3.0 + kernel 1.0 us/req (25% kernel), 0.30 wake-ups/req"
    assert lab._cpu_line({"cpu_us": 3.0}) == ""


def test_config_files_refuse_unknown_tables_and_keys_naming_the_nearest(tmp_path, fake_broker):
    run = CliRunner().invoke
    cfg = tmp_path / "typo.toml"
    cfg.write_text("[broker]\nmax_queu = 5\n")
    r = run(cli.main, ["--config", str(cfg), "broker"])
    assert r.exit_code == 2 and "no option 'max_queu'" in r.output and "did you mean 'max-queue'" in r.output
    cfg.write_text("[brokr]\nname = 'x'\n")
    r = run(cli.main, ["--config", str(cfg), "broker"])
    assert r.exit_code == 2 and "[brokr] is not a command" in r.output and "did you mean 'broker'" in r.output
    cfg.write_text("[broker]\nmax-queue = 'lots'\n")
    r = run(cli.main, ["--config", str(cfg), "broker"])
    assert r.exit_code == 2 and "--max-queue" in r.output and "from the --config file" in r.output


def test_a_bad_environment_variable_is_named_in_the_error(fake_broker):
    r = CliRunner().invoke(cli.main, ["broker"], env={"ZMQDIST_BROKER_MAX_QUEUE": "abc"})
    assert r.exit_code == 2 and "ZMQDIST_BROKER_MAX_QUEUE" in r.output and "--max-queue" in r.output
    r = CliRunner().invoke(cli.main, ["call", "x", "--timeout", "0"])
    assert r.exit_code == 2 and "--timeout" in r.output


def test_verbosity_flags_work_after_the_command_too(fake_broker):
    seen = []
    r = CliRunner().invoke(cli.main, ["broker", "-v"], catch_exceptions=False)
    assert r.exit_code == 0
    import logging

    seen.append(logging.getLogger().level)
    CliRunner().invoke(cli.main, ["broker", "-q", "-q"], catch_exceptions=False)
    seen.append(logging.getLogger().level)
    assert seen == [logging.DEBUG, logging.ERROR]


def test_one_shot_commands_only_warn_and_an_unquoted_json_string_gets_a_hint(tmp_path):
    cmd = [sys.executable, "-m", "zmqdist", "call", "echo", "1", "--connect", f"ipc://{tmp_path}/none.sock"]
    r = subprocess.run([*cmd, "--timeout", "0.3"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and " INFO " not in r.stderr  # "connecting to ..." is INFO: not shown
    r = CliRunner().invoke(cli.main, ["call", "echo", "hello"])
    assert r.exit_code == 2 and "'\"hello\"'" in r.output


def test_module_object_errors_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_mod.py").write_text("import not_installed_anywhere\n")
    (tmp_path / "classy.py").write_text("class Handlers:\n    pass\n")
    run = CliRunner().invoke
    r = run(cli.main, ["worker", "no_such_module_xyz:w", "--connect", "tcp://127.0.0.1:1"])
    assert r.exit_code == 1 and "no such module" in r.output
    r = run(cli.main, ["worker", "broken_mod:w", "--connect", "tcp://127.0.0.1:1"])
    assert r.exit_code == 1 and "failed inside it" in r.output and "not_installed_anywhere" in r.output
    assert "broken_mod.py:1" in r.output
    r = run(cli.main, ["worker", "classy:Handlers", "--connect", "tcp://127.0.0.1:1"])
    assert r.exit_code == 1 and "is a class" in r.output


def test_status_says_when_it_cuts_a_name():
    st = {
        "broker": "b", "incarnation": "i", "uptime_s": 1.0, "heartbeat_s": 0.25, "liveness": 4, "queued": 0,
        "requests_open": 0, "services": {"s" * 40: {"workers": 1, "capacity": 1, "inflight": 0, "queued": 0}},
        "workers": [{"name": "w" * 40, "services": ["s" * 40], "capacity": 1, "inflight": 0, "served": 0,
                     "silent_s": 0.1}],
        "counters": {},
    }  # fmt: skip
    text = cli.format_status(st)
    assert "w" * 27 + "…" in text and "s" * 23 + "…" in text and "w" * 28 not in text


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_zmqdist_worker_runs_the_worker_object_with_its_settings_and_flags_override(tmp_path):
    from zmqdist import Broker, Client

    b = Broker(bind=[f"ipc://{tmp_path}/o.sock"]).start()
    (tmp_path / "objmod.py").write_text(
        "from zmqdist import Worker\n"
        f"w = Worker(['{b.endpoints[0]}'], concurrency=7, name='from-object', heartbeat_s=0.1)\n"
        "w.add_service('x', lambda v: v)\n"
    )
    procs = Procs()
    env_cwd = {"cwd": tmp_path}
    try:
        cmd = [sys.executable, "-m", "zmqdist", "-q", "worker", "objmod:w"]
        procs.procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, **env_cwd))
        with Client(b.endpoints, timeout=5) as c:
            workers = wait_for(lambda: c.call("zmqdist.status")["workers"], 20, "the object's worker")
            assert [(w["name"], w["capacity"]) for w in workers] == [("from-object", 7)]
            procs.cleanup()
            procs.procs = []
            wait_for(lambda: not c.call("zmqdist.status")["workers"], 20, "gone")
            procs.procs.append(
                subprocess.Popen([*cmd, "--concurrency", "3", "--name", "flagged"], stderr=subprocess.PIPE, **env_cwd)
            )
            workers = wait_for(lambda: c.call("zmqdist.status")["workers"], 20, "the flagged worker")
            assert [(w["name"], w["capacity"]) for w in workers] == [("flagged", 3)]
    finally:
        procs.cleanup()
        b.stop()
