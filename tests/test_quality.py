"""Project rules checked in CI: lint, format, strict typing, and the sans-IO import contract."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contract_core_and_protocol_do_no_io():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports (import-linter) is not installed: pip install -e '.[test]'")
    r = run(exe, "--config", "setup.cfg")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_on_the_package():
    r = run(sys.executable, "-m", "mypy")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_lint_and_format():
    r = run(sys.executable, "-m", "ruff", "check", "zmqdist", "tests", "examples", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(sys.executable, "-m", "ruff", "format", "--check", "zmqdist", "tests", "examples", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr
