"""Workers of the tiers example: the same service in two regions, tagged with where they run."""

import os
import time

from zmqdist import Worker

REGION = os.environ.get("REGION", "?")
# Endpoints come from the command line (`zmqdist worker workers:worker --connect ...`).
worker = Worker(["tcp://127.0.0.1:5555"], concurrency=2)


@worker.service("work")
def work(x):
    time.sleep(0.02)  # a request takes 20 ms
    return [x, REGION, os.getpid()]
