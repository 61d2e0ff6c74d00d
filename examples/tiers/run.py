"""Proxy tiers in one command: a master, proxies 'east' and 'west', workers and a client.

    master <- east (1 worker, 2 slots)  <- the client (failover list: east, then west)
           <- west (2 workers, 4 slots)

The client keeps 40 requests in flight against east. East serves what its own worker can take and
funnels the rest through the master into west. Halfway, east is SIGKILLed: the client fails over to
west and nothing is lost. Prints where the requests were served.

python examples/tiers/run.py            (add --secure for the same with CURVE on every link: keys
                                        and allow-lists are generated in a temporary directory)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/shared.py

from shared import make_pki, own_broker, stop_all  # noqa: E402

from zmqdist import Client  # noqa: E402

N = 1200


def main(secure: bool = False) -> int:
    tmp = tempfile.mkdtemp(prefix="zmqdist-tiers-")
    ep = {n: f"ipc://{tmp}/{n}.sock" for n in ("master", "east", "west")}
    zd = [sys.executable, "-m", "zmqdist", "-q"]
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    broker_sec: list[str] = []
    up_sec: list[str] = []
    worker_sec: list[str] = []
    client_sec: dict[str, str] = {}
    if secure:
        pki = make_pki(tmp)
        k = pki["dir"]
        broker_sec = ["--key", f"{k}/broker.key_secret", "--allow-clients", f"{k}/clients"]
        broker_sec += ["--allow-workers", f"{k}/workers", "--allow-brokers", f"{k}/brokers"]
        up_sec = ["--upstream-server-key", pki["pub"]]
        worker_sec = ["--server-key", pki["pub"], "--key", f"{k}/worker.key_secret"]
        client_sec = {"server_key": pki["pub"], "key": f"{k}/client.key_secret"}
        print("CURVE on every link; keys in", k)
    procs = {"master": subprocess.Popen([*zd, "broker", "--bind", ep["master"], "--name", "master", *broker_sec])}
    for region in ("east", "west"):
        procs[region] = subprocess.Popen(
            [*zd, "broker", "--bind", ep[region], "--name", region, "--upstream", ep["master"], *up_sec, *broker_sec]
        )
    workers = [("east", ep["east"], ep["west"]), ("west", ep["west"], ep["east"]), ("west", ep["west"], ep["east"])]
    for i, (region, first, second) in enumerate(workers):
        cmd = [*zd, "worker", "workers:worker", "--connect", first, "--connect", second, "--name", f"{region}-{i}"]
        procs[f"w{i}"] = subprocess.Popen([*cmd, *worker_sec], env=dict(env, REGION=region))
    try:
        for name in ("master", "east", "west"):
            own_broker(procs[name], ep[name], name, **client_sec)
        with Client([ep["east"], ep["west"]], timeout=30, **client_sec) as client:
            deadline = time.monotonic() + 20
            while len(client.call("zmqdist.status")["workers"]) < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # let the proxies register and advertise (the load would wait anyway)
            futs = []
            for i in range(N):
                futs.append(client.submit("work", i))
                if i == N // 2:
                    print("SIGKILL proxy east (the client fails over to west)")
                    procs["east"].send_signal(signal.SIGKILL)
                if i >= 40:
                    futs[i - 40].result(30)
            results = [f.result(30) for f in futs]
        assert [r[0] for r in results] == list(range(N)), "a request was lost or answered wrongly"
        first, second = Counter(r[1] for r in results[: N // 2]), Counter(r[1] for r in results[N // 2 :])
        print(f"{N} requests, every one answered once and in order")
        # east's worker moves to west after the kill and keeps its label
        print(f"  first half  (client at east): by east's worker {first['east']:4d}, west's {first['west']:4d}")
        print(f"  second half (after the kill): by east's worker {second['east']:4d}, west's {second['west']:4d}")
        return 0
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)  # sockets, and the keys with --secure


if __name__ == "__main__":
    sys.exit(main(secure="--secure" in sys.argv[1:]))
