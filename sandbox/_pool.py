"""Worker threads that run isolate slices off the event loop, and the short ones it runs itself.

A slice blocks the thread that runs it for up to one slice limit. Running slices on a small
pool of worker threads keeps the event loop responsive (quickjs-ng releases the GIL while JS
runs) and lets several runs compute at once. The pool is a FIFO-fair ``CapacityLimiter`` over
anyio's worker threads: a hostile run can hold one worker for at most one slice before every
waiting run gets its turn. An isolate runs on one thread at a time, because its run awaits
each slice before it asks for the next.

A hand-over to a worker thread and back costs more than a typical settlement (0.2-0.5 ms in
a trial, most of it waiting for the GIL while the loop is busy, against 50-100 µs of JS for
a batch of results). So ``settle_inline`` lets the event loop run a settlement itself, under
a time limit of ``INLINE_LIMIT_S``: one that runs over is undone and goes to a worker thread
after all (``Isolate.settle_within``). Such slices get at most ``INLINE_SHARE`` of the loop's
time, and ``INLINE_BURST_S`` at once, so that a crowd of busy scripts still computes on the
worker threads while the loop serves everything else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ._isolate import Isolate, Slice

__all__ = ["INLINE_LIMIT_S", "SlicePool", "SlicePoolStatistics"]

T = TypeVar("T")

#: How long a settlement run on the event loop may take before it is undone.
INLINE_LIMIT_S = 0.002
#: The share of the event loop's time that slices run on it may take, and the most at once.
INLINE_SHARE = 0.25
INLINE_BURST_S = 0.01


@dataclass(frozen=True)
class SlicePoolStatistics:
    workers: int
    running: int
    waiting: int
    slices_total: int
    slices_inline: int  # run on the event loop (settle_inline), counted in slices_total too


class SlicePool:
    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(4, os.cpu_count() or 1)
        self._limiter = anyio.CapacityLimiter(self.workers)
        self._total = 0
        self._inline = 0
        self._loop_time = _LoopTime(INLINE_SHARE, INLINE_BURST_S)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run one slice on a worker thread. Cancellation waits for the slice to end (≤ one slice)."""
        self._total += 1
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    def settle_inline(self, isolate: Isolate, results: Sequence[tuple[int, bool, Any]],
                      state: Mapping[str, Any]) -> Slice | None:
        """Settle on the calling thread, the event loop's, if the isolate may try it and the
        loop has time to spare; None if it did not (or the slice ran over ``INLINE_LIMIT_S``
        and was undone): then settle the same results with ``run``."""
        if not isolate.tries_inline or not self._loop_time.has(INLINE_LIMIT_S):
            return None
        started = time.perf_counter()
        try:
            settled = isolate.settle_within(results, state, INLINE_LIMIT_S)
        finally:
            self._loop_time.spend(time.perf_counter() - started)
        if settled is not None:
            self._total += 1
            self._inline += 1
        return settled

    def statistics(self) -> SlicePoolStatistics:
        stats = self._limiter.statistics()
        return SlicePoolStatistics(
            workers=self.workers,
            running=stats.borrowed_tokens,
            waiting=stats.tasks_waiting,
            slices_total=self._total,
            slices_inline=self._inline,
        )


class _LoopTime:
    """A token bucket of event-loop time: ``share`` of the time that passes, ``burst_s`` at most."""

    def __init__(self, share: float, burst_s: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self._share = share
        self._burst_s = burst_s
        self._clock = clock
        self._tokens = burst_s
        self._at = clock()

    def has(self, need_s: float) -> bool:
        now = self._clock()
        self._tokens = min(self._burst_s, self._tokens + (now - self._at) * self._share)
        self._at = now
        return self._tokens >= need_s

    def spend(self, spent_s: float) -> None:
        self._tokens -= spent_s
