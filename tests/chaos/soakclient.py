"""A client process of the chaos soak, for faults a client thread cannot take (SIGKILL, SIGSTOP).

    python -m soakclient OUT FIRST ENDPOINT... [--server-key F --key F]

It keeps 100 submits of "work" in flight, numbered from FIRST, and beside them two that run 2.5 s
(so that a fault finds some of its requests open at a worker past the ttl), and appends one line
per request as it ends to OUT ("<number> <outcome>": ok, wrong, or the error's type), flushed at once, so what
ended before a SIGKILL is on record. On SIGTERM it sends no more, waits for what it has open
(bounded by the requests' deadline) and appends "done <issued>". A client SIGSTOPped past the ttl
is taken for gone by its broker, which stops its requests: when it resumes it is told so and sends
them again, so each still ends once, right (docs/semantics.md, point 21).
"""

from __future__ import annotations

import collections
import random
import signal
import sys
import threading
from typing import Any

from soakworker import answer

from zmqdist import Client
from zmqdist.errors import RequestError

TIMEOUT_S = 30.0  # as the soak's own clients
WINDOW = 100
LONG, LONG_MS = 2, 2500  # requests of this length in flight beside the window


def main() -> None:
    args = sys.argv[1:]
    keys: dict[str, str] = {}
    for opt, name in (("--server-key", "server_key"), ("--key", "key")):
        if opt in args:
            k = args.index(opt)
            keys[name] = args[k + 1]
            del args[k : k + 2]
    out_path, first, endpoints = args[0], int(args[1]), args[2:]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rng = random.Random(first)
    issued = 0
    with open(out_path, "a", buffering=1) as out, Client(endpoints, timeout=TIMEOUT_S, **keys) as c:

        def end(i: int, fut: Any) -> None:
            try:
                v = fut.result(TIMEOUT_S + 10)
                kind = "ok" if isinstance(v, dict) and v.get("i") == i and v.get("v") == answer(i) else "wrong"
            except RequestError as exc:  # a killed handler process (the soak's fault) says so: see soak.py
                kind = "handler-killed" if "the process running the handler of" in str(exc) else type(exc).__name__
            out.write(f"{i} {kind}\n")

        window: collections.deque[tuple[int, Any]] = collections.deque()
        long: collections.deque[tuple[int, Any]] = collections.deque()
        while not stop.is_set() or window or long:
            while long and (stop.is_set() or long[0][1].done()):
                end(*long.popleft())
            if not stop.is_set() and (len(window) < WINDOW or len(long) < LONG):
                i = first + issued
                issued += 1
                if len(long) < LONG:
                    long.append((i, c.submit("work", {"i": i, "ms": LONG_MS})))
                else:
                    window.append((i, c.submit("work", {"i": i, "ms": rng.choice((0, 0, 0, 1, 5))})))
                continue
            if window:
                end(*window.popleft())
        out.write(f"done {issued}\n")


if __name__ == "__main__":
    main()
