"""One command for the whole example: a broker, three worker processes, the client.

python examples/parallel/run.py          (ENDPOINT=tcp://127.0.0.1:5555 to use a TCP port instead
                                         of a socket in a temporary directory)
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # client.py, workers.py; examples/shared.py

from shared import own_broker  # noqa: E402


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="zmqdist-parallel-")
    ep = os.environ.get("ENDPOINT") or f"ipc://{tmp}/broker.sock"
    name = f"parallel-example-{os.getpid()}"
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    zd = [sys.executable, "-m", "zmqdist", "-q"]
    procs = [subprocess.Popen([*zd, "broker", "--bind", ep, "--name", name], env=env)]
    procs += [
        subprocess.Popen([*zd, "worker", f"workers:{n}", "--connect", ep], env=env) for n in ("fast", "medium", "slow")
    ]
    try:
        own_broker(procs[0], ep, name)  # not another broker that happens to be at that address
        import client

        return client.main(ep)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
