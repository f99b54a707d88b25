"""The isolate: the only package that imports ``quickjs``.

- :func:`check_script` runs the static checks of a script before any run is accepted.
- :class:`Isolate` is one hardened QuickJS context per run, driven slice by slice through a
  data-only outbox; :class:`SlicePool` runs slices on worker threads. A waiting script's
  context can be evicted and rebuilt by replay; :func:`release_freed_memory` returns the
  memory of evicted contexts to the OS.
"""

from ._checks import CheckResult, PhaseSpec, ScriptMeta, check_script
from ._isolate import (
    Isolate,
    IsolateLimits,
    Request,
    ScriptFailure,
    Slice,
    prepare_spare_isolate,
    spare_isolates_wanted,
)
from ._memory import evictions_total, release_freed_memory
from ._pool import SliceOverrun, SlicePool, SlicePoolStatistics, SliceRefused
from ._source import Diagnostic

__all__ = [
    "CheckResult",
    "Diagnostic",
    "Isolate",
    "IsolateLimits",
    "PhaseSpec",
    "Request",
    "ScriptFailure",
    "ScriptMeta",
    "Slice",
    "SliceOverrun",
    "SlicePool",
    "SlicePoolStatistics",
    "SliceRefused",
    "check_script",
    "evictions_total",
    "prepare_spare_isolate",
    "release_freed_memory",
    "spare_isolates_wanted",
]
