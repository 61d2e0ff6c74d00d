"""Build: compile the per-request path with mypyc where possible, else install pure Python.

Metadata is in setup.cfg; this file only adds the compiled modules (listed in zmqdist/_native.py)
and writes zmqdist/_native.json, which tells the package at import whether to use them. Set
ZMQDIST_PURE=1 to install without compiling; set ZMQDIST_REQUIRE_COMPILED=1 to fail the install
rather than fall back to pure Python when compiling fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_zmqdist_native", HERE / "zmqdist" / "_native.py")
assert _spec is not None and _spec.loader is not None
native: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native)


def compile_required() -> bool:
    """ZMQDIST_REQUIRE_COMPILED: fail the install rather than fall back to pure Python."""
    return os.environ.get("ZMQDIST_REQUIRE_COMPILED", "") not in ("", "0")


def write_manifest(package_dir: Path, compiled: bool, reason: str = "") -> None:
    reason = reason if len(reason) <= 300 else reason[:297] + "..."  # a compiler's whole command line
    data = {"compiled": compiled, "reason": reason, "sources": native.source_hashes(HERE) if compiled else {}}
    package_dir.mkdir(parents=True, exist_ok=True)
    (package_dir / native.MANIFEST).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def compile_jobs() -> int:
    """How many C files to compile at once: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class BuildExt(build_ext):  # type: ignore[misc]
    """Compiles, records the outcome beside the package; falls back to pure Python on failure."""

    def build_extensions(self) -> None:
        # mypyc writes one C file per module (multi_file below); distutils compiles an extension's
        # files one after another, so the install would use one core. Compile them side by side.
        jobs = compile_jobs()
        compile_one = self.compiler.compile
        if jobs > 1:

            def compile_all(sources: list[str], output_dir: str | None = None, **kw: Any) -> list[str]:
                if len(sources) < 2:
                    return list(compile_one(sources, output_dir, **kw))
                for obj in self.compiler.object_filenames(sources, output_dir=output_dir):
                    os.makedirs(os.path.dirname(obj) or ".", exist_ok=True)
                with ThreadPoolExecutor(jobs) as pool:  # gcc runs in its own process: threads suffice
                    done = pool.map(lambda src: compile_one([src], output_dir, **kw), sources)
                    return [obj for objs in done for obj in objs]

            self.compiler.compile = compile_all
        super().build_extensions()

    def run(self) -> None:
        targets = [HERE / "zmqdist"]
        if not self.inplace:
            targets.append(Path(self.build_lib) / "zmqdist")
        try:
            super().run()
        except Exception as exc:  # a missing compiler or headers: the package still works, slower
            if compile_required():
                raise
            self.warn(f"zmqdist: compiling with mypyc failed ({exc}): installing the pure-Python modules")
            for t in targets:
                write_manifest(t, False, f"compiling failed at install: {exc}")
            return
        for t in targets:
            write_manifest(t, bool(self.extensions))


ext_modules: list[Any] = []
if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
    write_manifest(HERE / "zmqdist", False, f"installed with {native.PURE_ENV} set")
elif native.builds_extensions(sys.argv):  # (not for metadata or an sdist alone: pip asks for both first)
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        write_manifest(HERE / "zmqdist", False, f"mypyc is not available at install: {exc}")
    else:
        paths = [str(native.source_path(Path(), m)) for m in native.MODULES]
        try:
            ext_modules = mypycify(paths, opt_level="3", group_name="zmqdist", multi_file=True)
            if sys.platform != "win32":
                # Python's own CFLAGS carry -Wall, whose -Wmisleading-indentation made gcc 12 spend
                # 40 of its 100 s parsing the 18 MB of generated C (measured on 2026-12-04 here).
                for ext in ext_modules:
                    ext.extra_compile_args = [*ext.extra_compile_args, "-Wno-misleading-indentation"]
                # a message read or written whole in one call (zmqdist/transport/wire.py; dlopen),
                # a message head packed in one (zmqdist/_heads.c)
                for c in native.C_SOURCES:
                    name = c.removesuffix(".c").replace("/", ".")
                    ext_modules.append(Extension(name, [c], libraries=["dl"], extra_compile_args=["-O2"]))
        except (Exception, SystemExit) as exc:  # mypyc type-checks first, and exits on an error
            if compile_required():
                raise
            sys.stderr.write(f"zmqdist: mypyc could not compile ({exc!r}): installing the pure-Python modules\n")
            write_manifest(HERE / "zmqdist", False, f"mypyc could not compile at install: {exc!r}")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
