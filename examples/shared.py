"""What the example scripts share: a small PKI for their --secure variants, and stopping processes."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from zmqdist.transport.security import generate


def make_pki(tmp: str) -> dict[str, str]:
    """One key shared by the brokers (peers follow failover lists across them), one for the workers,
    one for the client; an allow-list directory per role, as docs/security.md describes. Returns the
    keys directory and the brokers' public certificate."""
    keys = Path(tmp) / "keys"
    for name in ("broker", "worker", "client"):
        generate(name, keys)
    for role, name in (("clients", "client"), ("workers", "worker"), ("brokers", "broker")):
        (keys / role).mkdir()
        (keys / role / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    return {"dir": str(keys), "pub": str(keys / "broker.key")}


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running, wait for each (SIGKILL after 15 s)."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
