"""Runs the atheris harness briefly where atheris is installed (pip install -e '.[fuzz]')."""

import subprocess
import sys
from pathlib import Path

import pytest

atheris = pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[fuzz]')")


@pytest.mark.timeout(120)
def test_coverage_guided_fuzzing_finds_no_crash():
    harness = Path(__file__).with_name("fuzz_broker.py")
    r = subprocess.run(
        [sys.executable, str(harness), "-runs=20000", "-seed=1"], capture_output=True, text=True, timeout=110
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DONE" in r.stderr
