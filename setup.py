"""Compiles the runtime's hot path with mypyc (see runtime/_native.py); the rest is pyproject.toml.

``QUICKFLOW_COMPILE=0 pip install -e .`` installs pure Python. So does a machine without a C
compiler, with a warning: the runtime is the same, only slower. An editable install whose
extensions were compiled from the sources as they are now compiles nothing again.
"""

import json
import os
import runpy
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NATIVE = runpy.run_path(str(ROOT / "runtime" / "_native.py"))
MANIFEST = ROOT / "runtime" / NATIVE["MANIFEST"]
# The build environment has mypy but not quickflow's dependencies, whose types are then Any:
# strict mode would refuse that, so these checks stay with `mypy` in the dev environment.
MYPY_FLAGS = ["--allow-subclassing-any", "--allow-untyped-decorators", "--no-warn-return-any",
              "--no-warn-unused-ignores", "--follow-imports=silent"]


# Replaced by the generated extensions when build_ext is set up; meanwhile it makes the wheel
# platform-specific and build_ext run.
PLACEHOLDER = [Extension(NATIVE["GROUP"] + "__mypyc", sources=[])]


def _short(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 100 else text[:100] + "…"


def _warn(what: str, exc: BaseException) -> None:
    print(f"warning: quickflow's compiled modules {what} ({exc}); installing pure Python", file=sys.stderr)


class CompileHotPath(build_ext):
    """Generates the C code only when extensions are built (setup.py also runs for metadata),
    builds every compiled module or none, and records which sources they were built from: read
    before mypyc reads them, so an edit made during the build makes the build stale."""

    _manifest: dict | None = None

    def finalize_options(self) -> None:
        if self.distribution.ext_modules is PLACEHOLDER:  # once per process
            metadata_only = {"egg_info", "dist_info"} & set(sys.argv)
            self.distribution.ext_modules = [] if metadata_only else self._generate()
        super().finalize_options()

    def _in_tree(self) -> bool:
        """An editable install: the extensions go beside the sources, and so does the manifest.
        A wheel leaves the work tree's manifest alone: it describes the extensions there."""
        return bool(getattr(self, "editable_mode", False) or "editable_wheel" in sys.argv or self.inplace)

    def _generate(self) -> list[Extension]:
        if os.environ.get("QUICKFLOW_COMPILE", "1") == "0":
            if self._in_tree():
                MANIFEST.unlink(missing_ok=True)
            return []
        try:
            import mypy.version
            from mypyc.build import mypycify
        except ImportError as exc:
            _warn("cannot be generated", exc)
            return []
        compiler = f"mypyc {mypy.version.__version__}"
        if self._in_tree():
            status = NATIVE["check"](ROOT)
            if status.compiled and status.reason == f"compiled with {compiler}":
                return []  # compiled from these very sources, by this compiler, already
            if NATIVE["failed_before"](compiler, ROOT):
                return []  # and it would fail again (runtime._native warns at start)
            MANIFEST.unlink(missing_ok=True)
        self._manifest = NATIVE["manifest"](compiler, ROOT)
        try:
            return mypycify([*MYPY_FLAGS, *NATIVE["COMPILED"]], group_name=NATIVE["GROUP"], opt_level="3")
        except (Exception, SystemExit) as exc:  # mypyc refusing a module
            self._record(failed=f"mypyc: {_short(exc)}")
            _warn("cannot be generated", exc)
            return []

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # no compiler, a failed compile: pure Python works the same
            self._record(failed=f"the C compiler: {_short(exc)}")
            _warn("were not built", exc)
            self.extensions = self.distribution.ext_modules = []
            return
        self._record()

    def _record(self, failed: str | None = None) -> None:
        assert self._manifest is not None
        written = dict(self._manifest, **({"failed": failed} if failed else {}))
        text = json.dumps(written, indent=1) + "\n"
        if self._in_tree():
            MANIFEST.write_text(text)
        elif failed is None:  # a wheel: beside the modules it packs
            target = Path(self.build_lib) / "runtime" / MANIFEST.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


setup(ext_modules=PLACEHOLDER, cmdclass={"build_ext": CompileHotPath})
