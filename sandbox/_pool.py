"""Worker threads that run isolate slices off the event loop.

A slice blocks the thread that runs it for up to one slice limit. Running slices on a small
pool of worker threads keeps the event loop responsive (quickjs-ng releases the GIL while JS
runs) and lets several runs compute at once. The pool is a FIFO-fair ``CapacityLimiter`` over
anyio's worker threads: a hostile run can hold one worker for at most one slice before every
waiting run gets its turn. An isolate runs on one thread at a time, because its run awaits
each slice before it asks for the next.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.to_thread

__all__ = ["SlicePool", "SlicePoolStatistics"]

T = TypeVar("T")


@dataclass(frozen=True)
class SlicePoolStatistics:
    workers: int
    running: int
    waiting: int
    slices_total: int


class SlicePool:
    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(4, os.cpu_count() or 1)
        self._limiter = anyio.CapacityLimiter(self.workers)
        self._total = 0

    async def run(self, fn: Callable[[], T]) -> T:
        """Run one slice on a worker thread. Cancellation waits for the slice to end (≤ one slice)."""
        self._total += 1
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    def statistics(self) -> SlicePoolStatistics:
        stats = self._limiter.statistics()
        return SlicePoolStatistics(
            workers=self.workers,
            running=stats.borrowed_tokens,
            waiting=stats.tasks_waiting,
            slices_total=self._total,
        )
