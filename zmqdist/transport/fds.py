"""A process's file descriptors: its soft limit raised to its hard one, and how many are open.

Every connection a broker accepts is a descriptor. At the soft limit (``ulimit -n``, often 1,024),
libzmq cannot accept more: peers beyond it never connect (they see no broker at all), and libzmq's
I/O thread tries the accept again at once, at a core's worth of CPU, until a descriptor frees
(libzmq 4.3.5 has no backoff there). ``zmqdist broker`` raises its soft limit to the hard one at
start, as servers that need many connections do (systemd asks them to; Go does it for every
program); zmqdist polls with poll(2), never select(2), so descriptors past 1,023 are safe. A
``Broker`` embedded in another program leaves the limit alone: that program may use select(2).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Final

if sys.platform != "win32":
    import resource

log: Final = logging.getLogger(__name__)
FD_DIR: Final = "/proc/self/fd"  # Linux: one entry per open descriptor
NR_OPEN: Final = "/proc/sys/fs/nr_open"  # Linux: no limit may pass it (setrlimit says EPERM)
FALLBACK_MAX: Final = 1 << 20  # nr_open's default, where the file cannot be read


def _ceiling(hard: int) -> int:
    """The highest soft limit allowed: the hard one, or (hard unlimited) the kernel's nr_open."""
    if sys.platform == "win32" or hard != resource.RLIM_INFINITY:
        return hard
    try:
        with open(NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return FALLBACK_MAX


def raise_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit. Returns the soft limit
    before and after (equal when it was already there, or could not be raised)."""
    if sys.platform == "win32":
        return 0, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _ceiling(hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            # (INFO: where the system forbids it, as macOS past its OPEN_MAX, nothing is wrong yet)
            log.info("cannot raise the limit of open files from %d to %d: %s", soft, want, exc)
            return soft, soft
        log.info("raised the limit of open files from %d to %d, the hard limit (each connection is one)", soft, want)
        return soft, want
    return soft, soft


def usage() -> tuple[int, int] | None:
    """(descriptors open, the soft limit; -1: none) of this process, or None where they cannot be
    read. A process at its limit cannot open the directory that lists them: (limit, limit) then.
    Counting costs about 0.4 us a descriptor (2 ms for 5,000 here)."""
    if sys.platform == "win32":
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = -1 if soft == resource.RLIM_INFINITY else soft
    try:
        n = len(os.listdir(FD_DIR)) - 1  # (the listing's own descriptor)
    except OSError as exc:
        return (limit, limit) if exc.errno == errno.EMFILE and limit > 0 else None
    return n, limit
