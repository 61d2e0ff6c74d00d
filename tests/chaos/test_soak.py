"""The chaos soak, short: about a minute of a master pair, two regional proxy pairs, workers and
clients under random SIGKILLs and SIGSTOPs (tests/chaos/soak.py; the long run is documented in
docs/ha.md with its figures)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SOAK = Path(__file__).with_name("soak.py")


def run_soak(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the soak (stopped if this process dies); past ``timeout``, SIGTERM it, which kills its
    topology, before giving it up (a SIGKILL would leave the topology running)."""
    proc = subprocess.Popen([*cmd, "--stop-with-parent"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent) of process ``pid`` from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    kids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None and st[1] == pid and st[0] != "Z":
            kids.add(int(d.name))
    return kids


@pytest.mark.timeout(200)
def test_a_minute_of_faults_loses_nothing_answers_nothing_wrong_and_deposes_no_live_broker(tmp_path):
    report = tmp_path / "soak.json"
    # -X faulthandler: if the driver (the clients' process) dies in C, every thread's stack is shown
    cmd = [sys.executable, "-X", "faulthandler", str(SOAK), "--duration", "55", "--seed", "11", "--report", str(report)]
    r = run_soak(cmd, timeout=190)
    assert report.exists(), f"the soak ended {r.returncode} without a report:\n{r.stdout[-2000:]}{r.stderr[-12000:]}"
    rep = json.loads(report.read_text())
    print(f"\nsoak: {rep['requests']} requests, {rep['fault_count']} faults {rep['faults']}: {rep['outcomes']}")
    print(f"lifecycle: {rep['lifecycle']}")
    assert rep["fault_count"] >= 8  # one every 2-5 s for the 47 s before the settling
    assert rep["requests"] >= 10_000
    life = rep["lifecycle"]  # streams, joined keys and cancels ran too, and the verdict checked them
    assert all(life.get(kind, 0) >= 10 for kind in ("stream ok", "joined ok", "cancel cancelled", "retry ok")), life
    assert life.get("killing cancel cancelled", 0) >= 3, life  # handler processes killed by a cancel
    assert rep["bursts_past_the_quota"] >= 5  # clients that held back what their broker would refuse
    mdp = rep["mdp"]  # Majordomo clients and workers, and a native client of the Majordomo workers
    print(f"mdp: {mdp}")
    assert all(mdp.get(f"{what} ok", 0) >= 10 for what in ("mdp up", "mdp work", "native up")), mdp
    modes = rep["executions"]["by_handler_mode"]  # threads, async, inline and process handlers all served
    print(f"executions by handler mode: {modes}")
    assert all(modes[m] >= 100 for m in ("threads", "async", "inline", "process")), modes
    assert rep["faults"].get("kill handler", 0) >= 1  # a handler process SIGKILLed under its worker
    assert rep["faults"].get("stall host", 0) >= 1  # a pair and its region's workers stopped at once
    procs = rep["client_processes"]  # a SIGKILLed and a SIGSTOPped client process per region
    print(f"client processes: {procs}")
    assert len(procs) == 4 and all(c["ended"].get("ok", 0) >= 100 for c in procs.values()), procs
    assert r.returncode == 0, rep["verdict"]


def test_the_soak_reads_a_flap_and_a_live_step_down_as_defects_and_excuses_a_resumed_broker(tmp_path, monkeypatch):
    """The verdict's log reading, on lines as brokers write them: B stepped down while it carried
    the table (a defect), A took over again a millisecond after stepping down (a flap), and C, which
    the soak had stopped and resumed, stepped down on resuming (what it must do)."""
    monkeypatch.syspath_prepend(str(SOAK.parent))
    import soak

    line = "2026-12-04 12:44:{} WARNING zmqdist.broker: broker {n}: {n} {what}"
    (tmp_path / "A.log").write_text(
        "\n".join(
            line.format(t, n="A", what=w)
            for t, w in (
                ("14,008", "is active, epoch 5 (both started, B too: the primary serves); 0 open requests taken over"),
                ("19,656", "stepped down to passive (196 open requests, cold): B is active with epoch 6 (ours 5)"),
                ("19,657", "is active, epoch 7 (B is passive); 0 open requests taken over"),
                ("30,000", "stepped down to passive (0 open requests, cold): B is active with epoch 8 (ours 7)"),
                ("33,000", "is active, epoch 9 (B silent, 1 peers came here); 0 open requests taken over"),
            )
        )
    )
    (tmp_path / "B.log").write_text(
        line.format("19,700", n="B", what="stepped down to passive (12 open requests, warm): A is active with epoch 7")
    )
    (tmp_path / "C.log").write_text(
        line.format("40,500", n="C", what="stepped down to passive (9 open requests, warm): D is active with epoch 3")
    )
    # E resumed 0.6 ms into a millisecond and stepped down 0.3 ms later: its line shows that
    # millisecond, truncated, so before the SIGCONT (the soak failed so on a fast machine).
    (tmp_path / "E.log").write_text(
        line.format("50,000", n="E", what="stepped down to passive (5 open requests, warm): F is active with epoch 9")
    )
    resumed_c = soak.logged_at("2026-12-04 12:44:40,000")
    resumed_e = soak.logged_at("2026-12-04 12:44:50,000")
    assert resumed_c is not None and resumed_e is not None
    got = soak.read_logs(tmp_path, {"C": [resumed_c], "E": [resumed_e - 20, resumed_e + 0.0006]})
    assert [s["broker"] for s in got["live_active_step_downs"]] == ["B"]
    assert len(got["flaps"]) == 1 and got["flaps"][0].startswith("A.log:3: A took over 0.001s after stepping down")
    assert [(s["resumed"], s["since_resume_s"]) for s in got["step_downs"] if s["broker"] in "CE"] == [
        (True, 0.5),
        (True, -0.0006),
    ]
    assert soak.verdict(
        {
            "outcomes": {"ok": 1, "handler-killed": 1},
            "requests": 2,
            "errors": 0,
            "takeover_s": {},
            "faults": {"kill handler": 1},  # a killed handler process ends one request at most
            "orphans": ["4242 (parent 1): python3 -c ...spawn_main..."],
            "remembered_past_the_forgetting": {"MA": {"clients": 1, "batch_limits": 40, "mdp_peers": 0}},
            "stalls_that_changed_the_active_broker": ["R1A/R1B: R1A was active at epoch 5; after the stall ..."],
            "stalls_that_gave_a_worker_up": ["R2A: workers given up (served before, after): {'WR2-0': (7, 0)}"],
            "client_processes": {
                "CR1-kill": {
                    "ended": {"ok": 9, "handler-killed": 1},
                    "twice": 0,
                    "never": 0,
                    "hung": False,
                    "last_run_issued": 10,
                }
            },
            "executions": {
                "never_run_but_ok": 0,
                "by_handler_mode": {"threads": 5, "async": 2, "inline": 0, "process": 1},
            },
            **got,
        },
        0.001,
    ) == [
        "1 step-downs of a live active broker",
        "  B.log:1: 2026-12-04 12:44:19,700 B (resumed None s before): A is active with epoch 7",
        f"brokers that took over again right after stepping down: {got['flaps']}",
        "stalled hosts whose pair changed its active broker: "
        "['R1A/R1B: R1A was active at epoch 5; after the stall ...']",
        "stalled hosts whose active broker gave a worker of the host up: "
        "[\"R2A: workers given up (served before, after): {'WR2-0': (7, 0)}\"]",
        "processes that outlived their parent: ['4242 (parent 1): python3 -c ...spawn_main...']",
        "brokers that remember more peers than they have, 15 ttls after every client was done: "
        "{'MA': {'clients': 1, 'batch_limits': 40, 'mdp_peers': 0}}",
        "handler modes that ran no request (the soak did not test them): ['inline']",
        "2 requests ended by a killed handler process, for 1 kills of one",
    ]


def test_the_soak_counts_each_requests_runs_and_each_handler_modes(tmp_path, monkeypatch):
    """Execution logs as the workers write them: a native worker's name its handler mode, a
    Majordomo worker's do not; a mode with no log at all counts 0 (the verdict's defect)."""
    monkeypatch.syspath_prepend(str(SOAK.parent))
    import soak

    (tmp_path / "exec-threads-101.log").write_text("7\n8\n")
    (tmp_path / "exec-threads-102.log").write_text("8\n")  # 8 ran again after 101 was killed
    (tmp_path / "exec-async-103.log").write_text("9\n\n")
    (tmp_path / "exec-104.log").write_text("10\n")
    runs, by_mode = soak.executions(tmp_path)
    assert runs == {7: 1, 8: 2, 9: 1, 10: 1}
    assert by_mode == {"threads": 3, "async": 1, "inline": 0, "process": 0, "majordomo": 1}


def test_the_soak_finds_a_process_of_its_own_that_outlived_its_parent(tmp_path, monkeypatch):
    """A process with the soak's log directory in its environment whose parent is gone (a handler
    process left by its SIGKILLed worker) is named; the soak's own children, and theirs, are not."""
    monkeypatch.syspath_prepend(str(SOAK.parent))
    import soak

    env = dict(os.environ, SOAK_LOG_DIR=str(tmp_path))
    child = subprocess.Popen(["sleep", "30"], env=env)  # the soak's own child: not an orphan
    # sh starts sleep and exits: the sleep outlives its parent (adopted by init or a subreaper)
    orphaning = "sleep 31 >/dev/null 2>&1 & echo $!"
    sh = subprocess.Popen(["sh", "-c", orphaning], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = sh.communicate(timeout=10)
    stray = int(out)
    try:
        found = soak.orphans(tmp_path)
        assert [line.split()[0] for line in found] == [str(stray)], found
        assert "sleep 31" in found[0]
        assert soak.orphans(tmp_path / "other") == []  # another soak's log directory: none of ours
    finally:
        os.kill(stray, signal.SIGKILL)
        child.kill()
        child.wait()


def test_a_stalled_hosts_processes_get_no_other_fault_until_its_watcher_has_checked_them(monkeypatch):
    """The host stayed kept from other faults for a fixed window, but the watcher's check could
    come later (it waits for both brokers to answer): once, the master was killed meanwhile and
    its unanswered status read as the host's worker given up (seed 173). Now the names stay busy
    until the check is done, and a broker that answers keeps the verdict clean."""
    import random
    import threading
    import time

    monkeypatch.syspath_prepend(str(SOAK.parent))
    import soak

    answer = threading.Event()
    state = {"state": "active", "takeovers": 0, "step_downs": 0}

    class Topo:
        def state(self, name):
            answer.wait(10)  # a broker slow to answer after the stall
            return dict(state, state="active" if name == "MA" else "passive")

        def status(self, name):
            return {"workers": [{"name": "WM-0", "served": 7}]}

    chaos = soak.Chaos(Topo(), random.Random(1))
    was = {n: soak._pair_record(dict(state, state="active" if n == "MA" else "passive")) for n in ("MA", "MB")}
    host = ["MA", "MB", "WM-0"]
    chaos.watching.update(host)
    watch = soak.Watch("MA", "MB", was, "MA", {"WM-0": 5}, host)
    t = threading.Thread(target=chaos._watch_stall, args=(watch, time.monotonic()), daemon=True)
    t.start()  # past the settled time at once, its check waiting for an answer
    assert all(chaos.busy(n) for n in host) and not chaos.busy("WR1-0")
    answer.set()
    t.join(10)
    assert not any(chaos.busy(n) for n in host)
    assert chaos.stalls_expired == [] and chaos.stalls_changed == []


def test_a_process_that_exits_by_itself_is_noted_and_started_again_and_fails_the_verdict(monkeypatch):
    """A worker whose start failed exited by itself (seed 175): nothing noticed or restarted it,
    and the verdict passed. One the soak killed (a restart pending) is not such an exit."""
    import random

    monkeypatch.syspath_prepend(str(SOAK.parent))
    import soak

    class Popen:
        def __init__(self, code):
            self.returncode = code

        def poll(self):
            return self.returncode

    class Topo:
        procs = {}
        clients = []

    for name, code in (("WR2-1", 1), ("WR1-0", -9), ("MA", None)):
        proc = soak.Proc(name, [], Path("/nonexistent"), {})
        proc.popen = Popen(code)
        Topo.procs[name] = proc
    chaos = soak.Chaos(Topo(), random.Random(1))
    chaos.pending.append((5.0, "restart", "WR1-0"))  # killed by the soak: its restart is due
    chaos.note_exits(3.0)
    assert chaos.exited == ["    3.00 WR2-1 (exit code 1)"]
    assert (3.0, "restart", "WR2-1") in chaos.pending
    chaos.note_exits(3.05)  # its restart pending: not noted twice
    assert len(chaos.exited) == 1
    report = {
        "outcomes": {},
        "live_active_step_downs": [],
        "flaps": [],
        "tracebacks": [],
        "crashes": [],
        "takeover_s": {},
        "executions": {"never_run_but_ok": 0, "by_handler_mode": {"threads": 1}},
        "requests": 0,
        "processes_that_exited_by_themselves": chaos.exited,
    }
    assert any("exited by themselves" in b for b in soak.verdict(report, 0.01))
    assert soak.verdict({**report, "processes_that_exited_by_themselves": []}, 0.01) == []


@pytest.mark.timeout(120)
def test_a_soak_stopped_by_sigterm_kills_every_process_of_its_topology():
    """``timeout`` and a test runner that stops send SIGTERM: the soak's brokers, workers and
    clients outlived it and loaded the machine. Now they die with it."""
    cmd = [sys.executable, str(SOAK), "--duration", "60", "--seed", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(kids := children(proc.pid)) < 10:  # 6 brokers, workers, client processes
            assert proc.poll() is None and time.monotonic() < deadline, f"{len(kids)} processes started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "stopped by signal 15" in err, err[-2000:]
    deadline = time.monotonic() + 10  # SIGKILLed and waited for: gone (or a zombie)
    while alive := {k for k in kids if (st := _stat(k)) is not None and st[0] != "Z"}:
        assert time.monotonic() < deadline, f"the soak's processes outlived it: {alive}"
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_a_soak_told_to_stop_with_its_parent_kills_its_topology_when_the_parent_is_sigkilled():
    """A test runner SIGKILLed (or killed past its own timeout) cannot stop the soak it started:
    with ``--stop-with-parent`` the kernel sends the soak SIGTERM when its parent dies."""
    cmd = [sys.executable, str(SOAK), "--duration", "60", "--seed", "4", "--stop-with-parent"]
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])", *cmd])
    soak: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not (soak := children(parent.pid)) or len(kids := children(min(soak))) < 10:
            assert parent.poll() is None and time.monotonic() < deadline, "the soak did not start its topology"
            time.sleep(0.2)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 60
        while alive := {k for k in soak | kids if (st := _stat(k)) is not None and st[0] != "Z"}:
            assert time.monotonic() < deadline, f"the soak or its processes outlived its parent: {alive}"
            time.sleep(0.1)
    finally:
        parent.kill()
        for pid in soak:  # the test failed: stop what it started (a pid gone is not an error)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
