"""isolation="process": how a worker replaces a handler process, on real processes.

Two races of the replacement, each forced here by a log handler that runs, as the dead process's
task is reported ("... died ...: replaced", logged on the replacing thread), what another thread
could do at that moment."""

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


@pytest.fixture
def pool():
    box = Mailbox()
    procs = Processes(1, box, MonotonicClock(), None)
    handlers = []
    logger = logging.getLogger("zmqdist._handlers")

    def on_replaced(hook):
        handlers.append(_OnReplaced(hook))
        logger.addHandler(handlers[-1])

    yield procs, box, on_replaced
    for h in handlers:
        logger.removeHandler(h)
    procs.shutdown()
    box.close()


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
