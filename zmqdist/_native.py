"""Which implementation of the hot modules runs: compiled with mypyc, or the pure-Python sources.

An install compiles :data:`MODULES` with mypyc when it can (``setup.py``): the per-request path
costs about half as much CPU compiled (docs/performance.md). The build writes ``_native.json`` beside
this file: whether it compiled and the SHA-256 of every source it compiled.

At import (``zmqdist/__init__.py`` calls :func:`install` first), the compiled modules are used only
if every source still matches its hash and ``ZMQDIST_PURE`` is not set. Otherwise a finder loads the
``.py`` sources of all of them (never a mix: compiled modules call each other directly). A source
edited after ``pip install -e .`` therefore runs as edited, not as the stale compiled code, and
says so in a warning. This module imports only the standard library: ``setup.py`` reads it too.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The modules of the per-request path, compiled together (they call each other natively).
MODULES: tuple[str, ...] = (
    "zmqdist.protocol",
    "zmqdist.clock",
    "zmqdist.core.records",
    "zmqdist.core.batching",
    "zmqdist.core.hooks",
    "zmqdist.core.dispatch",
    "zmqdist.core.lifecycle",
    "zmqdist.core.replica",
    "zmqdist.core.tiers",
    "zmqdist.core.services",
    "zmqdist.core.door",
    "zmqdist.core.broker",
    "zmqdist.core.failover",
    "zmqdist.core.client",
    "zmqdist.core.worker",
    "zmqdist.core.link",
    "zmqdist.core.heaps",
    "zmqdist.core.ha",
    "zmqdist.core.mdp",
    "zmqdist.core.metrics",
    "zmqdist.core.rights",
    "zmqdist.transport.sockets",
    "zmqdist.transport.mailbox",
    "zmqdist.transport.loop",
    "zmqdist.broker",
    "zmqdist.client",
    "zmqdist.worker",
    "zmqdist._handlers",
)
# C sources built with them (their hashes are checked alike): zmqdist.transport._wire, zmqdist._heads
C_SOURCES: tuple[str, ...] = ("zmqdist/transport/_wire.c", "zmqdist/_heads.c")
MANIFEST = "_native.json"
PURE_ENV = "ZMQDIST_PURE"

log = logging.getLogger("zmqdist")

# "compiled", or "pure Python (<why>)": what benchmarks and status report.
STATE = "pure Python (not installed yet)"


# setup.py commands that only describe the project: pip runs two of them (egg_info, dist_info)
# before it builds a wheel, and each ran mypyc's type-check and C generation (8-10 s here) for
# nothing. Commands that build (build_ext, bdist_wheel, editable_wheel...) are not listed.
_DESCRIBE_ONLY: frozenset[str] = frozenset({"egg_info", "dist_info", "sdist", "--version", "--name"})
_BUILDS: frozenset[str] = frozenset(
    {"build", "build_ext", "bdist_wheel", "bdist_egg", "bdist", "editable_wheel", "develop", "install"}
)


def builds_extensions(argv: Sequence[str]) -> bool:
    """Whether ``setup.py`` run with ``argv`` builds the package's extensions (so must compile):
    not for the metadata and source-distribution commands alone."""
    args = list(argv[1:])
    if not args or args[0] not in _DESCRIBE_ONLY:
        return True
    return any(a in _BUILDS for a in args)


def source_path(root: Path, module: str) -> Path:
    """The source file of ``module`` under ``root`` (the directory holding the package)."""
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of the source of every module in :data:`MODULES` and of every :data:`C_SOURCES` file."""
    hashes = {m: hashlib.sha256(source_path(root, m).read_bytes()).hexdigest() for m in MODULES}
    for c in C_SOURCES:
        hashes[c] = hashlib.sha256(root.joinpath(*c.split("/")).read_bytes()).hexdigest()
    return hashes


def _compiled_is_current(root: Path) -> tuple[bool, str]:
    """Whether the compiled modules may be used, and if not why."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return False, f"{PURE_ENV} is set"
    try:
        manifest = json.loads((root / "zmqdist" / MANIFEST).read_text())
    except FileNotFoundError:
        return False, "not compiled at install"
    except (OSError, ValueError) as exc:
        return False, f"unreadable {MANIFEST}: {exc}"
    if not manifest.get("compiled"):
        return False, str(manifest.get("reason") or "not compiled at install")
    built = manifest.get("sources", {})
    try:
        changed = [m for m, h in source_hashes(root).items() if built.get(m) != h]
    except OSError as exc:
        return False, f"cannot read the sources: {exc}"
    if changed:
        names = ", ".join(m if m in C_SOURCES else str(source_path(Path(), m)) for m in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        log.warning(
            "zmqdist: %s%s changed since the modules were compiled: running the pure-Python sources "
            "(slower); run `pip install -e .` again to recompile",
            names,
            more,
        )
        return False, "sources changed since the build"
    return True, ""


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads the ``.py`` source of the modules in :data:`MODULES`, ahead of their compiled form."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(self._root, fullname))


def install() -> None:
    """Choose the implementation before any module of :data:`MODULES` is imported."""
    global STATE
    if any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        return
    root = Path(__file__).resolve().parent.parent
    ok, why = _compiled_is_current(root)
    if ok:
        STATE = "compiled"
        return
    STATE = f"pure Python ({why})"
    sys.meta_path.insert(0, _SourceFinder(root))


def compiled(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from a compiled extension."""
    return str(getattr(module, "__file__", "")).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def confirm(module: ModuleType) -> None:
    """After the imports: say pure if ``module`` (one of :data:`MODULES`) was not compiled after all."""
    global STATE
    if STATE == "compiled" and not compiled(module):
        STATE = "pure Python (compiled modules not found)"
