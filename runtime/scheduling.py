"""A capacity limiter that hands free slots to the most urgent waiter, not the oldest.

The dispatcher's server-wide agent limit: ``try_acquire`` takes a free slot without awaiting
(the common case costs no task switch), and waiters are served by priority, FIFO among equals.
Priorities are tuples; smaller is more urgent. (A run orders its own calls in its queue; see
``runtime.run``.)
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

import anyio

__all__ = ["PriorityLimiter", "PriorityLimiterStatistics"]


@dataclass(frozen=True)
class PriorityLimiterStatistics:
    total_tokens: int
    borrowed_tokens: int
    tasks_waiting: int


@dataclass(order=True)
class _Waiter:
    priority: tuple[Any, ...]
    seq: int
    event: anyio.Event = field(compare=False)
    granted: bool = field(default=False, compare=False)
    abandoned: bool = field(default=False, compare=False)


class PriorityLimiter:
    def __init__(self, total_tokens: int) -> None:
        self.total_tokens = total_tokens
        self._borrowed = 0
        self._waiting: list[_Waiter] = []
        self._abandoned = 0
        self._seq = itertools.count()

    def try_acquire(self) -> bool:
        """Take a free slot without waiting, if one is free and nobody waits for it."""
        if self._borrowed < self.total_tokens and len(self._waiting) == self._abandoned:
            self._borrowed += 1
            return True
        return False

    async def acquire(self, priority: tuple[Any, ...] = ()) -> None:
        if self.try_acquire():
            return
        waiter = _Waiter(priority, next(self._seq), anyio.Event())
        heapq.heappush(self._waiting, waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()  # handed a slot while being cancelled: pass it on
            else:
                waiter.abandoned = True
                self._abandoned += 1
            raise

    def release(self) -> None:
        """Give the slot to the most urgent waiter, or return it."""
        while self._waiting:
            waiter = heapq.heappop(self._waiting)
            if waiter.abandoned:
                self._abandoned -= 1
                continue
            waiter.granted = True
            waiter.event.set()
            return
        self._borrowed -= 1

    def statistics(self) -> PriorityLimiterStatistics:
        return PriorityLimiterStatistics(
            total_tokens=self.total_tokens,
            borrowed_tokens=self._borrowed,
            tasks_waiting=len(self._waiting) - self._abandoned,
        )
