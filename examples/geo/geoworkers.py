"""The workers of examples/geo: each serves "work" (10 ms) and says where it was served."""

import time

from zmqdist import Worker


def _make(site: str) -> Worker:
    w = Worker(["tcp://127.0.0.1:7100"], concurrency=2)  # connect lists come from the topology

    @w.service("work")
    def work(x):
        time.sleep(0.01)
        return {"site": site, "x": x}

    return w


central = _make("central")
east = _make("east")
west = _make("west")
