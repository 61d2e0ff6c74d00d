"""Workers of the backup pair example (endpoints come from `zmqdist worker ... --connect`)."""

import os
import time

from zmqdist import Worker

worker = Worker(["tcp://127.0.0.1:5555"], concurrency=4)


@worker.service("work")
def work(x):
    time.sleep(0.002)
    return [x, os.getpid()]
