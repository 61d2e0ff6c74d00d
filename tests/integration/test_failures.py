"""Real processes over real sockets: worker kills, broker restart, GIL-bound handlers."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from tests.integration.helpers import ROOT, free_port, scrape, status, value, wait_for
from zmqdist import Client, RemoteError, RequestTimeout, WorkerLost

pytestmark = pytest.mark.integration


def start_broker(procs, ep, *extra):
    b = procs.spawn("broker", "--bind", ep, "--name", "itest", *extra)
    return b


def start_workers(procs, ep, n, target="testworkers:echo", *extra):
    return [procs.spawn("worker", target, "--connect", ep, "--name", f"w{i}", *extra) for i in range(n)]


def wait_workers(client, n, timeout=20):
    return wait_for(lambda: len(status(client)["workers"]) == n, timeout, f"{n} workers registered")


@pytest.mark.timeout(180)
def test_5000_requests_while_two_of_four_workers_are_sigkilled(procs, ipc_ep):
    start_broker(procs, ipc_ep)
    workers = start_workers(procs, ipc_ep, 4)
    rng = random.Random()
    kill_at = sorted(rng.sample(range(300, 4000), 2))
    with Client([ipc_ep], timeout=60) as c:
        wait_workers(c, 4)
        futs = []
        victims = iter(rng.sample(workers, 2))
        killed = []
        for i in range(5000):
            futs.append(c.submit("echo", i))
            if kill_at and i == kill_at[0]:
                kill_at.pop(0)
                v = next(victims)
                v.send_signal(signal.SIGKILL)
                killed.append(v.pid)
            if i % 200 == 199:
                futs[i - 150].result(60)  # keep a bounded window, like a real pipelined client
        results = [f.result(60) for f in futs]
        # A victim killed while holding nothing delays no request: its expiry may come after the last
        # reply. On a starved machine a live worker may be declared dead too, and registers again.
        names = {f"w{workers.index(v)}" for v in workers if v.pid in killed}
        st = wait_for(
            lambda: (s := status(c)) and not names & {w["name"] for w in s["workers"]} and s, 15, "both victims gone"
        )
        # each victim is dropped by expiry or, sooner, when a send to its closed connection fails
        assert st["counters"]["workers_expired"] + st["counters"]["workers_unreachable"] >= 2
    assert [r[0] for r in results] == list(range(5000)), "a reply was lost, wrong or out of place"
    served = Counter(r[1] for r in results)
    assert len(killed) == 2 and all(served[pid] < 5000 for pid in killed)
    assert st["counters"]["lost"] == 0 and st["counters"]["replies_ok"] == 5000
    assert st["requests_open"] == 0


@pytest.mark.timeout(120)
def test_broker_restart_under_load_requests_complete_under_same_ids(procs, ipc_ep):
    broker = start_broker(procs, ipc_ep)
    start_workers(procs, ipc_ep, 2)
    with Client([ipc_ep], timeout=30) as c:
        wait_workers(c, 2)
        futs = [c.submit("echo", i) for i in range(300)]
        wait_for(lambda: sum(f.done() for f in futs) >= 50, 20, "first replies")
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
        futs += [c.submit("echo", i) for i in range(300, 600)]  # sent while no broker is there
        time.sleep(0.3)  # the outage itself (not an assertion wait)
        start_broker(procs, ipc_ep)
        results = [f.result(40)[0] for f in futs]
        assert results == list(range(600))
        assert c._core.counters["broker_restarts"] + c._core.counters["failovers"] >= 1
        wait_workers(c, 2)


@pytest.mark.timeout(90)
def test_a_broker_back_within_a_ttl_registers_each_worker_once(procs, ipc_ep):
    """The workers' heartbeats sent while their broker was away wait in their connection and reach
    the new broker together, each answered RECONNECT: a worker registers again once, not once per
    heartbeat (each registration dropped and requeued what the last one had just been sent)."""
    hb = ("--heartbeat", "0.4", "--liveness", "8")  # a ttl of 3.2 s: the outage stays inside it
    broker = start_broker(procs, ipc_ep, *hb)
    start_workers(procs, ipc_ep, 2, "testworkers:echo", *hb)
    with Client([ipc_ep], timeout=30) as c:
        wait_workers(c, 2)
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
        time.sleep(1.0)  # the outage itself (not an assertion wait): 2 or 3 heartbeats wait
        start_broker(procs, ipc_ep, *hb)
        assert [r[0] for r in c.map("echo", range(200))] == list(range(200))
        wait_workers(c, 2)
        st = status(c)
    assert st["counters"]["workers_registered"] == 2, st["counters"]
    assert st["counters"]["requeues"] == 0 and st["counters"]["late_results"] == 0


@pytest.mark.timeout(90)
def test_pure_python_cpu_bound_handler_for_10s_keeps_heartbeating(procs, ipc_ep):
    start_broker(procs, ipc_ep)
    procs.spawn("worker", "testworkers:gil", "--connect", ipc_ep)
    with Client([ipc_ep], timeout=30) as c:
        wait_workers(c, 1)
        assert c.call("spin", 10.0) > 0
        st = status(c)
    assert st["counters"]["workers_expired"] == 0 and st["counters"]["requeues"] == 0


@pytest.mark.timeout(90)
def test_c_code_holding_the_gil_expires_a_thread_worker_but_not_a_process_worker(procs, ipc_ep):
    start_broker(procs, ipc_ep, "--max-attempts", "1")
    procs.spawn("worker", "testworkers:gil", "--connect", ipc_ep, "--name", "threaded")
    with Client([ipc_ep], timeout=30) as c:
        wait_workers(c, 1)
        with pytest.raises(WorkerLost, match="attempt cap 1"):
            c.call("hold_gil", 3.0)  # no heartbeat for ~3 s > 1 s ttl: declared dead
        assert status(c)["counters"]["workers_expired"] == 1
    ep2 = ipc_ep + "2"
    start_broker(procs, ep2, "--max-attempts", "1")
    procs.spawn("worker", "testworkers:gil", "--connect", ep2, "--isolation", "process")
    with Client([ep2], timeout=30) as c:
        wait_workers(c, 1)
        assert c.call("hold_gil", 3.0) >= 1.0
        assert status(c)["counters"]["workers_expired"] == 0


@pytest.mark.timeout(60)
def test_sigterm_drains_in_flight_work_and_deregisters(procs, ipc_ep):
    start_broker(procs, ipc_ep)
    w = procs.spawn("worker", "testworkers:echo", "--connect", ipc_ep)
    with Client([ipc_ep], timeout=20) as c:
        wait_workers(c, 1)
        futs = [c.submit("slow", 1.0) for _ in range(2)]
        wait_for(lambda: status(c)["services"]["slow"]["inflight"] == 2, 10, "both in flight")
        w.send_signal(signal.SIGTERM)
        assert [f.result(10) for f in futs] == [w.pid, w.pid]
        assert w.wait(10) == 0
        st = status(c)
    assert st["counters"]["workers_left"] == 1 and st["counters"]["requeues"] == 0 and st["workers"] == []


@pytest.mark.timeout(60)
def test_broker_sigterm_stops_cleanly(procs, ipc_ep):
    b = start_broker(procs, ipc_ep)
    with Client([ipc_ep], timeout=5) as c:
        wait_for(lambda: status(c), 10, "broker up")
    b.send_signal(signal.SIGTERM)
    assert b.wait(10) == 0


@pytest.mark.timeout(60)
def test_deadline_budget_travels_and_no_worker_times_out_with_reason(procs, ipc_ep):
    start_broker(procs, ipc_ep)
    start_workers(procs, ipc_ep, 1)
    with Client([ipc_ep], timeout=5) as c:
        wait_workers(c, 1)
        # the call's own deadline (10 s), not the client's (5 s), reaches the handler, less the trip
        ctx = c.call("ctx", None, timeout=10.0)
        assert 8.0 < ctx["remaining"] < 10.0 and ctx["attempt"] == 1 and ":" in ctx["key"]
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout, match="no worker for service 'nobody' was registered"):
            c.call("nobody", 1, timeout=0.5)
        assert time.monotonic() - t0 < 4.0  # the call's 0.5 s, not the client's 5 s


@pytest.mark.timeout(60)
def test_many_client_threads_share_one_client(procs, ipc_ep):
    start_broker(procs, ipc_ep)
    start_workers(procs, ipc_ep, 2)
    with Client([ipc_ep], timeout=20) as c:
        wait_workers(c, 2)
        errors = []

        def run(k):
            try:
                assert [r[0] for r in c.map("echo", range(k * 1000, k * 1000 + 300))] == list(
                    range(k * 1000, k * 1000 + 300)
                )
            except BaseException as e:
                errors.append(e)

        ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert not errors


@pytest.mark.timeout(60)
def test_hung_worker_sigstop_is_given_up_then_rejoins_after_sigcont(procs, ipc_ep):
    start_broker(procs, ipc_ep)
    a, b = start_workers(procs, ipc_ep, 2)
    with Client([ipc_ep], timeout=30) as c:
        wait_workers(c, 2)
        futs = [c.submit("slow", 0.3) for _ in range(8)]
        wait_for(lambda: status(c)["services"]["slow"]["inflight"] == 4, 10, "both workers busy")
        a.send_signal(signal.SIGSTOP)  # hung: no heartbeats, no FIN, its connection stays open
        try:
            assert sorted({f.result(20) for f in futs}) == [b.pid]  # A's requests were requeued to B
            st = status(c)
            assert st["counters"]["workers_expired"] >= 1 and [w["name"] for w in st["workers"]] == ["w1"]
        finally:
            a.send_signal(signal.SIGCONT)
        wait_workers(c, 2)  # A finds it was forgotten and registers again
        st = status(c)
    assert st["counters"]["replies_ok"] == 8 and st["requests_open"] == 0
    assert c._core.counters["duplicates"] == 0


@pytest.mark.timeout(90)
def test_a_broker_stopped_again_and_again_still_gives_a_hung_worker_up(procs, ipc_ep):
    """The broker SIGSTOPped 1.5 s in every 2.5 s (a host stalled again and again, a throttled
    container) while worker A hangs holding requests. Its members' silence once counted from the
    broker's last resume: A never reached its ttl (3 s here) and kept its requests as long as the
    pauses went on. Silence now counts only the time the broker ran (core/link.py, Pauses). The
    ttl is twice the stops, so they are no death to B and the client, even on a loaded machine."""
    metrics = free_port()
    broker = start_broker(procs, ipc_ep, "--liveness", "12", "--metrics-port", str(metrics))
    a, b = start_workers(procs, ipc_ep, 2)
    with Client([ipc_ep], timeout=60) as c:
        wait_workers(c, 2)
        futs = [c.submit("slow", 0.3) for _ in range(8)]
        wait_for(lambda: status(c)["services"]["slow"]["inflight"] == 4, 10, "both workers busy")
        a.send_signal(signal.SIGSTOP)  # hung, holding two
        end = time.monotonic() + 30
        try:
            while time.monotonic() < end and not all(f.done() for f in futs):
                broker.send_signal(signal.SIGSTOP)
                time.sleep(1.5)
                broker.send_signal(signal.SIGCONT)
                time.sleep(1.0)
        finally:
            broker.send_signal(signal.SIGCONT)
        assert all(f.done() for f in futs), "a hung worker kept its requests while the broker kept pausing"
        assert sorted({f.result(1) for f in futs}) == [b.pid]  # A's requests ran at B
        st = status(c)
        assert st["counters"]["workers_expired"] == 1 and st["counters"]["duplicates"] == 0  # nobody else failed over
        # Each stop is counted and timed (it overran the loop's wait of at most 0.25 s by 1.25 s or
        # more), in the status and the metrics alike: a host that stalls shows, not only failovers.
        stops, ms = st["counters"]["pauses"], st["counters"]["paused_ms"]
        assert stops >= 3 and ms >= 1250 * 3, (stops, ms)
        text = scrape(metrics)
        assert value(text, "zmqdist_pauses_total") == stops and value(text, "zmqdist_paused_seconds_total") == ms / 1000
        a.send_signal(signal.SIGCONT)


@pytest.mark.timeout(90)
def test_client_and_worker_fail_over_to_the_next_endpoint_when_their_broker_dies(procs, tmp_path):
    a_ep, b_ep = f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock"
    a = start_broker(procs, a_ep)
    start_broker(procs, b_ep)
    procs.spawn("worker", "testworkers:echo", "--connect", a_ep, "--connect", b_ep, "--name", "w0")
    with Client([a_ep, b_ep], timeout=30) as c, Client([b_ep], timeout=10) as watch_b:
        wait_workers(c, 1)
        futs = [c.submit("echo", i) for i in range(400)]
        wait_for(lambda: sum(f.done() for f in futs) >= 50, 20, "first replies through A")
        a.send_signal(signal.SIGKILL)
        futs += [c.submit("echo", i) for i in range(400, 600)]
        assert [f.result(30)[0] for f in futs] == list(range(600))
        assert c._core.counters["failovers"] >= 1 and c._core.link.endpoint == b_ep
        st = status(watch_b)
        assert [w["name"] for w in st["workers"]] == ["w0"] and st["counters"]["replies_ok"] >= 1


@pytest.mark.timeout(60)
def test_a_sigtermed_broker_tells_its_peers_to_move_on_at_once(procs, tmp_path):
    """BYE reaches every peer (a broker that closed its socket at once lost about half of them:
    the peers then waited a ttl of silence)."""
    ep, other = f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock"
    broker = procs.spawn("broker", "--bind", ep, "--name", "A")
    clients = [Client([ep, other], timeout=10) for _ in range(4)]
    try:
        for c in clients:
            wait_for(lambda c=c: c.call("zmqdist.status", timeout=2), 20, "broker up")
        stopped = time.monotonic()
        broker.send_signal(signal.SIGTERM)
        wait_for(lambda: all(c._core.counters["failovers"] for c in clients), 5, "every client moved on")
        moved = time.monotonic() - stopped
        assert moved < 0.8, f"{moved:.2f}s: a client waited for silence (ttl 1 s) instead of getting BYE"
        assert broker.wait(10) == 0
    finally:
        for c in clients:
            c.close()


@pytest.mark.timeout(90)
def test_a_handler_process_that_dies_is_replaced_and_the_worker_goes_on(procs, ipc_ep):
    """isolation="process": a handler calls os._exit(1). That request ends in a clear error, the
    worker stays registered, and the next requests are served by a new process. An idle one
    SIGKILLed (the kernel's OOM killer, say) is replaced too, and the worker says so."""
    start_broker(procs, ipc_ep)
    w = procs.spawn("worker", "testworkers:crashy", "--connect", ipc_ep, quiet=False)  # its warnings are read
    with Client([ipc_ep], timeout=20) as c:
        wait_workers(c, 1)
        c.call("pid", 0.0)

        def children() -> set[int]:
            out = subprocess.run(["pgrep", "-P", str(w.pid)], capture_output=True, text=True).stdout
            return {int(pid) for pid in out.split()}

        before = children()  # one process per slot (concurrency=2), and multiprocessing's tracker
        with pytest.raises(RemoteError, match="process running the handler of 'crash' died"):
            c.call("crash", None)
        # the dead process is replaced: one child gone, one new
        wait_for(lambda: len(children() - before) == 1, 20, "the dead process replaced")
        after = children()
        assert len(after) == len(before) and len(before - after) == 1
        later = {c.call("pid", 0.0) for _ in range(6)}
        assert later <= after  # served by the live processes, the new one included where it was free
        idle = sorted(later)[0]
        os.kill(idle, signal.SIGKILL)  # no request open: none ends in an error
        wait_for(lambda: idle not in children() and len(children()) == len(after), 20, "the idle one replaced")
        after = children()
        assert {c.call("pid", 0.0) for _ in range(6)} <= after
        st = status(c)
        assert len(st["workers"]) == 1 and st["counters"]["workers_expired"] == 0
    left = sorted(after)
    w.send_signal(signal.SIGKILL)
    _, err = w.communicate(timeout=10)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in left), 10, "its children to die with it")
    said = err.decode()
    assert "the process running the handler of crash died (exit code 1): replaced" in said, said
    assert "a handler process died while idle (exit code -9): replaced" in said, said


def test_async_handlers_and_async_generators_run_in_handler_processes(procs, ipc_ep):
    """isolation="process" with async handlers: a coroutine's value; an async generator's parts
    as a stream, in order, and as one list (it failed: "async_generator is not msgpack-
    serialisable"); and a stream cancelled midway stops its generator, freeing the process."""
    start_broker(procs, ipc_ep)
    w = procs.spawn("worker", "testworkers:crashy", "--connect", ipc_ep)
    with Client([ipc_ep], timeout=20) as c:
        wait_workers(c, 1)
        assert c.call("apid", 0.0) not in (w.pid, os.getpid())  # run in a handler process
        parts = list(c.stream("acount", {"n": 5, "s": 0.0}))
        assert [k for k, _ in parts] == [0, 1, 2, 3, 4] and len({pid for _, pid in parts}) == 1
        assert [k for k, _ in c.call("acount", {"n": 3, "s": 0.0})] == [0, 1, 2]
        s = c.stream("acount", {"n": 1000, "s": 0.05}, window=1)  # 50 s, were it not stopped
        assert next(s)[0] == 0
        assert s.cancel()
        futs = [c.submit("pid", 0.5) for _ in range(2)]  # both processes serve again, at once
        assert len({f.result(15) for f in futs}) == 2
        # A cancel cancels an async handler's task there, as on the worker's event loop: it was a
        # flag only, and a coroutine waiting 50 s held its process for the 50 s.
        for service, value in (("apid", 50.0), ("acount", {"n": 2, "s": 50.0})):
            f = c.submit(service, value)
            wait_for(lambda: status(c)["workers"][0]["inflight"] == 1, 10, f"{service} running")
            assert f.cancel()
            futs = [c.submit("pid", 0.5) for _ in range(2)]
            assert len({f.result(15) for f in futs}) == 2, service


# A script that starts a process worker at its top level, with no ``if __name__ == "__main__":``.
UNGUARDED = """
import sys
from testworkers import _slow
from zmqdist import Worker
w = Worker([sys.argv[1]], concurrency=2, isolation="process")
w.add_service("slow", _slow)
if sys.argv[2] == "start":
    w.start()
    print("STARTED", flush=True)
    w.stop(drain=False)
else:
    w.run()
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["run", "start"])
def test_a_script_that_starts_a_process_worker_unguarded_fails_at_once_saying_why(tmp_path, ipc_ep, how):
    """Each handler process is spawned and imports the main module again: unguarded, that starts
    the worker again in it. The script fails at its start with the fix to make, where before its
    handler processes failed and were replaced without end (43 in 8 s, measured) while the worker
    took requests it could never run."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'integration'}")
    proc = subprocess.Popen(
        [sys.executable, str(script), ipc_ep, how], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, (out, err[-3000:])
    assert "STARTED" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("zmqdist.errors.ZmqdistError: isolation='process': a handler process exited"), err[-3000:]
    assert 'under `if __name__ == "__main__":`' in last
    # each child said why it stopped: the worker it was made to start again
    assert "a Worker is starting in a process that multiprocessing spawned" in err
    assert err.count("bootstrapping phase") == 0  # no child got as far as spawning processes of its own


# A script that starts a process worker, guarded, and ends without stopping it.
ENDS_RUNNING = """
import sys
from testworkers import _slow
from zmqdist import Worker
if __name__ == "__main__":
    w = Worker([sys.argv[1]], concurrency=2, isolation="process")
    w.add_service("slow", _slow)
    w.start()
    print("STARTED", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_script_that_ends_with_its_process_worker_running_exits_quietly(tmp_path, ipc_ep):
    """At exit multiprocessing terminates the handler processes; the worker used to replace them
    then, and each replacement, its parent gone, printed a traceback (EOFError), 2 runs of 3."""
    script = tmp_path / "ends_running.py"
    script.write_text(ENDS_RUNNING)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'integration'}")
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, str(script), ipc_ep], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0 and proc.stdout == "STARTED\n", (proc.stdout, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.timeout(120)
def test_a_call_to_a_quiet_service_is_served_while_another_services_backlog_lasts(procs, ipc_ep):
    """One worker serves two services; a map keeps a backlog of one of them at the broker. A call
    to the other is served in its turn, long before the map ends. (Before: every freed slot went
    to the service listed first while it had a backlog; the call waited for the map to end.)"""
    start_broker(procs, ipc_ep)
    start_workers(procs, ipc_ep, 1)  # testworkers:echo serves "echo", then "slow", "ctx", ...
    done = []
    with Client([ipc_ep], timeout=60) as c, Client([ipc_ep], timeout=60) as quiet:
        wait_workers(c, 1)

        def flood():
            for v in c.map("echo", range(3000), window=200):
                done.append(v)

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        wait_for(lambda: len(done) >= 100, 60, "the map under way")
        assert quiet.call("ctx", None)["attempt"] == 1
        at = len(done)
        t.join(90)
        assert len(done) == 3000
    assert at < 2000, f"the call was answered after {at} of the map's 3,000 results"


# A client process: it submits N calls of "slow" (S seconds each), says so, prints the results.
SUBMITTER = """
import json, sys
from zmqdist import Client
ep, n, s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with Client([ep], timeout=60) as c:
    futs = [c.submit("slow", s) for _ in range(n)]
    print("submitted", flush=True)
    print(json.dumps([type(e).__name__ if (e := f.exception(60)) else "ok" for f in futs]), flush=True)
"""


def submitter(procs, ep, n, seconds):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", SUBMITTER, ep, str(n), str(seconds)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.procs.append(proc)  # reaped whatever happens
    assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
    return proc


@pytest.mark.timeout(120)
def test_a_killed_clients_requests_stop_at_the_ttl_and_a_stopped_ones_are_sent_again(procs, ipc_ep):
    """A client SIGKILLed with 60 requests open: the broker stops them once the client has been
    silent past the ttl (1 s), so its worker runs a few, not all 60 for nobody. A client SIGSTOPped
    for 3 s is taken for gone the same way; when it resumes it is told so and sends them again:
    every request ends right. (Before: the dead client's 60 runs took the worker 6 s.)"""
    start_broker(procs, ipc_ep)
    start_workers(procs, ipc_ep, 1)  # two slots
    with Client([ipc_ep], timeout=60) as c:
        wait_workers(c, 1)
        doomed = submitter(procs, ipc_ep, 60, 0.2)
        wait_for(lambda: status(c)["queued"] >= 40, 30, "the client's requests queued")
        doomed.kill()
        doomed.communicate(timeout=10)
        st = wait_for(lambda: (s := status(c)) and s["requests_open"] == 0 and s, 30, "nothing open at the broker")
        ran = sum(w["served"] for w in st["workers"])
        assert st["counters"]["abandoned"] >= 30 and ran <= 30, (ran, st["counters"])
        paused = submitter(procs, ipc_ep, 20, 0.2)
        wait_for(lambda: status(c)["queued"] >= 10, 30, "the client's requests queued")
        before = status(c)["counters"]["abandoned"]
        paused.send_signal(signal.SIGSTOP)
        wait_for(lambda: status(c)["counters"]["abandoned"] > before, 30, "the stopped client taken for gone")
        paused.send_signal(signal.SIGCONT)
        out, err = paused.communicate(timeout=60)
        assert json.loads(out) == ["ok"] * 20, err


@pytest.mark.timeout(60)
def test_a_handler_raising_an_exception_whose_str_raises_fails_the_call_and_the_worker_serves_on(procs, ipc_ep):
    """On a handler thread, inline and async: the caller gets a RemoteError naming the type, and the
    worker (one slot) answers the next calls. Before, the handler thread died with the task (its
    slot taken for good), and an inline handler took the worker's socket loop down with it."""
    start_broker(procs, ipc_ep)
    (w,) = start_workers(procs, ipc_ep, 1, "testworkers:oddities")
    with Client([ipc_ep], timeout=10) as c:
        wait_workers(c, 1)
        pid = c.call("pid", None)
        for service in ("unprintable", "unprintable-inline", "aunprintable"):
            for _ in range(3):
                with pytest.raises(RemoteError) as err:
                    c.call(service, None)
                assert err.value.remote_type == "Unprintable" and "str()" in err.value.remote_message
            assert c.call("pid", None) == pid  # the same process, its one slot free
        assert w.poll() is None
