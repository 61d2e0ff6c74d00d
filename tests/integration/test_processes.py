"""isolation="process": how a worker replaces a handler process, on real processes.

Two races of the replacement, each forced here by a log handler that runs, as the dead process's
task is reported ("... died ...: replaced", logged on the replacing thread), what another thread
could do at that moment."""

import contextlib
import logging
import os
import signal
import threading
import time

import pytest

from tests.integration.helpers import wait_for
from zmqdist import protocol as p
from zmqdist._handlers import Processes, Service
from zmqdist.clock import MonotonicClock
from zmqdist.core.worker import Execute
from zmqdist.transport import Mailbox

pytestmark = pytest.mark.integration


class _OnReplaced(logging.Handler):
    """Runs ``hook`` once, on the thread that logs a handler process's death."""

    def __init__(self, hook):
        super().__init__(logging.WARNING)
        self.hook = hook

    def emit(self, record):
        if str(record.msg).startswith("the process running the handler") and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()


@contextlib.contextmanager
def _pool(n):
    """``n`` handler processes, their mailbox, and a way to run code on the keeper thread as it
    replaces one (see _OnReplaced)."""
    box = Mailbox()
    procs = Processes(n, box, MonotonicClock(), None)
    handlers = []
    logger = logging.getLogger("zmqdist._handlers")

    def on_replaced(hook):
        handlers.append(_OnReplaced(hook))
        logger.addHandler(handlers[-1])

    try:
        yield procs, box, on_replaced
    finally:
        for h in handlers:
            logger.removeHandler(h)
        procs.shutdown()
        box.close()


@pytest.fixture
def pool():
    with _pool(1) as it:
        yield it


@pytest.fixture
def pool2():
    with _pool(2) as it:
        yield it


def _kill_with_a_task(procs):
    """Give slot 0 a task and kill its process (a handler process that died)."""
    slot = procs._slots[0]
    slot.task = Execute(1, 1, "stuck", b"", "", 1, time.monotonic() + 60)
    os.kill(slot.proc.pid, signal.SIGKILL)
    return slot


@pytest.mark.timeout(60)
def test_a_task_given_to_the_new_process_as_it_starts_stays_its_task(pool):
    # The socket thread's submit can come right after the new slot is in the list, while the dead
    # process's task is being reported: the slot it took was cleared after that, its task lost to
    # the pool (a cancel of it then found no process to tell, and the handler ran on).
    procs, box, on_replaced = pool
    given = Execute(2, 1, "sleep", p.pack_value(3.0, None), "", 1, time.monotonic() + 60)
    submitted = threading.Event()

    def submit():
        procs.submit(Service(time.sleep), given)
        submitted.set()

    on_replaced(submit)
    old = _kill_with_a_task(procs)
    wait_for(submitted.is_set, 30, "the dead process's task reported")
    time.sleep(0.2)  # the replacement is done; the given task sleeps 3 s in a process still starting
    assert procs._slots[0] is not old
    assert procs._find(2, 1) is procs._slots[0]  # a cancel of it finds its process
    assert [item[:2] for item in box.drain()] == [("done", 1)]  # the dead one's, failed
    assert procs.replaced == 1


@pytest.mark.timeout(60)
def test_a_new_process_outlives_the_thread_that_saw_the_old_one_die(pool):
    # A process's parent-death signal follows the thread that started it. Started by the reader
    # thread of the dead process, which ends soon after, a replacement was SIGKILLed then (when the
    # thread outlived the start of the new process: here it waits for it).
    procs, _, on_replaced = pool
    ready = threading.Event()

    def linger():
        wait_for(procs._slots[0].ready.is_set, 30, "the new process ready")  # (the new slot is in by now)
        ready.set()

    on_replaced(linger)
    old = _kill_with_a_task(procs)
    wait_for(ready.is_set, 40, "the replacement ready")
    fresh = procs._slots[0]
    assert fresh is not old
    time.sleep(1.0)  # the thread that replaced it has gone on (or ended) by now
    assert fresh.proc.is_alive() and procs._slots[0] is fresh, fresh.proc.exitcode
    assert procs.replaced == 1


def _outcomes(box, tickets, timeout):
    """The ``("done", ticket, ...)`` items the pool posts for ``tickets``, each once."""
    got = {}
    end = time.monotonic() + timeout
    while set(got) != set(tickets) and time.monotonic() < end:
        for item in box.drain():
            if item[0] == "done":
                assert item[1] not in got, f"a second outcome for task {item[1]}: {item}, after {got[item[1]]}"
                got[item[1]] = item
        time.sleep(0.02)
    return got


def _task(ticket, service, value):
    return Execute(ticket, 1, service, p.pack_value(value, None), "", 1, time.monotonic() + 60)


@pytest.mark.timeout(90)
def test_a_task_given_to_a_process_that_died_idle_runs_on_its_replacement(pool2):
    # A handler process that died idle (the OOM killer) stays in the list, free, until the keeper
    # replaces it: a task the socket thread gave it then never ran, and failed as "died".
    procs, box, on_replaced = pool2
    idle = procs._slots[1]
    gave = threading.Event()

    def meanwhile():  # on the keeper thread, replacing slot 0: slot 1's replacement waits for it
        os.kill(idle.proc.pid, signal.SIGKILL)
        wait_for(lambda: not idle.reader.is_alive(), 20, "slot 1's reader to see its process die")
        procs.submit(Service(time.sleep), _task(3, "sleep", 1.0))  # to the new process of slot 0
        procs.submit(Service(abs), _task(2, "abs", -7))  # to slot 1: free, and dead
        gave.set()

    on_replaced(meanwhile)
    _kill_with_a_task(procs)
    wait_for(gave.is_set, 30, "the tasks given")
    got = _outcomes(box, {1, 2, 3}, 60)
    assert got[1][3] is False  # the task of the process that died with it: failed, saying so
    assert got[2][3] is True and p.unpack_value(got[2][4]) == 7, got[2]  # run, by slot 1's new process
    assert got[3][3] is True
    assert procs.replaced == 2 and all(s.proc.is_alive() for s in procs._slots)
    time.sleep(0.5)
    assert [item for item in box.drain() if item[0] == "done"] == []  # nothing twice


@pytest.mark.timeout(90)
def test_a_cancel_that_kills_a_process_as_its_task_ends_never_kills_the_next_task(pool2):
    # terminate_on_cancel, a cancel just as its task ends: the slot's reader has posted the task's
    # outcome, the cancel kills the process, and then the reader gave the slot the next waiting
    # task. That task died for a cancel not its own, reported as cancelled ("done", not ok, no
    # payload: to its caller a failure that said nothing). Now the new process runs it.
    procs, box, on_replaced = pool2
    slot = procs._slots[1]
    done = threading.Event()
    killing = {"sleep": Service(time.sleep, terminate_on_cancel=True)}

    def meanwhile():  # on the keeper thread: slot 1's replacement waits for it
        slot.task = _task(4, "sleep", 30.0)  # as if running (its process is idle)
        procs._waiting.append((Service(abs), _task(5, "abs", -5)))  # more tasks than processes
        box.post(("done", 4, 1, True, p.pack_value(None, None), None))  # its reader: task 4 ended...
        procs.abort(4, 1, killing)  # ... the cancel of task 4 kills slot 1's process ...
        procs._next(slot)  # ... and the reader goes on to the next task
        done.set()

    on_replaced(meanwhile)
    _kill_with_a_task(procs)
    wait_for(done.is_set, 30, "the cancel made")
    got = _outcomes(box, {1, 4, 5}, 60)
    assert got[5][3] is True and p.unpack_value(got[5][4]) == 5, got[5]  # run, not killed
    assert got[4][3] is True  # task 4's own outcome, once
    assert procs.replaced == 2 and all(s.proc.is_alive() for s in procs._slots)
    time.sleep(0.5)
    assert [item for item in box.drain() if item[0] == "done"] == []


@pytest.mark.timeout(90)
def test_a_handler_process_that_cannot_be_replaced_yet_is_replaced_once_it_can(tmp_path):
    """Out of file descriptors (or processes, or memory), a dead handler process's replacement
    fails. The thread that replaces them died of it: the worker ran with a dead slot for good, and
    the tasks given to it waited for ever. Now no task goes to the dead slot, the failure is logged,
    and the replacement is tried again until it starts."""
    import resource
    import subprocess
    import sys

    from tests.integration.helpers import ROOT
    from zmqdist import Broker, Client

    broker = Broker(bind=["tcp://127.0.0.1:*"]).start()
    log = tmp_path / "worker.log"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'integration'}")
    cmd = [sys.executable, "-m", "zmqdist", "worker", "testworkers:echo", "--connect", broker.endpoints[0]]
    cmd += ["--isolation", "process", "--concurrency", "2"]
    with open(log, "wb") as err:
        worker = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        with Client(broker.endpoints, timeout=30) as c:
            victim = c.call("echo", 0)[1]  # (waits for the worker) the first process, which lone calls get
            both = {f.result() for f in [c.submit("slow", 0.5), c.submit("slow", 0.5)]}
            assert victim in both and len(both) == 2, both
            (other,) = both - {victim}
            limit = resource.prlimit(worker.pid, resource.RLIMIT_NOFILE)
            held = len(os.listdir(f"/proc/{worker.pid}/fd"))
            resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (held, limit[1]))  # no descriptor to spare
            try:
                os.kill(victim, signal.SIGKILL)
                wait_for(lambda: "could not be replaced" in log.read_text(), 20, "the failed replacement")
                # meanwhile the live process serves every call: none waits on the dead slot
                assert [c.call("echo", i, timeout=10) for i in range(10)] == [[i, other] for i in range(10)]
            finally:
                resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, limit)
            wait_for(lambda: c.call("echo", 0)[1] not in (victim, other), 30, "the replacement", interval=0.2)
        assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait(10)
        broker.stop()


def _processes_made_by(monkeypatch, make):
    """Make the handler processes' spawn context call ``make(new, made)`` for each Process, where
    ``new()`` makes the real one and ``made`` lists those made so far; return that list."""
    import multiprocessing

    real = multiprocessing.get_context
    made = []

    class Context:
        def __init__(self, ctx):
            self.ctx = ctx

        def Pipe(self):
            return self.ctx.Pipe()

        def Process(self, **kw):
            made.append(make(lambda: self.ctx.Process(**kw), made))
            return made[-1]

    monkeypatch.setattr(multiprocessing, "get_context", lambda kind: Context(real(kind)))
    return made


@pytest.mark.timeout(60)
def test_handler_processes_that_cannot_all_start_end_those_that_did_and_say_why(monkeypatch):
    """Out of processes or memory at start (a container's pids limit, ulimit -u): the error was
    the raw OSError, and the processes started before it, with their reader threads and the
    keeper, were left running."""
    import errno

    from zmqdist.errors import ZmqdistError

    def scarce(new, made):
        if len(made) == 2:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return new()

    made = _processes_made_by(monkeypatch, scarce)
    threads = {t.ident for t in threading.enumerate()}
    with pytest.raises(ZmqdistError, match=r"cannot start the handler processes \(.*\): 2 of 3 started"):
        Processes(3, Mailbox(), MonotonicClock(), None)
    assert len(made) == 2
    wait_for(lambda: not any(p.is_alive() for p in made), 10, "the started processes ended")
    wait_for(lambda: {t.ident for t in threading.enumerate()} <= threads, 10, "their threads and the keeper ended")


@pytest.mark.timeout(90)
def test_a_handler_process_killed_as_the_worker_starts_is_replaced_not_the_end_of_the_worker(monkeypatch):
    """A handler process SIGKILLed before it was ready (the OOM killer, an operator; the chaos soak
    did it, seed 175) made the whole worker exit, blaming a script without a main guard, and
    nothing restarted it. A process killed by a signal is replaced and waited for; one that exits
    by itself still fails the start (test_failures.py, the unguarded script)."""

    class Killed:
        """The first process: SIGKILLed as soon as it is started, long before it can be ready."""

        def __init__(self, proc):
            self._proc = proc

        def start(self):
            self._proc.start()
            os.kill(self._proc.pid, signal.SIGKILL)

        def __getattr__(self, name):
            return getattr(self._proc, name)

    made = _processes_made_by(monkeypatch, lambda new, made: new() if made else Killed(new()))
    box = Mailbox()
    procs = Processes(2, box, MonotonicClock(), None)
    try:
        assert len(made) == 3 and made[0].exitcode == -signal.SIGKILL
        assert procs.replaced == 1 and all(s.ready.is_set() for s in procs._slots)
        assert made[0] not in [s.proc for s in procs._slots]
        procs.submit(Service(abs), _task(7, "abs", -3))
        got = _outcomes(box, {7}, 30)
        assert got[7][3] is True and p.unpack_value(got[7][4]) == 3, got
    finally:
        procs.shutdown()
        box.close()
