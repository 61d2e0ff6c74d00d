"""A request's trace id travels through every tier: it is in the logs of each process on its path
(at debug level) and in the RemoteError its client gets."""

import json
import signal

import pytest

from tests.integration.helpers import status, wait_for
from zmqdist import Client, RemoteError

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_trace_id_in_every_log_on_the_path_and_in_remote_error(procs, tmp_path):
    master, proxy = f"ipc://{tmp_path}/m.sock", f"ipc://{tmp_path}/p.sock"
    json_debug = ("--log-format", "json", "-vv")
    m = procs.spawn(*json_debug, "broker", "--bind", master, "--name", "master", quiet=False)
    x = procs.spawn(*json_debug, "broker", "--bind", proxy, "--name", "proxy", "--upstream", master, quiet=False)
    w = procs.spawn(*json_debug, "worker", "testworkers:gil", "--connect", master, quiet=False)  # spin() at the master
    with Client([proxy], timeout=10) as c:
        wait_for(lambda: status(c)["upstream"]["registered"], 20, "proxy registered")
        with Client([master], timeout=5) as cm:
            wait_for(lambda: "spin" in status(cm)["services"], 20, "worker registered")
        assert c.call("spin", 0.01, trace="trace-ok-42") > 0
        with pytest.raises(RemoteError) as ei:
            c.call("spin", "not seconds", trace="trace-fail-43")  # the handler raises TypeError
    assert ei.value.trace == "trace-fail-43" and "trace-fail-43" in str(ei.value)
    for p in (m, x, w):
        p.send_signal(signal.SIGTERM)
    logs = {}
    for name, p in (("master", m), ("proxy", x), ("worker", w)):
        _, err = p.communicate(timeout=20)
        logs[name] = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    for name, records in logs.items():
        for trace in ("trace-ok-42", "trace-fail-43"):
            assert any(trace in r["message"] for r in records), f"{trace} not in the {name}'s log"
    # the worker's log says which request failed
    assert any("trace-fail-43" in r["message"] and "TypeError" in r["message"] for r in logs["worker"])
    # under --log-format json the trace (and the worker) are fields of their own, not only words
    for name in ("master", "worker"):
        assert any(r.get("trace") == "trace-fail-43" for r in logs[name]), f"no trace field in the {name}'s log"
    assert any(r.get("worker") for r in logs["worker"])
    failed = next(r for r in logs["worker"] if r.get("trace") == "trace-fail-43" and r["level"] == "WARNING")
    assert "Traceback" in failed.get("exception", "")  # the handler's exception, with its traceback
