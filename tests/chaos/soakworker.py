"""The soak's worker: ``zmqdist worker soakworker:worker`` (tests/chaos on PYTHONPATH).

Every execution is written (the request's number, one line, flushed before the work) to
``$SOAK_LOG_DIR/exec-PID.log``, so the soak counts how often each request ran, kills included.
"""

import os
import time

from zmqdist import Worker, current_request

worker = Worker(["tcp://127.0.0.1:1"], concurrency=8)  # the soak gives --connect
_log = None


def _executions():
    global _log
    if _log is None:
        path = os.path.join(os.environ.get("SOAK_LOG_DIR", "."), f"exec-{os.getpid()}.log")
        _log = open(path, "a", buffering=1)  # kept open for the process's life
    return _log


def answer(i: int) -> int:
    """The value a correct worker returns for request ``i`` (the soak checks it)."""
    return (i * 7919) % 1_000_003


@worker.service("work")
def work(x):
    i = x["i"]
    _executions().write(f"{i}\n")
    if x.get("ms"):
        time.sleep(x["ms"] / 1000)
    return {"i": i, "v": answer(i)}


@worker.service("parts")
def parts(x):
    """A stream of ``n`` parts, each naming its request and place (the soak checks their order)."""
    i = x["i"]
    _executions().write(f"{i}\n")
    for k in range(x["n"]):
        if x.get("ms"):
            time.sleep(x["ms"] / 1000)
        yield {"i": i, "k": k, "v": answer(i) + k}
    return {"i": i, "v": answer(i)}


@worker.service("mdpwork")
def mdpwork(x):
    """For Majordomo clients: the body (one frame, the request's number) arrives as bytes, and a
    bytes value goes back as one frame: the number and its answer."""
    i = int(x)
    _executions().write(f"{i}\n")
    return b"%d %d" % (i, answer(i))


@worker.service("flaky")
def flaky(x):
    """Fails (ValueError) on the first ``fail`` runs of a request (its run number is its attempt:
    every run counts, those cut by a fault too); the caller's retry policy runs it again."""
    i, run = x["i"], current_request().attempt
    if run <= x["fail"]:
        raise ValueError(f"run {run} of {i} fails on purpose")
    _executions().write(f"{i}\n")
    return {"i": i, "v": answer(i)}
