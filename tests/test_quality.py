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


USER_CODE = """
from zmqdist import Client, ClientOptions, Worker
opts: ClientOptions = {"timeout": 2.0, "name": "n"}
c = Client("tcp://127.0.0.1:5555", **opts)
c.call("echo", 1, timeout=1.0, trace="t")
list(c.map("echo", [1, 2], window=10))
w = Worker(["tcp://127.0.0.1:5555"], concurrency=2)
w.add_service("s", abs, inline=True)
bad: ClientOptions = {"timeout": "2"}  # line 9
c.call("echo", 1, timout=1.0)  # line 10
Worker("tcp://127.0.0.1:5555", concurrency="3")  # line 11
w.add_service("t", abs, inline="no")  # line 12
"""


def test_a_users_type_checker_sees_each_public_options_name_and_type(tmp_path):
    """The public options are ``**options`` typed by TypedDicts (each checked at run time too,
    tests/unit/test_public_arguments.py): a user's mypy still refuses a wrong type or name, and
    takes the right ones."""
    (tmp_path / "user.py").write_text(USER_CODE)
    r = run(sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(tmp_path / "user.py"))
    errors = sorted(line.split(":")[1] for line in r.stdout.splitlines() if ": error:" in line)
    assert errors == ["10", "11", "12", "9"], r.stdout + r.stderr
    assert 'did you mean "timeout"' in r.stdout


def test_ruff_lint_and_format():
    r = run(sys.executable, "-m", "ruff", "check", "zmqdist", "tests", "examples", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(sys.executable, "-m", "ruff", "format", "--check", "zmqdist", "tests", "examples", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_lowest_versions_recipe_pins_every_runtime_bound_and_the_build_asks_the_same():
    """.ci/lowest runs the suite on the lowest versions setup.cfg accepts: a bound raised (or a
    dependency added) without its pin there would go untested, and the build requirements in
    pyproject.toml repeat install_requires (mypyc follows the runtime imports at build)."""
    import configparser
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    runtime = [Requirement(x) for x in cfg["options"]["install_requires"].split("\n") if x.strip()]
    pins = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    raised = {"click": Version("8.2.0")}  # the test tools (import-linter) need 8.2; see .ci/lowest.txt
    for req in runtime:
        (bound,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
        name = canonicalize_name(req.name)
        assert pins.get(name) == raised.get(name, bound), f"{req}: .ci/lowest.txt pins {pins.get(name)}"
    assert set(pins) == {canonicalize_name(r.name) for r in runtime}
    build = {
        canonicalize_name(Requirement(x).name): str(Requirement(x).specifier)
        for x in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    }
    for req in runtime:
        assert build.get(canonicalize_name(req.name)) == str(req.specifier), (
            f"pyproject.toml's build asks {req.name} differently"
        )


def test_the_source_distribution_carries_every_directory_of_the_project():
    """An sdist (what `pip install` builds from where no wheel fits) is the whole project, so that
    it can be tested as shipped: MANIFEST.in grafts every tracked directory but the package
    (which setup.cfg's packages carry). Without MANIFEST.in setuptools took 2 of 76 test modules."""
    r = run("git", "ls-files")
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    tops = {f.split("/")[0] for f in r.stdout.splitlines() if "/" in f}
    grafted = {line.split()[1] for line in (ROOT / "MANIFEST.in").read_text().splitlines() if line.startswith("graft ")}
    assert tops - {"zmqdist"} == grafted, "MANIFEST.in's grafts and the project's directories differ"
