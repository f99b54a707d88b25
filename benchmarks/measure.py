"""Small measuring tools shared by the scenarios: summaries of trials, percentiles, RSS, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["Figure", "git_commit", "machine_info", "percentile", "rss_bytes", "summarize"]

REPO = Path(__file__).resolve().parent.parent

#: One measured quantity: the median of ``samples`` is the figure; min/max show the spread.
Figure = dict[str, Any]

PACKAGES = ("quickflow", "quickjs-ng", "anyio", "fastapi", "uvicorn", "starlette", "sse-starlette", "httpx", "pydantic")


def summarize(samples: Sequence[float], unit: str, label: str) -> Figure:
    """The median of repeated trials with min/max, in the report's JSON shape."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError(f"no samples for {label!r}")
    return {
        "label": label,
        "unit": unit,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "samples": values,
    }


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0–100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    k = (len(ordered) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; no psutil needed)."""
    with open("/proc/self/statm") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def _runtime_build() -> str:
    from runtime._native import status

    native = status()
    return f"{native.reason} ({len(native.modules)} modules)" if native.compiled else f"pure Python: {native.reason}"


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the numbers: hardware, load, interpreter, package versions, commit."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kb = 0
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "loadavg_at_start": list(os.getloadavg()),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": git_commit(),
        "runtime": _runtime_build(),
        # Uncommitted changes to tracked files: the numbers describe the work tree, not the commit.
        # The benchmark's own output does not count: a previous run rewrote REPORT.md.
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                               ":(exclude)benchmarks/REPORT.md", ":(exclude)benchmarks/results")),
    }
