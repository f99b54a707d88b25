"""The modules compiled with mypyc, and the check that they still match their sources.

Every agent passes through these modules on the event loop, several times: its submission,
its turn in the queue, its dispatch, its settlement and journal entry, and the script's
requests around it. ``setup.py`` compiles them into C extensions beside their sources (about
15 % less event-loop CPU per agent: ``benchmarks/PROFILING.md``, nineteenth round) and writes
a manifest of the sources it compiled. Python then imports the extension before the source.

An extension built from an older source would run that older code. So, before any of them
is imported, :func:`activate` compares each source with the manifest: if one changed (an
edit, a checkout), or an extension is missing, every compiled module loads from its source
instead, as a whole (compiled modules call each other directly, so they cannot be mixed),
and :func:`status` says why. Reinstalling (``pip install -e .``) compiles them again.
``QUICKFLOW_COMPILE=0`` at install time builds nothing; ``QUICKFLOW_PURE=1`` at run time
ignores what was built.

Standard library only: ``setup.py`` reads :data:`COMPILED` from this file before anything
else is installed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["COMPILED", "GROUP", "MANIFEST", "NativeStatus", "activate", "failed_before", "manifest", "status"]

#: Source paths, relative to the project root. None of their classes may be subclassed or
#: patched from interpreted code (mypyc's native classes): tests and plugins use the
#: uncompiled ones (``MemoryStore``, ``SimulateBackend``, ``SlicePool``, ``Isolate``).
COMPILED = (
    "runtime/calls.py",
    "runtime/dispatcher.py",
    "runtime/events.py",
    "runtime/journal.py",
    "runtime/run.py",
    "runtime/scheduling.py",
    "runtime/script.py",
    "runtime/store/_sqlite.py",
)
#: mypyc's group: the compiled modules share one library, ``runtime/_compiled__mypyc``. In the
#: package, not at the top level, so that an editable install finds it from anywhere.
GROUP = "runtime._compiled"
#: Written by ``setup.py`` beside this file: ``{"compiler": ..., "sources": {path: sha256}}``.
MANIFEST = "_native.json"

_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class NativeStatus:
    compiled: bool  # the compiled modules are the ones imported
    reason: str  # why not, or what compiled them
    modules: tuple[str, ...] = ()
    warn: bool = False  # a build that should have run compiled does not: stale, or it failed


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(compiler: str, root: Path = _ROOT, *, failed: str | None = None) -> dict[str, object]:
    """What ``setup.py`` writes for the sources of :data:`COMPILED` under ``root``, read before
    it compiles them: that they compiled, or why they did not (``failed``)."""
    written: dict[str, object] = {"compiler": compiler, "sources": {path: _digest(root / path) for path in COMPILED}}
    if failed is not None:
        written["failed"] = failed
    return written


def _read_manifest(root: Path) -> Any:
    return json.loads((root / "runtime" / MANIFEST).read_text())


def _recorded(root: Path) -> dict[str, object] | None:
    try:
        recorded = _read_manifest(root)
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def failed_before(compiler: str, root: Path = _ROOT) -> bool:
    """Whether ``compiler`` already failed on these very sources (``setup.py`` does not retry)."""
    recorded = _recorded(root)
    return (recorded is not None and "failed" in recorded and recorded.get("compiler") == compiler
            and recorded.get("sources") == manifest(compiler, root)["sources"])


def _has_extension(source: Path) -> bool:
    stem = source.with_suffix("")
    return any(stem.with_name(stem.name + suffix).exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def check(root: Path = _ROOT) -> NativeStatus:
    """Whether the extensions under ``root`` were compiled from the sources there now."""
    if os.environ.get("QUICKFLOW_PURE", "") not in ("", "0"):
        return NativeStatus(False, "QUICKFLOW_PURE is set")
    try:
        recorded = _read_manifest(root)
        sources, compiler = dict(recorded["sources"]), str(recorded["compiler"])
    except FileNotFoundError:
        return NativeStatus(False, "not compiled (installed with QUICKFLOW_COMPILE=0)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return NativeStatus(False, f"the manifest runtime/{MANIFEST} is unreadable ({exc})", warn=True)
    if "failed" in recorded:
        return NativeStatus(False, f"the install could not compile them: {recorded['failed']}", warn=True)
    if set(sources) != set(COMPILED):
        return NativeStatus(False, "they were compiled from another list of modules (another checkout?): "
                                   "reinstall to compile them again", warn=True)
    library = GROUP.replace(".", "/") + "__mypyc.py"  # a source that does not exist: its extension does
    if not _has_extension(root / library):
        return NativeStatus(False, f"the compiled modules' library {library[:-3]} is missing: reinstall to compile "
                                   "it", warn=True)
    for path in COMPILED:
        source = root / path
        if not _has_extension(source):
            return NativeStatus(False, f"{path} has no compiled extension: reinstall to compile it", warn=True)
        if sources.get(path) != _digest(source):
            return NativeStatus(False, f"{path} changed since it was compiled: reinstall to compile it again",
                                warn=True)
    return NativeStatus(True, f"compiled with {compiler}", tuple(_module_name(path) for path in COMPILED))


class _SourcesFirst(MetaPathFinder):
    """Finds the compiled modules' sources, ahead of the extensions beside them."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self._names:
            return None
        filename = fullname.rpartition(".")[2] + ".py"
        for entry in path or ():
            candidate = os.path.join(entry, filename)
            if os.path.isfile(candidate):
                return importlib.util.spec_from_file_location(fullname, candidate)
        return None


_status: NativeStatus | None = None


def activate() -> NativeStatus:
    """Check once, before any compiled module is imported; load from source if they do not match."""
    global _status
    if _status is None:
        _status = check()
        if not _status.compiled:
            # And whatever an earlier build compiled: a checkout may list fewer modules.
            earlier = (_recorded(_ROOT) or {}).get("sources")
            paths = set(COMPILED) | (set(earlier) if isinstance(earlier, dict) else set())
            sys.meta_path.insert(0, _SourcesFirst([_module_name(str(path)) for path in paths]))
        if _status.warn:
            logging.getLogger("quickflow.native").warning("running the pure-Python runtime: %s", _status.reason)
    return _status


def status() -> NativeStatus:
    """Whether this process runs the compiled modules, and why not."""
    return activate()
