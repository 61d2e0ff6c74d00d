"""Real processes for integration tests: spawn, wait with bounded polls, kill with SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A tcp port on 127.0.0.1 that nothing listens on now (for a process that binds it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition", interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns a truthy value; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Procs:
    """Spawns ``python -m zmqdist ...`` processes and always reaps them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str, quiet: bool = True, netns: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``zmqdist ARGS`` (inside network namespace ``netns`` if given)."""
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'integration'}")
        prefix = ["ip", "netns", "exec", netns] if netns else []
        cmd = [*prefix, sys.executable, "-m", "zmqdist", *(["-q"] if quiet else []), *args]
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


def status(client: Any) -> dict[str, Any]:
    return client.call("zmqdist.status", timeout=5)  # type: ignore[no-any-return]


def scrape(port: int) -> str:
    """The text a broker's Prometheus endpoint serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def value(text: str, name: str, **labels: str) -> float:
    """The value of metric ``name`` with ``labels`` in a scrape (asserts that it is there)."""
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(lab) + r"\}" if lab else "") + r" ([0-9.e+-]+)$"
    m = re.search(pat, text, re.M)
    assert m, f"{name} {labels} not in the scrape"
    return float(m.group(1))
