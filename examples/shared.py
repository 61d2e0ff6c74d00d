"""What the example scripts share: a small PKI for their --secure variants, checking that they talk
to the broker they started (not another one already at that address), stopping processes."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from zmqdist import Client, RequestError
from zmqdist.transport.security import generate


def own_broker(proc: subprocess.Popen[bytes], endpoint: str, name: str, timeout: float = 20, **keys: Any) -> None:
    """Wait until the broker the example started answers at ``endpoint`` under its own ``name``;
    raise SystemExit saying why if it exited (an address in use, say) or another broker answers."""
    deadline = time.monotonic() + timeout
    seen = "nothing"
    with Client([endpoint], timeout=1, **keys) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the example's broker {name} exited at once (code {proc.returncode}): see above")
            try:
                seen = c.call("zmqdist.status")["broker"]
            except RequestError:
                continue
            if seen == name:
                return
            time.sleep(0.1)
    raise SystemExit(f"at {endpoint} answers broker {seen!r}, not this example's {name!r}: is another one running?")


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
