"""The event loop quickflow runs on: asyncio's, with timers that fire on time.

On Linux asyncio waits in ``epoll_wait``, which takes whole milliseconds and rounds a timeout
up: a timer due in 20.3 ms fires after 21 ms, plus the loop's own turn. Every simulated agent
latency, ``setTimeout``, retry delay and deadline is late by up to a millisecond, and a run
that waits on timers in rounds (16 agents of 50 ms, then the next 16) pays it in every round.

Here a wait with a timeout first waits on the epoll descriptor itself with ``select()``, whose
timeout has microseconds, then collects the ready events without waiting. The descriptor is
readable as soon as any registered one is ready, so I/O wakes the loop exactly as before. It
costs one more system call per wait with a timeout, and timers due within a millisecond of
each other no longer share a wake-up (10,000 timers spread over one second: 230–245 ms of CPU
against 113–138).

The service (``quickflow serve``), ``quickflow run`` and the benchmarks run on
:func:`new_event_loop`; an application embedding :class:`~runtime.Engine` may pass it to
``anyio.run(..., backend_options=run_options())`` too.
"""

from __future__ import annotations

import asyncio
import select
import selectors
from typing import Any

__all__ = ["new_event_loop", "run_options"]

# select() takes descriptors below FD_SETSIZE only (1024 with glibc). The epoll descriptor is
# one of a process's first, so this holds unless a loop is made after a thousand files are open.
_FD_SETSIZE = 1024


if hasattr(selectors, "EpollSelector"):

    class PreciseEpollSelector(selectors.EpollSelector):
        """An epoll selector whose timeouts have microseconds, not milliseconds rounded up."""

        def __init__(self) -> None:
            super().__init__()
            fd = self.fileno()
            self._waitable = [fd] if fd < _FD_SETSIZE else None

        def close(self) -> None:
            self._waitable = None  # the number may be reused by another file once closed
            super().close()

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is not None and timeout > 0 and self._waitable is not None:
                select.select(self._waitable, (), (), timeout)
                timeout = 0
            return super().select(timeout)

    def new_event_loop() -> asyncio.AbstractEventLoop:
        """An asyncio event loop whose timers fire on time (see the module docstring)."""
        return asyncio.SelectorEventLoop(PreciseEpollSelector())

else:  # kqueue (macOS, BSD) takes nanoseconds already

    def new_event_loop() -> asyncio.AbstractEventLoop:
        """An asyncio event loop (kqueue's timeouts are precise already)."""
        return asyncio.new_event_loop()


def run_options() -> dict[str, Any]:
    """``backend_options`` for ``anyio.run``: asyncio on :func:`new_event_loop`."""
    return {"loop_factory": new_event_loop}
