"""The pure-Python fallback (no compiler at install, or ZMQDIST_PURE=1) stays correct.

The rest of the suite runs whatever the install built: the compiled modules where mypyc could build
them. This runs the unit and simulation tests once more on the pure-Python sources, the property
tests at 10 examples each (the compiled run above does 40): about 15 s here, where the 40 took 37 s
(2026-12-05), too close to its timeout on a slow day.
"""

import os
import subprocess
import sys
from pathlib import Path

from zmqdist import _native

ROOT = Path(__file__).resolve().parent.parent


def test_the_pure_python_modules_pass_the_unit_and_simulation_tests():
    env = {**os.environ, _native.PURE_ENV: "1"}
    env["HYPOTHESIS_PROFILE"] = "pure"  # this run must stay bounded
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit", "tests/sim"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1]
