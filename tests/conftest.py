import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# "ci" keeps the suite fast; HYPOTHESIS_PROFILE=thorough runs the property tests 1,000 times each.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# "pure": the pure-Python second run of the unit and simulation tests (tests/test_pure.py).
settings.register_profile("pure", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The suite runs on two pytest-xdist workers (setup.cfg). A test marked `alone` measures a ratio
# of latencies that a neighbouring test's load would skew: it runs while no other test runs. Each
# test holds a shared lock on a file both workers open, an `alone` test an exclusive one; a gate
# taken first keeps a waiting `alone` test from being overtaken by the other worker's next tests.
# The wait happens outside the test's timeout (this wrapper runs before pytest-timeout's).
class _RunLock:
    def __init__(self, base: Path) -> None:
        self.gate = open(f"{base}.gate", "a+")  # both open for the worker's life
        self.room = open(f"{base}.room", "a+")
        self.paths = (self.gate.name, self.room.name)

    @contextlib.contextmanager
    def hold(self, alone: bool):
        fcntl.flock(self.gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(self.gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self.room, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(self.gate, fcntl.LOCK_UN)


def _run_lock(config):
    if not hasattr(config, "workerinput"):
        return None  # one process: every test already runs alone
    lock = getattr(config, "_zmqdist_run_lock", None)
    if lock is None:
        uid = config.workerinput["testrunuid"]
        lock = config._zmqdist_run_lock = _RunLock(Path(tempfile.gettempdir()) / f"zmqdist-tests-{uid}")
    return lock


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    lock = _run_lock(item.config)
    if lock is None:
        yield
        return
    with lock.hold(alone=item.get_closest_marker("alone") is not None):
        yield


def pytest_unconfigure(config):
    lock = getattr(config, "_zmqdist_run_lock", None)
    if lock is not None:
        lock.gate.close()
        lock.room.close()
        for path in lock.paths:  # the other worker keeps its open files; no one opens them again
            with contextlib.suppress(OSError):
                os.unlink(path)
