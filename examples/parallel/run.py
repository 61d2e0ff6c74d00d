"""One command for the whole example: a broker, three worker processes, the client.

python examples/parallel/run.py
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ep = os.environ.get("ENDPOINT", "tcp://127.0.0.1:5555")
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    zd = [sys.executable, "-m", "zmqdist", "-q"]
    procs = [subprocess.Popen([*zd, "broker", "--bind", ep], env=env)]
    procs += [
        subprocess.Popen([*zd, "worker", f"workers:{n}", "--connect", ep], env=env) for n in ("fast", "medium", "slow")
    ]
    try:
        time.sleep(1.0)  # let the workers register (the client would wait for them anyway)
        sys.path.insert(0, str(HERE))
        import client

        return client.main(ep)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(15)


if __name__ == "__main__":
    sys.exit(main())
