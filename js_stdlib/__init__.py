"""JavaScript that runs inside the isolate: the hardening pass, the prelude (the script globals)."""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["hardening", "prelude"]


@cache
def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def hardening() -> str:
    """Removes dangerous globals, installs the determinism shims, freezes the intrinsics."""
    return _read("hardening.js")


def prelude() -> str:
    """Defines agent(), parallel(), pipeline() and the other globals; leaves the host handle behind."""
    return _read("prelude.js")
