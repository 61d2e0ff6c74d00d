"""Three workers of different speeds for the parallel example.

Run one with:  zmqdist worker workers:fast --connect tcp://127.0.0.1:5555
"""

import time

from zmqdist import Worker


def make(name: str, seconds: float) -> Worker:
    w = Worker(["tcp://127.0.0.1:5555"], concurrency=2, name=name)

    @w.service("work")
    def work(x):
        time.sleep(seconds)  # stands in for real work
        return {"worker": name, "x": x}

    return w


fast = make("fast", 0.002)
medium = make("medium", 0.004)
slow = make("slow", 0.008)
