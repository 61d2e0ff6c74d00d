"""A backup pair in one command: primary 'main-a', backup 'main-b', three workers and a client.

    client, workers --> main-a (primary, active)  <== pair link ==>  main-b (backup, passive)

The client keeps 100 requests in flight. Halfway, the active broker is SIGKILLed: the backup takes
over with the copy of the request table it was sent, workers and the client follow it, and every
request is answered once. Then the killed primary is started again: it comes back passive.

python examples/ha/run.py            (add --secure for CURVE on every link, the pair link too)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/shared.py

from shared import make_pki, own_broker, stop_all  # noqa: E402

from zmqdist import Client, RequestError  # noqa: E402

N = 6000


def state(client: Client) -> str:
    """'NAME STATE (epoch N)' of the broker the client reaches (retried while it is starting)."""
    for _ in range(5):
        try:
            st = client.call("zmqdist.status", timeout=5)
            return f"{st['broker']} {st['ha']['state']} (epoch {st['ha']['epoch']})"
        except RequestError:
            continue
    return "no answer"


def main(secure: bool = False) -> int:
    tmp = tempfile.mkdtemp(prefix="zmqdist-ha-")
    ep = {n: f"ipc://{tmp}/{n}.sock" for n in ("main-a", "main-b")}
    ha = {n: f"ipc://{tmp}/{n}.ha" for n in ("main-a", "main-b")}
    zd = [sys.executable, "-m", "zmqdist", "-q"]
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    sec: list[str] = []
    worker_sec: list[str] = []
    client_sec: dict[str, str] = {}
    if secure:
        pki = make_pki(tmp)
        k = pki["dir"]
        sec = ["--key", f"{k}/broker.key_secret", "--allow-clients", f"{k}/clients"]
        sec += ["--allow-workers", f"{k}/workers", "--allow-brokers", f"{k}/brokers", "--peer-server-key", pki["pub"]]
        worker_sec = ["--server-key", pki["pub"], "--key", f"{k}/worker.key_secret"]
        client_sec = {"server_key": pki["pub"], "key": f"{k}/client.key_secret"}
        print("CURVE on every link, the pair link too; keys in", k)

    def broker(name: str, role: str, peer: str) -> subprocess.Popen[bytes]:
        cmd = [*zd, "broker", "--bind", ep[name], "--name", name, "--ha", role]
        return subprocess.Popen([*cmd, "--ha-bind", ha[name], "--peer", ha[peer], *sec])

    procs = {"main-a": broker("main-a", "primary", "main-b"), "main-b": broker("main-b", "backup", "main-a")}
    for i in range(3):
        cmd = [*zd, "worker", "workers:worker", "--connect", ep["main-a"], "--connect", ep["main-b"]]
        procs[f"w{i}"] = subprocess.Popen([*cmd, "--name", f"w{i}", *worker_sec], env=env)
    try:
        own_broker(procs["main-a"], ep["main-a"], "main-a", **client_sec)
        own_broker(procs["main-b"], ep["main-b"], "main-b", **client_sec)
        with Client([ep["main-a"], ep["main-b"]], timeout=30, **client_sec) as client:
            # The pair is formed when main-a is active with the 3 workers and main-b has heard it and
            # gone passive (a backup still starting up, 'pending', has nothing to take over yet).
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with Client([ep["main-a"]], timeout=5, **client_sec) as ca:
                    st = ca.call("zmqdist.status", timeout=5)
                with Client([ep["main-b"]], timeout=5, **client_sec) as cb:
                    st_b = cb.call("zmqdist.status", timeout=5)
                if st["ha"]["state"] == "active" and len(st["workers"]) == 3 and st_b["ha"]["state"] == "passive":
                    break
                time.sleep(0.1)
            else:
                print(
                    f"the pair did not form: main-a {st['ha']['state']} with {len(st['workers'])} workers, "
                    f"main-b {st_b['ha']['state']}"
                )
            with Client([ep["main-a"]], timeout=5, **client_sec) as ca, Client([ep["main-b"]], **client_sec) as cb:
                print("before:", state(ca), "|", state(cb))
            futs, done_at = [], {}
            killed = 0.0
            for i in range(N):
                f = client.submit("work", i)
                f.add_done_callback(lambda _f, i=i: done_at.setdefault(i, time.monotonic()))
                futs.append(f)
                if i == N // 2:
                    print("SIGKILL the active broker main-a")
                    killed = time.monotonic()
                    procs["main-a"].send_signal(signal.SIGKILL)
                if i >= 100:
                    futs[i - 100].result(30)
            results = [f.result(30) for f in futs]
            assert [r[0] for r in results] == list(range(N)), "a request was lost or answered wrongly"
            first = min(t for i, t in done_at.items() if i > N // 2) - killed
            print(f"{N} requests, every one answered once and in order")
            print(f"takeover: the first request sent after the kill was answered {first:.2f}s after it, by main-b")
            procs["main-a"].wait(10)
            procs["main-a"] = broker("main-a", "primary", "main-b")
            with Client([ep["main-a"]], timeout=5, **client_sec) as ca, Client([ep["main-b"]], **client_sec) as cb:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and "passive" not in state(ca):
                    time.sleep(0.1)
                print("after the restart:", state(ca), "|", state(cb))
        return 0
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)  # sockets, and the keys with --secure


if __name__ == "__main__":
    sys.exit(main(secure="--secure" in sys.argv[1:]))
