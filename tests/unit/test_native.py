"""The choice between the compiled (mypyc) and pure-Python hot modules (zmqdist/_native.py)."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import zmqdist
from zmqdist import _native

ROOT = Path(zmqdist.__file__).resolve().parent.parent


def _tree(tmp_path: Path) -> Path:
    """A copy of every compiled module's source under tmp_path, and a manifest that matches it."""
    for m in _native.MODULES:
        f = _native.source_path(tmp_path, m)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"# {m}\n")
    for c in _native.C_SOURCES:
        tmp_path.joinpath(c).write_text(f"/* {c} */\n")
    manifest = {"compiled": True, "reason": "", "sources": _native.source_hashes(tmp_path)}
    (tmp_path / "zmqdist" / _native.MANIFEST).write_text(json.dumps(manifest))
    return tmp_path


def test_a_matching_manifest_selects_the_compiled_modules(tmp_path, monkeypatch):
    monkeypatch.delenv(_native.PURE_ENV, raising=False)
    assert _native._compiled_is_current(_tree(tmp_path)) == (True, "")


def test_an_edited_source_selects_the_pure_sources_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(_native.PURE_ENV, raising=False)
    root = _tree(tmp_path)
    _native.source_path(root, "zmqdist.core.broker").write_text("# edited after the build\n")
    with caplog.at_level(logging.WARNING, logger="zmqdist"):
        ok, why = _native._compiled_is_current(root)
    assert (ok, why) == (False, "sources changed since the build")
    assert "core/broker.py changed since the modules were compiled" in caplog.text
    _tree(root)
    root.joinpath("zmqdist/transport/_wire.c").write_text("/* edited after the build */\n")
    assert _native._compiled_is_current(root) == (False, "sources changed since the build")
    assert "zmqdist/transport/_wire.c changed since the modules were compiled" in caplog.text


def test_no_manifest_a_failed_build_and_the_environment_select_pure(tmp_path, monkeypatch):
    monkeypatch.delenv(_native.PURE_ENV, raising=False)
    assert _native._compiled_is_current(tmp_path) == (False, "not compiled at install")
    root = _tree(tmp_path)
    manifest = root / "zmqdist" / _native.MANIFEST
    manifest.write_text(json.dumps({"compiled": False, "reason": "compiling failed at install: no gcc"}))
    assert _native._compiled_is_current(root) == (False, "compiling failed at install: no gcc")
    manifest.write_text("{not json")
    assert _native._compiled_is_current(root)[1].startswith("unreadable")
    _tree(root)
    monkeypatch.setenv(_native.PURE_ENV, "1")
    assert _native._compiled_is_current(root) == (False, "ZMQDIST_PURE is set")


def test_the_installed_package_runs_what_its_manifest_says():
    """Compiled where the install compiled (CI must not quietly test pure Python), never a mix."""
    flags = {m: _native.compiled(sys.modules[m]) for m in _native.MODULES if m in sys.modules}
    assert flags, "no hot module imported"
    if _native.STATE != "compiled":
        assert not any(flags.values()), flags
        pytest.skip(f"the hot modules run as {_native.STATE}")
    assert all(flags.values()), flags


def test_zmqdist_pure_runs_every_hot_module_from_its_source():
    code = textwrap.dedent(
        """
        import importlib, sys
        from zmqdist import _native, protocol as p
        from zmqdist.testing import Simulation
        for m in _native.MODULES:
            importlib.import_module(m)
            assert not _native.compiled(sys.modules[m]), m
        assert _native.STATE.startswith("pure Python"), _native.STATE
        sim = Simulation()
        sim.add_worker("w", concurrency=2)
        c = sim.add_client()
        sim.run_for(0.01)
        for i in range(20):
            c.submit("echo", i)
        sim.run_for(1)
        assert all(c.completed[r][0].status == p.ST_OK for r in range(1, 21)), c.completed
        print("ok", _native.STATE)
        """
    )
    env = {**os.environ, _native.PURE_ENV: "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok pure Python (ZMQDIST_PURE is set)")


def _plain_constants(source: str) -> list[str]:
    """Module-level constants (ALL_CAPS names, and ``log``) of ``source`` not annotated Final."""
    import ast
    import re

    const = re.compile(r"_?[A-Z][A-Z0-9_]+$")
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets = [t for n in node.targets for t in (n.elts if isinstance(n, ast.Tuple) else [n])]
            found += [t.id for t in targets if isinstance(t, ast.Name) and (const.match(t.id) or t.id == "log")]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, final = node.target.id, "Final" in ast.unparse(node.annotation)
            if (const.match(name) or name == "log") and not final:
                found.append(name)
    return found


def test_every_constant_of_a_compiled_module_is_final():
    """Compiled code inlines a Final literal and reads any other Final from a C static, but reads
    a plain global from the module's dict at every use (about 100 instructions, several times a
    request): the per-request modules keep their constants Final."""
    sample = "AA, BB = 1, 2\n_CC: int = 3\nlog = f()\nDD: Final = 4\nEE: Final[int] = 5\nx = 6\nM = T('M')\n"
    assert _plain_constants(sample) == ["AA", "BB", "_CC", "log"]
    plain = {m: _plain_constants(_native.source_path(ROOT, m).read_text()) for m in _native.MODULES}
    assert {m: names for m, names in plain.items() if names} == {}


@pytest.mark.parametrize(
    ("argv", "builds"),
    [
        # what pip runs, in order, for `pip install .` (read off `pip install -v` on 2026-12-07)
        (["_in_process.py", "egg_info"], False),
        (["_in_process.py", "dist_info", "--output-dir", "/tmp/m", "--keep-egg-info"], False),
        (["_in_process.py", "bdist_wheel", "--dist-info-dir", "/tmp/m/x.dist-info", "--dist-dir", "/tmp/d"], True),
        (["_in_process.py", "editable_wheel", "--dist-dir", "/tmp/d"], True),
        (["setup.py", "sdist"], False),
        (["setup.py", "sdist", "bdist_wheel"], True),  # an old habit: both in one run
        (["setup.py", "build_ext", "--inplace"], True),
        (["setup.py", "--version"], False),
        (["setup.py"], True),
        (["setup.py", "develop"], True),
    ],
)
def test_setup_compiles_only_for_the_commands_that_build(argv, builds):
    """pip asks for the metadata twice before it builds a wheel; mypyc's type-check and C
    generation ran at each (8-10 s apiece here) for nothing."""
    assert _native.builds_extensions(argv) is builds
