"""The compiled hot path (runtime/_native.py): extensions run only while they match their sources."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import runtime.run
from runtime import _native
from runtime._native import COMPILED, GROUP, MANIFEST, check

PROJECT = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _tree(root: Path, *, manifest: bool = True, extensions: bool = True) -> Path:
    """A copy of the compiled modules' sources under ``root``, as an install would leave them."""
    for path in COMPILED:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT / path, target)
        if extensions:
            target.with_name(target.stem + SUFFIX).write_bytes(b"not loaded by check()")
    if extensions:
        (root / (GROUP.replace(".", "/") + "__mypyc" + SUFFIX)).write_bytes(b"the modules' shared library")
    if manifest:
        (root / "runtime" / MANIFEST).write_text(json.dumps(_native.manifest("mypyc test", root)))
    return root


def test_extensions_built_from_these_sources_are_used(tmp_path: Path) -> None:
    status = check(_tree(tmp_path))
    assert status.compiled and not status.warn
    assert status.reason == "compiled with mypyc test"
    assert status.modules == tuple(path.removesuffix(".py").replace("/", ".") for path in COMPILED)


def test_an_install_that_compiled_nothing_runs_the_sources_quietly(tmp_path: Path) -> None:
    status = check(_tree(tmp_path, manifest=False, extensions=False))
    assert not status.compiled and not status.warn
    assert status.reason == "not compiled (installed with QUICKFLOW_COMPILE=0)"


def test_a_source_edited_after_the_build_runs_every_module_from_source(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    edited = root / "runtime" / "journal.py"
    edited.write_text(edited.read_text() + "\n# edited\n")
    status = check(root)
    assert not status.compiled and status.warn
    assert status.reason == "runtime/journal.py changed since it was compiled: reinstall to compile it again"


def test_a_missing_extension_runs_every_module_from_source(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "runtime" / ("scheduling" + SUFFIX)).unlink()
    status = check(root)
    assert not status.compiled and status.warn
    assert "runtime/scheduling.py has no compiled extension" in status.reason


def test_a_missing_shared_library_runs_every_module_from_source(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / (GROUP.replace(".", "/") + "__mypyc" + SUFFIX)).unlink()
    status = check(root)
    assert not status.compiled and status.warn
    assert "runtime/_compiled__mypyc is missing" in status.reason


def test_the_runtime_imports_from_another_directory(tmp_path: Path) -> None:
    # As the `quickflow` command does: the project directory is not on sys.path, only the
    # install's own path entries, which must lead to the compiled modules' library too.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import runtime.run; from runtime._native import status; print(status().compiled)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(_native.status().compiled)


def test_a_failed_compile_is_reported_and_not_retried_on_the_same_sources(tmp_path: Path) -> None:
    root = _tree(tmp_path, manifest=False)
    (root / "runtime" / MANIFEST).write_text(json.dumps(_native.manifest("mypyc test", root, failed="no cc")))
    status = check(root)
    assert not status.compiled and status.warn
    assert status.reason == "the install could not compile them: no cc"
    assert _native.failed_before("mypyc test", root)
    assert not _native.failed_before("mypyc other", root)
    edited = root / "runtime" / "run.py"
    edited.write_text(edited.read_text() + "\n# edited\n")
    assert not _native.failed_before("mypyc test", root)  # new sources: worth another try


def test_extensions_of_another_list_of_modules_are_not_used(tmp_path: Path) -> None:
    # A checkout whose list differs from the one its extensions were compiled from.
    root = _tree(tmp_path, manifest=False)
    recorded = _native.manifest("mypyc test", root)
    sources = recorded["sources"]
    assert isinstance(sources, dict)
    sources["runtime/engine.py"] = "0" * 64
    (root / "runtime" / MANIFEST).write_text(json.dumps(recorded))
    status = check(root)
    assert not status.compiled and status.warn and "another list of modules" in status.reason


def test_an_unreadable_manifest_is_reported(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "runtime" / MANIFEST).write_text("{not json")
    status = check(root)
    assert not status.compiled and "unreadable" in status.reason


def test_quickflow_pure_ignores_what_was_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUICKFLOW_PURE", "1")
    status = check(_tree(tmp_path))
    assert not status.compiled and status.reason == "QUICKFLOW_PURE is set"


def test_the_finder_loads_a_source_ahead_of_the_extension_beside_it(tmp_path: Path) -> None:
    package = tmp_path / "qf_native_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "hot.py").write_text("WHERE = 'source'\n")
    (package / ("hot" + SUFFIX)).write_bytes(b"an extension built from an older source")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ImportError):  # the extension comes first, as Python finds them
            importlib.import_module("qf_native_probe.hot")
        finder = _native._SourcesFirst(["qf_native_probe.hot"])
        sys.meta_path.insert(0, finder)
        try:
            assert importlib.import_module("qf_native_probe.hot").WHERE == "source"
        finally:
            sys.meta_path.remove(finder)
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("qf_native_probe.hot", "qf_native_probe"):
            sys.modules.pop(name, None)


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI compiles on install; a work tree may be edited since")
def test_ci_runs_the_suite_on_the_compiled_modules() -> None:
    status = _native.status()
    assert status.compiled, status.reason
    assert runtime.run.__file__ is not None and runtime.run.__file__.endswith(SUFFIX)
