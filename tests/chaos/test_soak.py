"""The chaos soak, short: about a minute of a master pair, two regional proxy pairs, workers and
clients under random SIGKILLs and SIGSTOPs (tests/chaos/soak.py; the long run is documented in
docs/ha.md with its figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SOAK = Path(__file__).with_name("soak.py")


@pytest.mark.timeout(200)
def test_a_minute_of_faults_loses_nothing_answers_nothing_wrong_and_deposes_no_live_broker(tmp_path):
    report = tmp_path / "soak.json"
    # -X faulthandler: if the driver (the clients' process) dies in C, every thread's stack is shown
    cmd = [sys.executable, "-X", "faulthandler", str(SOAK), "--duration", "55", "--seed", "11", "--report", str(report)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=190)
    assert report.exists(), f"the soak ended {r.returncode} without a report:\n{r.stdout[-2000:]}{r.stderr[-12000:]}"
    rep = json.loads(report.read_text())
    print(f"\nsoak: {rep['requests']} requests, {rep['fault_count']} faults {rep['faults']}: {rep['outcomes']}")
    assert rep["fault_count"] >= 8  # one every 2-5 s for the 47 s before the settling
    assert rep["requests"] >= 10_000
    assert r.returncode == 0, rep["verdict"]
