"""A Majordomo worker written with majortomo (not zmqdist): replies with its body upper-cased and
its pid, after ``delay`` seconds. Run: python mdpworker.py URL SERVICE DELAY HEARTBEAT"""

import os
import sys
import time

from majortomo import Worker


def main(url: str, service: str, delay: float, heartbeat: float) -> None:
    worker = Worker(url, service.encode(), heartbeat_interval=heartbeat, heartbeat_timeout=heartbeat * 10)
    with worker:
        while True:
            client, frames = worker.wait_for_request()
            time.sleep(delay)
            worker.send_reply_final(client, [f.upper() for f in frames] + [str(os.getpid()).encode()])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
