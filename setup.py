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
PLACEHOLDER = [Extension("quickflow__mypyc", sources=[])]


def _warn(what: str, exc: BaseException) -> None:
    print(f"warning: quickflow's compiled modules {what} ({exc}); installing pure Python", file=sys.stderr)


class CompileHotPath(build_ext):
    """Generates the C code only when extensions are built (setup.py also runs for metadata),
    builds every compiled module or none, and records which sources they were built from."""

    def finalize_options(self) -> None:
        if self.distribution.ext_modules is PLACEHOLDER:  # once per process
            metadata_only = {"egg_info", "dist_info"} & set(sys.argv)
            self.distribution.ext_modules = [] if metadata_only else self._generate()
        super().finalize_options()

    def _generate(self) -> list[Extension]:
        if os.environ.get("QUICKFLOW_COMPILE", "1") == "0":
            MANIFEST.unlink(missing_ok=True)
            return []
        editable = getattr(self, "editable_mode", False) or "editable_wheel" in sys.argv
        if editable and NATIVE["check"](ROOT).compiled:
            return []  # compiled from these very sources already
        MANIFEST.unlink(missing_ok=True)
        try:
            from mypyc.build import mypycify

            return mypycify([*MYPY_FLAGS, *NATIVE["COMPILED"]], group_name=NATIVE["GROUP"], opt_level="3")
        except (Exception, SystemExit) as exc:  # mypyc missing, or refusing a module
            _warn("cannot be generated", exc)
            return []

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # no compiler, a failed compile: pure Python works the same
            _warn("were not built", exc)
            self.extensions = self.distribution.ext_modules = []
            return
        import mypy.version

        text = json.dumps(NATIVE["manifest"](f"mypyc {mypy.version.__version__}", ROOT), indent=1) + "\n"
        MANIFEST.write_text(text)  # an editable install reads it here
        if not self.inplace:  # a wheel: beside the modules it packs
            target = Path(self.build_lib) / "runtime" / MANIFEST.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


setup(ext_modules=PLACEHOLDER, cmdclass={"build_ext": CompileHotPath})
