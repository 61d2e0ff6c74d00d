"""transport/fds.py: the soft limit of open files raised to the hard one, and descriptors counted
(in child processes: a limit changed here would change it for the whole test run)."""

import json
import os
import resource
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")


def child(code: str, soft: int, hard: int) -> object:
    """Run ``code`` in a Python whose limit of open files is (soft, hard); return what it printed (JSON)."""

    head = f"import json, resource\nresource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
    out = subprocess.run(
        [sys.executable, "-c", f"{head}from zmqdist.transport import fds\n{code}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return json.loads(out)


def hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)


def test_the_soft_limit_is_raised_to_the_hard_one():
    hard = hard_limit()
    if hard <= 128:
        pytest.skip(f"the hard limit of open files here is {hard}")
    got = child("print(json.dumps([fds.raise_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)]))", 128, hard)
    assert got == [[128, hard], [hard, hard]]


def test_a_soft_limit_at_the_hard_one_stays():
    got = child("print(json.dumps([fds.raise_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)]))", 100, 100)
    assert got == [[100, 100], [100, 100]]


def test_usage_counts_the_open_descriptors_against_the_soft_limit():
    """In a child of its own: no other thread of it opens or closes a descriptor meanwhile (in the
    test run, a lingering socket's reconnect could)."""
    code = (
        "import os\n"
        "before = fds.usage()\n"
        "r, w = os.pipe()\n"
        "print(json.dumps([before, fds.usage(), len(os.listdir('/proc/self/fd')) - 1]))"
    )
    before, after, listed = child(code, 200, 300)
    assert before[1] == after[1] == 200  # the soft limit
    assert after[0] == before[0] + 2 == listed  # the two ends of the pipe, and nothing else counted


def test_a_process_at_its_limit_is_counted_at_it():
    """At the limit the listing of /proc/self/fd cannot be opened: usage says (limit, limit)."""
    code = (
        "held = []\n"
        "try:\n"
        "    while True: held.append(open('/dev/null'))\n"
        "except OSError: pass\n"
        "full = fds.usage()\n"
        "held.pop().close(); held.pop().close()\n"
        "print(json.dumps([full, fds.usage()]))"
    )
    full, freed = child(code, 48, 48)
    assert full == [48, 48]
    assert freed == [46, 48]  # two closed: one for the listing, one still free
